"""hf_ner's predictions for a batch of docs as arrays: entities located on spaCy tokens, made disjoint,
and set on the docs through their token attributes (no Python object per token or per entity on the
common path)."""

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
from spacy.attrs import ENT_IOB, ENT_TYPE, IDX, LENGTH
from spacy.tokens import Doc, Span

from ..core.align import range_positions, resolve_overlaps, snap_many
from .inputs import Words


@dataclass
class Entities:
    """The decoded entities of a batch of docs as arrays, in doc order (`bounds`: doc i owns entries
    bounds[i]:bounds[i + 1]): token range, type, score and character span; and per doc how many
    entities grew to token boundaries (`snapped`)."""

    start: np.ndarray
    end: np.ndarray
    type_id: np.ndarray
    score: np.ndarray
    start_char: np.ndarray
    end_char: np.ndarray
    bounds: np.ndarray
    snapped: np.ndarray
    types: Tuple[str, ...]

    def of(self, i: int) -> List[Tuple[int, int, str, float]]:
        """Doc i's entities as (first token, end token, label, score)."""
        a, b = self.bounds[i], self.bounds[i + 1]
        return [(s, e, self.types[t], sc) for s, e, t, sc in zip(
            self.start[a:b].tolist(), self.end[a:b].tolist(), self.type_id[a:b].tolist(), self.score[a:b].tolist())]


def locate(docs: Sequence[Doc], text_lengths: Sequence[int], words: Words, start: np.ndarray, end: np.ndarray,
           type_id: np.ndarray, score: np.ndarray, types: Tuple[str, ...]) -> Entities:
    """Entities given as word ranges (start, end: indices into `words`, all docs laid end to end), snapped
    to spaCy tokens: an entity whose edge falls inside a token grows to the whole token (and is counted
    as snapped), one lying in whitespace is dropped, entities made to overlap are resolved."""
    doc_of = np.searchsorted(words.bounds, start, side="right") - 1
    # docs laid end to end in one character space, one character apart, to snap all spans at once
    base = np.concatenate([[0], np.cumsum(np.asarray(text_lengths[:-1], dtype=np.int64) + 1)])
    with_ents = np.unique(doc_of).tolist()
    tokens = [docs[d].to_array([IDX, LENGTH]).astype(np.int64).reshape(-1, 2) for d in with_ents]
    n_tokens = np.array([len(t) for t in tokens], dtype=np.int64)
    token_first = np.zeros(len(docs), dtype=np.int64)  # global index of each doc's first token
    token_first[with_ents] = np.cumsum(n_tokens) - n_tokens
    spans = np.concatenate(tokens) if tokens else np.zeros((0, 2), dtype=np.int64)
    token_start = spans[:, 0] + np.repeat(base[with_ents], n_tokens).astype(np.int64)
    token_end = token_start + spans[:, 1]
    char_start, char_end = words.start[start] + base[doc_of], words.end[end - 1] + base[doc_of]
    first, last, found = snap_many(char_start, char_end, token_start, token_end)
    first, last, doc_of = first[found], last[found], doc_of[found]
    exact = (token_start[first] == char_start[found]) & (token_end[last - 1] == char_end[found])
    entities = Entities(first - token_first[doc_of], last - token_first[doc_of], type_id[found], score[found],
                        token_start[first] - base[doc_of], token_end[last - 1] - base[doc_of],
                        np.searchsorted(doc_of, np.arange(len(docs) + 1)),
                        np.bincount(doc_of[~exact], minlength=len(docs)), types)
    overlapping = np.unique(doc_of[1:][(doc_of[1:] == doc_of[:-1]) & (first[1:] < last[:-1])])
    if len(overlapping):
        return resolve(entities, overlapping.tolist(), token_start, token_end, token_first, base)
    return entities


def set_ents_arrays(docs: List[Doc], predictions: Entities, which: List[int], type_hash: np.ndarray) -> None:
    """doc.ents of docs without entities, through their ENT_IOB / ENT_TYPE arrays (no Span objects)."""
    lengths = np.array([len(doc) for doc in docs], dtype=np.int64)
    offset = np.zeros(len(predictions.bounds) - 1, dtype=np.int64)
    offset[which] = np.cumsum(lengths) - lengths
    keep = np.isin(np.repeat(np.arange(len(offset)), np.diff(predictions.bounds)), which)
    doc_of = np.repeat(np.arange(len(offset)), np.diff(predictions.bounds))[keep]
    start, end = predictions.start[keep] + offset[doc_of], predictions.end[keep] + offset[doc_of]
    values = np.zeros((int(lengths.sum()), 2), dtype=np.uint64)
    values[:, 0] = 2  # O
    inside = range_positions(start, end - start)
    values[inside, 0] = 1  # I
    values[inside, 1] = np.repeat(type_hash[predictions.type_id[keep]], end - start)
    values[start, 0] = 3  # B
    for doc, first, n in zip(docs, (np.cumsum(lengths) - lengths).tolist(), lengths.tolist()):
        doc.from_array([ENT_IOB, ENT_TYPE], values[first:first + n])


def resolve(entities: Entities, fix: List[int], token_start: np.ndarray, token_end: np.ndarray,
             token_first: np.ndarray, base: np.ndarray) -> Entities:
    """Entities of the docs in `fix` made disjoint (`resolve_overlaps`), the others unchanged. Token
    arrays are those of `_entities` (one character space, docs one character apart)."""
    index = {t: i for i, t in enumerate(entities.types)}
    doc_of = np.repeat(np.arange(len(entities.bounds) - 1), np.diff(entities.bounds))
    keep = ~np.isin(doc_of, fix)
    resolved = [resolve_overlaps(entities.of(d)) for d in fix]
    new_doc = np.repeat(np.array(fix, dtype=np.int64), [len(r) for r in resolved])
    flat = [x for r in resolved for x in r]
    start = np.array([x[0] for x in flat], dtype=np.int64)
    end = np.array([x[1] for x in flat], dtype=np.int64)
    first, last = token_first[new_doc] + start, token_first[new_doc] + end - 1
    columns = [np.concatenate([old[keep], new]) for old, new in (
        (entities.start, start), (entities.end, end),
        (entities.type_id, np.array([index[x[2]] for x in flat], dtype=entities.type_id.dtype)),
        (entities.score, np.array([x[3] for x in flat], dtype=entities.score.dtype)),
        (entities.start_char, token_start[first] - base[new_doc]), (entities.end_char, token_end[last] - base[new_doc]))]
    all_docs = np.concatenate([doc_of[keep], new_doc])
    order = np.argsort(all_docs, kind="stable")  # each doc's entities stay in their order
    bounds = np.searchsorted(all_docs[order], np.arange(len(entities.bounds)))
    return Entities(*[c[order] for c in columns], bounds, entities.snapped, entities.types)


def combine(existing: List[Span], predicted: List[Span], overwrite: bool) -> List[Span]:
    """Entities already on the doc (an entity_ruler's, say) stay unless `overwrite`; on a clash
    the side with priority keeps its span, and the other side's non-clashing spans are added."""
    first, second = (predicted, existing) if overwrite else (existing, predicted)
    taken = {i for span in first for i in range(span.start, span.end)}
    return sorted(first + [s for s in second if not taken.intersection(range(s.start, s.end))])
