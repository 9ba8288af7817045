"""Writing outputs whole or not at all."""

import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict


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
