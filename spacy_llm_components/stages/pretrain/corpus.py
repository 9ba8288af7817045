"""Unlabelled text for pre-training: the documents of plain-text, JSONL, CSV/TSV, CoNLL, SQuAD and
DocBin files.

Which documents a file holds depends on its extension:
- `.jsonl`: the `text_column` field of each line;
- `.csv`, `.tsv`: the `text_column` column of each row (no label column needed);
- `.conll`, `.iob`, `.bio`: one document per sentence, its tokens joined by spaces;
- `.json`: the contexts of a SQuAD file, one per paragraph;
- `.spacy`: the text of each doc;
- anything else is plain text: one document per line (`text_unit="line"`), or per paragraph of
  lines between blank lines (`text_unit="paragraph"`).

Plain text and JSONL stream (constant memory, whatever the size). The labelled formats are read
whole by the readers `sllm prepare` uses, with their checks. Every error names the file and line; a
file without any text is an error.
"""

from pathlib import Path
from typing import Iterator

import spacy

from ...data.docbin import read_docbin
from ...data.errors import BadRecords, DataError
from ...data.jsonl import json_records, record_text
from ...data.tabular import read_table_texts
from ...data.text import decode_line
from ...data.types import ReadOptions
from ...tasks import TASKS

TEXT_UNITS = ("line", "paragraph")


def corpus_texts(path: Path, *, text_unit: str = "line", text_column: str = "text") -> Iterator[str]:
    """The documents of one corpus file, in file order."""
    path = Path(path)
    if text_unit not in TEXT_UNITS:
        raise ValueError(f"text unit {text_unit!r}: use one of {', '.join(TEXT_UNITS)}")
    if not path.is_file():
        raise DataError(path, None, "file does not exist" if not path.exists() else "not a file")
    found = False
    for text in _texts(path, text_unit, text_column):
        found = True
        yield text
    if not found:
        raise DataError(path, None, "no text: the file is empty or holds only blank lines")


def _texts(path: Path, text_unit: str, text_column: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    strict = BadRecords(skip=False)
    if suffix == ".jsonl":
        for number, record in json_records(path, strict):
            yield record_text(path, f"line {number}", record, text_column)
    elif suffix in (".csv", ".tsv"):
        for text, _ in read_table_texts(path, strict, text_column):
            yield text
    elif _task_reading(suffix) is not None:
        loaded = _task_reading(suffix).read(path, spacy.blank("en"), strict, ReadOptions(text_column))
        yield from (doc.text for doc in loaded.docs)
    elif suffix == ".spacy":
        yield from (doc.text for doc in read_docbin(path, spacy.blank("en").vocab) if doc.text.strip())
    else:
        yield from _plain_texts(path, text_unit)


def _task_reading(suffix: str):
    """The task whose reader takes files of this extension (its spec's `corpus_formats`), if any."""
    return next((spec for spec in TASKS.values() if suffix in spec.corpus_formats), None)


def _plain_texts(path: Path, text_unit: str) -> Iterator[str]:
    """Lines, or paragraphs (runs of non-blank lines, joined with newlines), streamed."""
    paragraph = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = decode_line(path, number, raw).rstrip("\r\n")
            if not line.strip():
                if paragraph:
                    yield "\n".join(paragraph)
                    paragraph = []
            elif text_unit == "line":
                yield line
            else:
                paragraph.append(line)
    if paragraph:
        yield "\n".join(paragraph)
