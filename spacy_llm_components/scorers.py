"""Scorers registered for spaCy's `nlp.evaluate` / `spacy evaluate`, also used by `sllm evaluate`.

Textcat decides labels the way the component does (`decode.decide_labels`: the argmax for
exclusive classes, per-label thresholds for multi-label), so the scores describe the decisions
users get. NER delegates to spaCy's entity scorer; QA follows the official SQuAD semantics.
"""

from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np
from spacy.pipeline.spancat import spancat_score
from spacy.scorer import get_ner_prf
from spacy.training import Example
from spacy.util import registry

from .core.decode import decide_labels, label_thresholds
from .core.metrics import classification_scores, confusion_matrix, squad_scores


def score_squad(examples: Iterable[Example], *, spans_key: str = "answers", **_: Any) -> Dict[str, Any]:
    """SQuAD EM/F1 of predicted answers against the reference's answers, per question.

    Gold answers come from the reference's `doc._.qas` (character offsets, as
    `sllm prepare` writes them) or else from `doc.spans[spans_key]` (each with
    `span._.question`) for the questions in `doc._.questions`; a question
    without gold answers is unanswerable. The prediction for a question is its
    best (first) answer span, or "" when there is none.
    """
    pairs = []
    for eg in examples:
        gold: Dict[str, List[str]] = {}
        if eg.reference._.qas:
            for qa in eg.reference._.qas:
                gold.setdefault(qa["question"], []).extend(a["text"] for a in qa["answers"])
        else:
            gold = {q: [] for q in (eg.reference._.questions or [])}
            for span in eg.reference.spans.get(spans_key, []):
                gold.setdefault(span._.question, []).append(span.text)
        predicted: Dict[str, str] = {}
        for span in eg.predicted.spans.get(spans_key, []):
            predicted.setdefault(span._.question, span.text)
        pairs.extend((predicted.get(q, ""), answers) for q, answers in gold.items())
    return squad_scores(pairs)


def score_textcat(examples: Iterable[Example], *, labels: List[str], multi_label: bool = False,
                  threshold: float = 0.5, thresholds: Optional[Dict[str, float]] = None, details: bool = False,
                  **_: Any) -> Dict[str, Any]:
    """Accuracy, P/R/F (per label, micro, macro) and ROC AUC of the component's decisions.

    `cats_score`, the primary metric, is accuracy for exclusive classes and macro F for
    multi-label. With `details`, also the support per label and (exclusive classes) the
    confusion matrix.
    """
    examples = list(examples)
    labels = list(labels)
    gold = np.array([[eg.reference.cats.get(label, 0.0) for label in labels] for eg in examples]).reshape(-1, len(labels)) >= 0.5
    prob = np.array([[eg.predicted.cats.get(label, 0.0) for label in labels] for eg in examples]).reshape(-1, len(labels))
    decided = decide_labels(prob, multi_label, label_thresholds(labels, threshold, thresholds))
    scores = classification_scores(labels, gold, decided, prob, multi_label)
    scores["cats_score"] = scores["cats_macro_f"] if multi_label else scores["cats_accuracy"]
    scores["cats_score_desc"] = "macro F" if multi_label else "accuracy"
    support = scores.pop("cats_support_per_type")
    if details:
        scores["cats_support_per_type"] = support
        if not multi_label and len(examples):
            scores["cats_confusion"] = confusion_matrix(labels, gold, decided)
    return scores


def score_ner(examples: Iterable[Example], *, spans_key: Optional[str] = None, **kwargs: Any) -> Dict[str, Any]:
    """spaCy's entity scorer for `doc.ents`, its span scorer for `doc.spans[spans_key]`."""
    if spans_key:
        return spancat_score(examples, spans_key=spans_key, allow_overlap=True)
    return get_ner_prf(examples)


@registry.scorers("spacy_llm_components.squad_scorer.v1")
def make_squad_scorer() -> Callable:
    return score_squad


@registry.scorers("spacy_llm_components.textcat_scorer.v1")
def make_textcat_scorer() -> Callable:
    return score_textcat


@registry.scorers("spacy_llm_components.ner_scorer.v1")
def make_ner_scorer() -> Callable:
    return score_ner
