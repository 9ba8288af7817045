"""Annotate: JSONL records in, JSONL records with cats / ents / answers out (`sllm predict`, and each shard
of the annotate flow).

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

from ..components.pipeline import doc_predictions, make_input_doc
from ..data.errors import BadRecords, DataError
from ..data.jsonl import LineRange, json_records


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
