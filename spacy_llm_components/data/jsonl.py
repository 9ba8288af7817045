"""JSON Lines: NER records `{"text", "spans": [{"start", "end", "label"}]}` and
classification records `{"text", "label": "x"}` or `{"text", "labels": ["x", "y"]}`."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from spacy.language import Language
from spacy.tokens import Doc

from .errors import BadRecords, DataError
from .text import decode_line


@dataclass(frozen=True)
class LineRange:
    """Lines [first_line, first_line + lines) of a file, at bytes [start, end): a shard."""

    index: int
    start: int
    end: int
    first_line: int
    lines: int


def line_ranges(path: Path, lines_per_range: int) -> List[LineRange]:
    """Cut a file into ranges of `lines_per_range` lines, streaming (one pass, constant memory)."""
    if lines_per_range < 1:
        raise ValueError(f"lines per shard must be at least 1, got {lines_per_range}")
    if not path.is_file():
        raise DataError(path, None, "file does not exist" if not path.exists() else "not a file")
    ranges: List[LineRange] = []
    start = offset = count = 0
    with open(path, "rb") as f:
        for raw in f:
            offset += len(raw)
            count += 1
            if count == lines_per_range:
                ranges.append(LineRange(len(ranges), start, offset, len(ranges) * lines_per_range + 1, count))
                start, count = offset, 0
    if count:
        ranges.append(LineRange(len(ranges), start, offset, len(ranges) * lines_per_range + 1, count))
    return ranges


def json_records(path: Path, bad: BadRecords, on_bytes: Optional[Callable[[int], None]] = None,
                 lines: Optional[LineRange] = None) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """(line number, object) per non-blank line, streamed (constant memory); a line that is not
    UTF-8 or not a JSON object is a bad record. `on_bytes` hears how many bytes each line had;
    `lines` restricts reading to one range (line numbers stay those of the whole file)."""
    if not path.is_file():
        raise DataError(path, None, "file does not exist" if not path.exists() else "not a file")
    seen = False
    with open(path, "rb") as f:
        f.seek(lines.start if lines else 0)
        first = lines.first_line if lines else 1
        for number, raw in enumerate(f, start=first):
            if lines is not None and number >= first + lines.lines:
                break
            if on_bytes is not None:
                on_bytes(len(raw))
            where = f"line {number}"
            try:
                line = decode_line(path, number, raw)
                if not line.strip():
                    continue
                seen = True
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(path, where, f"not valid JSON: {err.msg} at column {err.colno}") from None
                if not isinstance(record, dict):
                    raise DataError(path, where, f"expected a JSON object, got {type(record).__name__}")
            except DataError as err:
                bad.report(err)
                continue
            yield number, record
    if not seen and lines is None:
        raise DataError(path, None, "file is empty")


def record_text(path: Path, where: str, record: Dict[str, Any], field: str) -> str:
    text = record.get(field)
    if field not in record:
        raise DataError(path, where, f"no {field!r} field (fields: {', '.join(map(str, record)) or 'none'})")
    if not isinstance(text, str):
        raise DataError(path, where, f"{field!r} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise DataError(path, where, f"{field!r} is empty")
    return text


def read_ner_jsonl(path: Path, nlp: Language, bad: BadRecords, text_field: str = "text",
                   spans_field: str = "spans") -> List[Doc]:
    docs = []
    for number, record in json_records(path, bad):
        try:
            docs.append(_ner_doc(path, f"line {number}", record, nlp, text_field, spans_field))
        except DataError as err:
            bad.report(err)
    return docs


def _ner_doc(path: Path, where: str, record: Dict[str, Any], nlp: Language, text_field: str, spans_field: str) -> Doc:
    text = record_text(path, where, record, text_field)
    raw = record.get(spans_field, [])
    if not isinstance(raw, list):
        raise DataError(path, where, f"{spans_field!r} must be a list of {{start, end, label}} objects")
    doc = nlp.make_doc(text)
    spans = []
    for i, span in enumerate(raw):
        if not isinstance(span, dict) or not {"start", "end", "label"} <= set(span):
            raise DataError(path, where, f"span {i} must be an object with start, end and label, got {span!r}")
        start, end, label = span["start"], span["end"], span["label"]
        if not (isinstance(start, int) and isinstance(end, int)) or isinstance(start, bool) or isinstance(end, bool):
            raise DataError(path, where, f"span {i}: start and end must be integers, got {start!r}, {end!r}")
        if not isinstance(label, str) or not label.strip():
            raise DataError(path, where, f"span {i}: label must be a non-empty string, got {label!r}")
        if not 0 <= start < end <= len(text):
            raise DataError(path, where, f"span {i}: [{start}, {end}) is not a non-empty range inside the text "
                            f"(length {len(text)})")
        char_span = doc.char_span(start, end, label=label)
        if char_span is None:
            tokens = [t.text for t in doc if t.idx < end and t.idx + len(t) > start]
            raise DataError(path, where, f"span {i} {text[start:end]!r} [{start}, {end}) does not start and end on "
                            f"token boundaries (it cuts into tokens {tokens})")
        spans.append((i, char_span))
    spans.sort(key=lambda x: (x[1].start, x[1].end))
    for (i, a), (j, b) in zip(spans, spans[1:]):
        if b.start < a.end:
            raise DataError(path, where, f"spans {i} {a.text!r} and {j} {b.text!r} overlap; entities must not overlap")
    doc.ents = [s for _, s in spans]
    return doc


def read_cats_jsonl(path: Path, nlp: Language, bad: BadRecords, text_field: str = "text",
                    label_field: str = "label") -> List[Tuple[Doc, List[str], str]]:
    """(doc, labels, where) per record; `label_field` holds one label or a list of labels."""
    rows = []
    for number, record in json_records(path, bad):
        where = f"line {number}"
        try:
            text = record_text(path, where, record, text_field)
            field = label_field if label_field in record else f"{label_field}s" if f"{label_field}s" in record else None
            if field is None:
                raise DataError(path, where, f"no {label_field!r} field (fields: {', '.join(map(str, record))})")
            rows.append((nlp.make_doc(text), _labels_of(path, where, record[field]), where))
        except DataError as err:
            bad.report(err)
    return rows


def _labels_of(path: Path, where: str, value: Any) -> List[str]:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        raise DataError(path, where, f"label must be a string or a list of strings, got {value!r}")
    labels = [str(v).strip() for v in value]
    if any(not label for label in labels):
        raise DataError(path, where, "empty label")
    return labels
