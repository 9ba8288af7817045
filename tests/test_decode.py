"""Tag schemes, constrained decoding and answer-span search on plain arrays."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from spacy_llm_components.core.decode import (
    LabelSchemeError,
    answer_candidates,
    decode_entities,
    detect_scheme,
    greedy,
    log_softmax,
    tags_for_types,
    tags_to_entities,
    transitions,
    viterbi,
)

TYPES = ["PER", "LOC"]


@pytest.mark.parametrize(
    "tags,scheme",
    [
        (["O", "B-PER", "I-PER"], "IOB2"),
        (["O", "I-PER", "I-LOC"], "IO"),
        (["O", "B-PER", "I-PER", "L-PER", "U-PER"], "BILOU"),
        (["O", "B_PER", "I_PER", "E_PER", "S_PER"], "BIOES"),
    ],
)
def test_scheme_is_read_from_the_tag_set(tags, scheme):
    assert detect_scheme(tags) == scheme


@pytest.mark.parametrize("tags", [["LABEL_0", "LABEL_1"], ["O"], ["B-PER", "I-PER"], ["O", "B-X", "L-X", "E-X"]])
def test_unreadable_tag_sets_raise(tags):
    with pytest.raises(LabelSchemeError):
        detect_scheme(tags)


def test_entities_are_read_leniently_like_conlleval():
    assert tags_to_entities(["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC"]) == [
        (0, 2, "PER"), (3, 5, "LOC"), (5, 6, "LOC")]
    assert tags_to_entities(["U-PER", "B-LOC", "L-LOC", "I-PER"]) == [(0, 1, "PER"), (1, 3, "LOC"), (3, 4, "PER")]
    assert tags_to_entities(["B-PER", "I-LOC"]) == [(0, 1, "PER"), (1, 2, "LOC")]


def _valid(path_tags, scheme):
    tags = tags_for_types(TYPES, scheme)
    trans = transitions(tags, scheme)
    idx = [tags.index(t) for t in path_tags]
    ok = trans.start[idx[0]] and trans.end[idx[-1]]
    return ok and all(trans.pairs[a, b] for a, b in zip(idx, idx[1:]))


def _brute_force_best(log_probs, tags, scheme):
    """The best score over every tag path that is valid under `scheme`, by enumeration."""
    n, k = log_probs.shape
    best = -np.inf
    for path in itertools.product(range(k), repeat=n):
        if _valid([tags[i] for i in path], scheme):
            best = max(best, log_probs[np.arange(n), list(path)].sum())
    return best


@settings(max_examples=60)
@given(st.sampled_from(["IOB2", "BILOU", "BIOES", "IOB1", "IO"]), st.integers(1, 4), st.data())
def test_viterbi_finds_the_best_valid_path(scheme, n, data):
    tags = tags_for_types(TYPES, scheme)
    logits = data.draw(arrays(np.float64, (n, len(tags)), elements=st.floats(-5, 5)))
    lp = log_softmax(logits)
    path = viterbi(lp, transitions(tags, scheme))
    assert _valid([tags[i] for i in path], scheme)
    assert lp[np.arange(n), path].sum() == pytest.approx(_brute_force_best(lp, tags, scheme), abs=1e-9)


def test_viterbi_prefers_a_valid_path_over_likelier_invalid_ones():
    """BILOU, 3 positions: the likeliest tags (B-PER B-PER L-LOC) break the scheme; the best valid path,
    found by enumeration, is B-PER I-PER L-PER."""
    tags = tags_for_types(["PER", "LOC"], "BILOU")
    probs = np.full((3, len(tags)), 0.02)
    for i, (best, second, p) in enumerate([("B-PER", "U-PER", 0.2), ("B-PER", "I-PER", 0.3), ("L-LOC", "L-PER", 0.3)]):
        probs[i, tags.index(best)], probs[i, tags.index(second)] = 0.5, p
    lp = np.log(probs / probs.sum(axis=1, keepdims=True))
    path = [tags[i] for i in viterbi(lp, transitions(tags, "BILOU"))]
    assert path == ["B-PER", "I-PER", "L-PER"]
    assert lp[np.arange(3), [tags.index(t) for t in path]].sum() == pytest.approx(_brute_force_best(lp, tags, "BILOU"))


def test_viterbi_repairs_what_greedy_gets_wrong():
    tags = tags_for_types(["PER"], "IOB2")  # O B-PER I-PER
    lp = np.log(np.array([[0.1, 0.3, 0.6], [0.1, 0.3, 0.6]]))  # argmax I-PER I-PER (invalid start)
    trans = transitions(tags, "IOB2")
    assert [tags[i] for i in greedy(lp, trans)] == ["I-PER", "I-PER"]
    assert [tags[i] for i in viterbi(lp, trans)] == ["B-PER", "I-PER"]
    ents = decode_entities(lp, tags, trans, "viterbi")
    assert ents == [(0, 2, "PER", pytest.approx((0.3 + 0.6) / 2))]


@settings(max_examples=80)
@given(st.integers(1, 40), st.integers(0, 5), st.integers(1, 30), st.integers(1, 5), st.data())
def test_answers_stay_inside_the_context_and_respect_max_length(seq, ctx_start, max_len, top_k, data):
    ctx_start = min(ctx_start, seq - 1)
    ctx_end = data.draw(st.integers(ctx_start, seq))
    start = data.draw(arrays(np.float64, seq, elements=st.floats(-8, 8)))
    end = data.draw(arrays(np.float64, seq, elements=st.floats(-8, 8)))
    found, null = answer_candidates(start, end, (ctx_start, ctx_end), max_len, top_k)
    assert 0.0 <= null <= 1.0
    assert len(found) <= top_k
    for s, e, score in found:
        assert ctx_start <= s <= e < ctx_end  # never crosses the context's end
        assert e - s + 1 <= max_len
        assert 0.0 <= score <= 1.0
    assert [f[2] for f in found] == sorted((f[2] for f in found), reverse=True)


def test_answer_search_finds_the_obvious_span_and_null_score():
    start = np.array([0.0, -9, -9, 5.0, -9, -9])
    end = np.array([0.0, -9, -9, -9, 5.0, -9])
    found, null = answer_candidates(start, end, (2, 6), max_answer_len=5, top_k=1)
    assert [(s, e) for s, e, _ in found] == [(3, 4)]
    assert found[0][2] > 0.9 and null < 0.01
