"""Scoring a pipeline: run it over gold docs through `nlp.pipe` (the path users take) and score its
predictions with the task's scorer (`TaskSpec.scores`: spaCy's entity scorer, the component's own
decision rule for categories, the official SQuAD semantics), apart from the run's statistics (counts,
seconds, speed). Fine-tuning's dev evaluations, the evaluate stage and promotion all score this way,
so training picks checkpoints by the metric users will see."""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import spacy
from spacy.language import Language
from spacy.tokens import Doc
from spacy.training import Example

from ...components.base import HFPipe
from ...components.pipeline import hf_component
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
                "per_label": self.per_label, "confusion": self.confusion}


def score_pipeline(nlp: Language, references: Sequence[Doc], *, batch_size: Optional[int] = None,
                   component: Optional[str] = None) -> Evaluation:
    """Run the pipeline over the references' texts and score the predictions of its hf_* component (the
    first, or `component`) against them."""
    pipe = nlp.get_pipe(component) if component else hf_component(nlp)
    spec = pipe.spec
    start = time.perf_counter()
    predictions = list(nlp.pipe((spec.input_doc(nlp, ref) for ref in references), batch_size=batch_size))
    seconds = time.perf_counter() - start
    raw, per_label, confusion = spec.scores([Example(p, r) for p, r in zip(predictions, references)], pipe)
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
    return Evaluation(spec.name, spec.primary, scores, statistics, per_label, confusion, predictions)


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
               skip_bad: bool = False, batch_size: Optional[int] = None,
               component: Optional[str] = None) -> Tuple["Evaluation", Loaded, str]:
    """Load the pipeline (`open_pipeline`), read `test` (any format `prepare` reads) and score its hf_*
    component (the first, or `component`, with the pipeline's other hf_* heads off): (evaluation, the
    test docs as read, the pipeline's reference pinned to its version)."""
    nlp, reference = open_pipeline(pipeline)
    pipe = nlp.get_pipe(component) if component else hf_component(nlp)
    loaded = load_docs(pipe.spec.name, test, nlp, options=options, skip_bad=skip_bad)
    pipe.spec.gold_for(loaded, pipe)
    others = [name for name, p in nlp.pipeline if isinstance(p, HFPipe) and p is not pipe]
    with nlp.select_pipes(disable=others):
        result = score_pipeline(nlp, loaded.docs, batch_size=batch_size, component=pipe.name)
    result.statistics["skipped"] = len(loaded.skipped)
    return result, loaded, reference
