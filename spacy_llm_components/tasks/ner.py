"""Named-entity recognition: entities in `doc.ents` (or a span group), tagged per word."""

from collections import Counter
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch.nn.functional as F
from spacy.pipeline.spancat import spancat_score
from spacy.scorer import get_ner_prf
from spacy.tokens import Span
from spacy.training import Example
from spacy.util import filter_spans, registry
from transformers import DataCollatorForTokenClassification

from ..core.bootstrap import DocStatistics, prf
from ..core.calibration import CalibrationError, TemperatureProblem, precision_recall
from ..core.constants import IGNORE_INDEX
from ..data.conll import read_conll
from ..data.errors import DataError
from ..data.jsonl import read_ner_jsonl
from ..data.types import Loaded
from .base import Demo, TaskSpec, TunedThresholds, by_confidence, error_record, kl_divergence, register_task


class NerSpec(TaskSpec):
    name, hf_task, factory = "ner", "token-classification", "hf_ner"
    head = "token"
    primary = "ents_f"
    teacher_outputs = {"logits": True}
    score_weights = {"ents_f": 1.0, "ents_p": 0.0, "ents_r": 0.0, "ents_per_type": None}
    formats = (".conll", ".iob", ".bio", ".txt", ".tsv", ".jsonl", ".spacy")
    gold_description = "entity annotation (doc.ents)"
    description = "named-entity recognition (hf_ner)"
    input_example = {"text": ["Marta Kowalczyk opened a bakery in Lindenfeld for Brightwater Foods."]}
    output_columns = {"ents": ("spans", {"label": "string"})}
    corpus_formats = (".conll", ".iob", ".bio")
    demo = Demo(("train.conll", "dev.conll", "test.conll"), {"epochs": 10, "lr": 1e-4, "batch_size": 8},
                {"dataframe_records": [{"text": "Lena Hartmann joined Brightwater Foods in Lindenfeld last spring."}]})

    def has_gold(self, doc):
        return doc.has_annotation("ENT_IOB")

    def gold_labels(self, docs):
        return sorted({ent.label_ for doc in docs for ent in doc.ents})

    def read(self, path, nlp, bad, options):
        if path.suffix.lower() == ".jsonl":
            return Loaded(path, read_ner_jsonl(path, nlp, bad))
        docs, repairs = read_conll(path, nlp.vocab, bad, strict=options.strict)
        return Loaded(path, docs, repairs=repairs)

    def check_docbin(self, path, docs):
        if not any(d.has_annotation("ENT_IOB") for d in docs):
            raise DataError(path, None, "no doc has entity annotation (doc.ents)")
        return Loaded(path, docs)

    def labels(self, parts, multi_label):
        types = sorted({ent.label_ for part in parts for doc in part.docs for ent in doc.ents})
        if not types:
            raise DataError(parts[0].path, None, "no entities in the data")
        return types, False

    def describe(self, docs):
        per_label = Counter(e.label_ for d in docs for e in d.ents)
        return {**super().describe(docs), "entities": sum(per_label.values()), "per_label": dict(sorted(per_label.items()))}

    def collator(self, tokenizer):
        return DataCollatorForTokenClassification(tokenizer)  # labels padded with -100

    def soft_loss(self, student, teacher, batch, temperature, pipe):  # per piece that the tagger reads
        mask = batch["labels"] != IGNORE_INDEX  # first pieces of words, in gold and unlabelled rows alike
        kl = kl_divergence(student.logits.float()[mask] / temperature, teacher.logits.float()[mask] / temperature)
        return kl.mean() * temperature ** 2 if kl.numel() else student.logits.sum() * 0.0

    def gold_loss(self, student, batch, pipe):
        labels = batch["labels"].masked_fill(~batch["gold"].bool()[:, None], IGNORE_INDEX)
        if not (labels != IGNORE_INDEX).any():
            return student.logits.sum() * 0.0
        logits = student.logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)

    def temperature_problem(self, pipe, examples):
        """The entities' own scores: each predicted entity's words' tag log-probabilities (at temperature
        1) and decoded tags, and whether the entity is exactly right, so that the fitted temperature makes
        `ent._.score` say how often an entity is right (the words' tag NLL is mostly about O tags)."""
        words, log_probs, tags = pipe.word_tag_log_probs([eg.predicted for eg in examples])
        rows, segment, right = [], [], []
        for i, eg in enumerate(examples):
            a, b = int(words.bounds[i]), int(words.bounds[i + 1])
            starts, ends = words.start[a:b], words.end[a:b]
            for ent, is_right in entity_outcomes(eg)[0]:
                first = a + int(np.searchsorted(starts, ent.start_char, side="left"))
                last = a + int(np.searchsorted(ends, ent.end_char, side="right"))
                span = np.arange(first, last)
                # an entity grown to spaCy token edges, or made by resolving overlaps, may cover other words
                # than it was decoded from: only entities whose score the words give are fitted on
                if not len(span) or abs(np.exp(log_probs[span, tags[span]]).mean() - ent._.score) > 1e-4:
                    continue
                rows.append(span)
                segment.append(np.full(len(span), len(right)))
                right.append(is_right)
        rows_at = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        return TemperatureProblem("segments", log_probs[rows_at], np.array(right, dtype=bool), tags[rows_at],
                                  np.concatenate(segment) if segment else np.zeros(0, dtype=np.int64))

    def errors(self, examples, pipe):  # by character spans: wrong type, wrong boundaries, spurious, missed
        records = []
        for i, eg in enumerate(examples):
            if not eg.reference.has_annotation("ENT_IOB"):
                continue
            gold = {(e.start_char, e.end_char): e for e in eg.reference.ents}
            found = set()
            for ent in eg.predicted.ents:
                span = (ent.start_char, ent.end_char)
                same = gold.get(span)
                overlapping = [g for (s, e), g in gold.items() if s < ent.end_char and ent.start_char < e]
                found.update((g.start_char, g.end_char) for g in overlapping)
                if same is not None and same.label_ == ent.label_:
                    continue
                kind = ("wrong_label" if same is not None else "boundary" if overlapping else "false_positive")
                records.append(error_record(
                    i, eg.predicted, kind, predicted={"start": span[0], "end": span[1], "label": ent.label_,
                                                      "text": ent.text},
                    gold=[{"start": g.start_char, "end": g.end_char, "label": g.label_, "text": g.text}
                          for g in overlapping], score=ent._.score))
            for span, g in gold.items():
                if span not in found:
                    records.append(error_record(i, eg.predicted, "false_negative", predicted=None, score=None,
                                                gold=[{"start": span[0], "end": span[1], "label": g.label_,
                                                       "text": g.text}]))
        return by_confidence(records)

    def tune_thresholds(self, pipe, examples, request):  # the entity score threshold for a precision
        confidence, right, _ = self.confidences(examples, pipe)
        n_gold = sum(len(eg.reference.ents) for eg in examples if eg.reference.has_annotation("ENT_IOB"))
        curve = precision_recall(confidence, right, n_gold)
        if request.min_precision is None:
            return TunedThresholds(curve=curve)
        threshold = curve.threshold_for(request.min_precision)
        if threshold is None:
            raise CalibrationError(f"no entity score threshold reaches precision {request.min_precision:g} on the dev "
                                   f"data (the highest is {curve.precision.max() if len(curve.precision) else 0:.3f})")
        kept = right[confidence >= threshold]
        p, r = float(kept.mean()) if len(kept) else 0.0, float(kept.sum() / max(n_gold, 1))
        return TunedThresholds({"threshold": threshold},
                               {"ents_p": p, "ents_r": r, "ents_f": 2 * p * r / (p + r) if p + r else 0.0}, curve)

    def confidences(self, examples, pipe):  # each predicted entity's `ent._.score`, right if exactly gold
        outcomes = [(float(ent._.score), right) for eg in examples for ent, right in entity_outcomes(eg)[0]]
        return (np.array([score for score, _ in outcomes], dtype=np.float64),

                np.array([right for _, right in outcomes], dtype=bool),
                "each predicted entity's score (ent._.score), right when it is exactly a gold entity")

    def scores(self, examples, pipe):
        if pipe.spans_key:  # gold data holds doc.ents: score the predicted span group as entities
            for eg in examples:
                eg.predicted.ents = filter_spans(eg.predicted.spans.get(pipe.spans_key, []))
        scores = score_ner(examples)
        support = Counter(ent.label_ for eg in examples for ent in eg.reference.ents)
        per_label = {label: {**prf, "support": support.get(label, 0)}
                     for label, prf in sorted((scores.pop("ents_per_type", None) or {}).items())}
        for label in support:
            per_label.setdefault(label, {"p": 0.0, "r": 0.0, "f": 0.0, "support": support[label]})
        return scores, per_label, None

    def doc_statistics(self, examples, pipe):  # (after `scores`: a span group is then doc.ents)
        labels = sorted({e.label_ for eg in examples if eg.y.has_annotation("ENT_IOB")  # (others are not counted)
                         for e in (*eg.reference.ents, *eg.predicted.ents)})
        column = {label: 3 * j for j, label in enumerate(labels)}
        values = np.zeros((len(examples), 3 * len(labels)))
        for i, eg in enumerate(examples):
            for label, counts in entity_counts(eg).items():
                values[i, column[label]:column[label] + 3] = counts

        def metrics(sums):
            tp, fp, fn = sums[:, 0::3], sums[:, 1::3], sums[:, 2::3]
            p, r, f = prf(tp.sum(axis=1), fp.sum(axis=1), fn.sum(axis=1))
            per_p, per_r, per_f = prf(tp, fp, fn)
            out = {"ents_p": p, "ents_r": r, "ents_f": f}
            for j, label in enumerate(labels):
                out.update({(label, "p"): per_p[:, j], (label, "r"): per_r[:, j], (label, "f"): per_f[:, j]})
            return out

        return DocStatistics(values, metrics)


def entity_counts(eg: Example) -> Dict[str, List[int]]:
    """[tp, fp, fn] per entity type of one example, by spaCy's `get_ner_prf` rules (`entity_outcomes`)."""
    outcomes, counts = entity_outcomes(eg)
    return counts


def entity_outcomes(eg: Example) -> Tuple[List[Tuple[Span, bool]], Dict[str, List[int]]]:
    """(entity, right) of each scored predicted entity that counts, and [tp, fp, fn] per entity type, by spaCy's
    `get_ner_prf` rules: predictions aligned to the reference's tokens; one over reference tokens without
    entity annotation neither right nor wrong; an example without entity annotation not counted."""
    counts: Dict[str, List[int]] = {}
    outcomes: List[Tuple[Span, bool]] = []
    if not eg.y.has_annotation("ENT_IOB"):
        return outcomes, counts
    golds = {(e.label_, e.start, e.end) for e in eg.y.ents}
    align = eg.alignment.x2y
    for ent in eg.x.ents:
        mine = counts.setdefault(ent.label_, [0, 0, 0])
        indices = align[ent.start:ent.end]
        if len(indices) and all(token.ent_iob != 0 for token in eg.y[indices[0]:indices[-1] + 1]):
            key = (ent.label_, indices[0], indices[-1] + 1)
            right = key in golds
            mine[0 if right else 1] += 1
            golds.discard(key)
            if ent._.score is not None:  # (an entity another component set has no score)
                outcomes.append((ent, right))
    for label, _, _ in golds:
        counts.setdefault(label, [0, 0, 0])[2] += 1
    return outcomes, counts


def score_ner(examples: Iterable[Example], *, spans_key: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
    """spaCy's entity scorer for `doc.ents`, its span scorer for `doc.spans[spans_key]`."""
    if spans_key:
        return spancat_score(examples, spans_key=spans_key, allow_overlap=True)
    return get_ner_prf(examples)


@registry.scorers("spacy_llm_components.ner_scorer.v1")
def make_ner_scorer() -> Callable:
    return score_ner


NER = register_task(NerSpec())
