"""One spec per task: the only place that knows what differs between textcat, NER and QA.

A spec names the task in both schemes (`ner` for users, `token-classification` for
Hugging Face), the spaCy factory and the HF head, the metric that ranks checkpoints and
model versions, how its files are read and summarised, how its labels are found, which
collator pads its features, and how its predictions are scored. Adding a task means
adding a spec here and a component; nothing else branches on the task.
"""

from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from spacy.language import Language
from spacy.tokens import Doc
from spacy.training import Example
from spacy.util import filter_spans
from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

from .core.constants import IGNORE_INDEX
from .data.conll import read_conll
from .data.errors import BadRecords, DataError
from .data.jsonl import read_cats_jsonl, read_ner_jsonl
from .data.squad import read_squad
from .data.tabular import read_cats_table
from .data.types import Loaded, ReadOptions
from .scorers import score_ner, score_squad, score_textcat

Scores = Tuple[Dict[str, Any], Dict[str, Dict[str, Any]], Optional[Dict[str, Any]]]  # scores, per label, confusion


class TaskSpec:
    name: str  # what users type: sllm prepare NAME, project.yml's task
    hf_task: str  # the Hugging Face pipeline task name
    factory: str  # the spaCy factory of its component
    head: str  # the kind of head on the encoder (models.heads): token, sequence or span
    primary: str  # the score that ranks checkpoints, model versions and promotion
    score_weights: Dict[str, Optional[float]]  # the factory's default_score_weights (primary weighted 1)
    formats: Tuple[str, ...]  # file extensions `prepare` and `evaluate` read
    has_labels: bool = True  # whether the head has a label set of its own
    targets: Tuple[str, ...] = ("labels",)  # the gold keys of a training feature (not model inputs)

    @property
    def component(self) -> str:
        """The component's name in the shipped config (pipelines/NAME.cfg)."""
        return self.name

    # -- data --------------------------------------------------------------------------------------
    def read(self, path: Path, nlp: Language, bad: BadRecords, options: ReadOptions) -> Loaded:
        """Reference docs of a file in one of `formats` other than .spacy."""
        raise NotImplementedError

    def check_docbin(self, path: Path, docs: List[Doc]) -> Loaded:
        """Reference docs from a DocBin, checked for this task's annotation."""
        return Loaded(path, docs)

    def labels(self, parts: Sequence[Loaded], multi_label: Optional[bool]) -> Tuple[List[str], bool]:
        """The label set of the data and whether it is multi-label; sets the gold annotation that
        depends on the whole label set (textcat's doc.cats)."""
        return [], False

    gold_description: str = "gold annotation"

    def has_gold(self, doc: Doc) -> bool:
        """Whether a reference doc holds this task's annotation (`spacy train` checks its data with it)."""
        raise NotImplementedError

    def gold_labels(self, docs: Sequence[Doc]) -> List[str]:
        """The labels the reference docs use (entity types, categories), sorted."""
        return []

    def describe(self, docs: Sequence[Doc]) -> Dict[str, Any]:
        """Counts for summary.json."""
        return {"docs": len(docs), "tokens": sum(len(d) for d in docs)}

    def summary_line(self, counts: Dict[str, Any]) -> str:
        return f"{counts['docs']:,} docs, per label {counts.get('per_label', {})}"

    # -- training ----------------------------------------------------------------------------------
    def component_settings(self, labels: List[str], multi_label: bool, train_docs: Sequence[Doc]) -> Dict[str, Any]:
        """Settings of a new component trained on this data (a new head's labels...)."""
        return {"labels": list(labels) or None}

    def collator(self, tokenizer):
        return DataCollatorWithPadding(tokenizer)

    # -- distillation ------------------------------------------------------------------------------
    def unlabelled(self, doc: Doc, pipe) -> Doc:
        """A training doc for text without gold annotation (distillation's extra corpus): placeholder
        gold that `pipe.features` accepts, which the gold loss leaves out (feature key `gold` = 0)."""
        return doc

    def soft_loss(self, student, teacher, batch: Dict[str, Any], temperature: float, pipe) -> torch.Tensor:
        """KL(teacher || student) of the temperature-softened outputs, times T^2 (DistilBERT, Hinton et al.)."""
        raise NotImplementedError

    def gold_loss(self, student, batch: Dict[str, Any], pipe) -> torch.Tensor:
        """The head's own training loss on the gold labels of the rows that have them (`gold` = 1)."""
        raise NotImplementedError

    # -- evaluation --------------------------------------------------------------------------------
    def gold_for(self, loaded: Loaded, pipe) -> None:
        """Complete gold annotation of test data that only the component's labels decide."""

    def scores(self, examples: List[Example], pipe) -> Scores:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"TaskSpec({self.name!r})"


class TextcatSpec(TaskSpec):
    name, hf_task, factory = "textcat", "text-classification", "hf_textcat"
    head = "sequence"
    primary = "cats_score"  # accuracy for exclusive classes, macro F for multi-label (see score_textcat)
    score_weights = {"cats_score": 1.0}
    formats = (".csv", ".tsv", ".jsonl", ".spacy")
    gold_description = "categories (doc.cats)"

    def has_gold(self, doc):
        return bool(doc.cats)

    def gold_labels(self, docs):
        return sorted({label for doc in docs for label in doc.cats})

    def read(self, path, nlp, bad, options):
        if path.suffix.lower() == ".jsonl":
            rows = read_cats_jsonl(path, nlp, bad, options.text_column, options.label_column)
        else:
            rows = read_cats_table(path, nlp, bad, options.text_column, options.label_column, options.label_sep)
        cat_rows = [(labels, where) for _, labels, where in rows]
        return Loaded(path, [d for d, _, _ in rows], cat_rows=cat_rows,
                      strata=[tuple(sorted(labels)) for labels, _ in cat_rows])

    def check_docbin(self, path, docs):
        rows = []
        for i, doc in enumerate(docs):
            if not doc.cats:
                raise DataError(path, f"record {i}", "doc has no categories (doc.cats)")
            rows.append(([label for label, value in doc.cats.items() if value >= 0.5], f"record {i}"))
        return Loaded(path, docs, strata=[tuple(sorted(r[0])) for r in rows], cat_rows=rows)

    def labels(self, parts, multi_label):
        labels = sorted({label for part in parts for doc, (ls, _) in zip(part.docs, part.cat_rows)
                         for label in (list(doc.cats) or ls)})
        if multi_label is None:  # a record with other than exactly one label makes it multi-label
            multi_label = any(len(ls) != 1 for part in parts for ls, _ in part.cat_rows)
        if not labels:
            raise DataError(parts[0].path, None, "no labels in the data")
        for part in parts:
            set_cats(part, labels, multi_label)
        return labels, multi_label

    def describe(self, docs):
        per_label = Counter(label for d in docs for label, v in d.cats.items() if v >= 0.5)
        return {**super().describe(docs), "per_label": dict(sorted(per_label.items()))}

    def component_settings(self, labels, multi_label, train_docs):
        return {"labels": list(labels) or None, "multi_label": multi_label}

    def unlabelled(self, doc, pipe):
        doc.cats = {label: 0.0 for label in pipe.labels}
        return doc

    def soft_loss(self, student, teacher, batch, temperature, pipe):  # per window
        s, t = student.logits.float() / temperature, teacher.logits.float() / temperature
        if pipe.multi_label:  # one Bernoulli per label
            p = torch.sigmoid(t)
            kl = (F.binary_cross_entropy_with_logits(s, p, reduction="none")
                  - F.binary_cross_entropy_with_logits(t, p, reduction="none")).mean(-1)
            return kl.mean() * temperature ** 2
        return _kl(s, t).mean() * temperature ** 2

    def gold_loss(self, student, batch, pipe):
        gold = batch["gold"].bool()
        if not gold.any():
            return student.logits.sum() * 0.0
        logits, labels = student.logits.float()[gold], batch["labels"][gold]
        if pipe.multi_label:
            return F.binary_cross_entropy_with_logits(logits, labels.float())
        return F.cross_entropy(logits, labels)

    def gold_for(self, loaded, pipe):
        if loaded.cat_rows and not all(d.cats for d in loaded.docs):
            set_cats(loaded, pipe.labels, pipe.multi_label)

    def scores(self, examples, pipe):
        settings = {**pipe.cfg, "labels": pipe.labels, "multi_label": pipe.multi_label}
        scores = score_textcat(examples, **settings, details=True)  # the component's own decision rule
        per_f, per_auc = scores.pop("cats_f_per_type"), scores.pop("cats_auc_per_type")
        support = scores.pop("cats_support_per_type")
        per_label = {label: {**per_f[label], "auc": per_auc.get(label), "support": support[label]}
                     for label in pipe.labels}
        return scores, per_label, scores.pop("cats_confusion", None)


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the softmax distributions over the last axis, one value per row."""
    log_student = F.log_softmax(student_logits, dim=-1)
    log_teacher = F.log_softmax(teacher_logits, dim=-1)
    return (log_teacher.exp() * (log_teacher - log_student)).sum(-1)


def set_cats(loaded: Loaded, labels: Sequence[str], multi_label: bool) -> None:
    """Write `doc.cats` (1.0/0.0 for every label). Exclusive data needs exactly one label per record."""
    for doc, (ls, where) in zip(loaded.docs, loaded.cat_rows):
        if not multi_label and len(ls) != 1:
            raise DataError(loaded.path, where, f"exclusive classification needs exactly one label, got {ls}")
        unknown = set(ls) - set(labels)
        if unknown:
            raise DataError(loaded.path, where, f"label(s) {sorted(unknown)} not among the labels {list(labels)}")
        doc.cats = {label: float(label in ls) for label in labels}


class NerSpec(TaskSpec):
    name, hf_task, factory = "ner", "token-classification", "hf_ner"
    head = "token"
    primary = "ents_f"
    score_weights = {"ents_f": 1.0, "ents_p": 0.0, "ents_r": 0.0, "ents_per_type": None}
    formats = (".conll", ".iob", ".bio", ".txt", ".tsv", ".jsonl", ".spacy")
    gold_description = "entity annotation (doc.ents)"

    def has_gold(self, doc):
        return doc.has_annotation("ENT_IOB")

    def gold_labels(self, docs):
        return sorted({ent.label_ for doc in docs for ent in doc.ents})

    def read(self, path, nlp, bad, options):
        if path.suffix.lower() == ".jsonl":
            return Loaded(path, read_ner_jsonl(path, nlp, bad))
        docs, repairs = read_conll(path, nlp.vocab, bad, strict=options.strict)
        return Loaded(path, docs, repairs=repairs)

    def check_docbin(self, path, docs):
        if not any(d.has_annotation("ENT_IOB") for d in docs):
            raise DataError(path, None, "no doc has entity annotation (doc.ents)")
        return Loaded(path, docs)

    def labels(self, parts, multi_label):
        types = sorted({ent.label_ for part in parts for doc in part.docs for ent in doc.ents})
        if not types:
            raise DataError(parts[0].path, None, "no entities in the data")
        return types, False

    def describe(self, docs):
        per_label = Counter(e.label_ for d in docs for e in d.ents)
        return {**super().describe(docs), "entities": sum(per_label.values()), "per_label": dict(sorted(per_label.items()))}

    def collator(self, tokenizer):
        return DataCollatorForTokenClassification(tokenizer)  # labels padded with -100

    def soft_loss(self, student, teacher, batch, temperature, pipe):  # per piece that the tagger reads
        mask = batch["labels"] != IGNORE_INDEX  # first pieces of words, in gold and unlabelled rows alike
        kl = _kl(student.logits.float()[mask] / temperature, teacher.logits.float()[mask] / temperature)
        return kl.mean() * temperature ** 2 if kl.numel() else student.logits.sum() * 0.0

    def gold_loss(self, student, batch, pipe):
        labels = batch["labels"].masked_fill(~batch["gold"].bool()[:, None], IGNORE_INDEX)
        if not (labels != IGNORE_INDEX).any():
            return student.logits.sum() * 0.0
        logits = student.logits.float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)

    def scores(self, examples, pipe):
        if pipe.spans_key:  # gold data holds doc.ents: score the predicted span group as entities
            for eg in examples:
                eg.predicted.ents = filter_spans(eg.predicted.spans.get(pipe.spans_key, []))
        scores = score_ner(examples)
        support = Counter(ent.label_ for eg in examples for ent in eg.reference.ents)
        per_label = {label: {**prf, "support": support.get(label, 0)}
                     for label, prf in sorted((scores.pop("ents_per_type", None) or {}).items())}
        for label in support:
            per_label.setdefault(label, {"p": 0.0, "r": 0.0, "f": 0.0, "support": support[label]})
        return scores, per_label, None


class QASpec(TaskSpec):
    name, hf_task, factory = "qa", "question-answering", "hf_qa"
    head = "span"
    primary = "qa_f1"
    score_weights = {"qa_f1": 1.0, "qa_exact": 0.0}
    formats = (".json", ".spacy")
    has_labels = False
    targets = ("start_positions", "end_positions")
    gold_description = "questions with gold answers (doc._.qas)"

    def has_gold(self, doc):
        return bool(doc._.qas)

    def read(self, path, nlp, bad, options):
        pairs = read_squad(path, nlp, bad)
        return Loaded(path, [d for d, _ in pairs], groups=[title for _, title in pairs])

    def check_docbin(self, path, docs):
        for i, doc in enumerate(docs):
            if not doc._.qas:
                raise DataError(path, f"record {i}", "doc has no questions (doc._.qas)")
        return Loaded(path, docs)

    def describe(self, docs):
        qas = [qa for d in docs for qa in d._.qas]
        return {**super().describe(docs), "questions": len(qas), "impossible": sum(qa["is_impossible"] for qa in qas)}

    def summary_line(self, counts):
        return f"{counts['docs']:,} docs, {counts['questions']:,} questions"

    def component_settings(self, labels, multi_label, train_docs):
        impossible = any(qa["is_impossible"] for doc in train_docs for qa in doc._.qas)
        return {"handle_impossible": True} if impossible else {}  # SQuAD 2.0: the model learned to abstain

    def unlabelled(self, doc, pipe):
        doc._.qas = [{"id": f"unlabelled-{i}", "question": question, "answers": [], "is_impossible": True}
                     for i, question in enumerate(doc._.questions or [])]
        return doc

    def soft_loss(self, student, teacher, batch, temperature, pipe):  # start and end distributions
        padding = batch["attention_mask"] == 0
        kl = [_kl(getattr(student, name).float().masked_fill(padding, -1e4) / temperature,
                  getattr(teacher, name).float().masked_fill(padding, -1e4) / temperature).mean()
              for name in ("start_logits", "end_logits")]
        return (kl[0] + kl[1]) / 2 * temperature ** 2

    def gold_loss(self, student, batch, pipe):
        gold = batch["gold"].bool()
        if not gold.any():
            return student.start_logits.sum() * 0.0
        return (F.cross_entropy(student.start_logits.float()[gold], batch["start_positions"][gold])
                + F.cross_entropy(student.end_logits.float()[gold], batch["end_positions"][gold])) / 2

    def scores(self, examples, pipe):
        return score_squad(examples, spans_key=pipe.spans_key), {}, None


TASKS: Dict[str, TaskSpec] = {spec.name: spec for spec in (TextcatSpec(), NerSpec(), QASpec())}
_BY_ANY_NAME = {**TASKS, **{spec.hf_task: spec for spec in TASKS.values()}}


def task_spec(task: "str | TaskSpec") -> TaskSpec:
    """The spec of a task named either way (`ner` or `token-classification`)."""
    if isinstance(task, TaskSpec):
        return task
    try:
        return _BY_ANY_NAME[task]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}") from None
