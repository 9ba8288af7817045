"""The strategies a component chooses in its config, registered in spaCy's registry under versioned names
(the way spacy-transformers registers its span getters), so a config names one and a new one needs no
change to the component:

    [components.ner.aggregation]
    @sllm_strategies = "sllm.first_piece.v1"

- word aggregation (hf_ner): `sllm.first_piece.v1` (a word's first piece, as transformers'
  aggregation_strategy="first"), `sllm.mean_pieces.v1` (the mean of its pieces);
- tag decoding (hf_ner): `sllm.viterbi.v1` (the best tag sequence the scheme allows), `sllm.greedy.v1`
  (the argmax of each word);
- window pooling (hf_textcat): `sllm.mean_windows.v1`, `sllm.max_windows.v1` (a long doc's window logits).

An unknown name fails when the pipeline is built, listing the known ones. Configs written by 0.1.0 name
them as plain strings ("first", "viterbi", "mean"...), which still resolve.
"""

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from spacy.util import registry

from ..core.align import padded_ranges, range_positions
from ..core.decode import segment_means, viterbi_batch

CATEGORY = "sllm_strategies"
if not hasattr(registry, CATEGORY):
    registry.create(CATEGORY, entry_points=True)
strategies = getattr(registry, CATEGORY)


@dataclass(frozen=True)
class Strategy:
    """A registered strategy: its kind and the name it was registered under."""

    kind = "strategy"
    name: str


# -- word aggregation -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Aggregation(Strategy):
    """How the piece logits of a word become the word's: on the model's device for docs that fit one
    window (`select`, `reduce`), on the host for the merged logits of a long doc (`words`)."""

    kind = "aggregation"

    def select(self, first_piece: np.ndarray, word_of_piece: np.ndarray) -> np.ndarray:
        """Which pieces (of a batch, by their index in the pieces) the word logits are made from."""
        raise NotImplementedError

    def reduce(self, selected: torch.Tensor, word: np.ndarray):
        """(word ids, their logits) from the selected pieces' logits and the word of each."""
        raise NotImplementedError

    def words(self, merged: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
        """The words' logits of one doc from its merged piece logits and each word's first/last piece."""
        raise NotImplementedError


class FirstPiece(Aggregation):
    def select(self, first_piece, word_of_piece):
        return first_piece

    def reduce(self, selected, word):
        return word, selected

    def words(self, merged, first, last):
        return merged[first]


class MeanPieces(Aggregation):
    def select(self, first_piece, word_of_piece):
        return word_of_piece >= 0

    def reduce(self, selected, word):
        word, inverse = np.unique(word, return_inverse=True)
        index = torch.from_numpy(inverse).to(selected.device)
        sums = torch.zeros((len(word), selected.shape[1]), device=selected.device).index_add_(0, index, selected)
        return word, sums / torch.bincount(index, minlength=len(word)).unsqueeze(1)

    def words(self, merged, first, last):
        return segment_means(merged, first, last + 1) if len(first) else merged[:0]


@strategies("sllm.first_piece.v1")
def first_piece() -> Aggregation:
    return FirstPiece("sllm.first_piece.v1")


@strategies("sllm.mean_pieces.v1")
def mean_pieces() -> Aggregation:
    return MeanPieces("sllm.mean_pieces.v1")


# -- tag decoding -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decoder(Strategy):
    """The tag of each word from the words' log-probabilities (docs laid end to end: `bounds`)."""

    kind = "decoder"

    def __call__(self, word_lp: np.ndarray, bounds: np.ndarray, transitions: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Greedy(Decoder):
    def __call__(self, word_lp, bounds, transitions):
        return word_lp.argmax(axis=1)


class Viterbi(Decoder):
    def __call__(self, word_lp, bounds, transitions):
        """The best valid sequence per doc, for docs of similar length at once."""
        tags = np.zeros(len(word_lp), dtype=np.int64)
        lengths = np.diff(bounds)
        order = np.argsort(lengths, kind="stable")
        for chunk in np.array_split(order, max(1, len(order) // 256)):
            paths = viterbi_batch(padded_ranges(word_lp, bounds[chunk], lengths[chunk]), lengths[chunk], transitions)
            real = np.arange(paths.shape[1])[None, :] < lengths[chunk][:, None]
            tags[range_positions(bounds[chunk], lengths[chunk])] = paths[real]
        return tags


@strategies("sllm.viterbi.v1")
def viterbi() -> Decoder:
    return Viterbi("sllm.viterbi.v1")


@strategies("sllm.greedy.v1")
def greedy() -> Decoder:
    return Greedy("sllm.greedy.v1")


# -- window pooling ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WindowPooling(Strategy):
    """One logit vector for a doc from its windows' (windows x labels)."""

    kind = "pooling"

    def __call__(self, window_logits: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class MeanWindows(WindowPooling):
    def __call__(self, window_logits):
        return window_logits.mean(axis=0)


class MaxWindows(WindowPooling):
    def __call__(self, window_logits):
        return window_logits.max(axis=0)


@strategies("sllm.mean_windows.v1")
def mean_windows() -> WindowPooling:
    return MeanWindows("sllm.mean_windows.v1")


@strategies("sllm.max_windows.v1")
def max_windows() -> WindowPooling:
    return MaxWindows("sllm.max_windows.v1")


# the names configs of 0.1.0 used, per kind
LEGACY_NAMES = {"aggregation": {"first": "sllm.first_piece.v1", "mean": "sllm.mean_pieces.v1"},
                "decoder": {"viterbi": "sllm.viterbi.v1", "greedy": "sllm.greedy.v1"},
                "pooling": {"mean": "sllm.mean_windows.v1", "max": "sllm.max_windows.v1"}}
BASES = {"aggregation": Aggregation, "decoder": Decoder, "pooling": WindowPooling}


def known(kind: str):
    return sorted(name for name in strategies.get_all() if isinstance(strategies.get(name)(), BASES[kind]))


def resolve_strategy(kind: str, value: Union[str, Strategy], owner: str) -> Strategy:
    """The `kind` strategy a config gives: a resolved registered one, or a name (registered, or of 0.1.0)."""
    if isinstance(value, str):
        name = LEGACY_NAMES[kind].get(value, value)
        if name not in strategies.get_all():
            raise ValueError(f"{owner}: {kind} {value!r} is not a registered strategy; known: {', '.join(known(kind))}")
        value = strategies.get(name)()
    if not isinstance(value, BASES[kind]):
        raise ValueError(f"{owner}: {kind} {value!r} is a {value.kind} strategy, where a {kind} strategy is needed; known: "
                         f"{', '.join(known(kind))}")
    return value
