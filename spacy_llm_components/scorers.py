"""Scorers registered for spaCy's `nlp.evaluate` / `spacy evaluate`.

SQuAD metrics follow the official v1.1 evaluation script (answer
normalisation, exact match, token F1, max over gold answers) and the v2.0
HasAns/NoAns split. Textcat and NER delegate to spaCy's own scorers.
"""

import re
import string
from collections import Counter
from typing import Any, Callable, Dict, Iterable, List, Optional

from spacy.pipeline.spancat import spancat_score
from spacy.scorer import Scorer, get_ner_prf
from spacy.training import Example
from spacy.util import registry

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (official SQuAD)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:  # v2.0: an empty answer is right only against an empty answer
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(pairs: Iterable[tuple]) -> Dict[str, Any]:
    """Metrics over (prediction text, gold texts) pairs; gold [] marks an unanswerable question."""
    em: Dict[str, List[float]] = {"all": [], "has_ans": [], "no_ans": []}
    f1: Dict[str, List[float]] = {"all": [], "has_ans": [], "no_ans": []}
    for prediction, golds in pairs:
        golds = list(golds) or [""]
        e = max(exact_match(prediction, g) for g in golds)
        f = max(token_f1(prediction, g) for g in golds)
        split = "has_ans" if any(golds) else "no_ans"
        for part in ("all", split):
            em[part].append(e)
            f1[part].append(f)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    scores: Dict[str, Any] = {"qa_exact": mean(em["all"]), "qa_f1": mean(f1["all"]), "qa_total": len(em["all"])}
    for part in ("has_ans", "no_ans"):
        if em[part]:
            scores[f"qa_{part}_exact"] = mean(em[part])
            scores[f"qa_{part}_f1"] = mean(f1[part])
            scores[f"qa_{part}_total"] = len(em[part])
    return scores


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


def score_textcat(
    examples: Iterable[Example], *, labels: List[str], multi_label: bool = False, threshold: float = 0.5, **_: Any
) -> Dict[str, Any]:
    """spaCy's cats scorer (accuracy/F/AUC) with the component's labels and exclusivity."""
    return Scorer.score_cats(examples, "cats", labels=labels, multi_label=multi_label, threshold=threshold)


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
