"""Data preparation: user files (CoNLL, JSONL, CSV/TSV, SQuAD JSON, DocBin) -> reference Docs -> DocBin folders."""

from .docbin import docbin_bytes, read_docbin
from .errors import BadRecord, DataError
from .load import load_docs
from .prepare import Prepared, prepare
from .types import Loaded, ReadOptions

__all__ = ["BadRecord", "DataError", "Loaded", "Prepared", "ReadOptions", "docbin_bytes", "load_docs", "prepare",
           "read_docbin"]
