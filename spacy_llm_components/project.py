"""Where a project's state lives: its folder, the MLflow tracking URI and experiment, and what
produced a run (package versions, git commit). MLflow is imported only by the functions that
talk to it, so finding the project folder costs nothing."""

import os
import subprocess
from pathlib import Path
from typing import Dict, Optional

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


def code_version() -> str:
    """The package version and git commit: what a cached result of a flow step depends on beyond its inputs."""
    tags = environment_tags()
    return f"{tags.get('version.spacy-llm-components')}+{tags.get('git.commit', '')}"
