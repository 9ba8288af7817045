"""CSV and TSV files: a header row, a text column and (for classification) a label column.

TSV is read without quote handling (GLUE-style files hold bare quotes); CSV with
standard quoting. A multi-label cell lists labels separated by `label_sep`.
"""

import csv
import io
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from spacy.language import Language
from spacy.tokens import Doc

from .errors import BadRecords, DataError
from .text import read_text


def read_cats_table(path: Path, nlp: Language, bad: BadRecords, text_column: str = "text",
                    label_column: str = "label", label_sep: Optional[str] = None) -> List[Tuple[Doc, List[str], str]]:
    """(doc, labels, where) per row. With `label_sep`, a cell may hold several labels (or none)."""
    rows = []
    for where, (text, cell) in table_rows(path, bad, [(text_column, "--text-column"), (label_column, "--label-column")]):
        try:
            if not text.strip():
                raise DataError(path, where, f"empty {text_column!r}")
            cell = cell.strip()
            labels = [x.strip() for x in cell.split(label_sep)] if label_sep else [cell]
            labels = [x for x in labels if x] if label_sep else labels
            if not label_sep and not cell:
                raise DataError(path, where, f"empty {label_column!r}")
        except DataError as err:
            bad.report(err)
            continue
        rows.append((nlp.make_doc(text), labels, where))
    return rows


def read_table_texts(path: Path, bad: BadRecords, text_column: str = "text") -> Iterator[Tuple[str, str]]:
    """(text, where) per row with a non-empty `text_column` (other columns are not read)."""
    for where, (text,) in table_rows(path, bad, [(text_column, "--text-column")]):
        if text.strip():
            yield text, where


def table_rows(path: Path, bad: BadRecords, columns: List[Tuple[str, str]]) -> Iterator[Tuple[str, List[str]]]:
    """(where, the cells of `columns`) per non-blank row; `columns` pairs each column name with the
    option that names it, for the error when the header lacks it."""
    csv.field_size_limit(sys.maxsize)  # long documents are fine: the components window them
    tsv = path.suffix.lower() == ".tsv"
    reader = csv.reader(
        io.StringIO(read_text(path), newline=""),
        delimiter="\t" if tsv else ",",
        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
    )
    try:
        header = [h.strip() for h in next(reader)]
    except csv.Error as err:
        raise DataError(path, "line 1", f"cannot read the header row: {err}") from None
    for column, option in columns:
        if column not in header:
            raise DataError(path, "line 1", f"no column {column!r} in the header (columns: {', '.join(header)}); "
                            f"name yours with {option}")
    positions = [header.index(column) for column, _ in columns]
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            bad.report(DataError(path, f"line {reader.line_num}", f"malformed row: {err}"))
            continue
        where = f"line {reader.line_num}"
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(header):
            bad.report(DataError(path, where, f"expected {len(header)} fields ({', '.join(header)}), got {len(row)}"))
            continue
        yield where, [row[i] for i in positions]
