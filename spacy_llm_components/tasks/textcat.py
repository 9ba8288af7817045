"""Text classification: categories in `doc.cats`, exclusive (softmax) or multi-label (a sigmoid per label)."""

from collections import Counter
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from spacy.training import Example
from spacy.util import registry

from ..core.bootstrap import DocStatistics, prf
from ..core.calibration import CalibrationError, best_f1_threshold
from ..core.decode import decide_labels, label_thresholds
from ..core.metrics import classification_scores, confusion_matrix
from ..data.errors import DataError
from ..data.jsonl import read_cats_jsonl
from ..data.tabular import read_cats_table
from ..data.types import Loaded
from .base import Demo, TaskSpec, TunedThresholds, by_confidence, error_record, kl_divergence, register_task


class TextcatSpec(TaskSpec):
    name, hf_task, factory = "textcat", "text-classification", "hf_textcat"
    head = "sequence"
    primary = "cats_score"  # accuracy for exclusive classes, macro F for multi-label (see score_textcat)
    teacher_outputs = {"logits": False}
    score_weights = {"cats_score": 1.0}
    formats = (".csv", ".tsv", ".jsonl", ".spacy")
    gold_description = "categories (doc.cats)"
    description = "text classification (hf_textcat)"
    input_example = {"text": ["The delivery was quick and the soup was still hot."]}
    output_columns = {"cats": ("map", {})}
    demo = Demo(("train.csv", "dev.csv", "test.csv"), {"epochs": 8, "lr": 1e-4, "batch_size": 16},
                {"dataframe_records": [{"text": "Great little hotel, friendly staff and a lovely breakfast."}]})

    def has_gold(self, doc):
        return bool(doc.cats)

    def gold_labels(self, docs):
        return sorted({label for doc in docs for label in doc.cats})

    def read(self, path, nlp, bad, options):
        if path.suffix.lower() == ".jsonl":
            rows = read_cats_jsonl(path, nlp, bad, options.text_column, options.label_column)
        else:
            rows = read_cats_table(path, nlp, bad, options.text_column, options.label_column, options.label_sep)
        cat_rows = [(labels, where) for _, labels, where in rows]
        return Loaded(path, [d for d, _, _ in rows], cat_rows=cat_rows,
                      strata=[tuple(sorted(labels)) for labels, _ in cat_rows])

    def check_docbin(self, path, docs):
        rows = []
        for i, doc in enumerate(docs):
            if not doc.cats:
                raise DataError(path, f"record {i}", "doc has no categories (doc.cats)")
            rows.append(([label for label, value in doc.cats.items() if value >= 0.5], f"record {i}"))
        return Loaded(path, docs, strata=[tuple(sorted(r[0])) for r in rows], cat_rows=rows)

    def labels(self, parts, multi_label):
        labels = sorted({label for part in parts for doc, (ls, _) in zip(part.docs, part.cat_rows)
                         for label in (list(doc.cats) or ls)})
        if multi_label is None:  # a record with other than exactly one label makes it multi-label
            multi_label = any(len(ls) != 1 for part in parts for ls, _ in part.cat_rows)
        if not labels:
            raise DataError(parts[0].path, None, "no labels in the data")
        for part in parts:
            set_cats(part, labels, multi_label)
        return labels, multi_label

    def describe(self, docs):
        per_label = Counter(label for d in docs for label, v in d.cats.items() if v >= 0.5)
        return {**super().describe(docs), "per_label": dict(sorted(per_label.items()))}

    def component_settings(self, labels, multi_label, train_docs):
        return {"labels": list(labels) or None, "multi_label": multi_label}

    def unlabelled(self, doc, pipe):
        doc.cats = {label: 0.0 for label in pipe.labels}
        return doc

    def soft_loss(self, student, teacher, batch, temperature, pipe):  # per window
        s, t = student.logits.float() / temperature, teacher.logits.float() / temperature
        if pipe.multi_label:  # one Bernoulli per label
            p = torch.sigmoid(t)
            kl = (F.binary_cross_entropy_with_logits(s, p, reduction="none")
                  - F.binary_cross_entropy_with_logits(t, p, reduction="none")).mean(-1)
            return kl.mean() * temperature ** 2
        return kl_divergence(s, t).mean() * temperature ** 2

    def gold_loss(self, student, batch, pipe):
        gold = batch["gold"].bool()
        if not gold.any():
            return student.logits.sum() * 0.0
        logits, labels = student.logits.float()[gold], batch["labels"][gold]
        if pipe.multi_label:
            return F.binary_cross_entropy_with_logits(logits, labels.float())
        return F.cross_entropy(logits, labels)

    def multi_label_of(self, pipe):
        return pipe.multi_label

    def calibration_kind(self, pipe):
        return "sigmoid" if pipe.multi_label else "softmax"

    def calibration_rows(self, output, batch, pipe):  # per window, each carrying its doc's labels
        return output.logits.float().cpu().numpy(), batch["labels"].cpu().numpy()

    def confidences(self, examples, pipe):  # exclusive: the chosen class's probability; multi-label: each label's
        gold, decided, prob = decisions(examples, list(pipe.labels), pipe.multi_label, pipe.cfg.get("threshold", 0.5),
                                        pipe.cfg.get("thresholds"))
        if pipe.multi_label:
            return prob.ravel(), gold.ravel(), "each label's probability (doc.cats), right when the doc has the label"
        return (prob.max(axis=1) if prob.size else prob.ravel(), (gold == decided).all(axis=1),
                "each doc's probability of its chosen class (doc.cats), right when that is the gold class")

    def errors(self, examples, pipe):  # exclusive: the confusions; multi-label: each label decided wrongly
        labels = list(pipe.labels)
        gold, decided, prob = decisions(examples, labels, pipe.multi_label, pipe.cfg.get("threshold", 0.5),
                                        pipe.cfg.get("thresholds"))
        records = []
        for i, eg in enumerate(examples):
            if not pipe.multi_label:
                if (gold[i] != decided[i]).any():
                    chosen = int(np.argmax(decided[i]))
                    records.append(error_record(i, eg.predicted, "confusion", gold=labels[int(np.argmax(gold[i]))],
                                                predicted=labels[chosen], score=float(prob[i, chosen])))
                continue
            for j in np.flatnonzero(gold[i] != decided[i]).tolist():
                kind = "false_positive" if decided[i, j] else "false_negative"
                records.append(error_record(i, eg.predicted, kind, label=labels[j], score=float(
                    prob[i, j] if decided[i, j] else 1.0 - prob[i, j])))
        return by_confidence(records)

    def tune_thresholds(self, pipe, examples, request):  # per label, for F1, on the calibrated probabilities
        if not (pipe.multi_label and request.f1):
            return TunedThresholds()
        labels = list(pipe.labels)
        gold, _, prob = decisions(examples, labels, True, 0.5, None)
        missing = [label for j, label in enumerate(labels) if not gold[:, j].any()]
        if missing:
            raise CalibrationError(f"no dev doc has the labels {missing}: their thresholds cannot be tuned (add dev "
                                   "docs with them, or calibrate with --no-thresholds)")
        thresholds = {label: best_f1_threshold(prob[:, j], gold[:, j])[0] for j, label in enumerate(labels)}
        scores = score_textcat(examples, labels=labels, multi_label=True, thresholds=thresholds)
        return TunedThresholds({"thresholds": thresholds}, scores)

    def gold_for(self, loaded, pipe):
        if loaded.cat_rows and not all(d.cats for d in loaded.docs):
            set_cats(loaded, pipe.labels, pipe.multi_label)

    def scores(self, examples, pipe):
        settings = {**pipe.cfg, "labels": pipe.labels, "multi_label": pipe.multi_label}
        scores = score_textcat(examples, **settings, details=True)  # the component's own decision rule
        per_f, per_auc = scores.pop("cats_f_per_type"), scores.pop("cats_auc_per_type")
        support = scores.pop("cats_support_per_type")
        per_label = {label: {**per_f[label], "auc": per_auc.get(label), "support": support[label]}
                     for label in pipe.labels}
        return scores, per_label, scores.pop("cats_confusion", None)

    def doc_statistics(self, examples, pipe):
        labels, multi_label = list(pipe.labels), pipe.multi_label
        gold, decided = decisions(examples, labels, multi_label, pipe.cfg.get("threshold", 0.5),
                                  pipe.cfg.get("thresholds"))[:2]
        k = len(labels)  # columns: tp, fp, fn of each label, then whether the doc's decision is all right
        values = np.concatenate([gold & decided, ~gold & decided, gold & ~decided,
                                 (gold == decided).all(axis=1, keepdims=True)], axis=1).astype(np.float64)
        n = len(examples)

        def metrics(sums):
            tp, fp, fn = sums[:, :k], sums[:, k:2 * k], sums[:, 2 * k:3 * k]
            p, r, f = prf(tp, fp, fn)
            micro_f = prf(tp.sum(axis=1), fp.sum(axis=1), fn.sum(axis=1))[2]
            out = {"cats_accuracy": sums[:, 3 * k] / n, "cats_macro_p": p.mean(axis=1), "cats_macro_r": r.mean(axis=1),
                   "cats_macro_f": f.mean(axis=1), "cats_micro_f": micro_f}
            out["cats_score"] = out["cats_macro_f"] if multi_label else out["cats_accuracy"]
            for j, label in enumerate(labels):
                out.update({(label, "p"): p[:, j], (label, "r"): r[:, j], (label, "f"): f[:, j]})
            return out

        return DocStatistics(values, metrics, correct=values[:, 3 * k].astype(bool))


def set_cats(loaded: Loaded, labels: Sequence[str], multi_label: bool) -> None:
    """Write `doc.cats` (1.0/0.0 for every label). Exclusive data needs exactly one label per record."""
    for doc, (ls, where) in zip(loaded.docs, loaded.cat_rows):
        if not multi_label and len(ls) != 1:
            raise DataError(loaded.path, where, f"exclusive classification needs exactly one label, got {ls}")
        unknown = set(ls) - set(labels)
        if unknown:
            raise DataError(loaded.path, where, f"label(s) {sorted(unknown)} not among the labels {list(labels)}")
        doc.cats = {label: float(label in ls) for label in labels}


def score_textcat(examples: Iterable[Example], *, labels: List[str], multi_label: bool = False,
                  threshold: float = 0.5, thresholds: Optional[Dict[str, float]] = None, details: bool = False,
                  **_: Any) -> Dict[str, Any]:
    """Accuracy, P/R/F (per label, micro, macro) and ROC AUC of the component's decisions.

    `cats_score`, the primary metric, is accuracy for exclusive classes and macro F for
    multi-label. With `details`, also the support per label and (exclusive classes) the
    confusion matrix.
    """
    examples = list(examples)
    labels = list(labels)
    gold, decided, prob = decisions(examples, labels, multi_label, threshold, thresholds)
    scores = classification_scores(labels, gold, decided, prob, multi_label)
    scores["cats_score"] = scores["cats_macro_f"] if multi_label else scores["cats_accuracy"]
    scores["cats_score_desc"] = "macro F" if multi_label else "accuracy"
    support = scores.pop("cats_support_per_type")
    if details:
        scores["cats_support_per_type"] = support
        if not multi_label and len(examples):
            scores["cats_confusion"] = confusion_matrix(labels, gold, decided)
    return scores


def decisions(examples: Sequence[Example], labels: List[str], multi_label: bool, threshold: float,
              thresholds: Optional[Dict[str, float]]):
    """(gold, decided, scores) as (docs x labels) arrays: the reference's labels, the component's decisions
    by its own rule, the predicted scores."""
    gold = np.array([[eg.reference.cats.get(label, 0.0) for label in labels] for eg in examples]).reshape(-1, len(labels)) >= 0.5
    prob = np.array([[eg.predicted.cats.get(label, 0.0) for label in labels] for eg in examples]).reshape(-1, len(labels))
    return gold, decide_labels(prob, multi_label, label_thresholds(labels, threshold, thresholds)), prob


@registry.scorers("spacy_llm_components.textcat_scorer.v1")
def make_textcat_scorer() -> Callable:
    return score_textcat


TEXTCAT = register_task(TextcatSpec())
