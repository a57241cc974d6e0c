"""The search benchmark's like-for-like comparison with a closed-set model
(benchmarks/search_grocery.py ``seen_like_for_like``): a seen query lost to a novel product in
the open set is counted as such, and is right again when only the seen products are enrolled."""
from __future__ import annotations

import numpy as np

from benchmark_modules import load_benchmark
from modeling.search_index import Hit
from shoplens.vision.embedding import l2_normalise

grocery = load_benchmark("search_grocery")


class _VectorsOnly:
    """An embedder that is only asked its width (the vectors are given)."""
    dim = 3


def _unit(*rows):
    return l2_normalise(np.array(rows, dtype=np.float32))


def test_a_seen_query_lost_to_a_novel_product_is_right_among_the_seen_products_alone():
    # Products 2 and 4 are seen (even Class IDs), 3 is novel; two photos enrolled each.
    classes = [{"label": lab, "product_id": grocery.PRODUCT_BASE + lab, "name": str(lab)}
               for lab in (2, 3, 4)]
    enrol = _unit([1, 0, 0], [1, 0.1, 0], [0.6, 0.8, 0], [0.6, 0.75, 0.1], [0, 0, 1], [0, 0.1, 1])
    labels = [2, 2, 3, 3, 4, 4]
    # Query 0 is product 2 but closer to novel product 3; query 1 is product 4, answered right.
    queries = _unit([0.65, 0.76, 0], [0, 0.05, 1])
    q_labels = [2, 4]
    index = grocery.build_index(_VectorsOnly(), classes, enrol,
                                [grocery.PRODUCT_BASE + lab for lab in labels],
                                [str(i) for i in range(len(labels))])
    open_hits = index.search_vectors(queries, 3)
    assert [h[0].product_id - grocery.PRODUCT_BASE for h in open_hits] == [3, 4]

    like = grocery.seen_like_for_like(_VectorsOnly(), enrol, labels, len(labels), queries,
                                      q_labels, open_hits, "prototype", classes)

    assert like["n"] == 2
    assert like["open_set"]["R@1"] == 0.5
    assert like["closed_set"]["R@1"] == 1.0
    assert like["linear_probe"]["Top-1"] == 1.0
    assert like["open_set_misses"] == {"novel_product_on_top": 1, "other_seen_product_on_top": 0}


def _hit(label, score):
    return Hit(grocery.PRODUCT_BASE + label, str(label), score)


def test_trusting_the_classifier_for_seen_products_wins_seen_queries_only_by_losing_novel_ones():
    # A seen query (product 2) whose best match is novel product 3 by 0.03, and a novel query
    # (product 3) whose own product leads seen product 2 by 0.03; the classifier says 2 for both.
    ranked = [_hit(3, 0.80), _hit(2, 0.77), _hit(4, 0.10)]

    rows = grocery.seen_first_sweep([ranked, ranked], [2, 3], [2, 2], biases=(0.0, 0.05))

    assert rows == [{"bias": 0.0, "novel_R@1": 1.0, "seen_R@1": 0.0},
                    {"bias": 0.05, "novel_R@1": 0.0, "seen_R@1": 1.0}]
