"""Evaluation metrics on plain data: SQuAD answer scores, classification P/R/F and ROC AUC.

Pure functions (strings, numpy arrays): no model, no spaCy. `scorers.py` feeds them from
spaCy Examples.
"""

import re
import string
from collections import Counter
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


# -- SQuAD (official v1.1 evaluation script semantics, v2.0 HasAns/NoAns split) ------------------------
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


# -- classification -------------------------------------------------------------------------------------
def roc_auc(gold: np.ndarray, score: np.ndarray) -> Optional[float]:
    """Area under the ROC curve: the chance that a positive scores above a negative (ties count
    half), from average ranks. None when only one class is present."""
    gold = np.asarray(gold, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    n_pos = int(gold.sum())
    n_neg = len(gold) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(score, kind="mergesort")
    _, inverse, counts = np.unique(score[order], return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based, ties share their mean rank
    ranks = np.empty(len(score))
    ranks[order] = average_rank[inverse]
    return float((ranks[gold].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(len(num)), where=den > 0)


def classification_scores(labels: Sequence[str], gold: np.ndarray, decided: np.ndarray, prob: np.ndarray,
                          multi_label: bool) -> Dict[str, Any]:
    """Accuracy, per-label / micro / macro P, R, F, ROC AUC and support from (docs x labels) arrays:
    `gold` and `decided` booleans, `prob` the scores. Accuracy is the share of docs whose decided
    label set equals the gold one (for exclusive classes: the argmax is the gold class)."""
    gold, decided = np.asarray(gold, dtype=bool), np.asarray(decided, dtype=bool)
    tp = (gold & decided).sum(axis=0)
    fp = (~gold & decided).sum(axis=0)
    fn = (gold & ~decided).sum(axis=0)
    p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f = _ratio(2 * p * r, p + r)
    micro_p = tp.sum() / (tp.sum() + fp.sum()) if tp.sum() + fp.sum() else 0.0
    micro_r = tp.sum() / (tp.sum() + fn.sum()) if tp.sum() + fn.sum() else 0.0
    micro_f = 2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r else 0.0
    aucs = {label: roc_auc(gold[:, i], prob[:, i]) for i, label in enumerate(labels)}
    defined = [a for a in aucs.values() if a is not None]
    accuracy = float((gold == decided).all(axis=1).mean()) if len(gold) else 0.0
    return {
        "cats_accuracy": accuracy,
        "cats_micro_p": float(micro_p), "cats_micro_r": float(micro_r), "cats_micro_f": float(micro_f),
        "cats_macro_p": float(p.mean()) if len(labels) else 0.0,
        "cats_macro_r": float(r.mean()) if len(labels) else 0.0,
        "cats_macro_f": float(f.mean()) if len(labels) else 0.0,
        "cats_macro_auc": float(np.mean(defined)) if defined else None,
        "cats_f_per_type": {label: {"p": float(p[i]), "r": float(r[i]), "f": float(f[i])}
                            for i, label in enumerate(labels)},
        "cats_auc_per_type": aucs,
        "cats_support_per_type": {label: int(gold[:, i].sum()) for i, label in enumerate(labels)},
    }


def confusion_matrix(labels: Sequence[str], gold: np.ndarray, decided: np.ndarray) -> Dict[str, Any]:
    """Exclusive classes: counts of (gold class, decided class), rows gold."""
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    np.add.at(matrix, (np.asarray(gold).argmax(axis=1), np.asarray(decided).argmax(axis=1)), 1)
    return {"labels": list(labels), "matrix": matrix.tolist()}
