"""Scoring a pipeline: run it over gold docs through `nlp.pipe` (the path users take) and score its
predictions with the task's scorer (`TaskSpec.scores`: spaCy's entity scorer, the component's own
decision rule for categories, the official SQuAD semantics), apart from the run's statistics (counts,
seconds, speed). Fine-tuning's dev evaluations, the evaluate stage and promotion all score this way,
so training picks checkpoints by the metric users will see."""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import spacy
from spacy.language import Language
from spacy.tokens import Doc
from spacy.training import Example

from ...components.base import HFPipe
from ...components.pipeline import hf_component
from ...core.bootstrap import (
    BootstrapSettings,
    DocStatistics,
    PairedDifference,
    check_bootstrap,
    intervals,
    mcnemar,
    paired_differences,
)
from ...core.calibration import BINS, Reliability, reliability, summary
from ...data import Loaded, ReadOptions
from ...models.devices import machine
from ...tasks import load_docs
from .references import local_pipeline, pin_model


@dataclass
class Evaluation:
    task: str
    primary: str  # the score that ranks checkpoints and versions
    scores: Dict[str, float]  # what the predictions are worth: P/R/F, accuracy, EM...
    statistics: Dict[str, Any]  # what the run was: docs, words, seconds, speed, skipped records
    per_label: Dict[str, Dict[str, float]]
    confusion: Optional[Dict[str, Any]]  # exclusive textcat: {"labels": [...], "matrix": [[gold x predicted]]}
    predictions: List[Doc]
    intervals: Dict[str, Any] = field(default_factory=dict)  # the bootstrap's: settings, scores, per_label
    doc_statistics: Optional[DocStatistics] = None  # what the bootstrap resampled (not serialized)
    calibration: Dict[str, Any] = field(default_factory=dict)  # ECE, Brier and reliability bins of the scores
    confidences: Optional[Tuple[Any, Any]] = None  # (confidence, right) per scored decision (not serialized)
    references: List[Doc] = field(default_factory=list)  # the gold docs, beside `predictions` (not serialized)
    errors: Optional[List[Dict[str, Any]]] = None  # what it got wrong, if asked (errors.jsonl, not metrics.json)

    def examples(self) -> List[Example]:
        """The predictions beside their gold docs."""
        return [Example(p, r) for p, r in zip(self.predictions, self.references)]

    @property
    def reliability(self) -> Optional[Reliability]:
        return reliability(*self.confidences, self.calibration["bins"]) if self.calibration else None

    @property
    def primary_score(self) -> float:
        return self.scores[self.primary]

    def label_rows(self) -> List[Dict[str, Any]]:
        """One row per label (entity type, class) with its scores; for QA, one row per score."""
        if self.per_label:
            return [{"label": label, **scores} for label, scores in self.per_label.items()]
        return [{"metric": k, "value": v} for k, v in self.scores.items()]

    def to_json(self) -> Dict[str, Any]:
        return {"task": self.task, "primary": self.primary, "scores": self.scores, "statistics": self.statistics,
                "per_label": self.per_label, "confusion": self.confusion, "intervals": self.intervals,
                "calibration": self.calibration}

    def interval(self, metric: str) -> Optional[List[float]]:
        """The metric's confidence interval [low, high], if the evaluation drew one."""
        return (self.intervals.get("scores") or {}).get(metric)


def score_pipeline(nlp: Language, references: Sequence[Doc], *, batch_size: Optional[int] = None,
                   component: Optional[str] = None, bootstrap: Optional[BootstrapSettings] = None,
                   statistics: bool = False, errors: bool = False) -> Evaluation:
    """Run the pipeline over the references' texts and score the predictions of its hf_* component (the
    first, or `component`) against them; with `bootstrap`, each headline metric's confidence interval
    (documents resampled); with `statistics` (or `bootstrap`), the per-document statistics kept; with
    `errors`, what the component got wrong (`TaskSpec.errors`)."""
    pipe = nlp.get_pipe(component) if component else hf_component(nlp)
    spec = pipe.spec
    start = time.perf_counter()
    predictions = list(nlp.pipe((spec.input_doc(nlp, ref) for ref in references), batch_size=batch_size))
    seconds = time.perf_counter() - start
    examples = [Example(p, r) for p, r in zip(predictions, references)]
    raw, per_label, confusion = spec.scores(examples, pipe)
    scores = {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
              and not k.endswith("_total")}
    scores.setdefault(spec.primary, 0.0)  # undefined (no gold, no predictions) counts as 0
    words = sum(len(doc) for doc in predictions)
    pieces = word_pieces(pipe, predictions)
    statistics = {"docs": len(predictions), "words": words, "word_pieces": pieces, "seconds": round(seconds, 3),
                  "docs_per_second": round(len(predictions) / seconds, 1) if seconds else None,
                  "words_per_second": round(words / seconds, 1) if seconds else None,
                  "word_pieces_per_second": round(pieces / seconds, 1) if seconds else None,
                  **{k: v for k, v in raw.items() if k.endswith("_total")},  # questions counted (QA)
                  "device": str(pipe.checkpoint.device), "machine": machine(pipe.checkpoint.device)}
    drawn_too = bool(bootstrap and bootstrap.replicates)
    stats = spec.doc_statistics(examples, pipe) if (drawn_too or statistics) and examples else None
    drawn = bootstrap_intervals(stats, bootstrap) if stats is not None and drawn_too else {}
    confidences = spec.confidences(examples, pipe) if examples else None
    calibration = calibration_summary(*confidences) if confidences is not None and len(confidences[0]) else {}
    return Evaluation(spec.name, spec.primary, scores, statistics, per_label, confusion, predictions, drawn, stats,
                      calibration, confidences[:2] if calibration else None, list(references),
                      spec.errors(examples, pipe) if errors else None)


def calibration_summary(confidence, right, unit: str, bins: int = BINS) -> Dict[str, Any]:
    """How far the scores users read are from the share of them that is right: expected calibration error
    over `bins` equal-width bins, Brier score, and the bins themselves."""
    return {**summary(confidence, right, bins), "bins": bins, "of": unit,
            "reliability": reliability(confidence, right, bins).rows()}


def bootstrap_intervals(stats: DocStatistics, settings: BootstrapSettings) -> Dict[str, Any]:
    """The headline metrics' bootstrap intervals over the documents: {"replicates", "seed", "level", "unit",
    "seconds", "scores": {metric: [low, high]}, "per_label": {label: {"p"|"r"|"f": [low, high]}}}."""
    start = time.perf_counter()
    scores, per_label = split_labels(intervals(stats, settings.replicates, settings.seed, settings.level))
    return {"replicates": settings.replicates, "seed": settings.seed, "level": settings.level, "unit": "document",
            "seconds": round(time.perf_counter() - start, 3),
            "scores": {k: list(v) for k, v in scores.items()},
            "per_label": {label: {k: list(v) for k, v in got.items()} for label, got in per_label.items()}}


def split_labels(by_key: Dict[Any, Any]) -> Tuple[Dict[str, Any], Dict[str, Dict[str, Any]]]:
    """({metric: x}, {label: {"p"|"r"|"f": x}}) of a result keyed by metric names and (label, kind) pairs."""
    scores, per_label = {}, {}
    for key, value in by_key.items():
        if isinstance(key, tuple):
            per_label.setdefault(key[0], {})[key[1]] = value
        else:
            scores[key] = value
    return scores, per_label


def word_pieces(pipe, docs: Sequence[Doc]) -> int:
    """Word pieces of the texts the component read, by its own tokenizer, without special tokens (QA: and of
    each question once), counted after the timed run: the model-side measure of speed, beside words."""
    texts = [doc.text for doc in docs] + [q for doc in docs for q in (doc._.questions or [])]
    if not texts:
        return 0
    return sum(len(ids) for ids in pipe.checkpoint.tokenizer(texts, add_special_tokens=False)["input_ids"])


def open_pipeline(pipeline: Union[str, Path, Language]) -> Tuple[Language, str]:
    """(the pipeline, its reference pinned to its version) of a folder, `models:/NAME@ALIAS` or
    `models:/NAME/VERSION`, or a loaded one."""
    if isinstance(pipeline, Language):
        return pipeline, "<in memory>"
    reference = pin_model(pipeline)  # recorded as the version it was, wherever an alias moves later
    return spacy.load(local_pipeline(reference)), reference


def score_file(pipeline: Union[str, Path, Language], test: Union[str, Path], *, options: ReadOptions = ReadOptions(),
               skip_bad: bool = False, batch_size: Optional[int] = None, component: Optional[str] = None,
               bootstrap: Optional[BootstrapSettings] = None, statistics: bool = False, errors: bool = False
               ) -> Tuple["Evaluation", Loaded, str]:
    """Load the pipeline (`open_pipeline`), read `test` (any format `prepare` reads) and score its hf_*
    component (the first, or `component`, with the pipeline's other hf_* heads off): (evaluation, the
    test docs as read, the pipeline's reference pinned to its version)."""
    nlp, reference = open_pipeline(pipeline)
    pipe = nlp.get_pipe(component) if component else hf_component(nlp)
    loaded = load_docs(pipe.spec.name, test, nlp, options=options, skip_bad=skip_bad)
    pipe.spec.gold_for(loaded, pipe)
    others = [name for name, p in nlp.pipeline if isinstance(p, HFPipe) and p is not pipe]
    with nlp.select_pipes(disable=others):
        result = score_pipeline(nlp, loaded.docs, batch_size=batch_size, component=pipe.name, bootstrap=bootstrap,
                                statistics=statistics, errors=errors)
    result.statistics["skipped"] = len(loaded.skipped)
    return result, loaded, reference


@dataclass
class Comparison:
    """B against A on the same test documents: every headline metric's difference (B - A) with its paired
    bootstrap interval and p-value, per label too, and McNemar's test where each document gets one decision."""

    task: str
    primary: str
    a: str  # the pipelines' references (pinned)
    b: str
    settings: BootstrapSettings
    scores: Dict[str, PairedDifference]
    per_label: Dict[str, Dict[str, PairedDifference]]
    mcnemar: Optional[Dict[str, float]]
    evaluations: Tuple[Evaluation, Evaluation]

    @property
    def primary_difference(self) -> PairedDifference:
        return self.scores[self.primary]

    def to_json(self) -> Dict[str, Any]:
        return {"task": self.task, "primary": self.primary, "a": self.a, "b": self.b,
                "bootstrap": {"replicates": self.settings.replicates, "seed": self.settings.seed,
                              "level": self.settings.level, "unit": "document"},
                "scores": {k: d.to_json() for k, d in self.scores.items()},
                "per_label": {label: {k: d.to_json() for k, d in v.items()} for label, v in self.per_label.items()},
                "mcnemar": self.mcnemar}


def compare_pipelines(a: Union[str, Path, Language], b: Union[str, Path, Language], test: Union[str, Path], *,
                      options: ReadOptions = ReadOptions(), skip_bad: bool = False, batch_size: Optional[int] = None,
                      bootstrap: BootstrapSettings = BootstrapSettings(), head: Optional[str] = None) -> Comparison:
    """Run pipelines A and B (folders, models:/ references or loaded) on the same test file and compare
    them document by document (`paired_differences`): their one hf_* head, or the head named `head` in
    each (pipelines of several heads on a shared encoder, e.g. a multi-task teacher and its student), the
    other heads off. The two heads must be of the same task, labels and label kind."""
    check_bootstrap(bootstrap)
    if not bootstrap.replicates:
        raise ValueError("--bootstrap-replicates 0: a paired comparison needs replicates (e.g. 1000)")
    (nlp_a, ref_a), (nlp_b, ref_b) = open_pipeline(a), open_pipeline(b)
    pipes = []
    for nlp, ref in ((nlp_a, ref_a), (nlp_b, ref_b)):
        heads = [name for name, p in nlp.pipeline if isinstance(p, HFPipe)]
        if head is not None and head not in heads:
            raise ValueError(f"{ref}: no hf_* head {head!r} (its heads: {heads})")
        if head is None and len(heads) != 1:
            raise ValueError(f"{ref}: the pipeline has {len(heads)} hf_* heads ({heads}); name the one to compare "
                             f"with --test HEAD=FILE (e.g. {heads[0]}=test.conll)")
        pipes.append(nlp.get_pipe(head or heads[0]))
    pa, pb = pipes
    if pa.spec.name != pb.spec.name:
        raise ValueError(f"{ref_a} is a {pa.spec.name} pipeline and {ref_b} a {pb.spec.name} one: compare pipelines "
                         "of one task")
    if pa.spec.has_labels and sorted(pa.labels) != sorted(pb.labels):
        raise ValueError(f"{ref_a} and {ref_b} have different labels ({sorted(pa.labels)} and {sorted(pb.labels)}): "
                         "compare pipelines with one label set")
    kind_a, kind_b = pa.spec.multi_label_of(pa), pb.spec.multi_label_of(pb)
    if kind_a != kind_b:
        kinds = {True: "multi-label", False: "exclusive", None: "?"}
        raise ValueError(f"{ref_a} is {kinds[kind_a]} and {ref_b} {kinds[kind_b]}: their scores are not the same "
                         "metric; compare pipelines of one kind")
    ev_a, ev_b = (score_file(nlp, test, options=options, skip_bad=skip_bad, batch_size=batch_size,
                             component=pipe.name, statistics=True)[0] for nlp, pipe in ((nlp_a, pa), (nlp_b, pb)))
    if ev_a.doc_statistics is None or ev_b.doc_statistics is None:
        raise ValueError(f"the {pa.spec.name} task gives no per-document statistics: it cannot be compared")
    diffs = paired_differences(ev_a.doc_statistics, ev_b.doc_statistics, bootstrap.replicates, bootstrap.seed,
                               bootstrap.level)
    scores, per_label = split_labels(diffs)
    correct = (ev_a.doc_statistics.correct, ev_b.doc_statistics.correct)
    return Comparison(pa.spec.name, pa.spec.primary, ref_a, ref_b, bootstrap, scores, per_label,
                      mcnemar(*correct) if correct[0] is not None and correct[1] is not None else None, (ev_a, ev_b))
