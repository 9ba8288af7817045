"""`sllm`: the command line (thin: parse arguments, call the library, print)."""

import sys
from pathlib import Path
from typing import List, Optional

import spacy
import typer

from .data import DataError, ReadOptions
from .data.load import TASKS

app = typer.Typer(help="spaCy components for fine-tuned Hugging Face Transformers.", no_args_is_help=True)

TaskArg = typer.Argument(..., help=f"one of: {', '.join(TASKS)}")
SkipBad = typer.Option(False, "--skip-bad", help="skip bad records (and list them) instead of stopping at the first")
TextColumn = typer.Option("text", help="text column (CSV/TSV) or field (JSONL) for textcat")
LabelColumn = typer.Option("label", help="label column (CSV/TSV) or field (JSONL; a list makes it multi-label)")
LabelSep = typer.Option(None, help="separator of several labels in one CSV/TSV cell (multi-label)")


# Fine-tuning options, shared by `finetune`, `run` and `schedule`.
BaseModel = typer.Option("sentence-transformers/all-MiniLM-L6-v2", help="local HF checkpoint folder or hub name")
Epochs = typer.Option(3.0, help="training epochs")
MaxSteps = typer.Option(-1, help="stop after this many optimizer steps (overrides --epochs)")
BatchSize = typer.Option(16, help="batch size per device")
LearningRate = typer.Option(5e-5, help="peak learning rate (linear warmup and decay)")
GradAccum = typer.Option(1, help="gradient accumulation steps")
WarmupRatio = typer.Option(0.1, help="share of steps spent warming up")
EvalSteps = typer.Option(None, help="evaluate (and checkpoint) every N steps; default once per epoch")
Patience = typer.Option(None, help="stop early after N evaluations without improvement")
MaxLength = typer.Option(None, help="cap on the model input in word pieces (long docs are windowed)")
Device = typer.Option("auto", help="auto, cpu or cuda:N (bf16 on CUDA devices that support it)")
Seed = typer.Option(0, help="random seed")
Track = typer.Option(True, "--track/--no-track", help="record the run in MLflow (see `sllm ui mlflow`)")


def _finetune_config(**options):
    from .train import FinetuneConfig

    return FinetuneConfig(**options)


@app.callback()
def main() -> None:
    """spacy-llm-components command line."""


def _fail(err: Exception, code: int = 2) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(code=code)


def _check_task(task: str) -> None:
    if task not in TASKS:
        _fail(ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}"))


@app.command("prepare")
def prepare_command(
    task: str = TaskArg,
    inputs: List[Path] = typer.Argument(..., help="training file(s): CoNLL/JSONL/.spacy (ner), CSV/TSV/JSONL (textcat), SQuAD JSON (qa)"),
    output: Path = typer.Option(..., "--output", "-o", help="folder for train.spacy, dev.spacy, labels.json, summary.json"),
    dev: Optional[Path] = typer.Option(None, help="dev file; without it a seeded, stratified split of train"),
    dev_fraction: float = typer.Option(0.1, help="share of train carved out as dev when no dev file is given"),
    seed: int = typer.Option(0, help="seed of the dev split"),
    lang: str = typer.Option("en", help="spaCy language of the tokenizer"),
    text_column: str = TextColumn,
    label_column: str = LabelColumn,
    label_sep: Optional[str] = LabelSep,
    skip_bad: bool = SkipBad,
) -> None:
    """Turn labelled data into spaCy DocBin files for fine-tuning."""
    from .data import prepare

    _check_task(task)
    try:
        result = prepare(task, inputs, output, dev=dev, dev_fraction=dev_fraction, seed=seed, lang=lang,
                         options=ReadOptions(text_column, label_column, label_sep), skip_bad=skip_bad)
    except (DataError, ValueError) as err:
        _fail(err)
    s = result.summary
    for split in ("train", "dev"):
        counts = s["splits"][split]
        extra = f", {counts['questions']:,} questions" if task == "qa" else f", per label {counts['per_label']}"
        typer.echo(f"{split}: {counts['docs']:,} docs{extra}")
    if s["skipped"]["count"]:
        typer.echo(f"skipped {s['skipped']['count']} bad record(s):", err=True)
        for record in s["skipped"]["records"][:20]:
            typer.echo(f"  {record['path']}, {record['where']}: {record['problem']}", err=True)
    typer.echo(f"wrote {output} (content hash {s['content_hash'][:12]})")


@app.command("finetune")
def finetune_command(
    task: str = TaskArg,
    train: Path = typer.Option(..., help="train.spacy from `sllm prepare`"),
    dev: Path = typer.Option(..., help="dev.spacy from `sllm prepare`"),
    output: Path = typer.Option(..., "--output", "-o", help="spaCy pipeline folder to write"),
    base_model: str = BaseModel,
    epochs: float = Epochs,
    max_steps: int = MaxSteps,
    batch_size: int = BatchSize,
    lr: float = LearningRate,
    grad_accum: int = GradAccum,
    warmup_ratio: float = WarmupRatio,
    eval_steps: Optional[int] = EvalSteps,
    patience: Optional[int] = Patience,
    max_length: Optional[int] = MaxLength,
    device: str = Device,
    seed: int = Seed,
    gpu_id: Optional[int] = typer.Option(None, help="spaCy style: -1 for CPU, N for cuda:N (overrides --device)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from its last checkpoint"),
    keep_checkpoints: bool = typer.Option(False, help="keep OUTPUT/checkpoints after a finished run"),
    track: bool = Track,
) -> None:
    """Fine-tune a Hugging Face model with the Trainer and save a spaCy pipeline."""
    from .train import FinetuneError, finetune

    _check_task(task)
    if gpu_id is not None:
        device = "cpu" if gpu_id < 0 else f"cuda:{gpu_id}"
    config = _finetune_config(base_model=base_model, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                              lr=lr, grad_accum=grad_accum, warmup_ratio=warmup_ratio, eval_steps=eval_steps,
                              patience=patience, max_length=max_length, device=device, seed=seed)
    try:
        result = finetune(task, train, dev, output, config, resume=resume, keep_checkpoints=keep_checkpoints)
    except KeyboardInterrupt:
        typer.echo(f"interrupted: continue with the same command plus --resume (checkpoints in {output}/checkpoints)",
                   err=True)
        raise typer.Exit(code=130)
    except (DataError, FinetuneError, ValueError) as err:
        _fail(err)
    typer.echo(result.summary())
    if track and _is_main_process():
        from .tracking import log_finetune, tracking_uri

        run_id = log_finetune(output)
        typer.echo(f"MLflow run {run_id} in {tracking_uri()}")


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"  # under torchrun, one process logs


@app.command("evaluate")
def evaluate_command(
    pipeline: Path = typer.Argument(..., exists=True, file_okay=False, help="spaCy pipeline folder"),
    test: Path = typer.Argument(..., help="test data in any format `sllm prepare` reads"),
    output: Path = typer.Option(..., "--output", "-o", help="folder for metrics.json, report.md, confusion.png"),
    batch_size: Optional[int] = typer.Option(None, help="nlp.pipe batch size"),
    text_column: str = TextColumn,
    label_column: str = LabelColumn,
    label_sep: Optional[str] = LabelSep,
    skip_bad: bool = SkipBad,
    track: bool = Track,
) -> None:
    """Score a pipeline on test data through nlp.pipe; write metrics and a report."""
    from .evaluate import evaluate

    try:
        result = evaluate(pipeline, test, output, options=ReadOptions(text_column, label_column, label_sep),
                          skip_bad=skip_bad, batch_size=batch_size)
    except (DataError, ValueError) as err:
        _fail(err)
    m = result.metrics
    typer.echo(f"{m['primary']}: {100 * m[m['primary']]:.2f} on {m['docs']:,} docs ({m['words_per_second']:,} words/s)")
    typer.echo(f"wrote {output}/metrics.json and {output}/report.md")
    if track:
        from .tracking import log_evaluation, tracking_uri

        typer.echo(f"MLflow run {log_evaluation(output)} in {tracking_uri()}")


@app.command("predict")
def predict_command(
    pipeline: Path = typer.Argument(..., exists=True, file_okay=False, help="spaCy pipeline folder"),
    input_path: Path = typer.Argument(..., help='JSONL: {"text": ..., "questions": [...]} per line'),
    output_path: Path = typer.Argument(..., help="JSONL: each input record plus cats / ents / answers"),
    batch_size: Optional[int] = typer.Option(None, help="nlp.pipe batch size"),
    skip_bad: bool = SkipBad,
) -> None:
    """Stream records through the pipeline (constant memory) and write predictions."""
    from .predict import predict_file

    nlp = spacy.load(pipeline)
    try:
        report = predict_file(nlp, input_path, output_path, batch_size=batch_size, skip_bad=skip_bad)
    except (DataError, ValueError) as err:
        _fail(err)
    for record in report["skipped"][:20]:
        typer.echo(f"skipped {record['path']}, {record['where']}: {record['problem']}", err=True)
    typer.echo(f"wrote {report['written']:,} records to {output_path}"
               + (f" ({len(report['skipped'])} skipped)" if report["skipped"] else ""))


@app.command("export-hf")
def export_hf_command(
    pipeline: Path = typer.Argument(..., exists=True, file_okay=False, help="spaCy pipeline folder"),
    component: str = typer.Argument(..., help="name of the hf_* component in the pipeline"),
    output: Path = typer.Argument(..., help="folder to write (save_pretrained layout)"),
) -> None:
    """Write a component's model and tokenizer as a plain Hugging Face folder."""
    from .export import export_hf

    nlp = spacy.load(pipeline)
    try:
        path = export_hf(nlp, component, output)
    except ValueError as err:
        _fail(err)
    typer.echo(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# Registry, serving, flows


@app.command("register")
def register_command(
    pipeline: Path = typer.Argument(..., exists=True, file_okay=False, help="spaCy pipeline folder"),
    name: str = typer.Option(..., help="registered model name"),
    metrics: Optional[Path] = typer.Option(None, help="metrics.json of `sllm evaluate -o` (what promotion compares)"),
) -> None:
    """Log the pipeline as an MLflow model and register it as a new version (alias `challenger`)."""
    from .tracking import RegistryError, register, tracking_uri

    try:
        version = register(pipeline, name, metrics=metrics)
    except RegistryError as err:
        _fail(err)
    state = "registered" if version.created else "already registered as"
    typer.echo(f"{state} {name} version {version.version} (alias challenger) in {tracking_uri()}")


@app.command("promote")
def promote_command(
    name: str = typer.Argument(..., help="registered model name"),
    test: Optional[Path] = typer.Option(None, help="evaluate challenger and champion on this file now, "
                                                    "instead of comparing their recorded evaluations"),
) -> None:
    """Move the `champion` alias to the challenger if it beats the champion on the same evaluation set."""
    from .data import DataError
    from .tracking import RegistryError, promote

    try:
        decision = promote(name, test=test)
    except (RegistryError, DataError) as err:
        _fail(err)
    verdict = (f"champion is now version {decision.challenger}" if decision.promoted
               else f"champion stays version {decision.champion}")
    typer.echo(f"{name}: {verdict} ({decision.reason})")


@app.command("serve")
def serve_command(
    name: str = typer.Argument(..., help="registered model name"),
    alias: str = typer.Option("champion", help="alias of the version to serve"),
    port: int = typer.Option(5000, help="port"),
    host: str = typer.Option("127.0.0.1", help="interface; 0.0.0.0 to listen on all"),
    workers: int = typer.Option(1, help="server processes"),
) -> None:
    """Serve models:/NAME@ALIAS with `mlflow models serve` (POST /invocations)."""
    import os

    from .tracking import RegistryError, check_servable, serve_command as command, serve_env

    try:
        check_servable(name, alias)
    except RegistryError as err:
        _fail(err)
    args = command(name, alias=alias, host=host, port=port, workers=workers)
    typer.echo(f"serving models:/{name}@{alias} on http://{host}:{port}/invocations")
    os.execvpe(args[0], args, serve_env())


@app.command("run")
def run_command(
    task: str = TaskArg,
    train: List[Path] = typer.Option(..., help="training file(s), any format `sllm prepare` reads"),
    name: str = typer.Option(..., help="registered model name"),
    dev: Optional[Path] = typer.Option(None, help="dev file; without it a split of train"),
    test: Optional[Path] = typer.Option(None, help="test file for the evaluation; without it the dev split"),
    workdir: Optional[Path] = typer.Option(None, help="outputs (corpus, model, evaluation); default training/NAME"),
    promote: bool = typer.Option(False, "--promote", help="promote the new version if it beats the champion"),
    text_column: str = TextColumn,
    label_column: str = LabelColumn,
    label_sep: Optional[str] = LabelSep,
    base_model: str = BaseModel, epochs: float = Epochs, max_steps: int = MaxSteps, batch_size: int = BatchSize,
    lr: float = LearningRate, grad_accum: int = GradAccum, warmup_ratio: float = WarmupRatio,
    eval_steps: Optional[int] = EvalSteps, patience: Optional[int] = Patience, max_length: Optional[int] = MaxLength,
    device: str = Device, seed: int = Seed,
) -> None:
    """The whole pipeline as a Prefect flow: prepare, fine-tune, evaluate, register (and promote).
    Finished steps are skipped on a re-run with the same inputs; an interrupted fine-tune resumes."""
    from dataclasses import asdict

    _check_task(task)
    params = _pipeline_parameters(task, train, name, dev, test, workdir, promote, text_column, label_column,
                                  label_sep, asdict(_finetune_config(
                                      base_model=base_model, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                                      lr=lr, grad_accum=grad_accum, warmup_ratio=warmup_ratio, eval_steps=eval_steps,
                                      patience=patience, max_length=max_length, device=device, seed=seed)))
    from .flows.lifecycle import train_pipeline

    try:
        result = train_pipeline(**params)
    except (DataError, ValueError, OSError) as err:
        _fail(err)
    m = result["metrics"]
    typer.echo(f"{name} version {result['version']}: {m['primary']} {100 * m[m['primary']]:.2f}")
    if "promotion" in result:
        typer.echo(f"promotion: {result['promotion']['reason']}")


def _pipeline_parameters(task, train, name, dev, test, workdir, promote, text_column, label_column, label_sep,
                         config) -> dict:
    """train_pipeline's parameters with absolute paths (a scheduled run starts elsewhere)."""
    absolute = lambda p: str(Path(p).resolve()) if p is not None else None  # noqa: E731
    return dict(task=task, train=[absolute(p) for p in train], name=name, dev=absolute(dev), test=absolute(test),
                workdir=absolute(workdir), finetune_config=config, promote_if_better=promote,
                text_column=text_column, label_column=label_column, label_sep=label_sep)


@app.command("schedule")
def schedule_command(
    task: str = TaskArg,
    train: List[Path] = typer.Option(..., help="training file(s), re-read on every run"),
    name: str = typer.Option(..., help="registered model name"),
    cron: Optional[str] = typer.Option(None, help='cron schedule, e.g. "0 3 * * *"'),
    interval: Optional[float] = typer.Option(None, help="or: every N seconds"),
    dev: Optional[Path] = typer.Option(None), test: Optional[Path] = typer.Option(None),
    workdir: Optional[Path] = typer.Option(None),
    promote: bool = typer.Option(True, "--promote/--no-promote", help="promote a better model after each run"),
    text_column: str = TextColumn, label_column: str = LabelColumn, label_sep: Optional[str] = LabelSep,
    base_model: str = BaseModel, epochs: float = Epochs, max_steps: int = MaxSteps, batch_size: int = BatchSize,
    lr: float = LearningRate, device: str = Device, seed: int = Seed,
) -> None:
    """Serve train_pipeline on a schedule (runs until stopped). Needs a Prefect server:
    `sllm ui prefect` in another shell, then PREFECT_API_URL=http://127.0.0.1:4200/api."""
    import os
    from dataclasses import asdict

    _check_task(task)
    if (cron is None) == (interval is None):
        _fail(ValueError("give exactly one of --cron and --interval"))
    if promote and test is None:
        _fail(ValueError("scheduled promotion compares models on a fixed test file: pass --test FILE "
                         "(or --no-promote)"))
    if not os.environ.get("PREFECT_API_URL"):
        _fail(ValueError("schedules need a Prefect server: start one with `sllm ui prefect` and set "
                         "PREFECT_API_URL=http://127.0.0.1:4200/api"))
    params = _pipeline_parameters(task, train, name, dev, test, workdir, promote, text_column, label_column,
                                  label_sep, asdict(_finetune_config(base_model=base_model, epochs=epochs,
                                                                     max_steps=max_steps, batch_size=batch_size,
                                                                     lr=lr, device=device, seed=seed)))
    from prefect.deployments.runner import EntrypointType

    from .flows.lifecycle import train_pipeline

    train_pipeline.serve(name=f"train-{name}", cron=cron, interval=interval, parameters=params,
                         entrypoint_type=EntrypointType.MODULE_PATH, limit=1)  # runs never overlap on one workdir


@app.command("annotate")
def annotate_command(
    model: str = typer.Argument(..., help="models:/NAME@champion, models:/NAME/VERSION or a pipeline folder"),
    corpus: Path = typer.Argument(..., help='JSONL: {"text": ..., "questions": [...]} per line'),
    output: Path = typer.Option(..., "--output", "-o", help="folder for shard-NNNNN.jsonl"),
    lines_per_shard: int = typer.Option(10_000, help="lines per shard (one task each)"),
    task_runner: str = typer.Option("threads", help="threads, or dask (pip install 'spacy-llm-components[dask]')"),
    dask_address: Optional[str] = typer.Option(None, help="existing Dask scheduler, e.g. tcp://10.0.0.5:8786; "
                                                          "default a local cluster"),
    workers: Optional[int] = typer.Option(None, help="threads or local Dask workers (default 2)"),
    batch_size: Optional[int] = typer.Option(None, help="nlp.pipe batch size"),
    skip_bad: bool = SkipBad,
) -> None:
    """Annotate a large JSONL corpus in shards (Prefect tasks); a re-run skips finished shards."""
    from .flows.annotate import annotate_with
    from .tracking import RegistryError

    try:
        flow = annotate_with(task_runner, dask_address, workers)
        result = flow(model, str(corpus), str(output), lines_per_shard=lines_per_shard, batch_size=batch_size,
                      skip_bad=skip_bad)
    except (DataError, RegistryError, ValueError, OSError) as err:
        _fail(err)
    typer.echo(f"{result['shards']} shards in {result['output']} ({result['done_before']} done before, "
               f"{result['written']:,} records annotated now, {len(result['skipped'])} skipped)")


@app.command("ui")
def ui_command(
    which: str = typer.Argument(..., help="mlflow or prefect"),
    port: Optional[int] = typer.Option(None, help="port (mlflow 5000, prefect 4200)"),
) -> None:
    """Start the MLflow UI or the Prefect server/UI on what this project recorded."""
    import os

    from .orchestration import prefect_settings
    from .tracking import artifact_root, serve_env, tracking_uri

    env = serve_env(prefect_settings())
    bin_dir = Path(sys.executable).parent
    if which == "mlflow":
        args = [str(bin_dir / "mlflow"), "ui", "--backend-store-uri", tracking_uri(),
                "--default-artifact-root", artifact_root().as_uri(), "-h", "127.0.0.1", "-p", str(port or 5000)]
    elif which == "prefect":
        args = [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port or 4200)]
    else:
        _fail(ValueError(f"unknown UI {which!r}; use mlflow or prefect"))
    typer.echo(" ".join(args))
    os.execvpe(args[0], args, env)


@app.command("demo")
def demo_command(
    port: int = typer.Option(5151, help="first port of the demo servers (one per task)"),
) -> None:
    """The main job end to end on the demo data: prepare, fine-tune, evaluate, register, promote and
    serve one model per task, then ask each server one question (outputs in training/demo-*)."""
    from .demo import run_demo

    run_demo(port, echo=typer.echo)


if __name__ == "__main__":  # torchrun / accelerate launch -m spacy_llm_components.cli ...
    app()
