"""Data preparation: user files (CoNLL, JSONL, CSV/TSV, SQuAD JSON, DocBin) -> reference Docs -> DocBin folders."""

from .docbin import docbin_bytes, read_docbin, sha256_file
from .errors import BadRecord, DataError
from .load import FORMATS, TASKS, Loaded, ReadOptions, load_docs, set_cats
from .prepare import Prepared, describe, prepare

__all__ = [
    "BadRecord", "DataError", "FORMATS", "TASKS", "Loaded", "Prepared", "ReadOptions",
    "describe", "docbin_bytes", "load_docs", "prepare", "read_docbin", "set_cats", "sha256_file",
]
