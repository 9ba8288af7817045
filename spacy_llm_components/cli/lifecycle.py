"""`sllm register`, `promote`, `serve`, `run`, `schedule`, `annotate`, `ui`, `demo`: the registry, serving
and the Prefect flows."""

import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import typer

from ..data import DataError
from ..stages.compress.distill import DistillConfig
from ..stages.pretrain import PretrainConfig
from ..stages.shared.training import FinetuneConfig
from .common import LabelColumn, LabelSep, SkipBad, Strict, TaskArg, TextColumn, app, check_task, fail, with_settings
from .compress import Compress, Gate, MaxDrop, parse_methods, variant_line


@app.command("register")
def register_command(
    pipeline: Path = typer.Argument(..., exists=True, file_okay=False, help="spaCy pipeline folder"),
    name: str = typer.Option(..., help="registered model name"),
    metrics: Optional[Path] = typer.Option(None, help="metrics.json of `sllm evaluate -o` (what promotion compares)"),
) -> None:
    """Log the pipeline as an MLflow model and register it as a new version (alias `challenger`)."""
    from ..stages.registry import register
    from ..stages.shared.tracking import tracking_uri

    try:
        version = register(pipeline, name, metrics=metrics)
    except ValueError as err:
        fail(err)
    state = "registered" if version.created else "already registered as"
    typer.echo(f"{state} {name} version {version.version} (alias challenger) in {tracking_uri()}")


@app.command("promote")
def promote_command(
    name: str = typer.Argument(..., help="registered model name"),
    test: Optional[Path] = typer.Option(None, help="evaluate challenger and champion on this file now, "
                                                    "instead of comparing their recorded evaluations"),
    max_head_drop: float = typer.Option(0.5, min=0, help="several heads on one encoder: points any head may lose "
                                                         "against the champion's"),
    rule: Optional[str] = typer.Option(None, help="better (a higher score), significant (the paired bootstrap "
                                                  "interval of the difference above 0) or no-worse (its lower bound "
                                                  "above -MARGIN); kept as the model's rule; default: the model's "
                                                  "last, else better. significant and no-worse need --test"),
    margin: Optional[float] = typer.Option(None, help="no-worse: the points the challenger may lose (default 0.5)"),
) -> None:
    """Move the `champion` alias to the challenger if it beats the champion on the same evaluation set."""
    from ..stages.registry import promote

    try:
        decision = promote(name, test=test, max_head_drop=max_head_drop, rule=rule, margin=margin)
    except ValueError as err:
        fail(err)
    verdict = (f"champion is now version {decision.challenger}" if decision.promoted
               else f"champion stays version {decision.champion}")
    typer.echo(f"{name}: {verdict} ({decision.reason})")


@app.command("serve")
def serve_command(
    model: str = typer.Argument(..., help="models:/NAME@ALIAS, models:/NAME/VERSION, a registered model NAME "
                                          "(served at --alias) or a spaCy pipeline folder"),
    alias: str = typer.Option("champion", help="alias served when MODEL is a bare registered model name"),
    port: int = typer.Option(5000, help="port"),
    host: str = typer.Option("127.0.0.1", help="interface; 0.0.0.0 to listen on all"),
    workers: int = typer.Option(1, help="server processes"),
) -> None:
    """Serve a model with `mlflow models serve` (POST /invocations)."""
    import subprocess
    import tempfile

    from ..stages.serve import save_served_model, serve_env
    from ..stages.serve import serve_command as command
    from ..stages.shared.references import is_model_uri, pin_model

    if not is_model_uri(model) and not Path(model).is_dir():
        model = f"models:/{model}@{alias}"
    try:
        pin_model(model)  # an alias that does not exist, or a folder that is no pipeline, fails here
    except ValueError as err:
        fail(err)
    typer.echo(f"serving {model} on http://{host}:{port}/invocations")
    if is_model_uri(model):
        args = command(model, host=host, port=port, workers=workers)
        os.execvpe(args[0], args, serve_env())
    with tempfile.TemporaryDirectory(prefix="sllm-served-") as tmp:  # a folder becomes an MLflow model first
        served = save_served_model(Path(model), Path(tmp) / "model")
        raise typer.Exit(subprocess.call(command(str(served), host=host, port=port, workers=workers), env=serve_env()))


def _flow_parameters(task: str, train: List[Path], name: str, dev: Optional[Path], test: Optional[Path],
                     workdir: Optional[Path], promote: bool, text_column: str, label_column: str,
                     label_sep: Optional[str], config: FinetuneConfig, pretrain_corpus: Optional[List[Path]] = None,
                     pretrain_dev: Optional[List[Path]] = None, pretrain_config: Optional[PretrainConfig] = None,
                     compress: Optional[str] = None, max_drop: float = 0.5,
                     distill_config: Optional[DistillConfig] = None, strict: bool = False, gate: str = "drop") -> dict:
    """train_pipeline's parameters with absolute paths (a scheduled run starts elsewhere)."""
    absolute = lambda p: str(Path(p).resolve()) if p is not None else None  # noqa: E731
    pretraining = {}
    if pretrain_corpus:
        pretraining = dict(pretrain_corpus=[absolute(p) for p in pretrain_corpus],
                           pretrain_dev=[absolute(p) for p in pretrain_dev or []] or None,
                           pretrain_config=asdict(pretrain_config))
    if distill_config is not None and distill_config.corpus:
        distill_config.corpus = absolute(distill_config.corpus)
    return dict(task=check_task(task), train=[absolute(p) for p in train], name=name, dev=absolute(dev),
                test=absolute(test), workdir=absolute(workdir), finetune_config=asdict(config),
                promote_if_better=promote, text_column=text_column, label_column=label_column, label_sep=label_sep,
                compress_methods=parse_methods(compress) if compress else None, max_drop=max_drop, gate=gate,
                distill_config=asdict(distill_config) if distill_config is not None else None, strict=strict,
                **pretraining)


PretrainCorpus = typer.Option(None, help="domain text (repeatable; any format `sllm pretrain` reads): pre-train the "
                                         "base model on it first, and fine-tune the adapted encoder")
PretrainDev = typer.Option(None, help="held-out text for the pre-training's perplexity; default a share of the corpus")
# the pre-training starts from the fine-tune's --base-model, on its --device
PretrainSettings = with_settings(PretrainConfig, "pretrain_config", prefix="pretrain-", exclude=("base_model", "device"))


@app.command("run")
@with_settings(DistillConfig, "distill_config", prefix="distill-")
@with_settings(FinetuneConfig, "config")
@PretrainSettings
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
    strict: bool = Strict,
    pretrain_corpus: Optional[List[Path]] = PretrainCorpus,
    pretrain_dev: Optional[List[Path]] = PretrainDev,
    compress: Optional[str] = Compress,
    max_drop: float = MaxDrop,
    gate: str = Gate,
    config: FinetuneConfig = None,
    pretrain_config: PretrainConfig = None,
    distill_config: DistillConfig = None,
) -> None:
    """The whole pipeline as a Prefect flow: prepare, (pre-train,) fine-tune, evaluate, register (and promote,
    and compress). Finished steps are skipped on a re-run with the same inputs; an interrupted fine-tune resumes."""
    params = _flow_parameters(task, train, name, dev, test, workdir, promote, text_column, label_column, label_sep,
                              config, pretrain_corpus, pretrain_dev, pretrain_config, compress, max_drop,
                              distill_config, strict, gate)
    from ..flows.lifecycle import train_pipeline

    try:
        result = train_pipeline(**params)
    except (DataError, ValueError, OSError) as err:
        fail(err)
    typer.echo(f"{name} version {result['version']}: {result['primary']} {100 * result['score']:.2f}")
    if "promotion" in result:
        typer.echo(f"promotion: {result['promotion']['reason']}")
    for variant in result.get("compression", {}).get("variants", []):
        typer.echo(variant_line(variant))


@app.command("schedule")
@with_settings(DistillConfig, "distill_config", prefix="distill-")
@with_settings(FinetuneConfig, "config")
@PretrainSettings
def schedule_command(
    task: str = TaskArg,
    train: List[Path] = typer.Option(..., help="training file(s), re-read on every run"),
    name: str = typer.Option(..., help="registered model name"),
    cron: Optional[str] = typer.Option(None, help='cron schedule, e.g. "0 3 * * *"'),
    interval: Optional[float] = typer.Option(None, help="or: every N seconds"),
    dev: Optional[Path] = typer.Option(None, help="dev file; without it a split of train"),
    test: Optional[Path] = typer.Option(None, help="fixed test file on which promotion compares versions"),
    workdir: Optional[Path] = typer.Option(None, help="outputs (corpus, model, evaluation); default training/NAME"),
    promote: bool = typer.Option(True, "--promote/--no-promote", help="promote a better model after each run"),
    text_column: str = TextColumn,
    label_column: str = LabelColumn,
    label_sep: Optional[str] = LabelSep,
    strict: bool = Strict,
    pretrain_corpus: Optional[List[Path]] = PretrainCorpus,
    pretrain_dev: Optional[List[Path]] = PretrainDev,
    compress: Optional[str] = Compress,
    max_drop: float = MaxDrop,
    gate: str = Gate,
    config: FinetuneConfig = None,
    pretrain_config: PretrainConfig = None,
    distill_config: DistillConfig = None,
) -> None:
    """Serve train_pipeline on a schedule (runs until stopped). Needs a Prefect server:
    `sllm ui prefect` in another shell, then PREFECT_API_URL=http://127.0.0.1:4200/api."""
    if (cron is None) == (interval is None):
        fail(ValueError("give exactly one of --cron and --interval"))
    if promote and test is None:
        fail(ValueError("scheduled promotion compares models on a fixed test file: pass --test FILE "
                        "(or --no-promote)"))
    if not os.environ.get("PREFECT_API_URL"):
        fail(ValueError("schedules need a Prefect server: start one with `sllm ui prefect` and set "
                        "PREFECT_API_URL=http://127.0.0.1:4200/api"))
    params = _flow_parameters(task, train, name, dev, test, workdir, promote, text_column, label_column, label_sep,
                              config, pretrain_corpus, pretrain_dev, pretrain_config, compress, max_drop,
                              distill_config, strict, gate)
    from prefect.deployments.runner import EntrypointType

    from ..flows.lifecycle import train_pipeline

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
    from ..flows.annotate import annotate_with

    try:
        flow = annotate_with(task_runner, dask_address, workers)
        result = flow(model, str(corpus), str(output), lines_per_shard=lines_per_shard, batch_size=batch_size,
                      skip_bad=skip_bad)
    except (DataError, ValueError, OSError) as err:
        fail(err)
    typer.echo(f"{result['shards']} shards in {result['output']} ({result['done_before']} done before, "
               f"{result['written']:,} records annotated now, {len(result['skipped'])} skipped)")


@app.command("ui")
def ui_command(
    which: str = typer.Argument(..., help="mlflow or prefect"),
    port: Optional[int] = typer.Option(None, help="port (mlflow 5000, prefect 4200)"),
) -> None:
    """Start the MLflow UI or the Prefect server/UI on what this project recorded."""
    from ..flows.settings import prefect_settings
    from ..stages.serve import serve_env
    from ..stages.shared.tracking import artifact_root, tracking_uri

    env = serve_env(prefect_settings())
    bin_dir = Path(sys.executable).parent
    if which == "mlflow":
        args = [str(bin_dir / "mlflow"), "ui", "--backend-store-uri", tracking_uri(),
                "--default-artifact-root", artifact_root().as_uri(), "-h", "127.0.0.1", "-p", str(port or 5000)]
    elif which == "prefect":
        port = port or 4200
        args = [str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        # the UI calls the API where these say, not on the default port 4200
        env.update(PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),
                   PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api")
    else:
        fail(ValueError(f"unknown UI {which!r}; use mlflow or prefect"))
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
