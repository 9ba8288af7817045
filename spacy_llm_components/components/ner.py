"""hf_ner: `AutoModelForTokenClassification` as a spaCy component writing `doc.ents` or `doc.spans`."""

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from spacy.attrs import ENT_IOB
from spacy.language import Language
from spacy.tokens import Doc, Span, SpanGroup

from ..core.align import (
    align_words,
    group_words,
    merge_window_scores,
    unit_piece_ranges,
    window_spans,
    word_char_spans,
)
from ..core.constants import IGNORE_INDEX, TEACHER_PREFIX
from ..core.decode import (
    SCHEMES,
    LabelSchemeError,
    TagTable,
    detect_scheme,
    entities_to_tags,
    log_softmax,
    parse_tag,
    read_entities,
    segment_means,
    tag_transfer,
    tags_for_types,
    transitions,
)
from ..core.settings import setting
from ..data.extensions import value_key
from ..models.checkpoint import CheckpointError
from ..tasks.ner import NER
from .base import Feature, HFPipe, span_record
from .entities import Entities, combine, locate, set_ents_arrays
from .inputs import Pieces, Rows, Words
from .settings import SharedSettings, component_factory
from .strategies import Aggregation, Decoder, resolve_strategy

logger = logging.getLogger("spacy_llm_components")


@dataclass
class NerSettings(SharedSettings):
    """hf_ner's settings (`[components.ner]` in a config)."""

    labels: Optional[List[str]] = setting(None, "entity types of a new head on a base encoder; null: the checkpoint's "
                                                "(or, in `spacy train`, the data's)")
    scheme: str = setting("auto", "tag scheme of the head's labels: auto (read from them) or one of "
                                  + ", ".join(SCHEMES), choices=("auto", *SCHEMES))
    aggregation: Union[str, Aggregation] = setting({"@sllm_strategies": "sllm.first_piece.v1"},
                                                   "word pieces to words (a registered strategy)")
    decoder: Union[str, Decoder] = setting({"@sllm_strategies": "sllm.viterbi.v1"},
                                           "tags of the words (a registered strategy)")
    spans_key: Optional[str] = setting(None, "write the entities to doc.spans[spans_key] instead of doc.ents")
    overwrite_ents: bool = setting(False, "replace entities already on the doc (else they are kept, ours added "
                                          "where they do not overlap)")
    stride: int = setting(128, "word pieces two windows of a long doc overlap by", ge=0)
    threshold: float = setting(0.0, "entities whose score (`ent._.score`) is below this are left out (`sllm "
                                    "calibrate --ner-precision P` picks the lowest one reaching precision P on dev)",
                               ge=0, le=1)
    scorer: Optional[Callable] = setting({"@scorers": "spacy_llm_components.ner_scorer.v1"},
                                         "the scorer `nlp.evaluate` uses")


class HFEntityRecognizer(HFPipe):
    """Tags words with a token-classification head and sets entities on spaCy tokens.

    Word pieces are grouped into the tokenizer's words (first piece by default,
    mean of pieces as an option), decoded with the scheme's valid transitions,
    and each entity's character span is snapped to spaCy token boundaries. An
    entity whose edge falls inside a spaCy token grows to the whole token (and
    is counted in `snapped`) instead of being dropped. Long docs run as
    overlapping windows over word pieces whose logits are merged before decoding.
    """

    spec = NER

    def __init__(self, nlp: Language, name: str, settings: NerSettings) -> None:
        super().__init__(nlp, name, settings)
        self.entity_types = settings.labels
        self.scheme_cfg = settings.scheme
        self.aggregation = resolve_strategy("aggregation", settings.aggregation, name)
        self.decoder = resolve_strategy("decoder", settings.decoder, name)
        self.spans_key = settings.spans_key
        self.overwrite_ents = settings.overwrite_ents
        self.stride_cfg = settings.stride
        self.threshold = settings.threshold
        self.snapped = 0  # entities grown to token boundaries since the component was made
        self.cfg = {"spans_key": settings.spans_key}

    @property
    def stride(self) -> int:
        """Pieces that windows of a long doc overlap by: on a shared encoder, the encoder's windows."""
        return self.shared.stride if self.encoder_name is not None else self.stride_cfg

    def writes(self) -> List[str]:
        return [f"doc.spans[{self.spans_key!r}]" if self.spans_key else "doc.ents"]

    def _new_head_labels(self) -> Optional[List[str]]:
        if not self.entity_types:
            return None
        return tags_for_types(self.entity_types, "IOB2" if self.scheme_cfg == "auto" else self.scheme_cfg)

    def _labels_from_data(self, docs: Sequence[Doc]) -> None:
        if not self.entity_types:
            self.entity_types = self.spec.gold_labels(docs)

    def _on_load(self) -> None:
        tags = self.checkpoint.id2label
        try:
            self.scheme = detect_scheme(tags) if self.scheme_cfg == "auto" else self.scheme_cfg
            self.transitions = transitions(tags, self.scheme)
        except LabelSchemeError as err:
            raise CheckpointError(f"{self.checkpoint.source}: cannot read the label scheme of id2label: {err}") from err
        self.tags = tags
        self.tag_table = TagTable.of(tags)

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

    def features(self, docs: Sequence[Doc], teacher: Optional[Tuple[Words, np.ndarray, np.ndarray]] = None
                 ) -> List[Feature]:
        """Training features from gold `doc.ents`: one per window, the word's tag on its first piece.

        A tokenizer word overlapping an entity belongs to it; tags follow the
        head's scheme. Built with the same encoding and windows as `predict`.
        With `teacher` (another tokenizer's words of the same docs and their target log-probabilities
        over this head's tags, for a word that starts with it and one that starts inside it), each feature also holds, on its words' first pieces, the target of the
        teacher word each word is aligned to (`align_words`): `teacher_logits`.
        """
        tag_ids = {tag: i for i, tag in enumerate(self.tags)}
        n_pre = len(self.specials.single_prefix)
        n_suf = len(self.specials.single_suffix)
        features = []
        for d, (doc, enc) in enumerate(zip(docs, self._encode([d.text for d in docs]))):
            words = group_words(enc.word_ids)
            word_spans = word_char_spans(words, enc.offsets)
            soft = self._teacher_rows(teacher, d, words, word_spans, len(enc.ids)) if teacher is not None else None
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
                extra = {}
                if soft is not None:
                    rows = np.zeros((len(labels), len(self.tags)), dtype=np.float32)
                    rows[n_pre:n_pre + end - start] = soft[start:end]
                    extra[TEACHER_PREFIX + "logits"] = rows
                features.append(model_input.feature(labels=labels, **extra))
        return features

    @staticmethod
    def _teacher_rows(teacher: Tuple[Words, np.ndarray, np.ndarray], d: int, words, word_spans, n_pieces: int
                      ) -> np.ndarray:
        """(pieces x tags) targets of doc `d`: on each word's first piece, its aligned teacher word's (the
        `inside` one for a word that begins inside the teacher's word)."""
        teacher_words, start, inside = teacher
        a, b = int(teacher_words.bounds[d]), int(teacher_words.bounds[d + 1])
        rows = np.zeros((n_pieces, start.shape[-1]), dtype=np.float32)
        if words and b > a:
            at, continues = align_words(np.array([s for s, _ in word_spans]), teacher_words.start[a:b],
                                        teacher_words.end[a:b])
            rows[[first for first, _ in words]] = np.where(continues[:, None], inside[a + at], start[a + at])
        return rows

    def distillation_features(self, docs: Sequence[Doc], teacher: "HFEntityRecognizer") -> List[Feature]:
        """Training features of `docs` whose `teacher_logits` are the teacher's (a head with the same tags,
        any tokenizer) word tag log-probabilities at temperature 1, per word of this head's tokenizer: a
        word that begins inside a teacher word takes that word's distribution with B-X moved to I-X."""
        start_map, inside_map = tag_transfer(teacher.tags, self.tags)
        teacher_words, log_probs, _ = teacher.word_tag_log_probs(docs)
        probs = np.exp(log_probs)
        return self.features(docs, teacher=(teacher_words, np.log(probs @ start_map + 1e-8),
                                            np.log(probs @ inside_map + 1e-8)))

    def _prepare(self, docs: Sequence[Doc]) -> Tuple[List[int], Pieces, Words]:
        texts = [d.text for d in docs]  # (Doc.text joins the tokens' texts: once per doc)
        pieces = self._pieces(texts)
        return [len(t) for t in texts], pieces, pieces.words()

    def _predict_prepared(self, docs: Sequence[Doc], prepared: Tuple[List[int], Pieces, Words]) -> Entities:
        text_lengths, pieces, words = prepared
        return self._entities(docs, text_lengths, words, self._word_log_probs(docs, pieces, words))

    def _word_log_probs(self, docs: Sequence[Doc], pieces: Pieces, words: Words) -> np.ndarray:
        """(words x tags) log-probabilities: each word's piece logits aggregated (its first piece, or the
        mean of its pieces) and normalised on the model's device, so only those leave it. A doc longer
        than one window runs in overlapping windows whose piece logits are merged on the host first."""
        window = self.max_length - self.specials.n_single
        lengths, starts = pieces.lengths, pieces.bounds[:-1]
        fits = (lengths <= window) & (lengths > 0)
        long_docs = np.flatnonzero(lengths > window).tolist()
        windows = {d: window_spans(int(lengths[d]), window, self.stride) for d in long_docs}
        owners = [(d, k) for d in long_docs for k in range(len(windows[d]))]
        rows = Rows(np.concatenate([starts[fits], [starts[d] + windows[d][k][0] for d, k in owners]]).astype(np.int64),
                    np.concatenate([lengths[fits], [windows[d][k][1] - windows[d][k][0] for d, k in owners]]).astype(np.int64),
                    np.concatenate([np.flatnonzero(fits), [d for d, _ in owners]]).astype(np.int64))
        n_fitting = int(fits.sum())
        word_lp = np.zeros((len(words.first), len(self.tags)), dtype=np.float32)
        window_logits: Dict[Tuple[int, int], np.ndarray] = {}
        first_piece = np.zeros(len(pieces.ids), dtype=bool)
        first_piece[words.first] = True
        for batch, out in self._run(docs, pieces, rows):
            logits = out.logits
            fitting = batch.rows[batch.row] < n_fitting
            keep = fitting & self.aggregation.select(first_piece[batch.piece], words.of_piece[batch.piece])
            if keep.any():
                word, selected = self.aggregation.reduce(logits[batch.row[keep], batch.col[keep]].float(),
                                                         words.of_piece[batch.piece[keep]])
                word_lp[word] = torch.log_softmax(selected, dim=-1).cpu().numpy()
            for j in np.unique(batch.row[~fitting]).tolist():  # windows of long docs: all their pieces
                at = batch.row == j
                window_logits[owners[int(batch.rows[j]) - n_fitting]] = logits[j, batch.col[at]].float().cpu().numpy()
        for d in long_docs:
            merged = merge_window_scores(windows[d], [window_logits[(d, k)] for k in range(len(windows[d]))],
                                         int(lengths[d]))
            first, last = words.first[words.bounds[d]:words.bounds[d + 1]], words.last[words.bounds[d]:words.bounds[d + 1]]
            first, last = first - starts[d], last - starts[d]
            word_logits = self.aggregation.words(merged, first, last)
            word_lp[words.bounds[d]:words.bounds[d + 1]] = log_softmax(word_logits.astype(np.float32))
        return word_lp

    def word_tag_log_probs(self, docs: Sequence[Doc]) -> Tuple[Words, np.ndarray, np.ndarray]:
        """The docs' tokenizer words (laid end to end), each word's tag log-probabilities at temperature 1
        and its decoded tag: what entity scores are made of (calibration fits on them)."""
        _, pieces, words = self._prepare(docs)
        word_lp = self._word_log_probs(docs, pieces, words)
        return words, word_lp, self.decoder(word_lp, words.bounds, self.transitions)

    def _entities(self, docs: Sequence[Doc], text_lengths: Sequence[int], words: Words, word_lp: np.ndarray
                  ) -> Entities:
        """Decode the words' tags for all docs at once, read the entities, and snap them to spaCy tokens."""
        tags = self.decoder(word_lp, words.bounds, self.transitions)
        # an entity's score: the mean probability of its words' tags, at the head's temperature (which
        # changes the scores, not the decoded tags)
        scaled = word_lp if self.temperature == 1.0 else log_softmax(word_lp / self.temperature)
        chosen = np.exp(scaled[np.arange(len(tags)), tags])
        first_word = np.zeros(len(tags), dtype=bool)
        first_word[words.bounds[:-1][np.diff(words.bounds) > 0]] = True
        start, end, type_id = read_entities(tags, first_word, self.tag_table)
        score = segment_means(chosen, start, end)
        if self.threshold > 0:
            keep = score >= self.threshold
            start, end, type_id, score = start[keep], end[keep], type_id[keep], score[keep]
        return locate(docs, text_lengths, words, start, end, type_id, score, self.tag_table.types)

    def record(self, doc: Doc) -> Dict[str, List[Dict[str, Any]]]:
        spans = doc.spans.get(self.spans_key, []) if self.spans_key else doc.ents
        return {"ents": [span_record(s, label=s.label_) for s in spans]}

    def set_annotations(self, docs: Sequence[Doc], predictions: Entities) -> None:
        type_hash = np.array([self.vocab.strings.add(t) for t in predictions.types] or [0], dtype=np.uint64)
        plain = [] if self.spans_key else [i for i, doc in enumerate(docs) if not doc.to_array(ENT_IOB).any()]
        if plain:  # no entities on the doc yet: set them as token attributes, in one array for all docs
            set_ents_arrays([docs[i] for i in plain], predictions, plain, type_hash)
        for i in sorted(set(range(len(docs))) - set(plain)):
            doc = docs[i]
            spans = [Span(doc, s, e, label=label) for s, e, label, _ in predictions.of(i)]
            if self.spans_key:
                doc.spans[self.spans_key] = SpanGroup(doc, name=self.spans_key, spans=spans)
            else:
                doc.ents = combine(list(doc.ents), spans, self.overwrite_ents)
        user_data = [doc.user_data for doc in docs]
        for d, sc, ec, t, score in zip(np.repeat(np.arange(len(docs)), np.diff(predictions.bounds)).tolist(),
                                       predictions.start_char.tolist(), predictions.end_char.tolist(),
                                       type_hash[predictions.type_id].tolist(), predictions.score.tolist()):
            user_data[d][value_key("score", sc, ec, t)] = score
        self.snapped += int(predictions.snapped.sum())


make_hf_ner = component_factory("hf_ner", NerSettings, HFEntityRecognizer, module=__name__,
                                assigns=["doc.ents", "token.ent_iob", "token.ent_type"],
                                default_score_weights=NER.score_weights)
