"""Writing outputs whole or not at all."""

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterable


def write_files(output: Path, files: Dict[str, bytes]) -> None:
    """Write every file to a temporary folder beside `output`, then move them in: a failure while
    writing leaves `output` as it was, never half an output."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        output.mkdir(exist_ok=True)
        for name in files:
            os.replace(tmp / name, output / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_tree(folder: Path, exclude: Iterable[str] = ("checkpoints",)) -> str:
    """One sha256 over a folder's relative file names and contents (skipping top-level `exclude`
    entries): the identity of a pipeline folder, whatever its path or file dates."""
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
