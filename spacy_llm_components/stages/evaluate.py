"""Evaluate a pipeline on gold data through `nlp.pipe` (the path users take): metrics.json, report.md
and, for exclusive classes, the confusion matrix plot. Scoring itself is `shared.scoring`'s. A pipeline
of several heads on one encoder is evaluated head by head, each on its own test file (`evaluate_heads`)."""

from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from spacy.language import Language

from ..artifacts import METRICS, json_bytes, sha256_file, write_files
from ..components.base import HFPipe
from ..core.bootstrap import BootstrapSettings, PairedDifference, check_bootstrap
from ..data import ReadOptions
from .shared.plots import confusion_png, reliability_png
from .shared.scoring import Comparison, Evaluation, compare_pipelines, open_pipeline, score_file

MEAN = "weighted_score"  # a multi-head evaluation's primary: the mean of its heads' primary scores
ERRORS = "errors.jsonl"  # every error of the evaluation, most confident first per kind, for relabelling
WORST = 10  # errors of each kind the report shows


def evaluate(pipeline: Union[str, Path, Language], test: Union[str, Path], output: Optional[Union[str, Path]] = None,
             *, options: ReadOptions = ReadOptions(), skip_bad: bool = False, batch_size: Optional[int] = None,
             bootstrap: Optional[BootstrapSettings] = BootstrapSettings()) -> Evaluation:
    """Load the pipeline (a folder, `models:/NAME@ALIAS` or `models:/NAME/VERSION`), read `test` (any
    format `prepare` reads), score it with a bootstrap confidence interval for each headline metric
    (`bootstrap`; None or 0 replicates: none), and (with `output`) write metrics.json, report.md and, for
    exclusive classes, confusion.png."""
    check_bootstrap(bootstrap or BootstrapSettings())
    result, loaded, pipeline = score_file(pipeline, test, options=options, skip_bad=skip_bad, batch_size=batch_size,
                                          bootstrap=bootstrap, errors=output is not None)
    if output is not None:
        test_hash = sha256_file(test) if Path(test).is_file() else None  # what promotion compares on
        files = {METRICS: json_bytes({**result.to_json(), "pipeline": str(pipeline), "test": str(test),
                                      "test_sha256": test_hash, "skipped": [r.to_dict() for r in loaded.skipped]})}
        if result.confusion is not None:
            files["confusion.png"] = confusion_png(result.confusion)
        if result.calibration:
            files["reliability.png"] = reliability_png({"scores": result.reliability}, f"{result.task}: reliability")
        files[ERRORS] = jsonl_bytes(result.errors or [])
        files["report.md"] = report_markdown(result, str(pipeline), str(test)).encode()
        write_files(Path(output), files)
    return result


def evaluate_heads(pipeline: Union[str, Path, Language], tests: Dict[str, Union[str, Path]],
                   output: Optional[Union[str, Path]] = None, *, options: ReadOptions = ReadOptions(),
                   skip_bad: bool = False, batch_size: Optional[int] = None,
                   bootstrap: Optional[BootstrapSettings] = BootstrapSettings()) -> Dict[str, Any]:
    """Score each hf_* head of the pipeline on its own test file (`tests`: head name -> file; every head
    needs one), the other heads off. The result (and, with `output`, metrics.json) holds every head's
    evaluation under `heads`, their scores prefixed with the head's name, and as primary the mean of the
    heads' primary scores; report.md has a section per head."""
    check_bootstrap(bootstrap or BootstrapSettings())
    nlp, reference = open_pipeline(pipeline)
    heads = [name for name, pipe in nlp.pipeline if isinstance(pipe, HFPipe)]
    unknown, missing = sorted(set(tests) - set(heads)), [h for h in heads if h not in tests]
    if unknown or missing:
        raise ValueError(f"the pipeline's heads are {heads}: give one test file for each, as HEAD=FILE"
                         + (f"; no head {unknown}" if unknown else "") + (f"; none for {missing}" if missing else ""))
    results, loaded_by_head = {}, {}
    for head in heads:
        results[head], loaded_by_head[head], _ = score_file(nlp, tests[head], options=options, skip_bad=skip_bad,
                                                           batch_size=batch_size, component=head,
                                                           bootstrap=bootstrap, errors=output is not None)
    hashes = {h: sha256_file(t) if Path(t).is_file() else None for h, t in tests.items()}
    scores = {MEAN: sum(r.primary_score for r in results.values()) / len(results)}
    scores.update({f"{h}_{k}": v for h, r in results.items() for k, v in r.scores.items()})
    seconds = sum(r.statistics["seconds"] for r in results.values())
    docs = sum(r.statistics["docs"] for r in results.values())
    metrics = {"task": "+".join(r.task for r in results.values()), "primary": MEAN, "scores": scores,
               "statistics": {"docs": docs, "seconds": round(seconds, 3),
                              "docs_per_second": round(docs / seconds, 1) if seconds else None,
                              **{k: next(iter(results.values())).statistics.get(k) for k in ("device", "machine")}},
               "heads": {h: {**r.to_json(), "test": str(tests[h]), "test_sha256": hashes[h],
                             "skipped": [x.to_dict() for x in loaded_by_head[h].skipped]} for h, r in results.items()},
               "pipeline": str(reference), "test": {h: str(t) for h, t in tests.items()},
               "test_sha256": sha256_text(repr(sorted(hashes.items())))}
    if output is not None:
        files = {METRICS: json_bytes(metrics)}
        report: List[str] = [f"# Evaluation: {metrics['task']}", "", f"- pipeline: `{reference}`",
                             f"- primary metric: **{MEAN} = {100 * scores[MEAN]:.2f}** (the mean of the heads' "
                             "primary scores)", ""]
        for head, result in results.items():
            section = report_markdown(result, str(reference), str(tests[head])).replace("# Evaluation:", "## Head",
                                                                                        1).replace("\n## ", "\n### ")
            report.append(section.replace("(confusion.png)", f"(confusion-{head}.png)")
                          .replace("(reliability.png)", f"(reliability-{head}.png)")
                          .replace(f"`{ERRORS}`", f"`errors-{head}.jsonl`"))
            files[f"errors-{head}.jsonl"] = jsonl_bytes(result.errors or [])
            if result.confusion is not None:
                files[f"confusion-{head}.png"] = confusion_png(result.confusion)
            if result.calibration:
                files[f"reliability-{head}.png"] = reliability_png({"scores": result.reliability},
                                                                   f"{head}: reliability")
        files["report.md"] = "\n".join(report).encode()
        write_files(Path(output), files)
    return metrics


def compare(a: Union[str, Path, Language], b: Union[str, Path, Language], test: Union[str, Path],
            output: Optional[Union[str, Path]] = None, *, options: ReadOptions = ReadOptions(), skip_bad: bool = False,
            batch_size: Optional[int] = None, bootstrap: BootstrapSettings = BootstrapSettings(),
            head: Optional[str] = None) -> Comparison:
    """Pipelines A and B (folders or models:/ references) on the same test file (their one head, or the
    head named `head` in each), compared document by document: every headline metric's difference B - A with its paired bootstrap interval and p-value, per
    label too, and McNemar's test for classes. With `output`: comparison.json and comparison.md."""
    result = compare_pipelines(a, b, test, options=options, skip_bad=skip_bad, batch_size=batch_size,
                               bootstrap=bootstrap, head=head)
    if output is not None:
        data = {**result.to_json(), "head": head, "test": str(test), "test_sha256": sha256_file(test) if Path(test).is_file() else None}
        write_files(Path(output), {"comparison.json": json_bytes(data),
                                   "comparison.md": comparison_markdown(result, str(test)).encode()})
    return result


def comparison_markdown(result: Comparison, test: str) -> str:
    level = f"{100 * result.settings.level:g}%"
    lines = [f"# Comparison: {result.task}", "", f"- A: `{result.a}`", f"- B: `{result.b}`", f"- test data: `{test}`",
             f"- B - A with its {level} paired bootstrap interval ({result.settings.replicates:,} replicates of the "
             f"documents, seed {result.settings.seed}) and the p-value of no difference", ""]
    lines += ["| metric | A | B | B - A | " + level + " CI | p |", "| --- | ---: | ---: | ---: | --- | ---: |"]
    lines += [difference_row(name, d) for name, d in result.scores.items()]
    if result.mcnemar:
        m = result.mcnemar
        lines += ["", f"McNemar's exact test: {m['only_a_right']} documents only A gets right, {m['only_b_right']} "
                      f"only B; p = {m['p_value']:.4f}."]
    if result.per_label:
        lines += ["", "## Per label (F)", "", "| label | A | B | B - A | " + level + " CI | p |",
                  "| --- | ---: | ---: | ---: | --- | ---: |"]
        lines += [difference_row(label, v["f"]) for label, v in result.per_label.items() if "f" in v]
    return "\n".join(lines) + "\n"


def difference_row(name: str, d: PairedDifference) -> str:
    low, high = d.interval
    return (f"| {name} | {100 * d.a:.2f} | {100 * d.b:.2f} | {100 * d.difference:+.2f} | "
            f"[{100 * low:+.2f}, {100 * high:+.2f}] | {d.p_value:.4f} |")


def sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def span(bounds) -> str:
    """[low, high] as `low–high` in points; "" without an interval."""
    return f"{100 * bounds[0]:.2f}–{100 * bounds[1]:.2f}" if bounds else ""


def interval_text(bounds, level: float) -> str:
    return f"{100 * level:g}% CI {span(bounds)}"


def report_markdown(result: Evaluation, pipeline: str, test: str) -> str:
    st = result.statistics
    drawn = result.intervals
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
    lines = [f"# Evaluation: {result.task}", "", f"- pipeline: `{pipeline}`", f"- test data: `{test}`",
             f"- docs: {st['docs']:,}, words: {st['words']:,}, word pieces: {st['word_pieces']:,}; "
             f"{st['docs_per_second']:,} docs/s, {st['words_per_second']:,} words/s, "
             f"{st['word_pieces_per_second']:,} word pieces/s",
             f"- primary metric: **{result.primary} = {pct(result.primary_score)}**"
             + (f" ({interval_text(result.interval(result.primary), drawn['level'])})"
                if result.interval(result.primary) else "")]
    if drawn:
        lines.append(f"- {100 * drawn['level']:g}% confidence intervals: percentile bootstrap, {drawn['replicates']:,} "
                     f"replicates of the {drawn['unit']}s (seed {drawn['seed']}, {drawn['seconds']:.2f} s)")
    ci = f"{100 * drawn['level']:g}% CI" if drawn else ""
    lines += ["", "| metric | value |" + (f" {ci} |" if drawn else ""), "| --- | --- |" + (" --- |" if drawn else "")]
    for key, value in result.scores.items():
        bounds = result.interval(key)
        lines.append(f"| {key} | {pct(value)} |" + (f" {span(bounds)} |" if drawn else ""))
    if result.per_label:
        has_auc = any(v.get("auc") is not None for v in result.per_label.values())
        per_ci = drawn.get("per_label") or {}
        lines += ["", "## Per label", "", "| label | P | R | F | " + (f"F {ci} | " if drawn else "")
                  + ("AUC | " if has_auc else "") + "support |",
                  "| --- | --- | --- | --- | " + ("--- | " if drawn else "") + ("--- | " if has_auc else "") + "--- |"]
        for label, v in result.per_label.items():
            auc = f"{pct(v.get('auc'))} | " if has_auc else ""
            f_ci = f"{span((per_ci.get(label) or {}).get('f'))} | " if drawn else ""
            lines.append(f"| {label} | {pct(v['p'])} | {pct(v['r'])} | {pct(v['f'])} | {f_ci}{auc}{v['support']} |")
    if result.calibration:
        lines += ["", "## Calibration", "", calibration_text(result.calibration), "", "![reliability](reliability.png)"]
    if result.errors is not None:
        lines += ["", *errors_markdown(result.errors)]
    if result.confusion is not None:
        lines += ["", "## Confusion matrix", "", "Rows: gold, columns: predicted.", "", "![confusion](confusion.png)"]
    return "\n".join(lines) + "\n"


def calibration_text(calibration: Dict[str, Any]) -> str:
    """One sentence on how well the scores match how often they are right."""
    c = calibration
    return (f"Of {c['of']}: {c['decisions']:,} decisions, mean score {c['mean_confidence']:.3f}, share right "
            f"{c['accuracy']:.3f}; expected calibration error **{c['ece']:.4f}** ({c['bins']} equal-width bins), "
            f"Brier score {c['brier']:.4f}. `sllm calibrate` fits the head's temperature on dev data.")


def jsonl_bytes(records: List[Dict[str, Any]]) -> bytes:
    import json

    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def errors_markdown(errors: List[Dict[str, Any]]) -> List[str]:
    """The errors section: how many of each kind, and the most confident of each with their text."""
    kinds: Dict[str, List[Dict[str, Any]]] = {}
    for record in errors:
        kinds.setdefault(record["kind"], []).append(record)
    lines = ["## Errors", "", f"{len(errors):,} errors: " + (", ".join(f"{len(v):,} {k.replace('_', ' ')}"
                                                                        for k, v in kinds.items()) or "none")
             + f"; all of them in `{ERRORS}` (one JSON record each, with the doc's text, for relabelling)."]
    for kind, records in kinds.items():
        lines += ["", f"### {kind.replace('_', ' ')} (most confident first)", "", "| doc | score | gold | predicted | text |",
                  "| ---: | ---: | --- | --- | --- |"]
        for r in records[:WORST]:
            score = "" if r.get("score") is None else f"{r['score']:.3f}"
            lines.append(f"| {r['doc']} | {score} | {_cell(r.get('gold', r.get('label')))} | "
                         f"{_cell(r.get('predicted', r.get('label') if kind == 'false_positive' else None))} | "
                         f"{_cell(r.get('question', '') + ' ' if r.get('question') else '')}{_cell(r['text'][:120])} |")
    return lines


def _cell(value: Any) -> str:
    """A value as a Markdown table cell: spans as `text` (LABEL), lists joined, pipes escaped."""
    if value is None:
        return ""
    if isinstance(value, list):
        return "; ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return f"{value['text']} ({value['label']})" if "label" in value else str(value)
    return str(value).replace("|", "\\|").replace("\n", " ")
