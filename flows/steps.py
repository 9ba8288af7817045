"""One flow per lifecycle stage (prepare data, pre-train, fine-tune, evaluate, register, promote), and
what the flows share: the cache policy, retries, and the checks of inputs and cached outputs.

Each stage is a flow around one cached task that calls the library and records the step in
MLflow. Task inputs are paths and content hashes, never live objects, so Prefect can cache
on them: a re-run with the same data, settings and base model skips finished steps, and a
run killed while fine-tuning continues from its last Trainer checkpoint.
"""

import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE
from spacy_llm_components.flows.settings import is_transient

from spacy_llm_components.artifacts import METRICS, sha256_file, sha256_model, sha256_tree
from spacy_llm_components.data import DataError, ReadOptions
from spacy_llm_components.stages import registry
from spacy_llm_components.stages.evaluate import evaluate as evaluate_pipeline
from spacy_llm_components.stages.finetune import finetune as finetune_pipeline
from spacy_llm_components.stages.finetune import finetune_tasks as finetune_several
from spacy_llm_components.stages.prepare import prepare
from spacy_llm_components.stages.pretrain import PretrainConfig
from spacy_llm_components.stages.pretrain import pretrain as pretrain_encoder
from spacy_llm_components.stages.shared import tracking
from spacy_llm_components.stages.shared.multitask import MultitaskSettings
from spacy_llm_components.stages.shared.tracking import code_version
from spacy_llm_components.stages.shared.training import FinetuneConfig

# across runs: same inputs and same code -> same result (code: see project.code_version); whether a
# progress bar was shown is no part of a result
CACHE = (INPUTS - "progress") + TASK_SOURCE
RETRIES = dict(retries=2, retry_delay_seconds=[5, 30],
               retry_condition_fn=lambda task, run, state: is_transient(state.result(raise_on_failure=False)))


def cached(step, **params) -> Dict[str, Any]:
    """Run a cached task with this package's version as part of its inputs; when the cache answers
    with output files that are gone or were since overwritten (another run in the same folder),
    run it again for real."""
    params["code_version"] = code_version()
    result = step(**params)
    if not _outputs_intact(result.get("files", {})):
        get_run_logger().info("cached %s points at missing or changed files: running it again", step.name)
        result = step.with_options(refresh_cache=True)(**params)
    return result


def output_hashes(*paths: Path) -> Dict[str, str]:
    return {str(p): sha256_file(p) for p in paths}


def _outputs_intact(files: Dict[str, str]) -> bool:
    return all(Path(p).is_file() and sha256_file(Path(p)) == digest for p, digest in files.items())


def existing_file(path: Optional[str]) -> Optional[str]:
    """An input file's absolute path, checked before any step runs."""
    if path is None:
        return None
    resolved = Path(path).resolve()
    if not resolved.is_file():
        raise DataError(resolved, None, "file does not exist" if not resolved.exists() else "not a file")
    return str(resolved)


def _base_model_fingerprint(base_model: str) -> str:
    """A local checkpoint folder by content (retrained in place, it is another model), a hub name as is."""
    path = Path(base_model)
    return sha256_model(path) if path.is_dir() else base_model


def _local_model(config: Dict[str, Any]) -> Dict[str, Any]:
    """A local base model as an absolute path (a scheduled run starts elsewhere)."""
    if Path(config["base_model"]).is_dir():
        config["base_model"] = str(Path(config["base_model"]).resolve())
    return config


# ---------------------------------------------------------------------------------------------
# prepare


@task(name="prepare", cache_policy=CACHE, **RETRIES)
def prepare_task(task_name: str, train: List[str], dev: Optional[str], output: str, options: Dict[str, Any],
                 input_sha256: List[str], code_version: str) -> Dict[str, Any]:
    prepared = prepare(task_name, [Path(p) for p in train], Path(output), dev=Path(dev) if dev else None,
                       dev_fraction=options["dev_fraction"], seed=options["seed"], lang=options["lang"],
                       options=read_options(options))
    out = Path(prepared.output)
    return {"output": str(out), "train": str(out / "train.spacy"), "dev": str(out / "dev.spacy"),
            "content_hash": prepared.summary["content_hash"], "summary": prepared.summary,
            "files": output_hashes(out / "train.spacy", out / "dev.spacy")}


def read_options(options: Dict[str, Any]) -> ReadOptions:
    """The readers' options among a flow's (columns, label separator, strict tag schemes)."""
    return ReadOptions(options.get("text_column", "text"), options.get("label_column", "label"),
                       options.get("label_sep"), bool(options.get("strict", False)))


@flow(name="prepare-data")
def prepare_data(task: str, train: List[str], output: str, dev: Optional[str] = None, dev_fraction: float = 0.1,
                 seed: int = 0, lang: str = "en", text_column: str = "text", label_column: str = "label",
                 label_sep: Optional[str] = None, strict: bool = False) -> Dict[str, Any]:
    """Read labelled files (CoNLL / CSV / TSV / JSONL / SQuAD) into train.spacy and dev.spacy; with
    `strict`, CoNLL tag sequences that break their scheme are errors instead of repaired."""
    train = [existing_file(p) for p in train]
    dev = existing_file(dev)
    options = dict(dev_fraction=dev_fraction, seed=seed, lang=lang, text_column=text_column,
                   label_column=label_column, label_sep=label_sep, strict=strict)
    return cached(prepare_task, task_name=task, train=train, dev=dev, output=str(Path(output).resolve()),
                   options=options, input_sha256=[sha256_file(Path(p)) for p in train + ([dev] if dev else [])])


# ---------------------------------------------------------------------------------------------
# pretrain


@task(name="pretrain", cache_policy=CACHE, **RETRIES)
def pretrain_task(corpus: List[str], dev: List[str], output: str, config: Dict[str, Any], corpus_sha256: List[str],
                  dev_sha256: List[str], base_model_sha256: str, code_version: str,
                  progress: bool = True) -> Dict[str, Any]:
    result = pretrain_encoder(corpus, output, PretrainConfig(**config), dev=dev, resume=True, progress=progress)
    run_id = tracking.log_pretrain(output)
    get_run_logger().info(result.summary())
    out = Path(output)
    return {"encoder": str(out), "perplexity_before": result.perplexity_before,
            "perplexity_after": result.perplexity_after, "best_step": result.best_step, "mlflow_run_id": run_id,
            "files": output_hashes(out / METRICS, *sorted(out.glob("*.safetensors")))}


@flow(name="pretrain")
def pretrain(corpus: List[str], output: str, dev: Optional[List[str]] = None, config: Optional[Dict[str, Any]] = None,
             progress: bool = True) -> Dict[str, Any]:
    """Continue pre-training an encoder on domain text (resuming an interrupted run) and log the run to MLflow."""
    config = _local_model(asdict(PretrainConfig(**(config or {}))))  # defaults filled in: part of the cache key
    corpus, dev = [existing_file(p) for p in corpus], [existing_file(p) for p in dev or []]
    return cached(pretrain_task, corpus=corpus, dev=dev, output=str(Path(output).resolve()), config=config,
                   corpus_sha256=[sha256_file(Path(p)) for p in corpus], dev_sha256=[sha256_file(Path(p)) for p in dev],
                   base_model_sha256=_base_model_fingerprint(config["base_model"]), progress=progress)


# ---------------------------------------------------------------------------------------------
# finetune


@task(name="finetune", cache_policy=CACHE, **RETRIES)
def finetune_task(task_name: str, train: str, dev: str, output: str, config: Dict[str, Any],
                  train_sha256: str, dev_sha256: str, base_model_sha256: str, code_version: str,
                  data_summary: Optional[Dict[str, Any]] = None, progress: bool = True) -> Dict[str, Any]:
    result = finetune_pipeline(task_name, train, dev, output, FinetuneConfig(**config), resume=True, progress=progress)
    run_id = tracking.log_finetune(output, data_summary=data_summary)
    get_run_logger().info(result.summary())
    return {"pipeline": str(Path(output)), "primary": result.primary, "dev": result.dev_metrics,
            "best_step": result.best_step, "resumed_from": result.resumed_from, "mlflow_run_id": run_id,
            "files": output_hashes(Path(output) / "meta.json", Path(output) / METRICS)}


@flow(name="finetune")
def finetune(task: str, train: str, dev: str, output: str, config: Optional[Dict[str, Any]] = None,
             data_summary: Optional[Dict[str, Any]] = None, progress: bool = True) -> Dict[str, Any]:
    """Fine-tune on prepared data (resuming an interrupted run) and log the run to MLflow."""
    config = _local_model(asdict(FinetuneConfig(**(config or {}))))  # defaults filled in: part of the cache key
    train, dev = existing_file(train), existing_file(dev)
    return cached(finetune_task, task_name=task, train=train, dev=dev, output=str(Path(output).resolve()),
                   config=config, train_sha256=sha256_file(Path(train)), dev_sha256=sha256_file(Path(dev)),
                   base_model_sha256=_base_model_fingerprint(config["base_model"]), data_summary=data_summary,
                   progress=progress)


@task(name="finetune-tasks", cache_policy=CACHE, **RETRIES)
def finetune_tasks_task(tasks: List[str], train: List[str], dev: List[str], output: str, config: Dict[str, Any],
                        multitask: Dict[str, Any], train_sha256: List[str], dev_sha256: List[str],
                        base_model_sha256: str, code_version: str, progress: bool = True) -> Dict[str, Any]:
    result = finetune_several(tasks, train, dev, output, FinetuneConfig(**config), MultitaskSettings(**multitask),
                              resume=True, progress=progress)
    run_id = tracking.log_finetune(output)
    get_run_logger().info(result.summary())
    return {"pipeline": str(Path(output)), "primary": result.primary, "dev": result.dev_metrics,
            "best_step": result.best_step, "resumed_from": result.resumed_from, "mlflow_run_id": run_id,
            "files": output_hashes(Path(output) / "meta.json", Path(output) / METRICS)}


@flow(name="finetune-tasks")
def finetune_tasks(tasks: List[str], train: List[str], dev: List[str], output: str,
                   config: Optional[Dict[str, Any]] = None, multitask: Optional[Dict[str, Any]] = None,
                   progress: bool = True) -> Dict[str, Any]:
    """Fine-tune one head per task on a shared encoder, together, on one prepared training and dev set per
    task (resuming an interrupted run), and log the run to MLflow."""
    config = _local_model(asdict(FinetuneConfig(**(config or {}))))
    multitask = asdict(MultitaskSettings(**(multitask or {})))
    train, dev = [existing_file(p) for p in train], [existing_file(p) for p in dev]
    return cached(finetune_tasks_task, tasks=list(tasks), train=train, dev=dev, output=str(Path(output).resolve()),
                   config=config, multitask=multitask, train_sha256=[sha256_file(Path(p)) for p in train],
                   dev_sha256=[sha256_file(Path(p)) for p in dev],
                   base_model_sha256=_base_model_fingerprint(config["base_model"]), progress=progress)


# ---------------------------------------------------------------------------------------------
# evaluate


@task(name="evaluate", cache_policy=CACHE, **RETRIES)
def evaluate_task(pipeline: str, test: str, output: str, pipeline_sha256: str, test_sha256: str,
                  code_version: str, options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    result = evaluate_pipeline(pipeline, test, output, options=read_options(options or {}))
    run_id = tracking.log_evaluation(output)
    return {"output": output, "metrics_file": str(Path(output) / METRICS), "task": result.task,
            "primary": result.primary, "score": result.primary_score, "scores": result.scores,
            "statistics": result.statistics, "per_label": result.label_rows(), "mlflow_run_id": run_id,
            "report": (Path(output) / "report.md").read_text(encoding="utf8"),
            "files": output_hashes(Path(output) / METRICS)}


@flow(name="evaluate")
def evaluate(pipeline: str, test: str, output: str, name: Optional[str] = None, text_column: str = "text",
             label_column: str = "label", label_sep: Optional[str] = None, strict: bool = False) -> Dict[str, Any]:
    """Score a pipeline on test data (read with the same options as its training data); publish the
    per-label table and the report as artifacts."""
    pipeline, test, output = str(Path(pipeline).resolve()), existing_file(test), str(Path(output).resolve())
    options = dict(text_column=text_column, label_column=label_column, label_sep=label_sep, strict=strict)
    result = cached(evaluate_task, pipeline=pipeline, test=test, output=output,
                    pipeline_sha256=sha256_tree(Path(pipeline)), test_sha256=sha256_file(Path(test)), options=options)
    key = artifact_key(f"{name or Path(pipeline).name}-{result['task']}")
    create_table_artifact(result["per_label"], key=f"{key}-metrics",
                          description=f"{result['task']} evaluation of {pipeline} on {test}")
    create_markdown_artifact(result["report"], key=f"{key}-report", description=f"evaluation report of {pipeline}")
    return result


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", text.lower())).strip("-") or "model"


# ---------------------------------------------------------------------------------------------
# register, promote


@task(name="register", **RETRIES)
def register_task(pipeline: str, name: str, metrics_file: Optional[str]) -> Dict[str, Any]:
    return registry.register(pipeline, name, metrics=metrics_file).to_json()  # idempotent per pipeline content


@flow(name="register")
def register(pipeline: str, name: str, metrics: Optional[str] = None) -> Dict[str, Any]:
    """Log the pipeline as a pyfunc model and register it as the `challenger` version of `name`."""
    return register_task(str(Path(pipeline).resolve()), name, str(Path(metrics).resolve()) if metrics else None)


@task(name="promote", **RETRIES)
def promote_task(name: str, test: Optional[str] = None) -> Dict[str, Any]:
    return registry.promote(name, test=test).to_json()


@flow(name="promote")
def promote(name: str, test: Optional[str] = None) -> Dict[str, Any]:
    """Make the challenger the champion if it beats it on the same evaluation set."""
    decision = promote_task(name, str(Path(test).resolve()) if test else None)
    get_run_logger().info("%s: %s (%s)", name, "promoted" if decision["promoted"] else "kept", decision["reason"])
    return decision
