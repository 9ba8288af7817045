"""Bytes serialization for components whose state is a folder: `to_bytes` packs what `to_disk` writes,
`from_bytes` unpacks it into a temporary folder for `from_disk`."""

import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import srsly


class FolderBytes:
    """`to_bytes` / `from_bytes` from the component's own `to_disk` / `from_disk`."""

    def to_bytes(self, *, exclude: Iterable[str] = tuple()) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            self.to_disk(Path(tmp) / "c", exclude=exclude)
            files = {str(p.relative_to(tmp)): p.read_bytes() for p in Path(tmp).rglob("*") if p.is_file()}
        return srsly.msgpack_dumps(files)

    def from_bytes(self, bytes_data: bytes, *, exclude: Iterable[str] = tuple()):
        tmp = Path(tempfile.mkdtemp())
        try:
            for rel, data in srsly.msgpack_loads(bytes_data).items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
            return self.from_disk(tmp / "c", exclude=exclude)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
