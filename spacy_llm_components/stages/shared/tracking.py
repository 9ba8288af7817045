"""MLflow tracking: where a project's state lives (its folder, the tracking URI and experiment), what
produced a run (package versions, git commit), and one run per pre-training, fine-tune and evaluation,
keyed on the files those stages write (an encoder folder's metrics.json and training_log.jsonl; a
pipeline folder's meta.json `sllm` block, metrics.json and training_log.jsonl; an evaluation folder's
metrics.json, report.md and confusion.png), so the CLI, the flows and `project.yml` log the same way.
MLflow is imported only by the functions that talk to it, so finding the project folder costs nothing."""

import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

from ... import artifacts
from ...artifacts import CHECKPOINTS, METRICS, ArtifactError

PROJECT_ENV = "SLLM_PROJECT_DIR"  # where mlflow.db, mlartifacts/ and .prefect/ live; default: the working directory
DEFAULT_EXPERIMENT = "spacy-llm-components"
# MLflow 3's UI lists experiments of this kind with training runs (the default puts them under GenAI evaluation)
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")

_SET_BY_US: Optional[str] = None  # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: tell ours from a user's


def project_dir() -> Path:
    """The project folder (absolute): `$SLLM_PROJECT_DIR`, else the working directory."""
    return Path(os.environ.get(PROJECT_ENV) or os.getcwd()).resolve()


def tracking_uri() -> str:
    """`$MLFLOW_TRACKING_URI` (a tracking server in production), else `sqlite:///<project>/mlflow.db`."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    return env if env and env != _SET_BY_US else default_tracking_uri()


def default_tracking_uri() -> str:
    return f"sqlite:///{project_dir() / 'mlflow.db'}"


def artifact_root() -> Path:
    return project_dir() / "mlartifacts"


def use_tracking() -> str:
    """Point MLflow at `tracking_uri()` and return it. The registry follows it, unless the user set
    MLFLOW_REGISTRY_URI (mlflow.set_registry_uri would export it to every child process)."""
    import mlflow

    global _SET_BY_US
    uri = tracking_uri()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(uri)
    if uri == default_tracking_uri():  # a user's own MLFLOW_TRACKING_URI stays theirs on every later call
        _SET_BY_US = uri
    return uri


def experiment_id(name: Optional[str] = None) -> str:
    """The experiment's id, created on first use. With the default SQLite store its artifacts go to
    `<project>/mlartifacts/<experiment>` (an absolute path: `spacy project run` changes directory)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    use_tracking()
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.tags.get(EXPERIMENT_KIND[0]) is None:
            client.set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
        return found.experiment_id
    location = (artifact_root() / name).as_uri() if tracking_uri() == default_tracking_uri() else None
    try:
        return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    except MlflowException:  # created meanwhile by a concurrent run
        return client.get_experiment_by_name(name).experiment_id


def environment_tags() -> Dict[str, str]:
    """Package versions and the project's git commit, so a run says what produced it."""
    from importlib.metadata import PackageNotFoundError, version

    tags: Dict[str, str] = {}
    for package in ("spacy-llm-components", "spacy", "transformers", "torch", "mlflow",
                    "prefect"):
        try:
            tags[f"version.{package}"] = version(package)
        except PackageNotFoundError:
            pass
    try:
        root = Path(__file__).resolve().parents[3]  # the checkout holding the package
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            tags["git.commit"] = commit.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def code_version() -> str:
    """The package version and git commit: what a cached result of a flow step depends on beyond its inputs."""
    tags = environment_tags()
    return f"{tags.get('version.spacy-llm-components')}+{tags.get('git.commit', '')}"


PIPELINE_ARTIFACT = "pipeline"  # the pipeline folder inside a run's (or a logged model's) artifacts
ENCODER_ARTIFACT = "encoder"  # the encoder folder inside a pre-training run's artifacts


def numbers(data: Dict[str, Any], prefix: str = "") -> Dict[str, float]:
    """Numeric leaves of a nested dict as flat MLflow metric names (`dev.ents_f`)."""
    out: Dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(numbers(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[metric_key(name)] = float(value)
    return out


def metric_key(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in name)


def pipeline_info(pipeline: Union[str, Path]) -> Dict[str, Any]:
    """What fine-tuning recorded in a pipeline folder: the `sllm` block of meta.json (task, data
    hashes, labels, config, base model) and its metrics.json (as `finetune_metrics`)."""
    pipeline = Path(pipeline)
    if not (pipeline / artifacts.META).is_file():
        raise ArtifactError(f"{pipeline}: not a spaCy pipeline folder (no meta.json)")
    info = artifacts.read_meta_block(pipeline)
    if "task" not in info:  # a pipeline assembled by hand: ask its component
        import spacy

        from ...components.pipeline import task_of

        info["task"] = task_of(spacy.load(pipeline)).name
    return {**info, "finetune_metrics": artifacts.read_json(pipeline / METRICS)}


def log_finetune(pipeline: Union[str, Path], *, data_summary: Optional[Dict[str, Any]] = None,
                 run_name: Optional[str] = None, experiment: Optional[str] = None) -> str:
    """One MLflow run for a finished fine-tune: its settings as params, every logged step's loss and
    dev metrics at their step and time, data hashes, base model and versions as tags, and the pipeline
    folder (with metrics.json and training_log.jsonl) as artifacts. Returns the run id."""
    import mlflow

    pipeline = Path(pipeline)
    info = pipeline_info(pipeline)
    metrics = info["finetune_metrics"]
    tags = {"sllm.step": "finetune", "task": info["task"], "base_model": str(info.get("base_model", "")),
            "train_sha256": str(info.get("train_sha256", "")), "dev_sha256": str(info.get("dev_sha256", "")),
            **{k: str(v) for k, v in (info.get("encoder") or {}).items()}, **environment_tags()}
    if data_summary:
        tags["data_content_hash"] = str(data_summary.get("content_hash", ""))
    with mlflow.start_run(experiment_id=experiment_id(experiment), run_name=run_name or f"finetune-{info['task']}",
                          tags=tags) as run:
        mlflow.log_params({k: ("" if v is None else v) for k, v in (info.get("config") or {}).items()})
        mlflow.log_params({"labels": ",".join(info.get("labels") or [])[:6000], "multi_label": info.get("multi_label")})
        log_steps(run.info.run_id, pipeline)
        mlflow.log_metrics({f"best.{k}": v for k, v in numbers(metrics.get("dev") or {}).items()})
        mlflow.log_metrics(numbers(metrics.get("training") or {}, "training."))
        if data_summary:
            mlflow.log_dict(data_summary, "data_summary.json")
        with without_checkpoints(pipeline) as folder:
            mlflow.log_artifacts(str(folder), PIPELINE_ARTIFACT)
    return run.info.run_id


def log_pretrain(encoder: Union[str, Path], *, run_name: Optional[str] = None,
                 experiment: Optional[str] = None) -> str:
    """One MLflow run for a finished pre-training: its settings as params, the held-out perplexity and
    training loss at every logged step, perplexity before and after, the corpus' hashes and the base
    model as tags, and the encoder folder as artifacts. Returns the run id."""
    import mlflow

    encoder = Path(encoder)
    metrics = artifacts.read_json(encoder / METRICS, written_by=f"`sllm pretrain --output {encoder}`")
    if metrics.get("stage") != "pretrain":
        raise ArtifactError(f"{encoder / METRICS}: not the metrics of `sllm pretrain`")
    corpus, heldout = metrics.get("corpus") or {}, metrics.get("heldout") or {}
    tags = {"sllm.step": "pretrain", "base_model": str(metrics.get("base_model", "")),
            "corpus_sha256": str(corpus.get("sha256", "")), "dev_sha256": str(heldout.get("sha256") or ""),
            "heldout": str(heldout.get("from", "")), "encoder_sha256": artifacts.sha256_model(encoder),
            **{f"corpus_sha256.{i}": f["sha256"] for i, f in enumerate(corpus.get("files") or [])},
            **environment_tags()}
    with mlflow.start_run(experiment_id=experiment_id(experiment), run_name=run_name or "pretrain", tags=tags) as run:
        mlflow.log_params({k: ("" if v is None else v) for k, v in (metrics.get("config") or {}).items()})
        log_steps(run.info.run_id, encoder)
        mlflow.log_metrics({k: float(metrics[k]) for k in ("perplexity_before", "perplexity_after")})
        mlflow.log_metrics(numbers(metrics.get("training") or {}, "training."))
        mlflow.log_metrics(numbers({k: v for k, v in corpus.items() if k != "files"}, "corpus."))
        with without_checkpoints(encoder) as folder:
            mlflow.log_artifacts(str(folder), ENCODER_ARTIFACT)
    return run.info.run_id


def log_steps(run_id: str, folder: Path) -> None:
    """Every numeric value of `folder/training_log.jsonl` as a metric at its step and logging time."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    stepped = [Metric(metric_key(k), float(v), int(1000 * e["time"]) if "time" in e else now, int(e.get("step", 0)))
               for e in artifacts.read_log(folder) for k, v in e.items()
               if k not in ("step", "epoch", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)]
    client = MlflowClient()
    for start in range(0, len(stepped), 900):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=stepped[start:start + 900])


@contextmanager
def without_checkpoints(folder: Path) -> Iterator[Path]:
    """The folder, or a temporary copy of it without the Trainer checkpoints it may hold."""
    if not (folder / CHECKPOINTS).exists():
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="sllm-folder-") as tmp:
        copy = Path(tmp) / folder.name
        shutil.copytree(folder, copy, ignore=lambda d, names: [CHECKPOINTS] if Path(d) == folder else [])
        yield copy


def interval_metrics(data: Dict[str, Any]) -> Dict[str, float]:
    """An evaluation's (or each head's) confidence intervals as MLflow metrics: `<metric>.ci_low` and
    `<metric>.ci_high` (a head's prefixed with its name, as its scores are)."""
    out: Dict[str, float] = {}
    sources = [("", data)] + [(f"{head}_", ev) for head, ev in (data.get("heads") or {}).items()]
    for prefix, evaluation in sources:
        for name, (low, high) in ((evaluation.get("intervals") or {}).get("scores") or {}).items():
            out[metric_key(f"{prefix}{name}.ci_low")], out[metric_key(f"{prefix}{name}.ci_high")] = low, high
    return out


def calibration_metrics(data: Dict[str, Any]) -> Dict[str, float]:
    """An evaluation's (or each head's) calibration of its scores as MLflow metrics: `calibration.ece` and
    `calibration.brier` (a head's prefixed with its name)."""
    out: Dict[str, float] = {}
    sources = [("", data)] + [(f"{head}_", ev) for head, ev in (data.get("heads") or {}).items()]
    for prefix, evaluation in sources:
        calibration = evaluation.get("calibration") or {}
        for name in ("ece", "brier"):
            if name in calibration:
                out[metric_key(f"{prefix}calibration.{name}")] = float(calibration[name])
    return out


def log_evaluation(evaluation: Union[str, Path], *, run_name: Optional[str] = None,
                   experiment: Optional[str] = None) -> str:
    """One MLflow run for an evaluation folder (`sllm evaluate -o`): every score and statistic, the
    per-label scores, their intervals and calibration, the test set's hash, and the folder's files (report.md,
    metrics.json, errors.jsonl, the plots) as artifacts."""
    import mlflow

    evaluation = Path(evaluation)
    data = artifacts.read_json(evaluation / METRICS, written_by=f"`sllm evaluate -o {evaluation}`")
    tags = {"sllm.step": "evaluate", "task": str(data.get("task", "")), "primary_metric": str(data.get("primary")),
            "test_sha256": str(data.get("test_sha256") or ""), **environment_tags()}
    with mlflow.start_run(experiment_id=experiment_id(experiment), run_name=run_name or f"evaluate-{data.get('task')}",
                          tags=tags) as run:
        mlflow.log_params({"pipeline": data.get("pipeline"), "test": data.get("test")})
        mlflow.log_metrics(numbers(data.get("scores") or {}))
        mlflow.log_metrics(numbers(data.get("statistics") or {}, "statistics."))
        mlflow.log_metrics(numbers(data.get("per_label") or {}, "per_label."))
        mlflow.log_metrics(interval_metrics(data))
        mlflow.log_metrics(calibration_metrics(data))
        mlflow.log_artifacts(str(evaluation), "evaluation")  # report.md, reliability.png, errors.jsonl...
    return run.info.run_id
