"""MLflow: where runs are recorded, one run per fine-tune and evaluation, the pyfunc model that
serves any pipeline of this project, and the registry (register, gated promotion, serving).

Everything is keyed on files the library already writes: a pipeline folder (its meta.json
`sllm` block and metrics.json from fine-tuning) and an evaluation folder (metrics.json,
report.md, confusion.png). So the CLI, the Prefect flows and `project.yml` log the same way.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.tracking import MlflowClient

from .files import sha256_tree

PROJECT_ENV = "SLLM_PROJECT_DIR"  # where mlflow.db, mlartifacts/ and .prefect/ live; default: the working directory
DEFAULT_EXPERIMENT = "spacy-llm-components"
CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_NAME = "model"  # the logged model's name inside its run
PIPELINE_ARTIFACT = "pipeline"  # the pipeline folder inside the logged model's artifacts
# Request limits of the served model (environment variables override them): a request over a
# limit gets a 400 JSON error rather than minutes of CPU. `mlflow models serve` reads the whole
# body first and has no byte limit of its own: put a proxy in front for that.
MAX_ROWS = int(os.environ.get("SLLM_MAX_ROWS", 1_000))
MAX_TEXT_CHARS = int(os.environ.get("SLLM_MAX_TEXT_CHARS", 100_000))
MAX_REQUEST_CHARS = int(os.environ.get("SLLM_MAX_REQUEST_CHARS", 1_000_000))  # texts and questions
MAX_QUESTIONS = int(os.environ.get("SLLM_MAX_QUESTIONS", 64))  # per row


class RegistryError(ValueError):
    """A registry operation cannot be done as asked: the message says why."""


# ---------------------------------------------------------------------------------------------
# Where runs go


def project_dir() -> Path:
    """The project folder (absolute): `$SLLM_PROJECT_DIR`, else the working directory."""
    return Path(os.environ.get(PROJECT_ENV) or os.getcwd()).resolve()


_SET_BY_US: Optional[str] = None  # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: tell ours from a user's


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
    use_tracking()
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = (artifact_root() / name).as_uri() if tracking_uri() == default_tracking_uri() else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by a concurrent run
        return client.get_experiment_by_name(name).experiment_id


def environment_tags() -> Dict[str, str]:
    """Package versions and the project's git commit, so a run says what produced it."""
    from importlib.metadata import PackageNotFoundError, version

    tags: Dict[str, str] = {}
    for package in ("spacy-llm-components", "spacy", "spacy-transformers", "transformers", "torch", "mlflow",
                    "prefect"):
        try:
            tags[f"version.{package}"] = version(package)
        except PackageNotFoundError:
            pass
    try:
        root = Path(__file__).resolve().parents[1]
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            tags["git.commit"] = commit.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def _numbers(data: Dict[str, Any], prefix: str = "") -> Dict[str, float]:
    """Numeric leaves of a nested dict as flat MLflow metric names (`dev.ents_f`)."""
    out: Dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_numbers(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[_metric_key(name)] = float(value)
    return out


def _metric_key(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in name)


def _read_json(path: Path) -> Dict[str, Any]:
    return json.loads(path.read_text(encoding="utf8")) if path.is_file() else {}


def pipeline_info(pipeline: Union[str, Path]) -> Dict[str, Any]:
    """What fine-tuning recorded in a pipeline folder: the `sllm` block of meta.json (task, data
    hashes, labels, config, base model) and metrics.json."""
    pipeline = Path(pipeline)
    meta = _read_json(pipeline / "meta.json")
    if not meta:
        raise RegistryError(f"{pipeline}: not a spaCy pipeline folder (no meta.json)")
    info = dict(meta.get("sllm") or {})
    if "task" not in info:
        from .build import task_of

        import spacy

        info["task"] = task_of(spacy.load(pipeline))
    return {**info, "finetune_metrics": _read_json(pipeline / "metrics.json")}


# ---------------------------------------------------------------------------------------------
# Runs


def log_finetune(pipeline: Union[str, Path], *, data_summary: Optional[Dict[str, Any]] = None,
                 run_name: Optional[str] = None, experiment: Optional[str] = None) -> str:
    """One MLflow run for a finished fine-tune: its settings as params, every logged step's loss and
    dev metrics with their step, data hashes, base model and versions as tags, and the pipeline
    folder (with metrics.json and training_log.jsonl) as artifacts. Returns the run id."""
    pipeline = Path(pipeline)
    info = pipeline_info(pipeline)
    config = info.get("config") or {}
    metrics = info["finetune_metrics"]
    tags = {"sllm.step": "finetune", "task": info["task"], "base_model": str(info.get("base_model", "")),
            "train_sha256": str(info.get("train_sha256", "")), "dev_sha256": str(info.get("dev_sha256", "")),
            **environment_tags()}
    if data_summary:
        tags["data_content_hash"] = str(data_summary.get("content_hash", ""))
    with mlflow.start_run(experiment_id=experiment_id(experiment), run_name=run_name or f"finetune-{info['task']}",
                          tags=tags) as run:
        mlflow.log_params({k: ("" if v is None else v) for k, v in config.items()})
        mlflow.log_params({"labels": ",".join(info.get("labels") or [])[:6000], "multi_label": info.get("multi_label")})
        client, run_id = MlflowClient(), run.info.run_id
        log_path = pipeline / "training_log.jsonl"
        if log_path.is_file():
            from mlflow.entities import Metric

            entries = [json.loads(line) for line in log_path.read_text(encoding="utf8").splitlines() if line.strip()]
            now = int(time.time() * 1000)
            stepped = [Metric(_metric_key(k), float(v), now, int(e.get("step", 0)))
                       for e in entries for k, v in e.items()
                       if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)]
            for start in range(0, len(stepped), 900):  # log_batch takes at most 1000 metrics
                client.log_batch(run_id, metrics=stepped[start:start + 900])
        mlflow.log_metrics({f"best.{k}": v for k, v in _numbers(metrics.get("dev") or {}).items()})
        mlflow.log_metrics(_numbers(metrics.get("training") or {}, "training."))
        if data_summary:
            mlflow.log_dict(data_summary, "data_summary.json")
        with _without_checkpoints(pipeline) as folder:
            mlflow.log_artifacts(str(folder), PIPELINE_ARTIFACT)
    return run_id


@contextmanager
def _without_checkpoints(pipeline: Path) -> Iterator[Path]:
    """The pipeline folder, or a temporary copy of it without the Trainer checkpoints it may hold."""
    if not (pipeline / "checkpoints").exists():
        yield pipeline
        return
    with tempfile.TemporaryDirectory(prefix="sllm-pipeline-") as tmp:
        copy = Path(tmp) / pipeline.name
        shutil.copytree(pipeline, copy, ignore=lambda d, names: ["checkpoints"] if Path(d) == pipeline else [])
        yield copy


def log_evaluation(evaluation: Union[str, Path], *, run_name: Optional[str] = None,
                   experiment: Optional[str] = None) -> str:
    """One MLflow run for an evaluation folder (`sllm evaluate -o`): every metric, per-label scores,
    the test set's hash, and report.md, metrics.json and confusion.png as artifacts."""
    evaluation = Path(evaluation)
    data = _read_json(evaluation / "metrics.json")
    if not data:
        raise RegistryError(f"{evaluation}: no metrics.json (write it with `sllm evaluate -o {evaluation}`)")
    tags = {"sllm.step": "evaluate", "task": str(data.get("task", "")),
            "test_sha256": str(data.get("test_sha256") or ""), **environment_tags()}
    with mlflow.start_run(experiment_id=experiment_id(experiment), run_name=run_name or f"evaluate-{data.get('task')}",
                          tags=tags) as run:
        mlflow.log_params({"pipeline": data.get("pipeline"), "test": data.get("test")})
        mlflow.log_metrics(_numbers(data.get("metrics") or {}))
        mlflow.log_metrics(_numbers(data.get("per_label") or {}, "per_label."))
        mlflow.log_artifacts(str(evaluation), "evaluation")
    return run.info.run_id


# ---------------------------------------------------------------------------------------------
# The served model


class SpacyPipelineModel(mlflow.pyfunc.PythonModel):
    """Any pipeline of this project as an MLflow pyfunc model.

    Input: a DataFrame with a `text` column and, for QA, an optional `questions` column (a list
    of strings, or one string, per row). Output: one dict per row with `cats`, `ents` and/or
    `answers`, as `sllm predict` writes them. Bad rows raise an MlflowException that the
    scoring server answers with a 400 JSON error.
    """

    def load_context(self, context) -> None:
        import threading

        import spacy

        import spacy_llm_components  # noqa: F401  (registers the factories and Doc extensions)

        self.nlp = spacy.load(context.artifacts[PIPELINE_ARTIFACT])
        self.lock = threading.Lock()  # the scoring server calls predict from a thread pool

    def predict(self, context, model_input, params: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
        from .predict import doc_predictions

        records = request_records(model_input)  # checked before waiting for the model
        with self.lock:  # make_doc touches the shared vocab too
            docs = list(request_docs(self.nlp, records))
            return [doc_predictions(doc, self.nlp) for doc in self.nlp.pipe(docs)]


def _bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def request_records(model_input: Any) -> List[Dict[str, Any]]:
    """The rows of a request (DataFrame, list of records or dict of columns) as dicts, checked:
    a missing `text`, a text that is not a string or is too long, or too many rows is a 400."""
    if isinstance(model_input, pd.DataFrame):
        records = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        records = [model_input]
    elif isinstance(model_input, list):
        records = model_input
    else:
        raise _bad_request(f"expected a table with a 'text' column, got {type(model_input).__name__}")
    if len(records) == 1 and isinstance(records[0], dict) and _is_column(records[0].get("text")):
        records = _columns_to_rows(records[0])  # {"inputs": {"text": [...], ...}} arrives as one row of columns
    if len(records) > MAX_ROWS:
        raise _bad_request(f"{len(records)} rows in one request; send at most {MAX_ROWS}")
    for number, record in enumerate(records):
        if not isinstance(record, dict) or "text" not in record:
            raise _bad_request(f"row {number}: no 'text' column")
        text = record["text"]
        if not isinstance(text, str):
            raise _bad_request(f"row {number}: 'text' must be a string, got {type(text).__name__}")
        if len(text) > MAX_TEXT_CHARS:
            raise _bad_request(f"row {number}: text has {len(text):,} characters; the limit is {MAX_TEXT_CHARS:,}")
        questions = record.get("questions")
        if hasattr(questions, "tolist"):  # a numpy array after schema enforcement
            questions = questions.tolist()
        if questions is None or (isinstance(questions, float) and questions != questions):  # absent / NaN
            record.pop("questions", None)
            continue
        if isinstance(questions, str):
            questions = [questions]
        if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
            raise _bad_request(f"row {number}: 'questions' must be a string or a list of strings")
        if len(questions) > MAX_QUESTIONS:
            raise _bad_request(f"row {number}: {len(questions)} questions; the limit is {MAX_QUESTIONS}")
        record["questions"] = questions
    total = sum(len(r["text"]) + sum(map(len, r.get("questions", []))) for r in records)
    if total > MAX_REQUEST_CHARS:
        raise _bad_request(f"the request holds {total:,} characters of text; the limit is {MAX_REQUEST_CHARS:,}")
    return records


def _is_column(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and getattr(value, "ndim", 0) == 1)


def _columns_to_rows(columns: Dict[str, Any]) -> List[Dict[str, Any]]:
    lists = {k: (v.tolist() if hasattr(v, "tolist") else list(v) if isinstance(v, (list, tuple)) else v)
             for k, v in columns.items() if v is not None}
    n = len(lists["text"])
    if any(not isinstance(v, list) or len(v) != n for v in lists.values()):
        raise _bad_request("columns of the request have different lengths")
    return [{k: v[i] for k, v in lists.items()} for i in range(n)]


def request_docs(nlp, records: List[Dict[str, Any]]) -> Iterator:
    """Input docs for the checked rows of a request (see `request_records`)."""
    from .data import DataError
    from .predict import make_input_doc

    for number, record in enumerate(records):
        try:
            yield make_input_doc(nlp, record, f"row {number}", "request")
        except DataError as err:
            raise _bad_request(str(err)) from None


def model_signature():
    """Input: `text` (string) and optional `questions` (list of strings); output: cats / ents / answers."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Map, Object, Property, Schema

    span = [Property("text", "string"), Property("start_char", "long"), Property("end_char", "long"),
            Property("score", "double")]
    inputs = Schema([ColSpec("string", "text"), ColSpec(Array("string"), "questions", required=False)])
    outputs = Schema([
        ColSpec(Map("double"), "cats", required=False),
        ColSpec(Array(Object([*span, Property("label", "string")])), "ents", required=False),
        ColSpec(Array(Object([*span, Property("question", "string")])), "answers", required=False),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs)


INPUT_EXAMPLES = {
    "textcat": {"text": ["The delivery was quick and the soup was still hot."]},
    "ner": {"text": ["Marta Kowalczyk opened a bakery in Lindenfeld for Brightwater Foods."]},
    "qa": {"text": ["The Lindenfeld bridge was finished in 1894 by the engineer Ada Brenner."],
           "questions": [["When was the bridge finished?", "Who built the bridge?"]]},
}


def requirements() -> List[str]:
    """The served model's pip requirements: this plugin and the versions it was logged with."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package in ("spacy-llm-components", "spacy", "spacy-transformers", "transformers", "torch", "mlflow",
                    "pandas"):
        try:
            out.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            out.append(package)
    return out


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass
class ModelVersionInfo:
    name: str
    version: str
    run_id: Optional[str]
    tags: Dict[str, str]
    created: bool  # False when this very pipeline was registered before

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def to_json(self) -> Dict[str, Any]:
        return {**asdict(self), "uri": self.uri}


def evaluation_tags(metrics: Any, task: str) -> Dict[str, str]:
    """Registry tags from an evaluation's metrics.json: the primary metric, its value, the test
    set's hash (what promotion compares on) and the headline numbers."""
    flat = metrics.get("metrics") if isinstance(metrics, dict) else None
    primary = flat.get("primary") if isinstance(flat, dict) else None
    if not isinstance(primary, str) or not isinstance(flat.get(primary), (int, float)):
        raise RegistryError("the metrics JSON has no primary metric: pass the metrics.json `sllm evaluate -o` writes")
    if metrics.get("task") not in (None, task):
        raise RegistryError(f"the metrics are of a {metrics['task']} evaluation, the pipeline is {task}")
    tags = {"primary_metric": primary, "primary_value": repr(float(flat[primary])),
            "eval_sha256": str(metrics.get("test_sha256") or ""), "eval_docs": str(flat.get("docs", ""))}
    for key, value in flat.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("seconds", "words"):
            tags[f"metric.{key}"] = repr(value)
    return tags


def register(pipeline: Union[str, Path], name: str, *, metrics: Optional[Union[str, Path, Dict]] = None,
             experiment: Optional[str] = None) -> ModelVersionInfo:
    """Log `pipeline` as a pyfunc model and make it a new version of registered model `name`,
    tagged with its task, data hashes and (given an evaluation's metrics.json) its scores; the
    version gets the alias `challenger`. The same pipeline registered again returns its existing
    version (its metric tags refreshed) instead of a duplicate."""
    pipeline = Path(pipeline).resolve()
    if not name or any(c in name for c in "'\"\\/@"):
        raise RegistryError(f"{name!r}: a registered model name cannot be empty or hold quotes, slashes or @")
    info = pipeline_info(pipeline)
    if isinstance(metrics, (str, Path)):
        path = Path(metrics)
        if not path.is_file():
            raise RegistryError(f"{path}: metrics file does not exist")
        try:
            metrics = json.loads(path.read_text(encoding="utf8"))
        except json.JSONDecodeError as err:
            raise RegistryError(f"{path}: not JSON ({err})") from None
    eval_tags = evaluation_tags(metrics, info["task"]) if metrics else {}
    fingerprint = sha256_tree(pipeline)
    tags = {"task": info["task"], "base_model": str(info.get("base_model", "")),
            "train_sha256": str(info.get("train_sha256", "")), "dev_sha256": str(info.get("dev_sha256", "")),
            "pipeline_sha256": fingerprint, **eval_tags}
    use_tracking()
    client = MlflowClient()
    existing = _version_with_tag(client, name, "pipeline_sha256", fingerprint)
    if existing is not None:
        for key, value in eval_tags.items():
            client.set_model_version_tag(name, existing.version, key, value)
        client.set_registered_model_alias(name, CHALLENGER, existing.version)
        return ModelVersionInfo(name, str(existing.version), existing.run_id, {**existing.tags, **eval_tags}, False)

    with mlflow.start_run(experiment_id=experiment_id(experiment), run_name=f"register-{name}",
                          tags={"sllm.step": "register", **tags, **environment_tags()}) as run:
        if eval_tags:
            mlflow.log_metrics({k[len("metric."):]: float(v) for k, v in eval_tags.items() if k.startswith("metric.")})
        with _without_checkpoints(pipeline) as folder:
            logged = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=SpacyPipelineModel(),
                artifacts={PIPELINE_ARTIFACT: str(folder)},
                signature=model_signature(),
                input_example=pd.DataFrame(INPUT_EXAMPLES[info["task"]]),
                pip_requirements=requirements(),
            )
    version = mlflow.register_model(logged.model_uri, name, tags=tags)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return ModelVersionInfo(name, str(version.version), run.info.run_id, tags, True)


def _version_with_tag(client: MlflowClient, name: str, key: str, value: str):
    try:
        client.get_registered_model(name)
    except MlflowException:
        return None
    found = client.search_model_versions(f"name = '{name}' and tags.{key} = '{value}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def version_by_alias(name: str, alias: str):
    """The model version behind `name@alias`, or None when the alias (or the model) does not exist."""
    use_tracking()
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


@dataclass
class PromotionDecision:
    name: str
    promoted: bool
    reason: str
    metric: Optional[str]
    challenger: Optional[str]
    challenger_score: Optional[float]
    champion: Optional[str]  # the champion before the decision
    champion_score: Optional[float]
    run_id: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


def promote(name: str, *, test: Optional[Union[str, Path]] = None,
            experiment: Optional[str] = None) -> PromotionDecision:
    """Move `champion` to the `challenger` version if it beats the champion's primary metric on the
    same evaluation set (or there is no champion). Scores come from the versions' evaluation tags,
    or, with `test`, from evaluating both versions on that file now. Versions are never deleted;
    the decision and both scores are logged as an MLflow run and as tags on the challenger."""
    use_tracking()
    client = MlflowClient()
    challenger = version_by_alias(name, CHALLENGER)
    if challenger is None:
        raise RegistryError(f"registered model {name!r} has no {CHALLENGER!r} version: register one with "
                            f"`sllm register PIPELINE --name {name}`")
    champion = version_by_alias(name, CHAMPION)
    if champion is not None and champion.version == challenger.version:
        return _decide(client, name, False, "the challenger already is the champion", challenger, champion,
                       _tag_score(challenger), _tag_score(challenger), experiment)
    if test is not None:
        scores = {v.version: _evaluate_version(name, v.version, test) for v in filter(None, (challenger, champion))}
        metric = scores[challenger.version][0]
        ch_score = scores[challenger.version][1]
        cp_score = scores[champion.version][1] if champion is not None else None
    else:
        metric, ch_score = _tag_score(challenger)
        if metric is None:
            raise RegistryError(f"{name} version {challenger.version} has no evaluation: register it with "
                                f"--metrics EVAL/metrics.json, or pass --test FILE to evaluate it now")
        cp_score = None
        if champion is not None:
            cp_metric, cp_score = _tag_score(champion)
            same_set = champion.tags.get("eval_sha256") and \
                champion.tags.get("eval_sha256") == challenger.tags.get("eval_sha256")
            if cp_metric != metric or not same_set:
                raise RegistryError(
                    f"{name} versions {champion.version} (champion) and {challenger.version} (challenger) were not "
                    f"evaluated on the same set with the same metric; pass --test FILE to evaluate both on it")
    if champion is None:
        return _decide(client, name, True, "no champion yet", challenger, None, (metric, ch_score), (metric, None),
                       experiment)
    if ch_score > cp_score:
        return _decide(client, name, True, f"challenger {metric} {ch_score:.4f} > champion {cp_score:.4f}",
                       challenger, champion, (metric, ch_score), (metric, cp_score), experiment)
    return _decide(client, name, False, f"challenger {metric} {ch_score:.4f} does not beat champion {cp_score:.4f}",
                   challenger, champion, (metric, ch_score), (metric, cp_score), experiment)


def _tag_score(version) -> tuple:
    metric, value = version.tags.get("primary_metric"), version.tags.get("primary_value")
    return (metric, float(value)) if metric and value is not None else (None, None)


def _evaluate_version(name: str, version: str, test: Union[str, Path]) -> tuple:
    from .evaluate import evaluate

    result = evaluate(version_pipeline(name, version), test)
    return result.primary, float(result.metrics[result.primary])


def _parse_model_uri(uri: str) -> tuple:
    """`models:/NAME@alias` or `models:/NAME/3` -> (name, alias or version)."""
    body = uri[len("models:/"):]
    name, sep, ref = body.partition("@") if "@" in body else body.rpartition("/")
    if not name or not ref:
        raise RegistryError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return name, ref


def pin_model(model: str) -> str:
    """A registry URI with its alias replaced by the version behind it now (a long job then uses
    one version throughout, wherever the alias moves); a pipeline path, made absolute."""
    if not model.startswith("models:/"):
        path = Path(model).resolve()
        if not (path / "meta.json").is_file():
            raise RegistryError(f"{model}: neither a models:/ URI nor a spaCy pipeline folder")
        return str(path)
    name, ref = _parse_model_uri(model)
    if ref.isdigit():
        return model
    version = version_by_alias(name, ref)
    if version is None:
        raise RegistryError(f"{model}: registered model {name!r} has no alias {ref!r}")
    return f"models:/{name}/{version.version}"


def model_pipeline(model: str) -> Path:
    """The local pipeline folder of a pipeline path or a `models:/` URI (downloaded)."""
    if not model.startswith("models:/"):
        return Path(model)
    return version_pipeline(*_parse_model_uri(model))


def version_pipeline(name: str, version_or_alias: str) -> Path:
    """The pipeline folder of a registered version (`models:/NAME/3` or `models:/NAME@champion`),
    downloaded from the artifact store."""
    use_tracking()
    from mlflow.models import Model

    sep = "@" if not str(version_or_alias).isdigit() else "/"
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}{sep}{version_or_alias}"))
    artifacts = Model.load(local).flavors["python_function"]["artifacts"]
    return local / artifacts[PIPELINE_ARTIFACT]["path"]


def _decide(client: MlflowClient, name: str, promoted: bool, reason: str, challenger, champion,
            ch: tuple, cp: tuple, experiment: Optional[str]) -> PromotionDecision:
    decision = PromotionDecision(name, promoted, reason, ch[0], str(challenger.version), ch[1],
                                 str(champion.version) if champion is not None else None, cp[1])
    with mlflow.start_run(experiment_id=experiment_id(experiment), run_name=f"promote-{name}",
                          tags={"sllm.step": "promote", "decision": "promoted" if promoted else "kept",
                                "reason": reason}) as run:
        mlflow.log_params({"model": name, "metric": decision.metric, "challenger_version": decision.challenger,
                           "champion_version": decision.champion})
        mlflow.log_metrics({k: v for k, v in (("challenger_score", decision.challenger_score),
                                               ("champion_score", decision.champion_score)) if v is not None})
    decision.run_id = run.info.run_id
    client.set_model_version_tag(name, challenger.version, "promotion",
                                 f"{'promoted' if promoted else 'not promoted'}: {reason}")
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, challenger.version)
    return decision


# ---------------------------------------------------------------------------------------------
# Serving


def serve_command(name: str, *, alias: str = CHAMPION, host: str = "127.0.0.1", port: int = 5000,
                  workers: int = 1) -> List[str]:
    """The `mlflow models serve` command line for `models:/NAME@ALIAS` in this environment."""
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    return [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "models", "serve",
            "-m", f"models:/{name}@{alias}", "--env-manager", "local", "-h", host, "-p", str(port),
            "-w", str(workers)]


def serve_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for the server: this environment's bin/ first on PATH (for uvicorn) and the
    tracking URI, so `models:/` resolves against the same registry."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["MLFLOW_TRACKING_URI"] = tracking_uri()
    env.update(extra or {})
    return env


def check_servable(name: str, alias: str = CHAMPION) -> None:
    if version_by_alias(name, alias) is None:
        raise RegistryError(f"registered model {name!r} has no {alias!r} version"
                            + (f"; promote one with `sllm promote {name}`" if alias == CHAMPION else ""))
