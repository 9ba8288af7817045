"""Streaming predictions: JSONL records in, JSONL records with cats / ents / answers out.

Constant memory on large files: records stream through `nlp.pipe`, results are
written as they come, to a temporary file renamed into place at the end (an
error never leaves half an output).
"""

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

from spacy.language import Language
from spacy.tokens import Doc

from .components.base import HFPipe
from .data.errors import BadRecords, DataError
from .data.jsonl import LineRange, json_records


def doc_predictions(doc: Doc, nlp: Language) -> Dict[str, Any]:
    """What the pipeline's hf_* components predicted on a doc, as plain JSON-ready data:
    `cats`, `ents` and/or `answers`, one key per component (see `HFPipe.record`)."""
    out: Dict[str, Any] = {}
    for _, pipe in nlp.pipeline:
        if isinstance(pipe, HFPipe):
            out.update(pipe.record(doc))
    return out


def make_input_doc(nlp: Language, record: Dict[str, Any], where: str, path: Union[str, Path]) -> Doc:
    """A doc from an input record {"text": ..., "questions": [...]} (questions only for QA)."""
    text = record.get("text")
    if not isinstance(text, str):
        raise DataError(path, where, f'"text" must be a string, got {type(text).__name__}'
                        if "text" in record else 'no "text" field')
    doc = nlp.make_doc(text)
    questions = record.get("questions")
    if questions is not None:
        if isinstance(questions, str):
            questions = [questions]
        if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
            raise DataError(path, where, '"questions" must be a string or a list of strings')
        doc._.questions = questions
    return doc


def _docs(path: Path, nlp: Language, bad: BadRecords, progress, lines: Optional[LineRange]
          ) -> Iterator[Tuple[Doc, Dict]]:
    for number, record in json_records(path, bad, on_bytes=progress, lines=lines):
        try:
            yield make_input_doc(nlp, record, f"line {number}", path), record
        except DataError as err:
            bad.report(err)


def predict_file(nlp: Language, input_path: Union[str, Path], output_path: Union[str, Path], *,
                 batch_size: Optional[int] = None, skip_bad: bool = False, show_progress: bool = True,
                 lines: Optional[LineRange] = None) -> Dict[str, Any]:
    """Annotate every record of `input_path` (or of its `lines` range: a shard) into `output_path`;
    returns counts and skipped records.

    Each output line is the input record (all its fields) plus the predictions.
    """
    from tqdm import tqdm

    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise DataError(input_path, None, "file does not exist")
    bad = BadRecords(skip_bad)
    written = 0
    output_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output_path.name}.", dir=output_path.parent)
    size = lines.end - lines.start if lines else input_path.stat().st_size
    bar = tqdm(total=size, unit="B", unit_scale=True, disable=not show_progress, desc="predict")
    try:
        with os.fdopen(fd, "w", encoding="utf8") as out:
            stream = _docs(input_path, nlp, bad, bar.update, lines)
            for doc, record in nlp.pipe(stream, as_tuples=True, batch_size=batch_size):
                out.write(json.dumps({**record, **doc_predictions(doc, nlp)}, ensure_ascii=False) + "\n")
                written += 1
        os.replace(tmp, output_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return {"written": written, "skipped": [r.to_dict() for r in bad.records]}
