"""Pure metrics against brute-force and hand-computed references: ROC AUC, SQuAD answer scores."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spacy_llm_components.core.metrics import exact_match, normalize_answer, roc_auc, squad_scores, token_f1


def pairwise_auc(gold, score):
    """The definition: the share of (positive, negative) pairs in which the positive scores higher,
    ties counting half."""
    pos = [s for g, s in zip(gold, score) if g]
    neg = [s for g, s in zip(gold, score) if not g]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@given(st.lists(st.tuples(st.booleans(), st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.5000001, 0.9, 1.0])),
                min_size=1, max_size=40))
def test_roc_auc_equals_the_pairwise_definition(rows):
    gold = [g for g, _ in rows]
    score = [s for _, s in rows]
    if all(gold) or not any(gold):
        assert roc_auc(np.array(gold), np.array(score)) is None  # undefined with one class
    else:
        assert roc_auc(np.array(gold), np.array(score)) == pytest.approx(pairwise_auc(gold, score))


def test_roc_auc_by_hand():
    # positives 0.9, 0.4, 0.4; negatives 0.4, 0.1: pairs (9>4, 9>1, 4=4, 4>1, 4=4, 4>1) -> (1+1+.5+1+.5+1)/6
    assert roc_auc(np.array([1, 1, 1, 0, 0]), np.array([0.9, 0.4, 0.4, 0.4, 0.1])) == pytest.approx(5 / 6)
    assert roc_auc(np.array([0, 1]), np.array([0.7, 0.2])) == 0.0


def test_official_squad_normalisation_and_hand_computed_scores():
    assert normalize_answer("The  Eiffel-Tower, in Paris!") == "eiffeltower in paris"
    assert exact_match("an Apple", "apple") == 1.0
    assert token_f1("Gustave Eiffel company", "Gustave Eiffel's company") == pytest.approx(2 / 3)
    scores = squad_scores([("Paris", ["Paris", "in Paris"]), ("in 1889", ["1889"]), ("", []), ("x", [])])
    assert scores["qa_exact"] == pytest.approx(2 / 4)
    assert scores["qa_f1"] == pytest.approx((1 + 2 / 3 + 1 + 0) / 4)
    assert scores["qa_has_ans_exact"] == pytest.approx(1 / 2) and scores["qa_no_ans_exact"] == pytest.approx(1 / 2)
