"""The one place where shoplens reads its configuration.

Every setting comes from an environment variable (``SHOPLENS_<NAME>``) with an embedded default
that points at the local replica shop and the local S3 server that ``make demo`` starts. Pointing
the pipeline at the real shop or a real MinIO is a change of these variables, never of code.
Airflow tasks build a :class:`Settings` from the environment and then apply the DAG run's Params
on top with :meth:`Settings.with_overrides`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

# Category id -> display name. Ids are the shop's 8-digit category ids (see docs/target-site notes).
DEFAULT_CATEGORIES: dict[str, str] = {
    "10120000": "침대",
    "10130000": "매트리스/토퍼",
    "10150000": "테이블",
    "13020000": "행거",
    "13050000": "서랍장",
    "16220000": "그릇",
}


def _env(name: str, default: str) -> str:
    return os.environ.get(f"SHOPLENS_{name}", default)


def _env_int(name: str, default: int) -> int:
    raw = _env(name, str(default))
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"SHOPLENS_{name} must be an integer, got {raw!r}") from exc


def _env_float(name: str, default: float) -> float:
    raw = _env(name, str(default))
    try:
        return float(raw)
    except ValueError as exc:
        raise ConfigError(f"SHOPLENS_{name} must be a number, got {raw!r}") from exc


def _env_bool(name: str, default: bool) -> bool:
    raw = _env(name, "1" if default else "0").strip().lower()
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"SHOPLENS_{name} must be a boolean (1/0/true/false), got {raw!r}")


def _env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(f"SHOPLENS_{name}")
    if raw is None:
        return list(default)
    return [item.strip() for item in raw.split(",") if item.strip()]


class ConfigError(ValueError):
    """A setting has a value shoplens cannot use."""


@dataclass(frozen=True)
class Settings:
    # --- the shop (or its replica) -------------------------------------------------------------
    shop_base_url: str = "http://127.0.0.1:8611"
    # Hosts (host or host:port) the crawler may fetch from; the shop's own host is always allowed.
    allowed_hosts: tuple[str, ...] = ("127.0.0.1:8612",)
    categories: tuple[str, ...] = tuple(DEFAULT_CATEGORIES)
    best_n: int = 20
    photo_cap_per_product: int = 1000
    # Query string asking the image CDN for one fixed size, so a photo is never stored at two sizes.
    image_params: str = "w=1280&h=1280"
    reviews_per_page: int = 20
    # --- politeness ----------------------------------------------------------------------------
    user_agent: str = "shoplens/0.1 (+https://github.com/shoplens/shoplens; dataset research crawler)"
    download_delay: float = 0.4
    concurrent_per_host: int = 4
    autothrottle: bool = True
    obey_robots: bool = True
    download_timeout: float = 20.0
    retry_times: int = 3
    retry_after_cap: float = 60.0
    max_image_pixels: int = 40_000_000
    max_image_bytes: int = 20_000_000
    # --- object store --------------------------------------------------------------------------
    s3_endpoint: str = "127.0.0.1:8333"
    s3_access_key: str = "shoplens"
    s3_secret_key: str = "shoplens-secret"
    s3_secure: bool = False
    s3_bucket: str = "shoplens"
    s3_region: str = "us-east-1"
    # --- manifest ------------------------------------------------------------------------------
    manifest_url: str = "postgresql+psycopg2://postgres@127.0.0.1:5432/shoplens"
    # --- browser -------------------------------------------------------------------------------
    chromium_path: str = "/usr/bin/chromium"
    # --- free-form extras for later stages (JSON object in SHOPLENS_EXTRA) -----------------------
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> "Settings":
        d = cls()
        extra_raw = os.environ.get("SHOPLENS_EXTRA", "{}")
        try:
            extra = json.loads(extra_raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"SHOPLENS_EXTRA must be a JSON object: {exc}") from exc
        settings = cls(
            shop_base_url=_env("SHOP_BASE_URL", d.shop_base_url).rstrip("/"),
            allowed_hosts=tuple(_env_list("ALLOWED_HOSTS", list(d.allowed_hosts))),
            categories=tuple(_env_list("CATEGORIES", list(d.categories))),
            best_n=_env_int("BEST_N", d.best_n),
            photo_cap_per_product=_env_int("PHOTO_CAP", d.photo_cap_per_product),
            image_params=_env("IMAGE_PARAMS", d.image_params),
            reviews_per_page=_env_int("REVIEWS_PER_PAGE", d.reviews_per_page),
            user_agent=_env("USER_AGENT", d.user_agent),
            download_delay=_env_float("DOWNLOAD_DELAY", d.download_delay),
            concurrent_per_host=_env_int("CONCURRENT_PER_HOST", d.concurrent_per_host),
            autothrottle=_env_bool("AUTOTHROTTLE", d.autothrottle),
            obey_robots=_env_bool("OBEY_ROBOTS", d.obey_robots),
            download_timeout=_env_float("DOWNLOAD_TIMEOUT", d.download_timeout),
            retry_times=_env_int("RETRY_TIMES", d.retry_times),
            retry_after_cap=_env_float("RETRY_AFTER_CAP", d.retry_after_cap),
            max_image_pixels=_env_int("MAX_IMAGE_PIXELS", d.max_image_pixels),
            max_image_bytes=_env_int("MAX_IMAGE_BYTES", d.max_image_bytes),
            s3_endpoint=_env("S3_ENDPOINT", d.s3_endpoint),
            s3_access_key=_env("S3_ACCESS_KEY", d.s3_access_key),
            s3_secret_key=_env("S3_SECRET_KEY", d.s3_secret_key),
            s3_secure=_env_bool("S3_SECURE", d.s3_secure),
            s3_bucket=_env("S3_BUCKET", d.s3_bucket),
            s3_region=_env("S3_REGION", d.s3_region),
            manifest_url=_env("MANIFEST_URL", d.manifest_url),
            chromium_path=_env("CHROMIUM_PATH", d.chromium_path),
            extra=extra,
        )
        settings.validate()
        return settings

    def with_overrides(self, **overrides: Any) -> "Settings":
        """A copy with some fields replaced (e.g. from Airflow Params); ``None`` values are ignored."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown setting(s): {sorted(unknown)}")
        clean = {k: v for k, v in overrides.items() if v is not None}
        for key in ("categories", "allowed_hosts"):
            if key in clean:
                value = clean[key]
                if isinstance(value, str):
                    value = [v.strip() for v in value.split(",") if v.strip()]
                clean[key] = tuple(str(v) for v in value)
        if "shop_base_url" in clean:
            clean["shop_base_url"] = str(clean["shop_base_url"]).rstrip("/")
        new = dataclasses.replace(self, **clean)
        new.validate()
        return new

    def validate(self) -> None:
        if not self.shop_base_url.startswith(("http://", "https://")):
            raise ConfigError(f"shop_base_url must be an http(s) URL, got {self.shop_base_url!r}")
        if not self.categories:
            raise ConfigError("at least one category is required")
        for cat in self.categories:
            if not cat.isdigit():
                raise ConfigError(f"category ids are digits (e.g. 10120000), got {cat!r}")
        if self.best_n < 1:
            raise ConfigError(f"best_n must be >= 1, got {self.best_n}")
        if self.photo_cap_per_product < 1:
            raise ConfigError(f"photo_cap_per_product must be >= 1, got {self.photo_cap_per_product}")
        if self.concurrent_per_host < 1:
            raise ConfigError("concurrent_per_host must be >= 1")
        if self.download_delay < 0:
            raise ConfigError("download_delay must be >= 0")

    def public_dict(self) -> dict[str, Any]:
        """Settings without secrets, for run provenance rows and logs."""
        d = dataclasses.asdict(self)
        d["s3_secret_key"] = "***"
        d["categories"] = list(self.categories)
        d["allowed_hosts"] = list(self.allowed_hosts)
        return d
