"""hf_ner: `AutoModelForTokenClassification` as a spaCy component writing `doc.ents` or `doc.spans`."""

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from spacy.language import Language
from spacy.tokens import Doc, Span, SpanGroup

from ..align import (
    group_words,
    merge_window_scores,
    resolve_overlaps,
    snap_to_tokens,
    unit_piece_ranges,
    window_spans,
    word_char_spans,
)
from ..decode import (
    DECODERS,
    SCHEMES,
    LabelSchemeError,
    decode_entities,
    detect_scheme,
    entities_to_tags,
    log_softmax,
    parse_tag,
    tags_for_types,
    transitions,
)
from ..hf import DEFAULT_MODEL, CheckpointError
from ..tasks import TASKS
from .base import IGNORE_INDEX, Feature, HFPipe, span_record

AGGREGATIONS = ("first", "mean")
logger = logging.getLogger("spacy_llm_components")


@Language.factory(
    "hf_ner",
    assigns=["doc.ents", "token.ent_iob", "token.ent_type"],
    default_config={
        "model": DEFAULT_MODEL,
        "labels": None,
        "scheme": "auto",
        "aggregation": "first",
        "decoder": "viterbi",
        "spans_key": None,
        "overwrite_ents": False,
        "stride": 128,
        "batch_size": 64,
        "max_length": None,
        "device": "auto",
        "dtype": "float32",
        "scorer": {"@scorers": "spacy_llm_components.ner_scorer.v1"},
    },
    default_score_weights=TASKS["ner"].score_weights,
)
def make_hf_ner(
    nlp: Language,
    name: str,
    model: str,
    labels: Optional[List[str]],
    scheme: str,
    aggregation: str,
    decoder: str,
    spans_key: Optional[str],
    overwrite_ents: bool,
    stride: int,
    batch_size: int,
    max_length: Optional[int],
    device: str,
    dtype: str,
    scorer: Optional[Callable],
) -> "HFEntityRecognizer":
    return HFEntityRecognizer(
        nlp, name, model=model, labels=labels, scheme=scheme, aggregation=aggregation, decoder=decoder,
        spans_key=spans_key, overwrite_ents=overwrite_ents, stride=stride, batch_size=batch_size, max_length=max_length,
        device=device, dtype=dtype, scorer=scorer,
    )


@dataclass
class DocEntities:
    """Decoded entities of one doc: (first token, end token, label, score), and how many were snapped."""

    entities: List[Tuple[int, int, str, float]] = field(default_factory=list)
    snapped: int = 0


class HFEntityRecognizer(HFPipe):
    """Tags words with a token-classification head and sets entities on spaCy tokens.

    Word pieces are grouped into the tokenizer's words (first piece by default,
    mean of pieces as an option), decoded with the scheme's valid transitions,
    and each entity's character span is snapped to spaCy token boundaries. An
    entity whose edge falls inside a spaCy token grows to the whole token (and
    is counted in `snapped`) instead of being dropped. Long docs run as
    overlapping windows over word pieces whose logits are merged before decoding.
    """

    spec = TASKS["ner"]

    def __init__(self, nlp: Language, name: str, *, labels: Optional[List[str]], scheme: str, aggregation: str,
                 decoder: str, spans_key: Optional[str], overwrite_ents: bool, stride: int, **kwargs) -> None:
        super().__init__(nlp, name, **kwargs)
        if scheme != "auto" and scheme not in SCHEMES:
            raise ValueError(f"{name}: scheme {scheme!r} is not 'auto' or one of {SCHEMES}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"{name}: aggregation {aggregation!r} is not one of {AGGREGATIONS}")
        if decoder not in DECODERS:
            raise ValueError(f"{name}: decoder {decoder!r} is not one of {sorted(DECODERS)}")
        if stride < 0:
            raise ValueError(f"{name}: stride must be >= 0, got {stride}")
        self.entity_types = labels
        self.scheme_cfg = scheme
        self.aggregation = aggregation
        self.decoder = decoder
        self.spans_key = spans_key
        self.overwrite_ents = overwrite_ents
        self.stride = stride
        self.snapped = 0  # entities grown to token boundaries since the component was made
        self.cfg = {"spans_key": spans_key}

    def _new_head_labels(self) -> Optional[List[str]]:
        if not self.entity_types:
            return None
        return tags_for_types(self.entity_types, "IOB2" if self.scheme_cfg == "auto" else self.scheme_cfg)

    def _on_load(self) -> None:
        tags = self.checkpoint.id2label
        try:
            self.scheme = detect_scheme(tags) if self.scheme_cfg == "auto" else self.scheme_cfg
            self.transitions = transitions(tags, self.scheme)
        except LabelSchemeError as err:
            raise CheckpointError(f"{self.checkpoint.source}: cannot read the label scheme of id2label: {err}") from err
        self.tags = tags

    @property
    def labels(self) -> List[str]:
        """Entity types, in the order of their first tag in the checkpoint."""
        types: List[str] = []
        for tag in self._label_names():
            etype = parse_tag(tag)[1]
            if etype is not None and etype not in types:
                types.append(etype)
        return types

    def _windows(self, n_pieces: int) -> List[Tuple[int, int]]:
        """Overlapping piece windows that fit the model (none for a text without pieces)."""
        return window_spans(n_pieces, self.max_length - self.specials.n_single, self.stride) if n_pieces else []

    def features(self, docs: Sequence[Doc]) -> List[Feature]:
        """Training features from gold `doc.ents`: one per window, the word's tag on its first piece.

        A tokenizer word overlapping an entity belongs to it; tags follow the
        head's scheme. Built with the same encoding and windows as `predict`.
        """
        tag_ids = {tag: i for i, tag in enumerate(self.tags)}
        n_pre = len(self.specials.single_prefix)
        n_suf = len(self.specials.single_suffix)
        features = []
        for doc, enc in zip(docs, self._encode([d.text for d in docs])):
            words = group_words(enc.word_ids)
            word_spans = word_char_spans(words, enc.offsets)
            ents = [(ent.start_char, ent.end_char, ent.label_) for ent in doc.ents]
            ranges = unit_piece_ranges([(s, e) for s, e, _ in ents], word_spans)
            entities = []
            for (first, last), (start, end, label) in zip(ranges, ents):
                if entities and first < entities[-1][1]:  # two entities inside one tokenizer word
                    logger.warning("%s: entity %r [%d, %d) shares a tokenizer word with the one before it; the model "
                                   "tags words, so it is left out of training: %r", self.name, doc.text[start:end],
                                   start, end, doc.text[:80])
                elif last > first:
                    entities.append((first, last, label))
            piece_labels = [IGNORE_INDEX] * len(enc.ids)
            for (first_piece, _), tag in zip(words, entities_to_tags(len(words), entities, self.scheme)):
                if tag not in tag_ids:
                    raise ValueError(f"{self.name}: entity tag {tag!r} is not a label of the model ({self.tags})")
                piece_labels[first_piece] = tag_ids[tag]
            for start, end in self._windows(len(enc.ids)):
                model_input = self._single(enc.ids[start:end])
                labels = [IGNORE_INDEX] * n_pre + piece_labels[start:end] + [IGNORE_INDEX] * n_suf
                features.append(model_input.feature(labels=labels))
        return features

    def predict(self, docs: Sequence[Doc]) -> List[DocEntities]:
        encodings = self._encode([d.text for d in docs])
        inputs, spans = [], []
        for enc in encodings:
            windows = self._windows(len(enc.ids))
            spans.append(windows)
            inputs.extend(self._single(enc.ids[s:e]) for s, e in windows)
        outputs = iter(self._forward(inputs))
        results = []
        for doc, enc, windows in zip(docs, encodings, spans):
            if not windows:
                results.append(DocEntities())
                continue
            skip = len(self.specials.single_prefix)  # drop special-token positions
            window_logits = [next(outputs)[0][skip : skip + e - s] for s, e in windows]
            piece_logits = merge_window_scores(windows, window_logits, len(enc.ids))
            results.append(self._decode_doc(doc, enc, piece_logits))
        return results

    def _decode_doc(self, doc: Doc, enc, piece_logits: np.ndarray) -> DocEntities:
        words = group_words(enc.word_ids)
        word_spans = word_char_spans(words, enc.offsets)
        if self.aggregation == "first":
            word_logits = piece_logits[[s for s, _ in words]]
        else:
            word_logits = np.stack([piece_logits[s:e].mean(axis=0) for s, e in words])
        decoded = decode_entities(log_softmax(word_logits), self.tags, self.transitions, self.decoder)
        starts = [t.idx for t in doc]
        ends = [t.idx + len(t) for t in doc]
        out = DocEntities()
        for first_word, end_word, label, score in decoded:
            char_span = (word_spans[first_word][0], word_spans[end_word - 1][1])
            tokens = snap_to_tokens(char_span, starts, ends)
            if tokens is None:
                continue
            if (starts[tokens[0]], ends[tokens[1] - 1]) != char_span:
                out.snapped += 1
            out.entities.append((tokens[0], tokens[1], label, score))
        out.entities = resolve_overlaps(out.entities)
        return out

    def record(self, doc: Doc) -> Dict[str, List[Dict[str, Any]]]:
        spans = doc.spans.get(self.spans_key, []) if self.spans_key else doc.ents
        return {"ents": [span_record(s, label=s.label_) for s in spans]}

    def set_annotations(self, docs: Sequence[Doc], predictions: Sequence[DocEntities]) -> None:
        for doc, pred in zip(docs, predictions):
            spans = [Span(doc, s, e, label=label) for s, e, label, _ in pred.entities]
            for span, (_, _, _, score) in zip(spans, pred.entities):
                span._.score = score
            if self.spans_key:
                doc.spans[self.spans_key] = SpanGroup(doc, name=self.spans_key, spans=spans)
            else:
                doc.ents = _combine(list(doc.ents), spans, self.overwrite_ents)
            self.snapped += pred.snapped



def _combine(existing: List[Span], predicted: List[Span], overwrite: bool) -> List[Span]:
    """Entities already on the doc (an entity_ruler's, say) stay unless `overwrite`; on a clash
    the side with priority keeps its span, and the other side's non-clashing spans are added."""
    first, second = (predicted, existing) if overwrite else (existing, predicted)
    taken = {i for span in first for i in range(span.start, span.end)}
    return sorted(first + [s for s in second if not taken.intersection(range(s.start, s.end))])
