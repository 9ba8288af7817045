"""Read any supported file for a task into reference Docs (gold annotations on them)."""

from pathlib import Path
from typing import Union

from spacy.language import Language

from .docbin import read_docbin
from .errors import BadRecords, DataError
from .types import Loaded, ReadOptions


def load_docs(task: str, path: Union[str, Path], nlp: Language, *, options: ReadOptions = ReadOptions(),
              skip_bad: bool = False) -> Loaded:
    """Read `path` by its extension, with the task's reader. Bad records raise DataError, or are skipped
    and listed when `skip_bad`.

    Textcat docs come back without `doc.cats`: the label set of train and dev
    together decides them (`TaskSpec.labels`)."""
    from ..tasks import task_spec

    spec = task_spec(task)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in spec.formats:
        raise DataError(path, None, f"cannot read {suffix or 'a file without extension'} for {spec.name}; "
                        f"use one of {', '.join(spec.formats)}")
    bad = BadRecords(skip_bad)
    if suffix == ".spacy":
        loaded = spec.check_docbin(path, read_docbin(path, nlp.vocab))
    else:
        loaded = spec.read(path, nlp, bad, options)
    loaded.skipped = bad.records
    if not loaded.docs:
        raise DataError(path, None, f"no usable records ({len(bad)} bad)" if len(bad) else "no records")
    return loaded
