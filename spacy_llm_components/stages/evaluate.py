"""Evaluate a pipeline on gold data through `nlp.pipe` (the path users take): metrics.json, report.md
and, for exclusive classes, the confusion matrix plot. Scoring itself is `shared.scoring`'s."""

from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
from spacy.language import Language

from ..artifacts import METRICS, json_bytes, sha256_file, write_files
from ..data import ReadOptions
from .shared.scoring import Evaluation, score_file


def evaluate(pipeline: Union[str, Path, Language], test: Union[str, Path], output: Optional[Union[str, Path]] = None,
             *, options: ReadOptions = ReadOptions(), skip_bad: bool = False,
             batch_size: Optional[int] = None) -> Evaluation:
    """Load the pipeline (a folder, `models:/NAME@ALIAS` or `models:/NAME/VERSION`), read `test` (any
    format `prepare` reads), score it, and (with `output`) write metrics.json, report.md and, for
    exclusive classes, confusion.png."""
    result, loaded, pipeline = score_file(pipeline, test, options=options, skip_bad=skip_bad, batch_size=batch_size)
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
