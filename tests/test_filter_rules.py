"""The filter's rules as pure functions of stored features and thresholds (no model needed)."""
from __future__ import annotations

import dataclasses

import pytest
from PIL import Image

from dataset.filter import rules
from dataset.filter.occupancy import image_statistics
from shoplens.config import Settings

PLAIN_STUDIO = {"border_plain": 1.0, "fg_extent": 0.8, "fg_fill": 0.4, "luma_std": 40.0}
CLUTTERED = {"border_plain": 0.3, "fg_extent": 0.95, "fg_fill": 0.7, "luma_std": 50.0}
P = rules.RuleParams()


def box(label, score, x1, y1, x2, y2):
    return {"label": label, "score": score, "box": [x1, y1, x2, y2]}


def features(boxes, stats=CLUTTERED, width=1000, height=1000, category=None):
    return rules.Features(width, height, boxes, stats, category)


def decision(f, rule, params=P):
    return next(d for d in rules.decide(f, params) if d.rule == rule)


def test_a_bunch_of_bananas_is_one_product():
    bunch = [box("banana", 0.8, 100 + 60 * i, 200, 400 + 60 * i, 700) for i in range(6)]
    f = features(bunch)
    assert rules.count_products(f, P) == 1
    assert decision(f, "multi_product").passed


def test_a_pile_of_produce_the_detector_names_apple_and_orange_is_one_product():
    pile = [box("apple", 0.6, 0, 0, 300, 300), box("orange", 0.5, 400, 400, 700, 700)]
    assert rules.count_products(features(pile), P) == 1


def test_bed_and_chair_are_two_products_and_rejected():
    room = [box("bed", 0.8, 0, 400, 600, 900), box("chair", 0.7, 700, 500, 900, 900)]
    d = decision(features(room), "multi_product")
    assert not d.passed and d.score == 2.0 and "2 products" in d.reason


def test_one_object_named_both_chair_and_couch_is_one_product():
    armchair = [box("chair", 0.6, 100, 100, 800, 900), box("couch", 0.5, 120, 110, 820, 880)]
    assert rules.count_products(features(armchair), P) == 1


def test_people_never_count_even_when_configured():
    params = dataclasses.replace(P, product_classes={"*": ("person", "bowl")})
    f = features([box("bowl", 0.9, 0, 0, 800, 800), box("person", 0.9, 500, 0, 1000, 1000)])
    assert rules.count_products(f, params) == 1


def test_weak_or_tiny_boxes_do_not_count_as_a_second_product():
    f = features([box("bed", 0.9, 0, 0, 900, 900), box("chair", 0.1, 0, 0, 100, 100),
                  box("cup", 0.9, 0, 0, 10, 10)])
    assert rules.count_products(f, P) == 1


def test_category_mapping_decides_which_classes_are_products():
    f = features([box("bowl", 0.9, 0, 0, 600, 600), box("dining table", 0.8, 0, 500, 1000, 1000)],
                 category="16220000")
    assert rules.count_products(f, P) == 2
    bowls_only = dataclasses.replace(P, product_classes={"16220000": ("bowl", "cup")})
    assert rules.count_products(f, bowls_only) == 1


def test_in_a_cluttered_room_a_weak_second_piece_of_furniture_counts():
    # A bed the detector is sure of and a couch it is not (0.15 <= score < 0.25): a room.
    room = [box("bed", 0.8, 0, 300, 600, 1000), box("couch", 0.18, 650, 500, 1000, 900)]
    d = decision(features(room), "multi_product")
    assert not d.passed and d.score == 2.0
    # The same boxes on a studio backdrop: the weak couch is noise there, as in rules-2.
    assert decision(features(room, stats=PLAIN_STUDIO), "multi_product").passed
    # Below scene_min_score, or not furniture (a weak bottle beside produce), it still does not count.
    fainter = [room[0], box("couch", 0.1, 650, 500, 1000, 900)]
    assert rules.count_products(features(fainter), P) == 1
    apples = [box("apple", 0.8, 0, 0, 900, 900), box("bottle", 0.2, 900, 0, 1000, 300)]
    assert rules.count_products(features(apples), P) == 1


def test_several_separate_chairs_in_a_cluttered_photo_are_a_room_but_a_set_on_a_backdrop_is_one():
    chairs = [box("chair", 0.7, 20 + 240 * i, 400, 220 + 240 * i, 800) for i in range(4)]
    d = decision(features(chairs), "multi_product")
    assert not d.passed and d.score == 4.0
    assert rules.count_products(features(chairs, stats=PLAIN_STUDIO), P) == 1
    # Two chairs are still a pair (below scene_repeats), and one chair boxed three times over
    # itself is one chair.
    assert rules.count_products(features(chairs[:2]), P) == 1
    one = [box("chair", 0.7, 100, 100, 800, 900), box("chair", 0.6, 120, 90, 820, 880),
           box("chair", 0.5, 90, 120, 790, 910)]
    assert rules.count_products(features(one), P) == 1


def test_a_cluttered_photo_whose_main_product_is_small_is_a_room_scene():
    # One bed over 15 % of a cluttered frame: a bedroom, rejected as multi-product.
    bedroom = [box("bed", 0.8, 0, 500, 500, 800)]
    d = decision(features(bedroom), "multi_product")
    assert not d.passed and d.score == 1.0 and "room scene" in d.reason and "15%" in d.reason
    # The same bed filling the frame is one product; on a backdrop the share is not a room signal.
    assert decision(features([box("bed", 0.8, 0, 200, 1000, 900)]), "multi_product").passed
    assert decision(features(bedroom, stats=PLAIN_STUDIO), "multi_product").passed
    # Nothing detected: no main product, no room scene (the occupancy rule decides that case).
    assert decision(features([]), "multi_product").passed


def test_scene_steps_switched_off_give_the_rules_2_count():
    rules_2 = dataclasses.replace(P, scene_min_score=P.min_score, scene_repeats=0, scene_max_share=0.0)
    weak_couch = [box("bed", 0.8, 0, 300, 600, 1000), box("couch", 0.18, 650, 500, 1000, 900)]
    chairs = [box("chair", 0.7, 20 + 240 * i, 400, 220 + 240 * i, 800) for i in range(4)]
    bedroom = [box("bed", 0.8, 0, 500, 500, 800)]
    for boxes in (weak_couch, chairs, bedroom):
        assert decision(features(boxes), "multi_product", rules_2).passed
        assert not decision(features(boxes), "multi_product").passed


def test_occupancy_on_a_plain_background_is_the_foreground_extent():
    d = decision(features([], stats=PLAIN_STUDIO), "occupancy")
    assert d.passed and d.score == 0.8
    small = dict(PLAIN_STUDIO, fg_extent=0.2)
    d = decision(features([box("chair", 0.9, 0, 0, 1000, 1000)], stats=small), "occupancy")
    assert not d.passed and d.score == 0.2 and "20%" in d.reason


def test_occupancy_in_a_cluttered_scene_is_the_main_products_largest_box():
    f = features([box("chair", 0.9, 0, 0, 500, 400), box("chair", 0.9, 0, 0, 100, 100)])
    d = decision(f, "occupancy")
    assert d.score == 0.2 and not d.passed
    assert decision(f, "occupancy", dataclasses.replace(P, min_occupancy=0.15)).passed


def test_the_main_product_is_the_most_confident_one_not_the_biggest_box():
    # A small chair the detector is sure of, in front of a bed it is unsure of: the photo is
    # about the chair, which covers 10 % of it.
    f = features([box("bed", 0.4, 0, 0, 1000, 700), box("chair", 0.9, 600, 600, 900, 933)])
    d = decision(f, "occupancy")
    assert d.score == pytest.approx(0.1, abs=0.001) and not d.passed


def test_a_pile_of_produce_covers_the_extent_of_all_its_fruit():
    pile = [box("apple", 0.7, 0, 0, 250, 250), box("orange", 0.6, 700, 700, 1000, 1000),
            box("apple", 0.5, 400, 100, 600, 300)]
    d = decision(features(pile), "occupancy")
    assert d.passed and d.score == 1.0
    # Not for other kinds: two chairs far apart are measured by the bigger one.
    chairs = [box("chair", 0.7, 0, 0, 250, 250), box("chair", 0.6, 700, 700, 1000, 1000)]
    assert decision(features(chairs), "occupancy").score == 0.09


def test_a_fridge_or_bowl_holding_the_product_is_not_a_second_product():
    fridge = box("refrigerator", 0.9, 0, 0, 1000, 1000)
    carton = box("bottle", 0.6, 300, 100, 700, 900)
    f = features([fridge, carton])
    assert rules.count_products(f, P) == 1
    assert decision(f, "occupancy").score == 0.32  # the carton, not the fridge around it
    fruit_bowl = [box("bowl", 0.5, 0, 200, 1000, 1000), box("orange", 0.8, 100, 300, 500, 700),
                  box("orange", 0.7, 500, 300, 900, 700)]
    assert rules.count_products(features(fruit_bowl), P) == 1
    # A holder beside the product, or one that is not a holder class, still counts.
    beside = box("refrigerator", 0.9, 0, 0, 400, 1000)
    assert rules.count_products(features([beside, carton]), P) == 2
    bed = box("bed", 0.9, 0, 0, 1000, 1000)
    assert rules.count_products(features([bed, carton]), P) == 2
    # A holder-class box that is the product under another name is that product, not its holder.
    bench_or_chair = [box("bench", 0.7, 0, 0, 1000, 600), box("chair", 0.5, 100, 0, 1000, 600)]
    assert rules.product_boxes(features(bench_or_chair), P) == bench_or_chair
    assert rules.count_products(features(bench_or_chair), P) == 1
    # How much of the product must lie within the holder is a threshold.
    half_inside = box("refrigerator", 0.9, 0, 0, 500, 1000)
    assert rules.count_products(features([half_inside, carton]), P) == 2
    loose = dataclasses.replace(P, holder_inside=0.4)
    assert rules.count_products(features([half_inside, carton]), loose) == 1


def test_occupancy_unknown_follows_the_configured_verdict():
    f = features([])
    assert decision(f, "occupancy").passed and decision(f, "occupancy").score is None
    strict = dataclasses.replace(P, occupancy_when_unknown="reject")
    assert not decision(f, "occupancy", strict).passed


def test_quality_rules_small_aspect_blank():
    assert not decision(features([], width=200, height=300), "too_small").passed
    assert decision(features([], width=224, height=300), "too_small").passed
    d = decision(features([], width=3100, height=1000), "aspect_ratio")
    assert not d.passed and d.score == 3.1
    assert not decision(features([], stats=dict(CLUTTERED, luma_std=2.0)), "blank").passed


def test_unreadable_image_gets_only_that_reason():
    f = rules.Features(0, 0, [], {"decode_error": "UnidentifiedImageError: x"})
    decisions = rules.decide(f, P)
    assert [d.rule for d in decisions] == ["unreadable"] and not decisions[0].passed
    assert rules.verdict(decisions) == ("reject", ["unreadable"])


def test_verdict_lists_every_failed_rule():
    f = features([box("bed", 0.8, 0, 0, 60, 60), box("chair", 0.8, 120, 120, 180, 180)],
                 width=200, height=200)
    verdict, reasons = rules.verdict(rules.decide(f, P))
    assert verdict == "reject" and reasons == ["too_small", "multi_product", "occupancy"]


def test_image_statistics_measure_extent_on_plain_background_and_blankness():
    photo = Image.new("RGB", (400, 300), (250, 250, 250))
    photo.paste((30, 60, 90), (100, 75, 300, 225))  # half the width, half the height
    stats = image_statistics(photo)
    assert stats["border_plain"] == 1.0
    assert stats["fg_extent"] == pytest.approx(0.25, abs=0.03)
    assert image_statistics(Image.new("RGB", (400, 300), (128, 128, 128)))["luma_std"] == 0.0


def test_foreground_extent_ignores_a_few_stray_specks():
    photo = Image.new("RGB", (400, 400), (250, 250, 250))
    photo.paste((30, 60, 90), (100, 100, 300, 300))  # a quarter of the frame
    alone = image_statistics(photo)["fg_extent"]
    photo.paste((0, 0, 0), (4, 4, 8, 8))  # one dark speck in a corner
    assert image_statistics(photo)["fg_extent"] == pytest.approx(alone, abs=0.02)
    assert alone == pytest.approx(0.25, abs=0.03)


def test_settings_map_to_params_and_unknown_classes_are_refused():
    params = rules.params_from_settings(Settings(filter_min_occupancy=0.6, filter_holder_inside=0.7,
                                                 filter_product_classes={"*": ["bowl"]}))
    assert params.min_occupancy == 0.6 and params.classes_for("x") == {"bowl"}
    assert params.holder_inside == 0.7
    scene = rules.params_from_settings(Settings(filter_scene_min_score=0.2, filter_scene_repeats=0,
                                                filter_scene_max_share=0.1))
    assert (scene.scene_min_score, scene.scene_repeats, scene.scene_max_share) == (0.2, 0, 0.1)
    with pytest.raises(ValueError, match="unknown classes"):
        rules.params_from_settings(Settings(filter_product_classes={"*": ["sofa"]}))
    with pytest.raises(ValueError, match="occupancy_when_unknown"):
        rules.params_from_settings(Settings(filter_occupancy_when_unknown="maybe"))
