"""Korean shop vocabulary for the replica's invented names, brands, nicknames and comments."""
from __future__ import annotations

import random

BRANDS = ["오늘가구", "하루공방", "누리홈", "바른리빙", "소담하우스", "온새미로", "다온리빙", "라움",
          "마루앤", "포근상점", "나무결", "한결리빙", "모노하우스", "보금자리", "새봄홈", "도담",
          "아띠리빙", "리브앤", "숲속공방", "별빛가구"]

PRODUCT_NOUNS = {
    "침대": ["원목 침대 프레임", "수납 침대", "저상형 침대", "패밀리 침대", "호텔형 침대", "라텍스 침대"],
    "매트리스/토퍼": ["포켓스프링 매트리스", "메모리폼 토퍼", "라텍스 매트리스", "접이식 토퍼",
                  "하이브리드 매트리스"],
    "테이블": ["원목 식탁", "접이식 테이블", "소파 테이블", "원형 티테이블", "확장형 식탁"],
    "행거": ["스탠드 행거", "이동식 행거", "시스템 행거", "원목 옷걸이 행거", "드레스룸 행거"],
    "서랍장": ["5단 서랍장", "와이드 서랍장", "원목 수납장", "틈새 서랍장", "화장대 서랍장"],
    "그릇": ["도자기 접시 세트", "파스타 볼", "면기 세트", "유리 디저트 볼", "스톤웨어 식기"],
}
GENERIC_NOUNS = ["수납함", "쿠션", "러그", "스탠드 조명", "선반", "바구니"]
ADJECTIVES = ["모던", "내추럴", "북유럽", "심플", "프리미엄", "베이직", "클래식", "미니멀", "빈티지",
              "코지"]
OPTIONS = ["색상: 화이트", "색상: 내추럴", "색상: 그레이", "색상: 월넛", "사이즈: 슈퍼싱글",
           "사이즈: 퀸", "사이즈: 킹", "구성: 2인 세트", "구성: 단품", "색상: 베이지 / 사이즈: 퀸"]

NICK_FIRST = ["행복한", "졸린", "부지런한", "느긋한", "반짝이는", "따뜻한", "조용한", "씩씩한", "엉뚱한",
              "포근한"]
NICK_SECOND = ["고양이", "집순이", "자취생", "신혼부부", "곰돌이", "살림꾼", "토끼", "여행자", "새댁",
               "인테리어러버"]

COMMENT_OPENINGS = ["배송이 생각보다 빨랐어요.", "사진보다 실물이 훨씬 예뻐요.", "고민하다가 구매했는데",
                    "두 번째 구매입니다.", "가격 대비 만족스러워요.", "선물용으로 샀어요.",
                    "조립이 어렵지 않았어요.", "색감이 화면이랑 거의 같아요."]
COMMENT_MIDDLES = ["마감도 깔끔하고 튼튼해요.", "집 분위기랑 잘 어울려요.", "크기가 딱 적당해요.",
                   "냄새도 거의 안 나요.", "조금 작은 느낌이지만 괜찮아요.", "포장이 꼼꼼했어요.",
                   "생각했던 것보다 무게감이 있어요.", "매일 잘 쓰고 있어요."]
COMMENT_CLOSINGS = ["추천합니다!", "재구매 의사 있어요.", "잘 쓸게요~", "만족합니다.",
                    "다른 색상도 사고 싶어요.", "별 다섯 개 드려요.", "아쉬운 점은 없어요.", ""]
LOW_STAR_REMARKS = ["다만 마감이 조금 아쉬워요.", "배송 중에 살짝 찍혀서 왔어요.",
                    "생각보다 색이 어두워요."]


def product_name(rng: random.Random, category_title: str) -> str:
    nouns = PRODUCT_NOUNS.get(category_title, GENERIC_NOUNS)
    return f"{rng.choice(ADJECTIVES)} {rng.choice(nouns)} {rng.choice('ABCDEFGHJK')}{rng.randint(1, 9)}"


def nickname(rng: random.Random) -> str:
    suffix = str(rng.randint(1, 999)) if rng.random() < 0.6 else ""
    return f"{rng.choice(NICK_FIRST)}{rng.choice(NICK_SECOND)}{suffix}"


def comment(rng: random.Random, stars: int) -> str:
    parts = [rng.choice(COMMENT_OPENINGS), rng.choice(COMMENT_MIDDLES)]
    if stars <= 3:
        parts.append(rng.choice(LOW_STAR_REMARKS))
    parts.append(rng.choice(COMMENT_CLOSINGS))
    return " ".join(p for p in parts if p)
