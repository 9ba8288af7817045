"""Property tests of the pure alignment and windowing functions."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from spacy_llm_components.core.align import (
    group_words,
    merge_window_scores,
    pack_units,
    refine_units,
    resolve_overlaps,
    snap_to_tokens,
    unit_piece_ranges,
    window_spans,
)


@st.composite
def tokens_and_span(draw):
    """Non-overlapping token char spans with gaps, and an arbitrary char span inside the text."""
    spans, pos = [], 0
    for _ in range(draw(st.integers(1, 30))):
        pos += draw(st.integers(0, 2))
        length = draw(st.integers(1, 6))
        spans.append((pos, pos + length))
        pos += length
    start = draw(st.integers(0, pos - 1))
    end = draw(st.integers(start + 1, pos))
    return spans, (start, end)


@given(tokens_and_span())
def test_snapped_spans_lie_on_token_boundaries_and_cover_the_span(data):
    spans, (start, end) = data
    starts, ends = [s for s, _ in spans], [e for _, e in spans]
    snapped = snap_to_tokens((start, end), starts, ends)
    overlapping = [i for i, (s, e) in enumerate(spans) if s < end and e > start]
    if not overlapping:
        assert snapped is None
        return
    first, last = snapped
    assert (first, last) == (overlapping[0], overlapping[-1] + 1)
    # the tokens just outside the result do not touch the span: snapping neither stops short nor overshoots
    assert first == 0 or not (spans[first - 1][0] < end and spans[first - 1][1] > start)
    assert last == len(spans) or not (spans[last][0] < end and spans[last][1] > start)
    # every token of the result overlaps the span: nothing extra, nothing lost
    assert all(spans[i][0] < end and spans[i][1] > start for i in range(first, last))


@given(tokens_and_span())
def test_an_aligned_span_is_unchanged_by_snapping(data):
    spans, _ = data
    starts, ends = [s for s, _ in spans], [e for _, e in spans]
    for i in range(len(spans)):
        for j in range(i + 1, len(spans) + 1):
            assert snap_to_tokens((starts[i], ends[j - 1]), starts, ends) == (i, j)


@given(st.integers(0, 300), st.integers(1, 64), st.integers(0, 70))
def test_windows_cover_everything_in_order_within_size(n, size, overlap):
    windows = window_spans(n, size, overlap)
    assert windows[0][0] == 0 and windows[-1][1] == n
    assert all(e - s <= size for s, e in windows)
    for (s1, e1), (s2, e2) in zip(windows, windows[1:]):
        assert s1 < s2 <= e1 < e2  # ordered, no gaps
    if n <= size:
        assert windows == [(0, n)]


@settings(max_examples=60)
@given(st.integers(1, 200), st.integers(2, 40), st.integers(0, 39), st.integers(0, 2**31))
def test_merging_windows_of_one_global_array_gives_that_array(n, size, overlap, seed):
    """If windows saw consistent scores, the merge reproduces them exactly (no loss, no shift)."""
    scores = np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)
    windows = window_spans(n, size, overlap)
    merged = merge_window_scores(windows, [scores[s:e] for s, e in windows], n)
    np.testing.assert_array_equal(merged, scores)


def test_merge_prefers_the_window_with_more_context():
    windows = [(0, 6), (3, 9)]
    a = np.zeros((6, 1))
    b = np.ones((6, 1))
    merged = merge_window_scores(windows, [a, b], 9)[:, 0]
    # 3,4,5 are in both: 3 has more context in the first window, 5 in the second; 4 ties -> earlier window
    assert merged.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]


@given(st.lists(st.integers(0, 12), max_size=30), st.integers(1, 16))
def test_packed_windows_respect_size_and_keep_every_piece(lengths, max_len):
    units, pos = [], 0
    for length in lengths:
        units.append((pos, pos + length))
        pos += length
    windows = pack_units(units, max_len)
    assert all(e - s <= max_len for s, e in windows)
    covered = [i for s, e in windows for i in range(s, e)]
    assert covered == list(range(pos))


def test_sentences_over_the_limit_split_on_tokens():
    sentences = [(0, 4), (4, 20)]
    tokens = [(0, 2), (2, 4), (4, 9), (9, 15), (15, 20)]
    assert refine_units(sentences, tokens, 8) == [(0, 4), (4, 9), (9, 15), (15, 20)]


def test_group_words_and_unit_ranges():
    assert group_words([None, 0, 0, 1, 2, 2, None]) == [(1, 3), (3, 4), (4, 6)]
    pieces = [(0, 3), (3, 5), (6, 9)]  # "abcde fgh" -> abc ##de fgh
    assert unit_piece_ranges([(0, 5), (5, 6), (6, 9)], pieces) == [(0, 2), (2, 2), (2, 3)]


def test_overlaps_after_snapping_merge_same_type_and_keep_surer_otherwise():
    assert resolve_overlaps([(0, 2, "PER", 0.5), (1, 3, "PER", 0.9)]) == [(0, 3, "PER", 0.9)]
    # the surer entity takes the shared token, the other keeps the rest: nothing is dropped
    assert resolve_overlaps([(0, 2, "PER", 0.5), (1, 3, "LOC", 0.9)]) == [(0, 1, "PER", 0.5), (1, 3, "LOC", 0.9)]
    assert resolve_overlaps([(0, 5, "PER", 0.61), (4, 5, "LOC", 0.62)]) == [(0, 4, "PER", 0.61), (4, 5, "LOC", 0.62)]
    assert resolve_overlaps([(0, 1, "PER", 0.5), (1, 3, "LOC", 0.9)]) == [(0, 1, "PER", 0.5), (1, 3, "LOC", 0.9)]


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(1, 4), st.sampled_from("AB"), st.floats(0, 1)), max_size=12))
def test_resolved_entities_never_overlap_and_cover_the_same_tokens(raw):
    entities = [(s, s + n, label, score) for s, n, label, score in raw]
    resolved = resolve_overlaps(entities)
    for (s1, e1, *_), (s2, e2, *_) in zip(resolved, resolved[1:]):
        assert e1 <= s2 and s1 < e1
    covered = {i for s, e, *_ in entities for i in range(s, e)}
    assert {i for s, e, *_ in resolved for i in range(s, e)} == covered
