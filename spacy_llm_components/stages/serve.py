"""Serve: a registered version or a pipeline folder behind `mlflow models serve` (POST /invocations), in
this environment and against this project's registry."""

import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

from .shared.pyfunc import pyfunc_model
from .shared.tracking import pipeline_info, tracking_uri


def serve_command(model_uri: str, *, host: str = "127.0.0.1", port: int = 5000, workers: int = 1) -> List[str]:
    """The `mlflow models serve` command line for a model (`models:/NAME@ALIAS`, `models:/NAME/3` or a
    local MLflow model folder) in this environment."""
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    return [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "models", "serve",
            "-m", model_uri, "--env-manager", "local", "-h", host, "-p", str(port), "-w", str(workers)]


def serve_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for the server: this environment's bin/ first on PATH (for uvicorn) and the
    tracking URI, so `models:/` resolves against the same registry."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["MLFLOW_TRACKING_URI"] = tracking_uri()
    env.update(extra or {})
    return env


def save_served_model(pipeline: Path, path: Path) -> Path:
    """A pipeline folder as a local MLflow model folder, for `mlflow models serve -m PATH`."""
    import mlflow

    mlflow.pyfunc.save_model(path=str(path), **pyfunc_model(pipeline, pipeline_info(pipeline)["task"]))
    return path
