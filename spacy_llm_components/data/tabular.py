"""CSV and TSV files for classification: a header row, a text column and a label column.

TSV is read without quote handling (GLUE-style files hold bare quotes); CSV with
standard quoting. A multi-label cell lists labels separated by `label_sep`.
"""

import csv
import io
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from spacy.language import Language
from spacy.tokens import Doc

from .errors import BadRecords, DataError
from .text import read_text


def read_cats_table(path: Path, nlp: Language, bad: BadRecords, text_column: str = "text",
                    label_column: str = "label", label_sep: Optional[str] = None) -> List[Tuple[Doc, List[str], str]]:
    """(doc, labels, where) per row. With `label_sep`, a cell may hold several labels (or none)."""
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
    for column in (text_column, label_column):
        if column not in header:
            option = "--text-column" if column == text_column else "--label-column"
            raise DataError(path, "line 1", f"no column {column!r} in the header (columns: {', '.join(header)}); "
                            f"name yours with {option}")
    text_at, label_at = header.index(text_column), header.index(label_column)
    rows = []
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
        try:
            if len(row) != len(header):
                raise DataError(path, where, f"expected {len(header)} fields ({', '.join(header)}), got {len(row)}")
            text = row[text_at]
            if not text.strip():
                raise DataError(path, where, f"empty {text_column!r}")
            cell = row[label_at].strip()
            labels = [x.strip() for x in cell.split(label_sep)] if label_sep else [cell]
            labels = [x for x in labels if x] if label_sep else labels
            if not label_sep and not cell:
                raise DataError(path, where, f"empty {label_column!r}")
        except DataError as err:
            bad.report(err)
            continue
        rows.append((nlp.make_doc(text), labels, where))
    return rows
