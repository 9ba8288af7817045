"""Evaluate a pipeline on gold data through `nlp.pipe` (the path users take): metrics, report, plot.

Scores come from the task's scorer (`TaskSpec.scores`: spaCy's entity scorer, the
component's own decision rule for categories, the official SQuAD semantics) and are kept
apart from the run's statistics (counts, seconds, speed). The same `score_pipeline` serves
the dev evaluations during fine-tuning, so training picks checkpoints by the metric users
will see.
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import spacy
from spacy.language import Language
from spacy.tokens import Doc
from spacy.training import Example

from .artifacts import METRICS, json_bytes, sha256_file, write_files
from .build import hf_component
from .models.devices import machine
from .data import ReadOptions
from .tasks import load_docs


@dataclass
class Evaluation:
    task: str
    primary: str  # the score that ranks checkpoints and versions
    scores: Dict[str, float]  # what the predictions are worth: P/R/F, accuracy, EM...
    statistics: Dict[str, Any]  # what the run was: docs, words, seconds, speed, skipped records
    per_label: Dict[str, Dict[str, float]]
    confusion: Optional[Dict[str, Any]]  # exclusive textcat: {"labels": [...], "matrix": [[gold x predicted]]}
    predictions: List[Doc]

    @property
    def primary_score(self) -> float:
        return self.scores[self.primary]

    def label_rows(self) -> List[Dict[str, Any]]:
        """One row per label (entity type, class) with its scores; for QA, one row per score."""
        if self.per_label:
            return [{"label": label, **scores} for label, scores in self.per_label.items()]
        return [{"metric": k, "value": v} for k, v in self.scores.items()]

    def to_json(self) -> Dict[str, Any]:
        return {"task": self.task, "primary": self.primary, "scores": self.scores, "statistics": self.statistics,
                "per_label": self.per_label, "confusion": self.confusion}


def score_pipeline(nlp: Language, references: Sequence[Doc], *, batch_size: Optional[int] = None) -> Evaluation:
    """Run the pipeline over the references' texts and score its predictions against them."""
    pipe = hf_component(nlp)
    spec = pipe.spec
    start = time.perf_counter()
    predictions = list(nlp.pipe((spec.input_doc(nlp, ref) for ref in references), batch_size=batch_size))
    seconds = time.perf_counter() - start
    raw, per_label, confusion = spec.scores([Example(p, r) for p, r in zip(predictions, references)], pipe)
    scores = {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
              and not k.endswith("_total")}
    scores.setdefault(spec.primary, 0.0)  # undefined (no gold, no predictions) counts as 0
    words = sum(len(doc) for doc in predictions)
    pieces = word_pieces(pipe, predictions)
    statistics = {"docs": len(predictions), "words": words, "word_pieces": pieces, "seconds": round(seconds, 3),
                  "docs_per_second": round(len(predictions) / seconds, 1) if seconds else None,
                  "words_per_second": round(words / seconds, 1) if seconds else None,
                  "word_pieces_per_second": round(pieces / seconds, 1) if seconds else None,
                  **{k: v for k, v in raw.items() if k.endswith("_total")},  # questions counted (QA)
                  "device": str(pipe.checkpoint.device), "machine": machine(pipe.checkpoint.device)}
    return Evaluation(spec.name, spec.primary, scores, statistics, per_label, confusion, predictions)


def word_pieces(pipe, docs: Sequence[Doc]) -> int:
    """Word pieces of the texts the component read, by its own tokenizer, without special tokens (QA: and of
    each question once), counted after the timed run: the model-side measure of speed, beside words."""
    texts = [doc.text for doc in docs] + [q for doc in docs for q in (doc._.questions or [])]
    if not texts:
        return 0
    return sum(len(ids) for ids in pipe.checkpoint.tokenizer(texts, add_special_tokens=False)["input_ids"])


def evaluate(pipeline: Union[str, Path, Language], test: Union[str, Path], output: Optional[Union[str, Path]] = None,
             *, options: ReadOptions = ReadOptions(), skip_bad: bool = False,
             batch_size: Optional[int] = None) -> Evaluation:
    """Load the pipeline (a folder, `models:/NAME@ALIAS` or `models:/NAME/VERSION`), read `test` (any
    format `prepare` reads), score it, and (with `output`) write metrics.json, report.md and, for
    exclusive classes, confusion.png."""
    if isinstance(pipeline, Language):
        nlp = pipeline
    else:
        from .registry import local_pipeline, pin_model

        pipeline = pin_model(pipeline)  # recorded as the version it was, wherever an alias moves later
        nlp = spacy.load(local_pipeline(pipeline))
    pipe = hf_component(nlp)
    loaded = load_docs(pipe.spec.name, test, nlp, options=options, skip_bad=skip_bad)
    pipe.spec.gold_for(loaded, pipe)
    result = score_pipeline(nlp, loaded.docs, batch_size=batch_size)
    result.statistics["skipped"] = len(loaded.skipped)
    if output is not None:
        test_hash = sha256_file(test) if Path(test).is_file() else None  # what promotion compares on
        files = {METRICS: json_bytes({**result.to_json(), "pipeline": str(pipeline), "test": str(test),
                                      "test_sha256": test_hash, "skipped": [r.to_dict() for r in loaded.skipped]})}
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
    st = result.statistics
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
    lines = [f"# Evaluation: {result.task}", "", f"- pipeline: `{pipeline}`", f"- test data: `{test}`",
             f"- docs: {st['docs']:,}, words: {st['words']:,}, word pieces: {st['word_pieces']:,}; "
             f"{st['docs_per_second']:,} docs/s, {st['words_per_second']:,} words/s, "
             f"{st['word_pieces_per_second']:,} word pieces/s",
             f"- primary metric: **{result.primary} = {pct(result.primary_score)}**", ""]
    lines += ["| metric | value |", "| --- | --- |"]
    lines += [f"| {key} | {pct(value)} |" for key, value in result.scores.items()]
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
