"""`sllm prepare`, `finetune`, `evaluate`, `compare`, `calibrate`, `predict`, `export-hf`: one model, on this
machine."""

from pathlib import Path
from typing import List, Optional

import typer

from ..core.bootstrap import BootstrapSettings
from ..data import DataError
from ..stages.shared.multitask import MultitaskSettings
from ..stages.shared.training import FinetuneConfig
from ..tasks import TASKS
from .common import (
    BatchSize,
    GpuId,
    KeepCheckpoints,
    LabelColumn,
    LabelSep,
    ModelArg,
    Resume,
    SkipBad,
    Strict,
    TaskArg,
    TextColumn,
    Track,
    app,
    check_task,
    device_of,
    fail,
    read_options,
    training_errors,
    with_settings,
)

FORMATS = "; ".join(f"{spec.name} {', '.join(spec.formats)}" for spec in TASKS.values())


@app.command("prepare")
def prepare_command(
    task: str = TaskArg,
    inputs: List[Path] = typer.Argument(..., help=f"training file(s): {FORMATS}"),
    output: Path = typer.Option(..., "--output", "-o", help="folder for train.spacy, dev.spacy, labels.json, "
                                                             "summary.json"),
    dev: Optional[Path] = typer.Option(None, help="dev file; without it a seeded, stratified split of train"),
    dev_fraction: float = typer.Option(0.1, help="share of train carved out as dev when no dev file is given"),
    seed: int = typer.Option(0, help="seed of the dev split"),
    lang: str = typer.Option("en", help="spaCy language of the tokenizer"),
    text_column: str = TextColumn,
    label_column: str = LabelColumn,
    label_sep: Optional[str] = LabelSep,
    strict: bool = Strict,
    skip_bad: bool = SkipBad,
) -> None:
    """Turn labelled data into spaCy DocBin files for fine-tuning."""
    from ..stages.prepare import prepare
    from ..tasks import task_spec

    spec = task_spec(check_task(task))
    try:
        result = prepare(spec.name, inputs, output, dev=dev, dev_fraction=dev_fraction, seed=seed, lang=lang,
                         options=read_options(text_column, label_column, label_sep, strict), skip_bad=skip_bad)
    except (DataError, ValueError) as err:
        fail(err)
    s = result.summary
    for split in ("train", "dev"):
        typer.echo(f"{split}: {spec.summary_line(s['splits'][split])}")
    for key, what in (("skipped", "skipped {} bad record(s):"),
                      ("repaired", "repaired {} tag sequence(s) that broke their scheme (--strict refuses them):")):
        if s[key]["count"]:
            typer.echo(what.format(s[key]["count"]), err=True)
            for record in s[key]["records"][:20]:
                typer.echo(f"  {record['path']}, {record['where']}: {record['problem']}", err=True)
    typer.echo(f"wrote {output} (content hash {s['content_hash'][:12]})")


@app.command("finetune")
@with_settings(MultitaskSettings, "multitask")
@with_settings(FinetuneConfig, "config")
def finetune_command(
    task: str = typer.Argument(..., help=f"one of: {', '.join(TASKS)}; or several joined by + (ner+textcat): one "
                                         "head each on a shared encoder, trained together"),
    train: List[Path] = typer.Option(..., help="train.spacy from `sllm prepare` (several tasks: one per task, in "
                                               "their order)"),
    dev: List[Path] = typer.Option(..., help="dev.spacy from `sllm prepare` (one per task)"),
    output: Path = typer.Option(..., "--output", "-o", help="spaCy pipeline folder to write"),
    gpu_id: Optional[int] = GpuId,
    resume: bool = Resume,
    keep_checkpoints: bool = KeepCheckpoints,
    track: bool = Track,
    config: FinetuneConfig = None,
    multitask: MultitaskSettings = None,
) -> None:
    """Fine-tune a Hugging Face model with the Trainer and save a spaCy pipeline. Several tasks (or a
    --base-model pipeline whose heads share an encoder, to add heads to it) train one shared encoder."""
    from ..stages.finetune import finetune, finetune_tasks
    from ..stages.shared.trainer import is_main_process

    tasks = [check_task(t) for t in task.split("+")]
    if gpu_id is not None:
        config.device = device_of(gpu_id)
    with training_errors(output):
        if len(tasks) > 1 or (Path(config.base_model).expanduser() / "config.cfg").is_file():
            result = finetune_tasks(tasks, train, dev, output, config, multitask, resume=resume,
                                    keep_checkpoints=keep_checkpoints)
        elif len(train) != 1 or len(dev) != 1:
            raise ValueError(f"one task ({tasks[0]}) takes one --train and one --dev file; got {len(train)} and "
                             f"{len(dev)}")
        else:
            result = finetune(tasks[0], train[0], dev[0], output, config, resume=resume,
                              keep_checkpoints=keep_checkpoints)
    if not is_main_process():  # under torchrun, one process reports and logs
        return
    typer.echo(result.summary())
    if track:
        from ..stages.shared.tracking import log_finetune, tracking_uri

        typer.echo(f"MLflow run {log_finetune(output)} in {tracking_uri()}")


@app.command("compare")
@with_settings(BootstrapSettings, "bootstrap", prefix="bootstrap-")
def compare_command(
    a: str = typer.Argument(..., help="pipeline A (the baseline): a folder, models:/NAME/VERSION or models:/NAME@ALIAS"),
    b: str = typer.Argument(..., help="pipeline B (compared with A): a folder or models:/ reference"),
    test: str = typer.Option(..., help="test data in any format `sllm prepare` reads; both run on its documents. "
                                       "Pipelines of several heads: HEAD=FILE, the head compared"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="folder for comparison.json and comparison.md"),
    batch_size: Optional[int] = BatchSize,
    text_column: str = TextColumn,
    label_column: str = LabelColumn,
    label_sep: Optional[str] = LabelSep,
    strict: bool = Strict,
    skip_bad: bool = SkipBad,
    bootstrap: BootstrapSettings = None,
) -> None:
    """Compare B with A on the same documents: each metric's difference with a paired bootstrap interval
    and p-value (and McNemar's test for classes)."""
    from ..stages.evaluate import compare, difference_row

    options = read_options(text_column, label_column, label_sep, strict)
    try:
        test = files_by_head([test], "test")
        head, test = next(iter(test.items())) if isinstance(test, dict) else (None, test)
        result = compare(a, b, Path(test), output, options=options, skip_bad=skip_bad, batch_size=batch_size,
                         bootstrap=bootstrap, head=head)
    except (DataError, ValueError) as err:
        fail(err)
    typer.echo(f"B - A on {result.evaluations[0].statistics['docs']:,} docs of {test}, "
               f"{100 * bootstrap.level:g}% paired bootstrap intervals:")
    typer.echo(f"| metric | A | B | B - A | {100 * bootstrap.level:g}% CI | p |")
    for name, d in result.scores.items():
        typer.echo(difference_row(name, d))
    if result.mcnemar:
        typer.echo(f"McNemar: {result.mcnemar['only_a_right']} docs only A right, {result.mcnemar['only_b_right']} "
                   f"only B; p = {result.mcnemar['p_value']:.4f}")
    if output is not None:
        typer.echo(f"wrote {output}/comparison.json and {output}/comparison.md")


def local_model(model: str) -> Path:
    """The pipeline folder behind a folder or models:/ reference, or exit 2 saying why not."""
    from ..stages.shared.references import local_pipeline

    try:
        return local_pipeline(model)
    except ValueError as err:
        fail(err)


@app.command("evaluate")
@with_settings(BootstrapSettings, "bootstrap", prefix="bootstrap-")
def evaluate_command(
    model: str = ModelArg,
    test: List[str] = typer.Argument(..., help="test data in any format `sllm prepare` reads; a pipeline of several "
                                               "heads: HEAD=FILE for each (ner=test.conll textcat=test.tsv)"),
    output: Path = typer.Option(..., "--output", "-o", help="folder for metrics.json, report.md, confusion.png"),
    batch_size: Optional[int] = BatchSize,
    text_column: str = TextColumn,
    label_column: str = LabelColumn,
    label_sep: Optional[str] = LabelSep,
    strict: bool = Strict,
    skip_bad: bool = SkipBad,
    track: bool = Track,
    bootstrap: BootstrapSettings = None,
) -> None:
    """Score a model on test data through nlp.pipe, with a bootstrap confidence interval for each headline
    metric; write metrics and a report."""
    from ..stages.evaluate import evaluate, evaluate_heads, interval_text

    options = read_options(text_column, label_column, label_sep, strict)
    try:
        tests = files_by_head(test, "test")
        if isinstance(tests, dict):
            metrics = evaluate_heads(model, tests, output, options=options, skip_bad=skip_bad, batch_size=batch_size,
                                     bootstrap=bootstrap)
            for head, evaluation in metrics["heads"].items():
                primary = evaluation["primary"]
                bounds = ((evaluation.get("intervals") or {}).get("scores") or {}).get(primary)
                ci = f" ({interval_text(bounds, bootstrap.level)})" if bounds else ""
                typer.echo(f"{head}: {primary} {100 * evaluation['scores'][primary]:.2f}{ci} "
                           f"on {evaluation['statistics']['docs']:,} docs of {evaluation['test']}")
            typer.echo(f"{metrics['primary']}: {100 * metrics['scores'][metrics['primary']]:.2f}")
            result = None
        else:
            result = evaluate(model, tests, output, options=options, skip_bad=skip_bad, batch_size=batch_size,
                              bootstrap=bootstrap)
    except (DataError, ValueError) as err:
        fail(err)
    if result is None:
        typer.echo(f"wrote {output}/metrics.json and {output}/report.md")
        if track:
            from ..stages.shared.tracking import log_evaluation, tracking_uri

            typer.echo(f"MLflow run {log_evaluation(output)} in {tracking_uri()}")
        return
    st = result.statistics
    bounds = result.interval(result.primary)
    ci = f" ({interval_text(bounds, bootstrap.level)})" if bounds else ""
    typer.echo(f"{result.primary}: {100 * result.primary_score:.2f}{ci} on {st['docs']:,} docs "
               f"({st['docs_per_second']:,} docs/s, {st['words_per_second']:,} words/s, "
               f"{st['word_pieces_per_second']:,} word pieces/s)")
    typer.echo(f"wrote {output}/metrics.json and {output}/report.md")
    if track:
        from ..stages.shared.tracking import log_evaluation, tracking_uri

        typer.echo(f"MLflow run {log_evaluation(output)} in {tracking_uri()}")


def files_by_head(values: List[str], what: str):
    """One file (a path), or HEAD=FILE for each head of a pipeline of several (a dict)."""
    if len(values) > 1 or "=" in values[0] and not Path(values[0]).exists():
        files = dict(v.split("=", 1) if "=" in v else ("", v) for v in values)
        if "" in files:
            raise ValueError(f"several {what} files: write HEAD=FILE for each (got {values})")
        return files
    return Path(values[0])


@app.command("calibrate")
def calibrate_command(
    model: str = ModelArg,
    dev: List[str] = typer.Option(..., "--dev", help="dev data in any format `sllm prepare` reads (never the test "
                                                     "set); a pipeline of several heads: HEAD=FILE for each"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="folder for the calibrated pipeline; default: "
                                                                       "the pipeline folder itself"),
    thresholds: bool = typer.Option(True, help="multi-label textcat: tune each label's threshold for F1 on dev"),
    ner_precision: Optional[float] = typer.Option(None, help="NER: set the entity score threshold to the lowest "
                                                             "that reaches this precision on dev (e.g. 0.95)"),
    batch_size: Optional[int] = BatchSize,
    text_column: str = TextColumn,
    label_column: str = LabelColumn,
    label_sep: Optional[str] = LabelSep,
    strict: bool = Strict,
    skip_bad: bool = SkipBad,
) -> None:
    """Fit each head's temperature on dev data (scores that mean what they say) and the thresholds on its
    scores; write the calibrated pipeline, with ECE and Brier before and after and a reliability diagram."""
    from ..stages.calibrate import calibrate

    options = read_options(text_column, label_column, label_sep, strict)
    try:
        fitted = calibrate(model, files_by_head(dev, "dev"), output, options=options, skip_bad=skip_bad,
                           batch_size=batch_size, tune_thresholds=thresholds, ner_precision=ner_precision)
    except (DataError, ValueError) as err:
        fail(err)
    for head, c in fitted.items():
        extra = {k: v for k, v in c.settings.items() if k != "temperature"}
        typer.echo(f"{head}: temperature {c.temperature:.4f}; ECE {c.before['ece']:.4f} -> {c.after['ece']:.4f}, "
                   f"Brier {c.before['brier']:.4f} -> {c.after['brier']:.4f} on {c.after['decisions']:,} decisions"
                   + (f"; set {extra}" if extra else ""))
    where = output or local_model(model)
    typer.echo(f"wrote {where} (report: {where}/calibration/calibration.md)")


@app.command("predict")
def predict_command(
    model: str = ModelArg,
    input_path: Path = typer.Argument(..., help='JSONL: {"text": ..., "questions": [...]} per line'),
    output_path: Path = typer.Argument(..., help="JSONL: each input record plus cats / ents / answers"),
    batch_size: Optional[int] = BatchSize,
    skip_bad: bool = SkipBad,
) -> None:
    """Stream records through the model (constant memory) and write predictions."""
    import spacy

    from ..stages.annotate import predict_file

    nlp = spacy.load(local_model(model))
    try:
        report = predict_file(nlp, input_path, output_path, batch_size=batch_size, skip_bad=skip_bad)
    except (DataError, ValueError) as err:
        fail(err)
    for record in report["skipped"][:20]:
        typer.echo(f"skipped {record['path']}, {record['where']}: {record['problem']}", err=True)
    typer.echo(f"wrote {report['written']:,} records to {output_path}"
               + (f" ({len(report['skipped'])} skipped)" if report["skipped"] else ""))


@app.command("export-hf")
def export_hf_command(
    model: str = ModelArg,
    component: str = typer.Argument(..., help="name of the hf_* component in the pipeline"),
    output: Path = typer.Argument(..., help="folder to write (save_pretrained layout)"),
) -> None:
    """Write a component's model and tokenizer as a plain Hugging Face folder."""
    import spacy

    from ..components.pipeline import export_hf

    nlp = spacy.load(local_model(model))
    try:
        path = export_hf(nlp, component, output)
    except ValueError as err:
        fail(err)
    typer.echo(f"wrote {path}")
