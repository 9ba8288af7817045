"""What the readers return: reference docs of one file, and the options of tabular/JSONL readers."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, List, Optional, Tuple

from spacy.tokens import Doc

from .errors import BadRecord


@dataclass(frozen=True)
class ReadOptions:
    """Column and field names for tabular/JSONL classification data; `label_sep` makes a CSV/TSV
    label cell multi-label; `strict` refuses CoNLL tag sequences that break their scheme instead of
    repairing them."""

    text_column: str = "text"
    label_column: str = "label"
    label_sep: Optional[str] = None
    strict: bool = False


@dataclass
class Loaded:
    """Reference docs of one file; `groups` keeps related docs (an article's paragraphs) together in splits,
    `strata` is what a stratified split balances (a doc's labels)."""

    path: Path
    docs: List[Doc]
    groups: Optional[List[Hashable]] = None
    strata: Optional[List[Hashable]] = None
    cat_rows: List[Tuple[List[str], str]] = field(default_factory=list)  # textcat: (labels, where) per doc
    skipped: List[BadRecord] = field(default_factory=list)
    repairs: List[BadRecord] = field(default_factory=list)  # records read leniently (CoNLL tag repairs)
