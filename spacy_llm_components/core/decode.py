"""Tag-scheme decoding for NER and answer-span search for QA.

Pure functions on numpy arrays and label strings: no model, no spaCy.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

SCHEMES = ("IOB1", "IOB2", "BILOU", "BIOES", "IO")
_PREFIXES = {"B", "I", "L", "U", "E", "S"}
# Which prefix plays which role, per scheme.
_BEGIN = {"IOB1": {"B"}, "IOB2": {"B"}, "BILOU": {"B"}, "BIOES": {"B"}, "IO": set()}
_INSIDE = {"IOB1": {"I"}, "IOB2": {"I"}, "BILOU": {"I"}, "BIOES": {"I"}, "IO": {"I"}}
_LAST = {"BILOU": {"L"}, "BIOES": {"E"}}


class LabelSchemeError(ValueError):
    """The tag set cannot be read as one of the supported schemes."""


def parse_tag(tag: str) -> Tuple[str, Optional[str]]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', None). Accepts '-' or '_' after the prefix."""
    if tag == "O":
        return "O", None
    if len(tag) > 2 and tag[0] in _PREFIXES and tag[1] in "-_":
        return tag[0], tag[2:]
    raise LabelSchemeError(f"tag {tag!r} is not 'O' or PREFIX-TYPE with PREFIX in B/I/L/U/E/S")


def detect_scheme(tags: Sequence[str]) -> str:
    """Read the scheme from a tag set (a checkpoint's id2label values).

    IOB1 and IOB2 share one tag set; it is read as IOB2 (what HF checkpoints use),
    pass the scheme explicitly for IOB1 data.
    """
    if "O" not in tags:
        raise LabelSchemeError(f"no 'O' tag among {list(tags)[:10]}")
    prefixes = {parse_tag(t)[0] for t in tags} - {"O"}
    if not prefixes:
        raise LabelSchemeError("only the 'O' tag: no entity types")
    if prefixes <= {"B", "I", "L", "U"} and prefixes & {"L", "U"}:
        return "BILOU"
    if prefixes <= {"B", "I", "E", "S"} and prefixes & {"E", "S"}:
        return "BIOES"
    if prefixes == {"I"}:
        return "IO"
    if prefixes <= {"B", "I"}:
        return "IOB2"
    raise LabelSchemeError(f"mixed prefixes {sorted(prefixes)} fit no scheme in {SCHEMES}")


def tags_for_types(types: Sequence[str], scheme: str = "IOB2") -> List[str]:
    """The full tag list for entity types under a scheme, 'O' first."""
    prefixes = {"IOB1": "BI", "IOB2": "BI", "BILOU": "BILU", "BIOES": "BIES", "IO": "I"}[scheme]
    return ["O"] + [f"{p}-{t}" for t in types for p in prefixes]


@dataclass(frozen=True)
class Transitions:
    """Allowed first tags, tag bigrams and last tags, as boolean arrays over the tag list."""

    start: np.ndarray  # (K,)
    pairs: np.ndarray  # (K, K): pairs[a, b] = tag b may follow tag a
    end: np.ndarray  # (K,)


def transitions(tags: Sequence[str], scheme: str) -> Transitions:
    """Valid transitions of `scheme` over `tags`."""
    if scheme not in SCHEMES:
        raise LabelSchemeError(f"unknown scheme {scheme!r}; use one of {SCHEMES}")
    parsed = [parse_tag(t) for t in tags]
    begin, inside = _BEGIN[scheme], _INSIDE[scheme]
    last = _LAST.get(scheme, set())  # U-/S- need no rule of their own: they open and close at once
    k = len(tags)
    pairs = np.ones((k, k), dtype=bool)
    start = np.ones(k, dtype=bool)
    end = np.ones(k, dtype=bool)
    for b, (pb, tb) in enumerate(parsed):
        if scheme in ("IOB2", "BILOU", "BIOES") and pb in inside | last:
            start[b] = False  # I-/L- cannot open a sentence
        if pb in begin | inside and scheme in ("BILOU", "BIOES"):
            end[b] = False  # B-/I- must be closed by L-/U-
        for a, (pa, ta) in enumerate(parsed):
            open_a = pa in begin | inside and scheme in ("IOB2", "BILOU", "BIOES")
            if scheme in ("BILOU", "BIOES"):
                if open_a:  # an open entity continues with I/L of its own type
                    pairs[a, b] = pb in inside | last and tb == ta
                else:  # after O / L / U only O, B or U
                    pairs[a, b] = pb not in inside | last
            elif scheme == "IOB2":
                if pb in inside:
                    pairs[a, b] = pa in begin | inside and ta == tb
            elif scheme == "IOB1":
                if pb in begin:  # B- only separates two entities of the same type
                    pairs[a, b] = pa in begin | inside and ta == tb
    return Transitions(start=start, pairs=pairs, end=end)


def viterbi(log_probs: np.ndarray, trans: Transitions) -> np.ndarray:
    """Best tag sequence under the transition constraints (ties go to the lower tag id)."""
    n, k = log_probs.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    forbid = np.where(trans.pairs, 0.0, -np.inf)
    score = log_probs[0] + np.where(trans.start, 0.0, -np.inf)
    back = np.zeros((n, k), dtype=np.int64)
    for i in range(1, n):
        cand = score[:, None] + forbid  # (prev, next)
        back[i] = cand.argmax(axis=0)
        score = cand[back[i], np.arange(k)] + log_probs[i]
    score = score + np.where(trans.end, 0.0, -np.inf)
    path = np.empty(n, dtype=np.int64)
    path[-1] = int(score.argmax())
    for i in range(n - 1, 0, -1):
        path[i - 1] = back[i, path[i]]
    return path


def greedy(log_probs: np.ndarray, trans: Transitions) -> np.ndarray:
    """Per-position argmax, no constraints (what HF pipelines do); entities are then read leniently."""
    return log_probs.argmax(axis=1) if len(log_probs) else np.zeros(0, dtype=np.int64)


DECODERS = {"viterbi": viterbi, "greedy": greedy}


def tags_to_entities(tags: Sequence[str]) -> List[Tuple[int, int, str]]:
    """Read (start, end, type) entities from tags, leniently (conlleval semantics).

    An entity opens at B/U/S, or at I/L/E that does not continue an open entity
    of the same type; it closes at L/E/U/S, at O, or when the next tag does not
    continue it. Valid sequences of every scheme read as their definition says.
    """
    entities: List[Tuple[int, int, str]] = []
    open_start: Optional[int] = None
    open_type: Optional[str] = None
    for i, tag in enumerate(tags):
        prefix, etype = parse_tag(tag)
        continues = prefix in ("I", "L", "E") and open_type == etype and open_start is not None
        if not continues and open_start is not None:
            entities.append((open_start, i, open_type))  # type: ignore[arg-type]
            open_start, open_type = None, None
        if prefix == "O":
            continue
        if not continues:
            open_start, open_type = i, etype
        if prefix in ("L", "E", "U", "S"):
            entities.append((open_start, i + 1, etype))  # type: ignore[arg-type]
            open_start, open_type = None, None
    if open_start is not None:
        entities.append((open_start, len(tags), open_type))  # type: ignore[arg-type]
    return entities


def entities_to_tags(n: int, entities: Sequence[Tuple[int, int, str]], scheme: str = "IOB2") -> List[str]:
    """Tags for `n` positions from disjoint (start, end, type) entities: the inverse of `tags_to_entities`.

    IOB1 uses B only where an entity directly follows one of the same type.
    """
    tags = ["O"] * n
    previous: Optional[Tuple[int, str]] = None  # (end, type) of the last entity written
    for start, end, etype in sorted(entities):
        if not 0 <= start < end <= n:
            raise ValueError(f"entity ({start}, {end}, {etype!r}) lies outside 0..{n} or is empty")
        if scheme == "IO":
            prefixes = ["I"] * (end - start)
        elif scheme in ("BILOU", "BIOES"):
            single, last = ("U", "L") if scheme == "BILOU" else ("S", "E")
            prefixes = [single] if end - start == 1 else ["B"] + ["I"] * (end - start - 2) + [last]
        elif scheme == "IOB1":
            first = "B" if previous == (start, etype) else "I"
            prefixes = [first] + ["I"] * (end - start - 1)
        elif scheme == "IOB2":
            prefixes = ["B"] + ["I"] * (end - start - 1)
        else:
            raise LabelSchemeError(f"unknown scheme {scheme!r}; use one of {SCHEMES}")
        for i, prefix in zip(range(start, end), prefixes):
            if tags[i] != "O":
                raise ValueError(f"entities overlap at position {i}")
            tags[i] = f"{prefix}-{etype}"
        previous = (end, etype)
    return tags


def decode_entities(
    log_probs: np.ndarray, tags: Sequence[str], trans: Transitions, decoder: str = "viterbi"
) -> List[Tuple[int, int, str, float]]:
    """Entities (start, end, type, score) over positions; score = mean probability of the chosen tags."""
    path = DECODERS[decoder](log_probs, trans)
    chosen = np.exp(log_probs[np.arange(len(path)), path]) if len(path) else np.zeros(0)
    total = np.concatenate([[0.0], np.cumsum(chosen)]).tolist()
    return [(s, e, t, (total[e] - total[s]) / (e - s)) for s, e, t in tags_to_entities([tags[i] for i in path])]


def tag_transfer(teacher_tags: Sequence[str], student_tags: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """(teacher tags x student tags) 0/1 matrices that carry a teacher word's tag distribution to a
    student word: `start` for a student word that begins where the teacher's word does (the same tag),
    `inside` for one that begins inside it (the teacher's word continues there: B-X and I-X both go to
    I-X, as every tag of type X does). The two heads must have the same tags."""
    if sorted(teacher_tags) != sorted(student_tags):
        raise LabelSchemeError(f"the teacher's tags {sorted(teacher_tags)} differ from the student's "
                               f"{sorted(student_tags)}: a student learns the teacher's tags")
    index = {tag: j for j, tag in enumerate(student_tags)}
    start = np.zeros((len(teacher_tags), len(student_tags)), dtype=np.float32)
    inside = np.zeros_like(start)
    for i, tag in enumerate(teacher_tags):
        start[i, index[tag]] = 1.0
        kind = parse_tag(tag)[1]
        inside[i, index.get(f"I-{kind}", index[tag]) if kind else index[tag]] = 1.0
    return start, inside


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.exp(log_softmax(x, axis=axis))


def answer_candidates(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    context: Tuple[int, int],
    max_answer_len: int,
    top_k: int,
    null_index: Optional[int] = 0,
) -> Tuple[List[Tuple[int, int, float]], float]:
    """Best answer spans in one window, and the window's no-answer score.

    Positions outside `context` = [first, last) cannot be part of an answer.
    Start and end probabilities are a softmax over context positions plus the
    null position (CLS), as in HF's question-answering pipeline; a span scores
    p_start * p_end. Returns [(start, end_inclusive, score)] best first, and
    p_start[null] * p_end[null] (0.0 when there is no null position).
    """
    first, last = context
    if last <= first:
        return [], 1.0
    keep = np.zeros(len(start_logits), dtype=bool)
    keep[first:last] = True
    if null_index is not None:
        keep[null_index] = True
    p_start = softmax(np.where(keep, start_logits, -np.inf))
    p_end = softmax(np.where(keep, end_logits, -np.inf))
    null = float(p_start[null_index] * p_end[null_index]) if null_index is not None else 0.0
    s, e = p_start[first:last], p_end[first:last]
    scores = np.triu(np.outer(s, e))  # end >= start
    scores = np.tril(scores, max_answer_len - 1)  # length <= max_answer_len
    flat = scores.ravel()
    k = min(top_k, int((flat > 0).sum()))
    if k == 0:
        return [], null
    best = np.argpartition(-flat, k - 1)[:k]
    best = best[np.argsort(-flat[best], kind="stable")]
    n = last - first
    return [(first + int(i // n), first + int(i % n), float(flat[i])) for i in best], null


def label_thresholds(labels: Sequence[str], threshold: float, per_label: Optional[dict] = None) -> np.ndarray:
    """The decision threshold of each label: its own, else the shared one."""
    per_label = per_label or {}
    return np.array([per_label.get(label, threshold) for label in labels], dtype=np.float64)


def decide_labels(probs: np.ndarray, multi_label: bool, thresholds: np.ndarray) -> np.ndarray:
    """Decisions (docs x labels, boolean) from label scores: the argmax for exclusive classes,
    each label at or over its threshold for multi-label."""
    probs = np.asarray(probs, dtype=np.float64)
    if multi_label:
        return probs >= thresholds[None, :]
    decided = np.zeros(probs.shape, dtype=bool)
    if probs.size:
        decided[np.arange(len(probs)), probs.argmax(axis=1)] = True
    return decided


# -- the same decoding over many sequences at once (the inference path) ------------------------------
_O, _B, _I, _L, _U = 0, 1, 2, 3, 4  # prefix roles: E plays L's, S plays U's


@dataclass(frozen=True)
class TagTable:
    """Per tag id: its prefix role and entity type id (-1 for O), to read entities from tag ids in bulk."""

    role: np.ndarray  # (K,) int8
    type_id: np.ndarray  # (K,) int32
    types: Tuple[str, ...]

    @classmethod
    def of(cls, tags: Sequence[str]) -> "TagTable":
        roles = {"O": _O, "B": _B, "I": _I, "L": _L, "E": _L, "U": _U, "S": _U}
        parsed = [parse_tag(t) for t in tags]
        types = tuple(dict.fromkeys(t for _, t in parsed if t is not None))
        return cls(np.array([roles[p] for p, _ in parsed], dtype=np.int8),
                   np.array([types.index(t) if t is not None else -1 for _, t in parsed], dtype=np.int32), types)


def read_entities(tag_ids: np.ndarray, first: np.ndarray, table: TagTable) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`tags_to_entities` over many sequences laid end to end: `first` marks the first position of each
    sequence (entities never cross it). Returns (start, end, type id) arrays of the entities, in order."""
    role, etype = table.role[tag_ids], table.type_id[tag_ids]
    open_after = (role == _B) | (role == _I)  # an entity stays open after B- and I-
    prev_open = np.concatenate([[False], open_after[:-1]]) & ~first
    prev_type = np.concatenate([[-2], etype[:-1]])
    continues = ((role == _I) | (role == _L)) & prev_open & (prev_type == etype)
    starts = np.flatnonzero((role != _O) & ~continues)
    breaks = np.append(np.flatnonzero(~continues), len(tag_ids))  # an entity runs until the next break
    ends = breaks[np.searchsorted(breaks, starts, side="right")]
    return starts, ends, etype[starts]


def segment_means(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Mean of values[s:e] (rows of values) for each non-empty segment [s, e), each summed on its own."""
    if not len(starts):
        return np.zeros((0, *values.shape[1:]), dtype=np.float64)
    bounds = np.empty(2 * len(starts), dtype=np.int64)
    bounds[0::2], bounds[1::2] = starts, ends
    padded = np.concatenate([values.astype(np.float64), np.zeros((1, *values.shape[1:]))])
    sums = np.add.reduceat(padded, bounds, axis=0)[0::2]
    return sums / (ends - starts).reshape(-1, *([1] * (values.ndim - 1)))


def viterbi_batch(log_probs: np.ndarray, lengths: np.ndarray, trans: Transitions) -> np.ndarray:
    """`viterbi` for D padded sequences at once: log_probs (D, W, K), lengths (D,); returns (D, W) tag ids
    (0 past each sequence's end). Each sequence gets the path `viterbi` gives it alone."""
    d, w, k = log_probs.shape
    paths = np.zeros((d, w), dtype=np.int64)
    if d == 0 or w == 0:
        return paths
    forbid = np.where(trans.pairs, 0.0, -np.inf)
    score = log_probs[:, 0] + np.where(trans.start, 0.0, -np.inf)  # (D, K)
    back = np.zeros((d, w, k), dtype=np.int64)
    for i in range(1, w):
        live = lengths > i
        if not live.any():
            break
        cand = score[live][:, :, None] + forbid  # (live, prev, next)
        best_prev = cand.argmax(axis=1)
        back[live, i] = best_prev
        score[live] = np.take_along_axis(cand, best_prev[:, None, :], axis=1)[:, 0, :] + log_probs[live, i]
    score = score + np.where(trans.end, 0.0, -np.inf)
    rows = np.arange(d)
    current = score.argmax(axis=1)
    last = np.maximum(lengths, 1) - 1
    paths[rows, last] = current
    for i in range(w - 1, 0, -1):
        active = last >= i
        current = np.where(active, back[rows, i, current], current)
        paths[active, i - 1] = current[active]
    paths[np.arange(w)[None, :] >= lengths[:, None]] = 0
    return paths
