"""Model inputs: word pieces of many texts as flat arrays, special tokens, and length-sorted padded
batches built with array operations (no Python loop per piece or per sequence).

The same encoding serves training features and inference, so the two cannot drift.
"""

from dataclasses import dataclass
from itertools import chain
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

Feature = Dict[str, Any]  # one training example for the model: input_ids, token_type_ids, labels...


@dataclass
class ModelInput:
    """One sequence for the model: ids with special tokens, and segment ids."""

    input_ids: List[int]
    token_type_ids: Optional[List[int]] = None

    def feature(self, **targets: Any) -> Feature:
        """A training feature: this input plus its targets (labels, start/end positions)."""
        out: Feature = {"input_ids": self.input_ids}
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids
        return {**out, **targets}


@dataclass(frozen=True)
class SpecialTokens:
    """Where a tokenizer puts its special tokens (and segment ids) around one or two sequences.

    Read off the tokenizer's own encodings (its post-processor), not from
    `build_inputs_with_special_tokens`, which adds nothing for tokenizers that
    load as a plain `PreTrainedTokenizerFast`.
    """

    single_prefix: List[int]
    single_suffix: List[int]
    pair_prefix: List[int]
    pair_middle: List[int]
    pair_suffix: List[int]
    pair_types: Tuple[List[int], int, List[int], int, List[int]]  # prefix, first seq, middle, second seq, suffix

    @classmethod
    def of(cls, tokenizer) -> "SpecialTokens":
        single = tokenizer("a", return_token_type_ids=True).encodings[0]
        pair = tokenizer("a", "b", return_token_type_ids=True).encodings[0]
        sp = _segments(single.ids, single.sequence_ids)
        pp = _segments(pair.ids, pair.sequence_ids)
        tp = _segments(pair.type_ids, pair.sequence_ids)
        return cls(sp[0], sp[2], pp[0], pp[2], pp[4], (tp[0], tp[1][0], tp[2], tp[3][0], tp[4]))

    @property
    def n_single(self) -> int:
        return len(self.single_prefix) + len(self.single_suffix)

    @property
    def n_pair(self) -> int:
        return len(self.pair_prefix) + len(self.pair_middle) + len(self.pair_suffix)

    def single(self, ids: Sequence[int]) -> ModelInput:
        input_ids = self.single_prefix + list(ids) + self.single_suffix
        return ModelInput(input_ids, [0] * len(input_ids))


def _segments(values: Sequence[int], sequence_ids: Sequence[Optional[int]]) -> List[List[int]]:
    """Split an encoding into [specials, seq 0, specials, seq 1, specials] by sequence id."""
    parts: List[List[int]] = [[], [], [], [], []]
    part = 0
    for value, seq in zip(values, sequence_ids):
        if seq is None:
            part = {0: 0, 1: 2, 2: 2, 3: 4, 4: 4}[part]
        else:
            part = 1 if seq == 0 else 3
        parts[part].append(value)
    return parts


@dataclass
class Pieces:
    """The word pieces of many texts laid end to end (no special tokens): ids, character offsets, the
    tokenizer word of each piece (-1: none), and where each text's pieces begin (`bounds`, D + 1)."""

    ids: np.ndarray
    start: np.ndarray
    end: np.ndarray
    word: np.ndarray
    bounds: np.ndarray

    @classmethod
    def of(cls, encodings: Sequence[Any]) -> "Pieces":
        """From the `tokenizers` Encodings of the texts."""
        lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
        total = int(lengths.sum())
        bounds = np.zeros(len(encodings) + 1, dtype=np.int64)
        np.cumsum(lengths, out=bounds[1:])
        ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int64, count=total)
        offsets = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in encodings)),
                              dtype=np.int64, count=2 * total).reshape(total, 2)
        word = np.fromiter((-1 if w is None else w for w in chain.from_iterable(e.word_ids for e in encodings)),
                           dtype=np.int64, count=total)
        return cls(ids, offsets[:, 0], offsets[:, 1], word, bounds)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.bounds)

    def words(self) -> "Words":
        """The tokenizer's words: consecutive pieces of one text that share a word id (`group_words`)."""
        has = self.word >= 0
        first_of_text = np.zeros(len(self.ids), dtype=bool)
        first_of_text[self.bounds[:-1][self.bounds[:-1] < len(self.ids)]] = True
        previous = np.concatenate([[-1], self.word[:-1]])
        opens = has & (first_of_text | (self.word != previous))
        first = np.flatnonzero(opens)
        continued = np.append(has[1:] & ~opens[1:], False)  # the next piece belongs to the same word
        last = np.flatnonzero(has & ~continued)
        word_of_piece = np.where(has, np.cumsum(opens) - 1, -1)
        bounds = np.searchsorted(first, self.bounds)  # words of text d: bounds[d]:bounds[d + 1]
        return Words(first, last, word_of_piece, self.start[first], self.end[last], bounds)


@dataclass
class Words:
    """The tokenizer's words of `Pieces`: their first and last piece, character spans, and per text."""

    first: np.ndarray
    last: np.ndarray
    of_piece: np.ndarray  # word index of each piece (-1: none)
    start: np.ndarray
    end: np.ndarray
    bounds: np.ndarray  # D + 1


@dataclass
class Rows:
    """Single sequences to run: row j is pieces ids[start[j] : start[j] + length[j]] of a `Pieces`,
    between the tokenizer's special tokens, from doc `doc[j]`."""

    start: np.ndarray
    length: np.ndarray
    doc: Optional[np.ndarray] = None  # the doc (of the batch) each row belongs to


@dataclass
class Batch:
    """One padded batch of `Rows`: which rows (indices into Rows), the model feed, and where each row's
    pieces sit in it (`row`, `col`, in the rows' piece order; `piece`: their index in the Pieces)."""

    rows: np.ndarray
    input_ids: np.ndarray
    attention_mask: np.ndarray
    row: np.ndarray
    col: np.ndarray
    piece: np.ndarray


def padded_batches(ids: np.ndarray, rows: Rows, specials: SpecialTokens, batch_size: int, pad_id: int
                   ) -> Iterator[Batch]:
    """Rows in batches of similar length (shortest first), padded to the longest of each batch."""
    prefix = np.array(specials.single_prefix, dtype=np.int64)
    suffix = np.array(specials.single_suffix, dtype=np.int64)
    order = np.argsort(rows.length, kind="stable")
    for first in range(0, len(order), batch_size):
        chosen = order[first:first + batch_size]
        length = rows.length[chosen]
        n = len(chosen)
        width = int(length.max()) + len(prefix) + len(suffix)
        input_ids = np.full((n, width), pad_id, dtype=np.int64)
        input_ids[:, :len(prefix)] = prefix
        row = np.repeat(np.arange(n), length)
        within = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
        col = within + len(prefix)
        piece = np.repeat(rows.start[chosen], length) + within
        input_ids[row, col] = ids[piece]
        for k, token in enumerate(suffix):
            input_ids[np.arange(n), len(prefix) + length + k] = token
        attention_mask = (np.arange(width)[None, :] < (length + len(prefix) + len(suffix))[:, None]).astype(np.int64)
        yield Batch(chosen, input_ids, attention_mask, row, col, piece)


def pad_inputs(inputs: Sequence[ModelInput], pad_id: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, attention_mask, token_type_ids) of sequences of any shape (pairs too), right-padded."""
    lengths = np.fromiter((len(x.input_ids) for x in inputs), dtype=np.int64, count=len(inputs))
    width = int(lengths.max()) if len(inputs) else 0
    mask = np.arange(width)[None, :] < lengths[:, None]
    ids = np.full((len(inputs), width), pad_id, dtype=np.int64)
    ids[mask] = np.fromiter(chain.from_iterable(x.input_ids for x in inputs), dtype=np.int64, count=int(lengths.sum()))
    types = np.zeros((len(inputs), width), dtype=np.int64)
    types[mask] = np.fromiter(chain.from_iterable(x.token_type_ids or [0] * len(x.input_ids) for x in inputs),
                              dtype=np.int64, count=int(lengths.sum()))
    return ids, mask.astype(np.int64), types
