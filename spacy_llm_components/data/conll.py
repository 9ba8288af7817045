"""CoNLL column files for NER: token first, tag last; 2 or 4 columns, tab or space separated,
IOB1/IOB2/BILOU tags, `-DOCSTART-` lines optional. One Doc per sentence."""

from pathlib import Path
from typing import List, Tuple

from spacy.tokens import Doc, Span
from spacy.vocab import Vocab

from ..decode import LabelSchemeError, parse_tag, tags_to_entities
from .errors import BadRecords, DataError
from .text import numbered_lines, read_text


def read_conll(path: Path, vocab: Vocab, bad: BadRecords) -> List[Doc]:
    docs: List[Doc] = []
    sentence: List[Tuple[int, str, str]] = []  # (line, token, tag)
    broken = False  # the current sentence has a bad line and is skipped as a whole

    def flush() -> None:
        nonlocal sentence, broken
        if sentence and not broken:
            docs.append(_sentence_doc(vocab, sentence))
        sentence, broken = [], False

    for number, line in numbered_lines(read_text(path)):
        if not line.strip():
            flush()
            continue
        columns = line.split("\t") if "\t" in line else line.split()
        columns = [c.strip() for c in columns]
        if columns[0] == "-DOCSTART-":
            flush()
            continue
        try:
            if len(columns) < 2 or not columns[0] or not columns[-1]:
                raise DataError(path, f"line {number}", f"expected a token and a tag column, got {line!r}")
            try:
                parse_tag(columns[-1])
            except LabelSchemeError as err:
                raise DataError(path, f"line {number}", str(err)) from None
        except DataError as err:
            bad.report(err)
            broken = True
            continue
        sentence.append((number, columns[0], columns[-1]))
    flush()
    return docs


def _sentence_doc(vocab: Vocab, sentence: List[Tuple[int, str, str]]) -> Doc:
    words = [token for _, token, _ in sentence]
    doc = Doc(vocab, words=words, spaces=[True] * (len(words) - 1) + [False])
    # lenient reading (conlleval): I- after O or after another type opens an entity, so IOB1 reads right
    doc.ents = [Span(doc, s, e, label=t) for s, e, t in tags_to_entities([tag for _, _, tag in sentence])]
    return doc
