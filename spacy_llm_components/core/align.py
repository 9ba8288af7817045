"""Word pieces <-> words <-> spaCy tokens, and window split/merge.

Pure functions on plain data (ints, offsets, numpy arrays): no model, no I/O,
no spaCy pipeline. The same functions serve inference and training features,
so the two cannot drift.
"""

from bisect import bisect_left, bisect_right
from typing import List, Optional, Sequence, Tuple

import numpy as np

CharSpan = Tuple[int, int]  # [start, end) in characters
PieceRange = Tuple[int, int]  # [start, end) in word-piece positions


def group_words(word_ids: Sequence[Optional[int]]) -> List[PieceRange]:
    """Piece ranges of consecutive pieces that share a pre-tokenizer word id.

    `word_ids` comes from a fast tokenizer's `Encoding.word_ids`; pieces with
    id None (special tokens) belong to no word.
    """
    words: List[PieceRange] = []
    start = 0
    current: Optional[int] = None
    for i, wid in enumerate(word_ids):
        if wid != current or wid is None:
            if current is not None:
                words.append((start, i))
            start, current = i, wid
    if current is not None:
        words.append((start, len(word_ids)))
    return words


def word_char_spans(words: Sequence[PieceRange], piece_offsets: Sequence[CharSpan]) -> List[CharSpan]:
    """Character span of each word (a range of pieces)."""
    return [(piece_offsets[s][0], piece_offsets[e - 1][1]) for s, e in words]


def unit_piece_ranges(
    unit_spans: Sequence[CharSpan], piece_spans: Sequence[CharSpan]
) -> List[PieceRange]:
    """For each unit (token, sentence) the range of pieces that overlap it.

    Both inputs are sorted by start. A unit no piece overlaps (whitespace, a
    character the tokenizer drops) gets an empty range at the position where
    its pieces would be.
    """
    piece_starts = [s for s, _ in piece_spans]
    piece_ends = [e for _, e in piece_spans]
    ranges: List[PieceRange] = []
    for start, end in unit_spans:
        first = bisect_right(piece_ends, start)  # first piece ending after the unit starts
        last = bisect_left(piece_starts, end)  # first piece starting at/after the unit ends
        ranges.append((first, max(first, last)))
    return ranges


def window_spans(n: int, size: int, overlap: int) -> List[PieceRange]:
    """Cover range(n) with windows of at most `size` items; neighbours share `overlap` items
    (capped at size // 2, so a text of n items takes at most about 2n/size windows).

    n == 0 gives one empty window, so an empty input still has one (empty) window.
    """
    if size < 1:
        raise ValueError(f"window size must be >= 1, got {size}")
    # an overlap near the window size would make one window per item: at most half a window
    overlap = max(0, min(overlap, size // 2))
    if n <= size:
        return [(0, n)]
    step = size - overlap
    spans = []
    start = 0
    while True:
        end = min(start + size, n)
        spans.append((start, end))
        if end == n:
            return spans
        start += step


def merge_window_scores(
    windows: Sequence[PieceRange], window_scores: Sequence[np.ndarray], n: int
) -> np.ndarray:
    """Per position, keep the scores of the window in which it has the most context.

    Context of a position is its distance to the nearer window edge; a document
    edge counts as full context. With one window covering everything the result
    is that window's scores unchanged.
    """
    if len(windows) != len(window_scores):
        raise ValueError("one score array per window is needed")
    if n == 0:
        width = window_scores[0].shape[1:] if window_scores else ()
        return np.zeros((0, *width), dtype=np.float32)
    out = np.empty((n, *window_scores[0].shape[1:]), dtype=window_scores[0].dtype)
    best = np.full(n, -1, dtype=np.int64)
    for (start, end), scores in zip(windows, window_scores):
        if scores.shape[0] != end - start:
            raise ValueError(f"window {start}:{end} has {scores.shape[0]} score rows")
        idx = np.arange(start, end)
        left = np.where(start == 0, n, idx - start)
        right = np.where(end == n, n, end - 1 - idx)
        context = np.minimum(left, right)
        better = context > best[start:end]
        out[start:end][better] = scores[better]
        best[start:end][better] = context[better]
    return out


def pack_units(unit_ranges: Sequence[PieceRange], max_len: int) -> List[PieceRange]:
    """Greedily pack consecutive units (sentences, tokens) into windows of <= max_len pieces.

    Windows end on unit boundaries; a unit longer than max_len is cut into
    max_len-sized pieces. Empty units are skipped. No input gives one empty window.
    """
    windows: List[PieceRange] = []
    cur_start: Optional[int] = None
    cur_end = 0
    for start, end in unit_ranges:
        if end <= start:
            continue
        if cur_start is not None and end - cur_start <= max_len:
            cur_end = end
            continue
        if cur_start is not None:
            windows.append((cur_start, cur_end))
            cur_start = None
        while end - start > max_len:
            windows.append((start, start + max_len))
            start += max_len
        cur_start, cur_end = start, end
    if cur_start is not None:
        windows.append((cur_start, cur_end))
    return windows or [(0, 0)]


def snap_to_tokens(
    span: CharSpan, token_starts: Sequence[int], token_ends: Sequence[int]
) -> Optional[Tuple[int, int]]:
    """Smallest token range [first, last) whose characters cover `span`.

    Returns None when no token overlaps the span (it lies in whitespace).
    """
    start, end = span
    if not token_starts or end <= start:
        return None
    first = bisect_right(token_ends, start)  # first token ending after span start
    last = bisect_left(token_starts, end)  # first token starting at/after span end
    if first >= last:
        return None
    return first, last


def refine_units(
    coarse: Sequence[PieceRange], fine: Sequence[PieceRange], max_len: int
) -> List[PieceRange]:
    """Replace each coarse unit (sentence) longer than max_len by the fine units (tokens) inside it."""
    units: List[PieceRange] = []
    for start, end in coarse:
        if end - start <= max_len:
            units.append((start, end))
        else:
            units.extend((s, e) for s, e in fine if s >= start and e <= end and e > s)
    return units


def resolve_overlaps(entities: List[Tuple[int, int, str, float]]) -> List[Tuple[int, int, str, float]]:
    """Make snapped entities disjoint without losing tokens.

    Overlapping entities of one type merge; where types clash, each token goes
    to the surest entity covering it, and the others keep the tokens left to them.
    """
    merged: List[Tuple[int, int, str, float]] = []
    for ent in sorted(entities, key=lambda x: (x[2], x[0], x[1])):
        last = merged[-1] if merged else None
        if last is not None and last[2] == ent[2] and ent[0] < last[1]:
            merged[-1] = (last[0], max(last[1], ent[1]), last[2], max(last[3], ent[3]))
        else:
            merged.append(ent)
    owner: dict = {}
    for i, (start, end, _, score) in enumerate(merged):
        for t in range(start, end):
            if t not in owner or score > merged[owner[t]][3]:
                owner[t] = i
    runs: List[Tuple[int, int, str, float]] = []
    for t in sorted(owner):
        i = owner[t]
        if runs and runs[-1][1] == t and owner[t - 1] == i:
            runs[-1] = (runs[-1][0], t + 1, runs[-1][2], runs[-1][3])
        else:
            runs.append((t, t + 1, merged[i][2], merged[i][3]))
    return runs


def snap_many(start: np.ndarray, end: np.ndarray, token_start: np.ndarray, token_end: np.ndarray
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`snap_to_tokens` for many spans at once, in one character space (docs laid end to end, with a
    gap between them so that no span reaches another doc's tokens). Returns (first token, end token,
    found) arrays; a span lying in whitespace is not found."""
    first = np.searchsorted(token_end, start, side="right")
    last = np.searchsorted(token_start, end, side="left")
    return first, last, (first < last) & (end > start)


def range_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat indices start, start + 1, ..., start + length - 1 of each range, in order."""
    return np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))


def padded_ranges(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Ranges of rows of `values` as one zero-padded (ranges x longest x ...) array."""
    out = np.zeros((len(starts), int(lengths.max()) if len(lengths) else 0, *values.shape[1:]), dtype=values.dtype)
    out[np.arange(out.shape[1])[None, :] < lengths[:, None]] = values[range_positions(starts, lengths)]
    return out



def align_words(student_start: np.ndarray, teacher_start: np.ndarray, teacher_end: np.ndarray
                ) -> Tuple[np.ndarray, np.ndarray]:
    """For each student word (by its first character), the teacher word it reads its target from, and
    whether it starts inside that word (a continuation: the teacher saw one word where the student sees
    several). Two tokenizers' words of one text are compared through their character offsets: the
    teacher word starting at or before the student word's start that still covers it, else the next
    teacher word (a student word over characters the teacher tokenizer dropped). Needs >= 1 teacher word."""
    if not len(teacher_start):
        raise ValueError("the teacher has no words in a text where the student has some")
    student_start = np.asarray(student_start, dtype=np.int64)
    at = np.searchsorted(teacher_start, student_start, side="right") - 1
    before = at < 0
    at = np.clip(at, 0, len(teacher_start) - 1)
    past = ~before & (teacher_end[at] <= student_start) & (at + 1 < len(teacher_start))
    at = np.where(past, at + 1, at)
    continues = (teacher_start[at] < student_start) & (student_start < teacher_end[at])
    return at, continues
