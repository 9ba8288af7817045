"""Read any supported file for a task into reference Docs (gold annotations on them)."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, List, Optional, Sequence, Tuple, Union

from spacy.language import Language
from spacy.tokens import Doc

from .conll import read_conll
from .docbin import read_docbin
from .errors import BadRecord, BadRecords, DataError
from .jsonl import read_cats_jsonl, read_ner_jsonl
from .squad import read_squad
from .tabular import read_cats_table

TASKS = ("textcat", "ner", "qa")
FORMATS = {
    "ner": (".conll", ".iob", ".bio", ".txt", ".tsv", ".jsonl", ".spacy"),
    "textcat": (".csv", ".tsv", ".jsonl", ".spacy"),
    "qa": (".json", ".spacy"),
}


@dataclass(frozen=True)
class ReadOptions:
    """Column and field names for tabular/JSONL classification data; `label_sep` makes a CSV/TSV
    label cell multi-label."""

    text_column: str = "text"
    label_column: str = "label"
    label_sep: Optional[str] = None


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


def load_docs(task: str, path: Union[str, Path], nlp: Language, *, options: ReadOptions = ReadOptions(),
              skip_bad: bool = False) -> Loaded:
    """Read `path` by its extension. Bad records raise DataError, or are skipped and listed when `skip_bad`.

    Textcat docs come back without `doc.cats`: the label set of train and dev
    together decides them (see `set_cats`)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS[task]:
        raise DataError(path, None, f"cannot read {suffix or 'a file without extension'} for {task}; "
                        f"use one of {', '.join(FORMATS[task])}")
    bad = BadRecords(skip_bad)
    if suffix == ".spacy":
        loaded = _from_docbin(task, path, nlp)
    elif task == "ner":
        docs = read_ner_jsonl(path, nlp, bad) if suffix == ".jsonl" else read_conll(path, nlp.vocab, bad)
        loaded = Loaded(path, docs)
    elif task == "textcat":
        if suffix == ".jsonl":
            rows = read_cats_jsonl(path, nlp, bad, options.text_column, options.label_column)
        else:
            rows = read_cats_table(path, nlp, bad, options.text_column, options.label_column, options.label_sep)
        loaded = Loaded(path, [d for d, _, _ in rows], cat_rows=[(labels, where) for _, labels, where in rows])
        loaded.strata = [tuple(sorted(labels)) for labels, _ in loaded.cat_rows]
    else:
        pairs = read_squad(path, nlp, bad)
        loaded = Loaded(path, [d for d, _ in pairs], groups=[t for _, t in pairs])
    loaded.skipped = bad.records
    if not loaded.docs:
        raise DataError(path, None, f"no usable records ({len(bad)} bad)" if len(bad) else "no records")
    return loaded


def _from_docbin(task: str, path: Path, nlp: Language) -> Loaded:
    docs = read_docbin(path, nlp.vocab)
    if task == "ner" and not any(d.has_annotation("ENT_IOB") for d in docs):
        raise DataError(path, None, "no doc has entity annotation (doc.ents)")
    if task == "qa":
        for i, doc in enumerate(docs):
            if not doc._.qas:
                raise DataError(path, f"record {i}", "doc has no questions (doc._.qas)")
        return Loaded(path, docs)
    if task == "textcat":
        rows = []
        for i, doc in enumerate(docs):
            if not doc.cats:
                raise DataError(path, f"record {i}", "doc has no categories (doc.cats)")
            rows.append(([label for label, value in doc.cats.items() if value >= 0.5], f"record {i}"))
        return Loaded(path, docs, strata=[tuple(sorted(r[0])) for r in rows], cat_rows=rows)
    return Loaded(path, docs)


def cat_labels(loaded: Sequence[Loaded], multi_label: Optional[bool]) -> Tuple[List[str], bool]:
    """Sorted label set over the files, and whether the task is multi-label (auto: a record with
    other than exactly one label, or a DocBin that says so, makes it multi-label)."""
    labels = sorted({label for part in loaded for doc, (ls, _) in zip(part.docs, part.cat_rows)
                     for label in (list(doc.cats) or ls)})
    if multi_label is None:
        multi_label = any(len(ls) != 1 for part in loaded for ls, _ in part.cat_rows)
    if not labels:
        raise DataError(loaded[0].path, None, "no labels in the data")
    return labels, multi_label


def set_cats(loaded: Loaded, labels: Sequence[str], multi_label: bool) -> None:
    """Write `doc.cats` (1.0/0.0 for every label). Exclusive data needs exactly one label per record."""
    for doc, (ls, where) in zip(loaded.docs, loaded.cat_rows):
        if not multi_label and len(ls) != 1:
            raise DataError(loaded.path, where, f"exclusive classification needs exactly one label, got {ls}")
        unknown = set(ls) - set(labels)
        if unknown:
            raise DataError(loaded.path, where, f"label(s) {sorted(unknown)} not among the labels {list(labels)}")
        doc.cats = {label: float(label in ls) for label in labels}
