"""spaCy DocBin (`.spacy`) files: read with user data, written byte-for-byte deterministically."""

from pathlib import Path
from typing import Iterable, List

from spacy.tokens import Doc, DocBin
from spacy.vocab import Vocab

from .errors import DataError


def read_docbin(path: Path, vocab: Vocab) -> List[Doc]:
    if not path.is_file():
        raise DataError(path, None, "file does not exist")
    try:
        docs = list(DocBin(store_user_data=True).from_disk(path).get_docs(vocab))
    except Exception as err:  # zlib/msgpack errors of a file that is not a DocBin
        raise DataError(path, None, f"not a readable spaCy DocBin: {err}") from None
    if not docs:
        raise DataError(path, None, "file holds no docs")
    return docs


def docbin_bytes(docs: Iterable[Doc]) -> bytes:
    """DocBin bytes that depend only on the docs (DocBin keeps its strings in a set, whose order varies
    between Python processes: sort them)."""
    db = DocBin(store_user_data=True, docs=docs)
    db.strings = sorted(db.strings)  # type: ignore[assignment]  # to_bytes only iterates it
    return db.to_bytes()

