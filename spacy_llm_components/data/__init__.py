"""Readers: user files (CoNLL, JSONL, CSV/TSV, SQuAD JSON, DocBin) -> reference Docs, with errors that name
the file and line. Which reader a task uses is its spec's business (tasks/); writing DocBin folders is the
prepare stage's."""

from .docbin import docbin_bytes, read_docbin
from .errors import BadRecord, DataError
from .types import Loaded, ReadOptions

__all__ = ["BadRecord", "DataError", "Loaded", "ReadOptions", "docbin_bytes", "read_docbin"]
