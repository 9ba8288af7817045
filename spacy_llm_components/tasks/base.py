"""What every task spec says, the registry of specs, and reading a task's files into reference docs."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from spacy.language import Language
from spacy.tokens import Doc
from spacy.training import Example
from transformers import DataCollatorWithPadding

from ..core.bootstrap import DocStatistics
from ..core.calibration import CalibrationError, TemperatureProblem
from ..data.docbin import read_docbin
from ..data.errors import BadRecords, DataError
from ..data.types import Loaded, ReadOptions

Scores = Tuple[Dict[str, Any], Dict[str, Dict[str, Any]], Optional[Dict[str, Any]]]  # scores, per label, confusion


@dataclass(frozen=True)
class Demo:
    """The task in `sllm demo`: its files in demo/NAME/ (train, dev, test), the fine-tuning settings that
    suit their size, and the request sent to the served champion."""

    files: Tuple[str, str, str]
    config: Dict[str, Any]
    request: Dict[str, Any]


@dataclass(frozen=True)
class ThresholdRequest:
    """Which thresholds `sllm calibrate` tunes: per-label ones for F1 (multi-label textcat), and the entity
    score threshold reaching a precision (NER; None: none set)."""

    f1: bool = True
    min_precision: Optional[float] = None


@dataclass
class TunedThresholds:
    settings: Dict[str, Any] = field(default_factory=dict)  # component settings: thresholds, threshold...
    scores: Optional[Dict[str, float]] = None  # the headline scores with them (None: as without)
    curve: Any = None  # what they were read from (NER: a PrecisionRecall)


class TaskSpec:
    name: str  # what users type: sllm prepare NAME, project.yml's task
    hf_task: str  # the Hugging Face pipeline task name
    factory: str  # the spaCy factory of its component
    head: str  # the kind of head on the encoder (models.heads): token, sequence or span
    primary: str  # the score that ranks checkpoints, model versions and promotion
    score_weights: Dict[str, Optional[float]]  # the factory's default_score_weights (primary weighted 1)
    formats: Tuple[str, ...]  # file extensions `prepare` and `evaluate` read
    corpus_formats: Tuple[str, ...] = ()  # of those, the ones pre-training reads text from with this task's reader
    has_labels: bool = True  # whether the head has a label set of its own
    targets: Tuple[str, ...] = ("labels",)  # the gold keys of a training feature (not model inputs)
    # the model outputs a student distilled across tokenizers reads from its features (as `teacher_NAME`),
    # each per input position (True) or one per feature (False); empty: the task cannot be distilled so
    teacher_outputs: Dict[str, bool] = {}
    description: str  # what model cards call the task
    input_example: Dict[str, List[Any]]  # a served request's columns, logged with each model
    # what its component's `record` adds to a served response, for the served model's signature: a column's
    # kind, "map" (label -> probability) or "spans" (text, offsets, score and the extra fields named here)
    output_columns: Dict[str, Tuple[str, Dict[str, str]]]
    request_note: str = ""  # what a served request needs besides its text (model cards say it)
    demo: Demo

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

    def multi_label_of(self, pipe) -> Optional[bool]:
        """Whether the component decides several labels per doc (None: the task has no such choice); a
        student is distilled only on data of its teacher's kind."""
        return None

    # -- evaluation --------------------------------------------------------------------------------
    def gold_for(self, loaded: Loaded, pipe) -> None:
        """Complete gold annotation of test data that only the component's labels decide."""

    def input_doc(self, nlp: Language, reference: Doc) -> Doc:
        """What a user would feed the pipeline for a gold doc: its text (and what else the task asks)."""
        return nlp.make_doc(reference.text)

    def scores(self, examples: List[Example], pipe) -> Scores:
        raise NotImplementedError

    def doc_statistics(self, examples: List[Example], pipe) -> Optional[DocStatistics]:
        """Per-document statistics from which the headline metrics (`scores`' own, on the same examples,
        after `scores` ran) are sums: what a bootstrap over documents resamples. None: no intervals."""
        return None

    # -- calibration -------------------------------------------------------------------------------
    def calibration_kind(self, pipe) -> str:
        """How the head's logits become probabilities: "softmax" (one class per row) or "sigmoid"."""
        return "softmax"

    def calibration_rows(self, output, batch: Dict[str, Any], pipe) -> Tuple[np.ndarray, np.ndarray]:
        """(logits, targets) of the head's gold decisions in one batch of training features."""
        raise NotImplementedError

    def temperature_problem(self, pipe, examples: List[Example]) -> TemperatureProblem:
        """What the head's temperature is fitted on, given the pipeline's predictions on dev docs at
        temperature 1 (`examples`): by default the NLL of its gold decisions (the loss it was trained to
        lower) in training features of the references, built as inference builds its inputs."""
        logits, targets = [], []
        for batch, output in pipe.feature_outputs(pipe.features([eg.reference for eg in examples])):
            rows, gold = self.calibration_rows(output, batch, pipe)
            logits.append(rows)
            targets.append(gold)
        if not logits:
            raise CalibrationError("the dev data gives no gold decisions to calibrate on")
        width = max(x.shape[1] for x in logits)  # (QA: a softmax over each batch's padded length)
        logits = [np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=-1e4) for x in logits]
        return TemperatureProblem(self.calibration_kind(pipe), np.concatenate(logits), np.concatenate(targets))

    def errors(self, examples: List[Example], pipe) -> List[Dict[str, Any]]:
        """What the head got wrong on each example, as records for a person to look at or relabel: the
        doc's index and text, the kind of error, the gold and predicted labels or spans, and the model's
        score for what it predicted; most confident first within a kind (after `scores` ran)."""
        return []

    def tune_thresholds(self, pipe, examples: List[Example], request: "ThresholdRequest") -> "TunedThresholds":
        """Decision thresholds on the head's (calibrated) scores, tuned on its dev predictions: the settings
        to store, the headline scores they give on those predictions, the curve they were read from."""
        return TunedThresholds()

    def confidences(self, examples: List[Example], pipe) -> Optional[Tuple[np.ndarray, np.ndarray, str]]:
        """(confidence, right or wrong, what they are in words) of each decision a user reads a score of,
        after `scores` ran: what the calibration error and the Brier score measure. None: no scores."""
        return None

    def __repr__(self) -> str:
        return f"TaskSpec({self.name!r})"

    def load(self, path: Union[str, Path], nlp: Language, *, options: ReadOptions = ReadOptions(),
             skip_bad: bool = False) -> Loaded:
        """Reference docs of `path`, read by its extension. Bad records raise DataError, or are skipped
        and listed when `skip_bad`. Textcat docs come back without `doc.cats`: the label set of train and
        dev together decides them (`labels`)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in self.formats:
            raise DataError(path, None, f"cannot read {suffix or 'a file without extension'} for {self.name}; "
                            f"use one of {', '.join(self.formats)}")
        bad = BadRecords(skip_bad)
        if suffix == ".spacy":
            loaded = self.check_docbin(path, read_docbin(path, nlp.vocab))
        else:
            loaded = self.read(path, nlp, bad, options)
        loaded.skipped = bad.records
        if not loaded.docs:
            raise DataError(path, None, f"no usable records ({len(bad)} bad)" if len(bad) else "no records")
        return loaded


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the softmax distributions over the last axis, one value per row."""
    log_student = F.log_softmax(student_logits, dim=-1)
    log_teacher = F.log_softmax(teacher_logits, dim=-1)
    return (log_teacher.exp() * (log_teacher - log_student)).sum(-1)


TASKS: Dict[str, TaskSpec] = {}  # by the name users type, in the order the tasks registered
_BY_ANY_NAME: Dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Make a task known to every stage, the CLI and the flows, by its name and its Hugging Face name."""
    TASKS[spec.name] = spec
    _BY_ANY_NAME.update({spec.name: spec, spec.hf_task: spec})
    return spec


def unregister_task(name: str) -> None:
    """Forget a task registered with `register_task` (a plugin's, or a test's)."""
    spec = TASKS.pop(name)
    for key in (spec.name, spec.hf_task):
        _BY_ANY_NAME.pop(key, None)


def factories_in_words() -> str:
    """The components' factories as a sentence says them: "hf_textcat, hf_ner or hf_qa"."""
    names = [spec.factory for spec in TASKS.values()]
    return " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def task_spec(task: "str | TaskSpec") -> TaskSpec:
    """The spec of a task named either way (`ner` or `token-classification`)."""
    if isinstance(task, TaskSpec):
        return task
    try:
        return _BY_ANY_NAME[task]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}") from None


def task_specs(tasks: str) -> List[TaskSpec]:
    """The specs of one task or of several joined by + (`ner+textcat`: heads on one shared encoder)."""
    return [task_spec(name) for name in tasks.split("+")]


def input_example(tasks: str) -> Dict[str, List[Any]]:
    """A served request's columns for a pipeline of these tasks: the first task's text, and the columns
    any of them adds (QA's questions)."""
    example: Dict[str, List[Any]] = {}
    for spec in task_specs(tasks):
        for column, values in spec.input_example.items():
            example.setdefault(column, values)
    return example


def load_docs(task: "str | TaskSpec", path: Union[str, Path], nlp: Language, *, options: ReadOptions = ReadOptions(),
              skip_bad: bool = False) -> Loaded:
    """`TaskSpec.load` of the task named `task`."""
    return task_spec(task).load(path, nlp, options=options, skip_bad=skip_bad)


def error_record(i: int, doc: Doc, kind: str, **fields: Any) -> Dict[str, Any]:
    """One error for errors.jsonl: the doc (index and whole text, for relabelling), the kind, the rest."""
    return {"doc": i, "kind": kind, **fields, "text": doc.text}


def by_confidence(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Errors grouped by kind, the most confident first (those without a score last)."""
    return sorted(records, key=lambda r: (r["kind"], -(r.get("score") if r.get("score") is not None else -1.0)))
