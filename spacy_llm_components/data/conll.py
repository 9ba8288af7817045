"""CoNLL column files for NER: token first, tag last; 2 or 4 columns, tab or space separated,
IOB1/IOB2/BILOU/BIOES tags, `-DOCSTART-` lines optional. One Doc per sentence.

Tag sequences that break the file's scheme (IOB2 `I-PER` right after `B-ORG`, BILOU `L-` with
no `B-`) are read leniently, as conlleval does, and each repair is reported; `strict` refuses
them instead, naming the line.
"""

from pathlib import Path
from typing import List, Tuple

from spacy.tokens import Doc, Span
from spacy.vocab import Vocab

from ..core.decode import LabelSchemeError, detect_scheme, parse_tag, tags_for_types, tags_to_entities, transitions
from .errors import BadRecord, BadRecords, DataError
from .text import numbered_lines, read_text

Sentence = List[Tuple[int, str, str]]  # (line, token, tag)


def read_conll(path: Path, vocab: Vocab, bad: BadRecords, strict: bool = False) -> Tuple[List[Doc], List[BadRecord]]:
    """(docs, repairs): one doc per sentence, and the places where a tag sequence was repaired."""
    sentences: List[Sentence] = []
    sentence: Sentence = []
    broken = False  # the current sentence has a bad line and is skipped as a whole

    def flush() -> None:
        nonlocal sentence, broken
        if sentence and not broken:
            sentences.append(sentence)
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
    docs, repairs = [], []
    for sent, problems in zip(sentences, _check_transitions(path, sentences)):
        if problems and strict:
            bad.report(DataError(path, problems[0].where, f"{problems[0].problem} (--strict refuses it)"))
            continue
        repairs.extend(BadRecord(str(path), r.where, f"{r.problem}; read leniently, as conlleval does")
                       for r in problems)
        docs.append(_sentence_doc(vocab, sent))
    return docs, repairs


def file_scheme(sentences: List[Sentence]) -> str:
    """The file's tag scheme. IOB1 and IOB2 share a tag set: a file in which some entity opens with
    B- (after O, another type, or at the start of a sentence) is IOB2; otherwise B- only separates
    two entities of one type, as in IOB1."""
    tags = {tag for sent in sentences for _, _, tag in sent} | {"O"}
    if len(tags) == 1:
        return "IOB2"
    scheme = detect_scheme(sorted(tags))
    if scheme != "IOB2":
        return scheme
    for sent in sentences:
        previous = "O"
        for _, _, tag in sent:
            prefix, etype = parse_tag(tag)
            if prefix == "B" and parse_tag(previous)[1] != etype:
                return "IOB2"
            previous = tag
    return "IOB1"


def _check_transitions(path: Path, sentences: List[Sentence]) -> List[List[BadRecord]]:
    """Per sentence, one record per tag that breaks the file's scheme."""
    try:
        scheme = file_scheme(sentences)
    except LabelSchemeError as err:  # prefixes of several schemes: no transition can be trusted
        first = [BadRecord(str(path), f"line {sentences[0][0][0]}", f"the tags fit no single scheme ({err})")]
        return [first] + [[] for _ in sentences[1:]]
    types = sorted({parse_tag(tag)[1] for sent in sentences for _, _, tag in sent} - {None})
    tags = tags_for_types(types, scheme)
    index = {tag.replace("_", "-", 1): i for i, tag in enumerate(tags)}
    allowed = transitions(tags, scheme)
    out = []
    for sent in sentences:
        repairs = []
        ids = [index.get(tag.replace("_", "-", 1)) for _, _, tag in sent]
        for k, ((number, _, tag), tag_id) in enumerate(zip(sent, ids)):
            previous = ids[k - 1] if k else None
            if tag_id is None:
                problem = f"tag {tag!r} does not belong to the file's {scheme} scheme"
            elif previous is None and not allowed.start[tag_id]:
                problem = f"{tag!r} at the start of a sentence breaks {scheme}"
            elif previous is not None and not allowed.pairs[previous, tag_id]:
                problem = f"{tag!r} after {sent[k - 1][2]!r} breaks {scheme}"
            elif k == len(sent) - 1 and not allowed.end[tag_id]:
                problem = f"{tag!r} ends the sentence without closing its entity, which breaks {scheme}"
            else:
                continue
            repairs.append(BadRecord(str(path), f"line {number}", problem))
        out.append(repairs)
    return out


def _sentence_doc(vocab: Vocab, sentence: Sentence) -> Doc:
    words = [token for _, token, _ in sentence]
    doc = Doc(vocab, words=words, spaces=[True] * (len(words) - 1) + [False])
    # lenient reading (conlleval): I- after O or after another type opens an entity, so IOB1 reads right
    doc.ents = [Span(doc, s, e, label=t) for s, e, t in tags_to_entities([tag for _, _, tag in sentence])]
    return doc
