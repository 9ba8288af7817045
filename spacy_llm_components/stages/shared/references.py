"""Model references, the one resolver: a pipeline folder, `models:/NAME@ALIAS` or `models:/NAME/VERSION`
-> the version behind an alias now (`pin_model`) -> a local pipeline folder (`local_pipeline`)."""

import atexit
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

from ...artifacts import META
from .tracking import PIPELINE_ARTIFACT, tracking_uri, use_tracking


class RegistryError(ValueError):
    """A registry operation or a model reference cannot be done as asked: the message says why."""


def version_by_alias(name: str, alias: str):
    """The model version behind `name@alias`, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    use_tracking()
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


@dataclass(frozen=True)
class ModelRef:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION`."""

    name: str
    version: Optional[str] = None
    alias: Optional[str] = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}" if self.version else f"models:/{self.name}@{self.alias}"


def is_model_uri(model: Union[str, Path]) -> bool:
    return isinstance(model, str) and model.startswith("models:/")


def parse_model_uri(uri: str) -> ModelRef:
    """`models:/NAME@alias` or `models:/NAME/3` -> ModelRef (no registry access)."""
    body = uri[len("models:/"):] if is_model_uri(uri) else ""
    name, _, ref = body.partition("@") if "@" in body else body.rpartition("/")
    if not name or not ref or "/" in name:
        raise RegistryError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    if "@" in body:
        return ModelRef(name, alias=ref)
    if not ref.isdigit():
        raise RegistryError(f"{uri!r}: the version after the last / must be a number (or use models:/NAME@ALIAS)")
    return ModelRef(name, version=ref)


def pin_model(model: Union[str, Path]) -> str:
    """A registry URI with its alias replaced by the version behind it now (a long job then uses one
    version throughout, wherever the alias moves); a pipeline folder as an absolute path."""
    if not is_model_uri(model):
        path = Path(model).resolve()
        if not (path / META).is_file():
            raise RegistryError(f"{model}: neither a models:/ URI nor a spaCy pipeline folder (no {META})")
        return str(path)
    ref = parse_model_uri(str(model))
    if ref.version:
        return ref.uri
    version = version_by_alias(ref.name, ref.alias)
    if version is None:
        raise RegistryError(f"{model}: registered model {ref.name!r} has no alias {ref.alias!r}")
    return ModelRef(ref.name, version=str(version.version)).uri


_DOWNLOADS: Dict[Tuple[str, str, str], Path] = {}
_DOWNLOAD_LOCK = threading.Lock()
_DOWNLOAD_ROOT: Optional[Path] = None


def local_pipeline(model: Union[str, Path]) -> Path:
    """The local spaCy pipeline folder of a model reference: a pipeline folder as it is, a `models:/`
    URI downloaded from the artifact store once per process and version (removed when the process
    exits)."""
    global _DOWNLOAD_ROOT
    pinned = pin_model(model)
    if not is_model_uri(pinned):
        return Path(pinned)
    ref = parse_model_uri(pinned)
    key = (tracking_uri(), ref.name, ref.version)
    with _DOWNLOAD_LOCK:
        if key not in _DOWNLOADS:
            import mlflow
            from mlflow.models import Model

            if _DOWNLOAD_ROOT is None:
                _DOWNLOAD_ROOT = Path(tempfile.mkdtemp(prefix="sllm-models-"))
                atexit.register(shutil.rmtree, _DOWNLOAD_ROOT, ignore_errors=True)
            target = _DOWNLOAD_ROOT / f"{len(_DOWNLOADS)}-{ref.name}-{ref.version}"
            local = Path(mlflow.artifacts.download_artifacts(ref.uri, dst_path=str(target)))
            artifacts = Model.load(local).flavors["python_function"]["artifacts"]
            _DOWNLOADS[key] = local / artifacts[PIPELINE_ARTIFACT]["path"]
        return _DOWNLOADS[key]
