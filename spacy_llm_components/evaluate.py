"""Evaluate a pipeline on gold data through `nlp.pipe` (the path users take): metrics, report, plot.

Scores come from the components' registered scorers (spaCy's entity and
category scorers, the official SQuAD semantics); accuracy, support and the
confusion matrix are added here. The same `score_pipeline` serves the dev
evaluations during fine-tuning, so training picks checkpoints by the metric
users will see.
"""

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import spacy
from spacy.language import Language
from spacy.tokens import Doc
from spacy.training import Example
from spacy.util import filter_spans

from .build import hf_component, task_of
from .data import ReadOptions, load_docs, set_cats, sha256_file
from .files import write_files
from .scorers import score_ner, score_squad, score_textcat

PRIMARY = {"ner": "ents_f", "qa": "qa_f1"}  # textcat: see primary_metric


def primary_metric(task: str, multi_label: bool = False) -> str:
    """The metric that ranks checkpoints and models: entity F1, accuracy (exclusive classes),
    macro F1 (multi-label), SQuAD F1."""
    if task == "textcat":
        return "cats_macro_f" if multi_label else "cats_accuracy"
    return PRIMARY[task]


@dataclass
class Evaluation:
    task: str
    metrics: Dict[str, Any]  # flat numbers: the primary metric, P/R/F, speed...
    per_label: Dict[str, Dict[str, float]]
    confusion: Optional[Dict[str, Any]]  # exclusive textcat: {"labels": [...], "matrix": [[gold x predicted]]}
    predictions: List[Doc]

    @property
    def primary(self) -> str:
        return self.metrics["primary"]

    def label_rows(self) -> List[Dict[str, Any]]:
        """One row per label (entity type, class) with its scores; for QA, one row per metric."""
        if self.per_label:
            return [{"label": label, **scores} for label, scores in self.per_label.items()]
        return [{"metric": k, "value": v} for k, v in self.metrics.items() if isinstance(v, (int, float))]

    def to_json(self) -> Dict[str, Any]:
        return {"task": self.task, "metrics": self.metrics, "per_label": self.per_label, "confusion": self.confusion}


def input_doc(nlp: Language, reference: Doc) -> Doc:
    """What a user would feed the pipeline for a gold doc: its text, and its questions for QA."""
    doc = nlp.make_doc(reference.text)
    if reference._.qas:
        doc._.questions = [qa["question"] for qa in reference._.qas]
    return doc


def score_pipeline(nlp: Language, references: Sequence[Doc], *, batch_size: Optional[int] = None) -> Evaluation:
    """Run the pipeline over the references' texts and score its predictions against them."""
    task = task_of(nlp)
    pipe = hf_component(nlp)
    start = time.perf_counter()
    predictions = list(nlp.pipe((input_doc(nlp, ref) for ref in references), batch_size=batch_size))
    seconds = time.perf_counter() - start
    examples = [Example(pred, ref) for pred, ref in zip(predictions, references)]
    multi = bool(getattr(pipe, "multi_label", False)) if task == "textcat" else False
    confusion = None
    if task == "ner":
        if pipe.spans_key:  # gold data holds doc.ents: score the predicted span group as entities
            for pred in predictions:
                pred.ents = filter_spans(pred.spans.get(pipe.spans_key, []))
        scores = score_ner(examples)
        support = Counter(ent.label_ for ref in references for ent in ref.ents)
        per_label = {label: {**prf, "support": support.get(label, 0)}
                     for label, prf in sorted((scores.pop("ents_per_type", None) or {}).items())}
        for label in support:
            per_label.setdefault(label, {"p": 0.0, "r": 0.0, "f": 0.0, "support": support[label]})
    elif task == "textcat":
        scores, per_label, confusion = _textcat_scores(examples, pipe.labels, multi, pipe.cfg["threshold"])
    else:
        scores, per_label = score_squad(examples, spans_key=pipe.spans_key), {}
    words = sum(len(doc) for doc in predictions)
    metrics = {k: v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics.setdefault(primary_metric(task, multi), 0.0)  # undefined (no gold, no predictions) counts as 0
    metrics.update(primary=primary_metric(task, multi), docs=len(predictions), words=words,
                   seconds=round(seconds, 3), words_per_second=round(words / seconds, 1) if seconds else None)
    return Evaluation(task, metrics, per_label, confusion, predictions)


def _textcat_scores(examples: List[Example], labels: List[str], multi_label: bool, threshold: float):
    scores = score_textcat(examples, labels=labels, multi_label=multi_label, threshold=threshold)
    gold = np.array([[eg.reference.cats.get(label, 0.0) for label in labels] for eg in examples]) >= 0.5
    prob = np.array([[eg.predicted.cats.get(label, 0.0) for label in labels] for eg in examples])
    aucs = scores.get("cats_auc_per_type") or {}
    per_label = {label: {**(scores.get("cats_f_per_type") or {}).get(label, {"p": 0.0, "r": 0.0, "f": 0.0}),
                         "auc": aucs.get(label), "support": int(gold[:, i].sum())}
                 for i, label in enumerate(labels)}
    confusion = None
    if multi_label:
        scores["cats_accuracy"] = float(((prob >= threshold) == gold).all(axis=1).mean())  # exact match of label sets
    else:
        g, p = gold.argmax(axis=1), prob.argmax(axis=1)
        scores["cats_accuracy"] = float((g == p).mean())
        matrix = np.zeros((len(labels), len(labels)), dtype=int)
        np.add.at(matrix, (g, p), 1)
        confusion = {"labels": list(labels), "matrix": matrix.tolist()}
    return scores, per_label, confusion


def evaluate(pipeline: Union[str, Path, Language], test: Union[str, Path], output: Optional[Union[str, Path]] = None,
             *, options: ReadOptions = ReadOptions(), skip_bad: bool = False,
             batch_size: Optional[int] = None) -> Evaluation:
    """Load the pipeline, read `test` (any format `prepare` reads), score it, and (with `output`)
    write metrics.json, report.md and, for exclusive classes, confusion.png."""
    nlp = spacy.load(pipeline) if not isinstance(pipeline, Language) else pipeline
    task = task_of(nlp)
    loaded = load_docs(task, test, nlp, options=options, skip_bad=skip_bad)
    if task == "textcat" and loaded.cat_rows and not all(d.cats for d in loaded.docs):
        pipe = hf_component(nlp)
        set_cats(loaded, pipe.labels, pipe.multi_label)
    result = score_pipeline(nlp, loaded.docs, batch_size=batch_size)
    result.metrics["skipped"] = len(loaded.skipped)
    if output is not None:
        test_hash = sha256_file(Path(test)) if Path(test).is_file() else None  # what promotion compares on
        files = {"metrics.json": (json.dumps({**result.to_json(), "pipeline": str(pipeline), "test": str(test),
                                              "test_sha256": test_hash,
                                              "skipped": [r.to_dict() for r in loaded.skipped]},
                                             indent=2) + "\n").encode()}
        if result.confusion is not None:
            files["confusion.png"] = confusion_png(result.confusion)
        files["report.md"] = report_markdown(result, str(pipeline), str(test)).encode()
        write_files(Path(output), files)
    return result


def confusion_png(confusion: Dict[str, Any]) -> bytes:
    """The confusion matrix (rows gold, columns predicted) as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, matrix = confusion["labels"], np.array(confusion["matrix"])
    size = min(4 + 0.25 * len(labels), 24)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8 if len(labels) > 20 else 10)
    ax.set_yticks(range(len(labels)), labels, fontsize=8 if len(labels) > 20 else 10)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    if len(labels) <= 20:
        for (i, j), n in np.ndenumerate(matrix):
            ax.text(j, i, str(n), ha="center", va="center", color="white" if n > matrix.max() / 2 else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def report_markdown(result: Evaluation, pipeline: str, test: str) -> str:
    m = result.metrics
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
    lines = [f"# Evaluation: {result.task}", "", f"- pipeline: `{pipeline}`", f"- test data: `{test}`",
             f"- docs: {m['docs']:,}, words: {m['words']:,}, {m['words_per_second']:,} words/s",
             f"- primary metric: **{m['primary']} = {pct(m[m['primary']])}**", ""]
    lines += ["| metric | value |", "| --- | --- |"]
    for key, value in m.items():
        if key.startswith(("ents_", "cats_", "qa_")) and not key.endswith("_total") and isinstance(value, float):
            lines.append(f"| {key} | {pct(value)} |")
    if result.per_label:
        has_auc = any(v.get("auc") is not None for v in result.per_label.values())
        lines += ["", "## Per label", "", "| label | P | R | F | " + ("AUC | " if has_auc else "") + "support |",
                  "| --- | --- | --- | --- | " + ("--- | " if has_auc else "") + "--- |"]
        for label, v in result.per_label.items():
            auc = f"{pct(v.get('auc'))} | " if has_auc else ""
            lines.append(f"| {label} | {pct(v['p'])} | {pct(v['r'])} | {pct(v['f'])} | {auc}{v['support']} |")
    if result.confusion is not None:
        lines += ["", "## Confusion matrix", "", "Rows: gold, columns: predicted.", "", "![confusion](confusion.png)"]
    return "\n".join(lines) + "\n"
