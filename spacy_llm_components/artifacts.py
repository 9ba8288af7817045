"""The files every stage writes and reads: their names, atomic writers, readers and content hashes.

One owner, so that a stage never parses another stage's file its own way:
- prepared data: `labels.json` (task, labels, language) and `summary.json` (counts, hashes);
- a trained model folder (pipeline or encoder): `metrics.json` (best dev scores, training speed;
  for an encoder its perplexity and corpus), `training_log.jsonl` (one JSON object per Trainer log)
  and the `sllm` block of spaCy's `meta.json` (with the encoder a fine-tune started from);
- an evaluation folder: `metrics.json` (scores, statistics, per-label scores, the test set's hash).

Writes are atomic: a file (or a folder's set of files) is complete or absent, never half written.
"""

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

METRICS = "metrics.json"
TRAINING_LOG = "training_log.jsonl"
LABELS = "labels.json"
SUMMARY = "summary.json"
META = "meta.json"
META_BLOCK = "sllm"  # our block inside spaCy's meta.json: task, data hashes, config, base model
CHECKPOINTS = "checkpoints"  # Trainer checkpoints inside an output folder, removed after a finished run

PathLike = Union[str, Path]


class ArtifactError(ValueError):
    """A file a stage needs is missing or unreadable: the message names it and says what writes it."""


# -- writing ------------------------------------------------------------------------------------------
def json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf8")


def write_files(output: PathLike, files: Dict[str, bytes]) -> None:
    """Write every file to a temporary folder beside `output`, then move them in: a failure while
    writing leaves `output` as it was, never half an output."""
    write_folder(output, lambda tmp: [(tmp / name).write_bytes(data) for name, data in files.items()])


def write_folder(output: PathLike, fill: Callable[[Path], Any]) -> None:
    """Let `fill` write files into a temporary folder beside `output`, then move them into `output`
    (files of the same names are replaced, others kept): a failure while writing leaves `output` as it
    was, never half an output."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        fill(tmp)
        output.mkdir(exist_ok=True)
        for part in sorted(tmp.iterdir()):
            if (output / part.name).is_dir():
                shutil.rmtree(output / part.name)
            os.replace(part, output / part.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_folder(output: PathLike, fill: Callable[[Path], Any]) -> Path:
    """Let `fill` write a whole folder in a temporary sibling of `output`, then swap it in place of
    `output`: afterwards `output` is the new folder, or (on any failure) exactly what it was."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        fill(tmp)
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def save_pipeline_copy(nlp: Any, source: PathLike, target: PathLike) -> None:
    """`nlp.to_disk(target)` for a pipeline loaded from `source` with other settings (an int8 copy, a
    calibrated one): how the weights were trained (metrics.json, training_log.jsonl) is still true of it."""
    nlp.to_disk(target)
    for name in (METRICS, TRAINING_LOG):
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, Path(target) / name)


def write_json(path: PathLike, data: Any) -> Path:
    """One JSON file, written to a temporary sibling and renamed into place."""
    path = Path(path)
    write_files(path.parent, {path.name: json_bytes(data)})
    return path


def append_log(folder: PathLike, entry: Dict[str, Any]) -> None:
    """Append one entry to `folder/training_log.jsonl`."""
    with open(Path(folder) / TRAINING_LOG, "a", encoding="utf8") as f:
        f.write(json.dumps(entry) + "\n")


def truncate_log(folder: PathLike, step: Optional[int]) -> None:
    """A fresh run (step None) starts a new log; a resumed one drops the entries logged after `step`."""
    path = Path(folder) / TRAINING_LOG
    if not path.exists():
        return
    if step is None:
        path.unlink()
        return
    kept = [entry for entry in read_log(folder) if entry.get("step", 0) <= step]
    write_files(path.parent, {path.name: "".join(json.dumps(e) + "\n" for e in kept).encode("utf8")})


# -- reading ------------------------------------------------------------------------------------------
def read_json(path: PathLike, *, written_by: Optional[str] = None) -> Dict[str, Any]:
    """A JSON object from `path`; {} when the file does not exist, unless `written_by` names the command
    that writes it (then a missing file is an error saying so)."""
    path = Path(path)
    if not path.is_file():
        if written_by:
            raise ArtifactError(f"{path}: file does not exist (it is written by {written_by})")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: not JSON ({err})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_log(folder: PathLike) -> List[Dict[str, Any]]:
    """The entries of `folder/training_log.jsonl`, in order ([] when there is none)."""
    path = Path(folder) / TRAINING_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf8").splitlines() if line.strip()]


@dataclass(frozen=True)
class LabelInfo:
    """What `prepare` recorded about the labels of a data folder."""

    task: str
    labels: List[str]
    multi_label: bool
    lang: str


def read_labels(data_file: PathLike) -> LabelInfo:
    """The labels.json beside a prepared `.spacy` file."""
    path = Path(data_file).parent / LABELS
    info = read_json(path, written_by="`sllm prepare`, beside train.spacy and dev.spacy")
    return LabelInfo(task=str(info.get("task")), labels=list(info.get("labels") or []),
                     multi_label=bool(info.get("multi_label", False)), lang=str(info.get("lang") or "en"))


def read_meta_block(pipeline: PathLike) -> Dict[str, Any]:
    """The `sllm` block of a pipeline folder's meta.json ({} for a pipeline built by hand)."""
    meta = read_json(Path(pipeline) / META)
    return dict(meta.get(META_BLOCK) or {})


# -- hashes -------------------------------------------------------------------------------------------
def sha256_file(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_tree(folder: PathLike, exclude: Iterable[str] = (CHECKPOINTS,)) -> str:
    """One sha256 over a folder's relative file names and contents (skipping top-level `exclude`
    entries): the identity of a pipeline or encoder folder, whatever its path or file dates."""
    folder, skip = Path(folder), set(exclude)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if rel.parts[0] in skip:
            continue
        digest.update(rel.as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def sha256_model(folder: PathLike) -> str:
    """The identity of a model folder by its weights, config and tokenizer: the run records beside them
    (checkpoints, metrics.json with its timings, training_log.jsonl) do not count, so the same model
    trained twice has one hash."""
    return sha256_tree(folder, exclude=(CHECKPOINTS, METRICS, TRAINING_LOG))


def encoder_lineage(base_model: str) -> Dict[str, Any]:
    """Which encoder a fine-tune starts from, when it is a local folder: its path and content hash, and
    for an encoder `sllm pretrain` wrote, its held-out perplexity and corpus hash. {} for a hub name.
    The keys are the registry tags and MLflow tags they become."""
    path = Path(base_model).expanduser()
    if not path.is_dir():
        return {}
    lineage: Dict[str, Any] = {"encoder_path": str(path.resolve()), "encoder_sha256": sha256_model(path)}
    metrics = read_json(path / METRICS)
    if metrics.get("stage") == "pretrain":
        lineage["encoder_perplexity"] = metrics.get("perplexity_after")
        lineage["encoder_corpus_sha256"] = (metrics.get("corpus") or {}).get("sha256")
    return lineage
