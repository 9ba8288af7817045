"""User files -> `train.spacy`, `dev.spacy`, `labels.json`, `summary.json` in one folder.

Deterministic: the same input and options give the same bytes, and `summary.json`
records a content hash of inputs and options (what a cache can key on). All
reading and checking happens before anything is written, and the files are
moved into place only when all of them are complete.
"""

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import spacy

from ..artifacts import LABELS, SUMMARY, json_bytes, write_files
from ..data.docbin import docbin_bytes
from ..data.errors import DataError
from ..data.split import split_indices
from ..data.types import Loaded, ReadOptions
from ..tasks import load_docs, task_spec

FORMAT_VERSION = 1  # bump when the written docs change for the same input

logger = logging.getLogger("spacy_llm_components")


@dataclass
class Prepared:
    output: Path
    task: str
    labels: List[str]
    multi_label: bool
    summary: Dict[str, Any]

    @property
    def train(self) -> Path:
        return self.output / "train.spacy"

    @property
    def dev(self) -> Path:
        return self.output / "dev.spacy"


def prepare(
    task: str,
    train: Union[str, Path, Sequence[Union[str, Path]]],
    output: Union[str, Path],
    *,
    dev: Optional[Union[str, Path]] = None,
    dev_fraction: float = 0.1,
    seed: int = 0,
    lang: str = "en",
    options: ReadOptions = ReadOptions(),
    multi_label: Optional[bool] = None,
    skip_bad: bool = False,
) -> Prepared:
    """Read `train` (one file or several, concatenated) and `dev`, else carve a seeded, stratified dev
    split from train, and write the folder."""
    spec = task_spec(task)
    nlp = spacy.blank(lang)
    train_paths = [Path(train)] if isinstance(train, (str, Path)) else [Path(p) for p in train]
    if not train_paths:
        raise ValueError("no training file given")
    parts = [load_docs(task, p, nlp, options=options, skip_bad=skip_bad) for p in train_paths]
    if dev is not None:
        parts.append(load_docs(task, dev, nlp, options=options, skip_bad=skip_bad))
    for part in parts:  # what was read leniently, per file (summary.json lists every place)
        if part.repairs:
            first = "; ".join(f"{r.where}: {r.problem}" for r in part.repairs[:3])
            logger.warning("%s: %d tag sequence(s) broke their scheme and were repaired as conlleval reads them "
                           "(--strict refuses them): %s%s", part.path, len(part.repairs), first,
                           "; ..." if len(part.repairs) > 3 else "")
    labels, multi = spec.labels(parts, multi_label)
    train_docs = [doc for part in parts[: len(train_paths)] for doc in part.docs]
    if dev is None:
        whole = _concat(parts)
        train_idx, dev_idx = split_indices(len(whole.docs), dev_fraction, seed, strata=whole.strata, groups=whole.groups)
        if not dev_idx or not train_idx:
            raise DataError(whole.path, None, f"{len(whole.docs)} record(s) are too few to carve a dev split; "
                            "give a dev file")
        train_docs, dev_docs = [whole.docs[i] for i in train_idx], [whole.docs[i] for i in dev_idx]
    else:
        dev_docs = parts[-1].docs
    files = {"train.spacy": docbin_bytes(train_docs), "dev.spacy": docbin_bytes(dev_docs)}
    label_info = {"task": spec.name, "labels": labels, "multi_label": multi, "lang": lang}
    summary = {
        **label_info,
        "content_hash": _content_hash(task, train_paths, dev, dev_fraction, seed, lang, options, multi_label, skip_bad),
        "inputs": {"train": [str(p) for p in train_paths], "dev": str(dev) if dev else None},  # as given
        "dev_from": "file" if dev else f"{dev_fraction:g} of train, seed {seed}",
        "splits": {"train": spec.describe(train_docs), "dev": spec.describe(dev_docs)},
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
        "skipped": {"count": sum(len(p.skipped) for p in parts),
                    "records": [r.to_dict() for p in parts for r in p.skipped]},
        # tag sequences that broke their scheme, read leniently like conlleval (--strict refuses them)
        "repaired": {"count": sum(len(p.repairs) for p in parts),
                     "records": [r.to_dict() for p in parts for r in p.repairs]},
    }
    files[LABELS] = json_bytes(label_info)
    files[SUMMARY] = json_bytes(summary)
    write_files(Path(output), files)
    return Prepared(Path(output), spec.name, labels, multi, summary)


def _concat(parts: List[Loaded]) -> Loaded:
    """One Loaded of several training files; groups are kept apart per file."""
    if len(parts) == 1:
        return parts[0]
    out = Loaded(parts[0].path, [d for p in parts for d in p.docs])
    if any(p.groups is not None for p in parts):
        out.groups = [(i, g) for i, p in enumerate(parts) for g in (p.groups or range(len(p.docs)))]
    if any(p.strata is not None for p in parts):
        out.strata = [s for p in parts for s in (p.strata or [None] * len(p.docs))]
    return out


def _content_hash(task: str, train: List[Path], dev: Optional[Union[str, Path]], dev_fraction: float, seed: int,
                  lang: str, options: ReadOptions, multi_label: Optional[bool], skip_bad: bool) -> str:
    digest = hashlib.sha256()
    settings = {"format": FORMAT_VERSION, "task": task, "dev_fraction": None if dev else dev_fraction,
                "seed": None if dev else seed, "lang": lang, "options": asdict(options),
                "multi_label": multi_label, "skip_bad": skip_bad}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for path in [*train, *([Path(dev)] if dev else [])]:
        digest.update(b"\0file\0" if path in train else b"\0dev\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()
