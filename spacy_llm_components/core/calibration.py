"""Calibration maths on plain arrays: temperature scaling (Guo et al. 2017: one scalar dividing a head's
logits, fitted by the dev set's negative log-likelihood), expected calibration error over equal-width
bins, the Brier score, and decision thresholds tuned on dev (F1 per label, a precision floor, SQuAD 2.0's
no-answer threshold)."""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

KINDS = ("softmax", "sigmoid")  # how a head's logits become probabilities
BINS = 15  # Guo et al.'s number of bins
TEMPERATURE_RANGE = (0.05, 20.0)  # where the fitted temperature is searched


class CalibrationError(ValueError):
    """Data a calibration or threshold cannot be fitted on."""


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def temperature_nll(logits: np.ndarray, targets: np.ndarray, temperature: float, kind: str = "softmax") -> float:
    """Mean negative log-likelihood of the targets under softmax(logits / T) (targets: class indices), or
    under sigmoid(logits / T) per entry (targets: 0/1 of the same shape)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    if kind == "softmax":
        return float(-_log_softmax(z)[np.arange(len(z)), np.asarray(targets)].mean())
    y = np.asarray(targets, dtype=np.float64)
    return float((np.logaddexp(0.0, z) - y * z).mean())  # binary cross-entropy, stable for any z


def segment_scores(log_probs: np.ndarray, chosen: np.ndarray, segment: np.ndarray, n: int, temperature: float,
                   product: bool = False) -> np.ndarray:
    """Each segment's score at a temperature, from the chosen class's probability in each of its rows under
    softmax(log_probs / T): their mean (an entity's score from its words' tags) or their product (an
    answer's from its start and end)."""
    lp = _log_softmax(np.asarray(log_probs, dtype=np.float64) / temperature)[np.arange(len(chosen)), chosen]
    if product:
        return np.exp(np.bincount(segment, lp, minlength=n))
    return np.bincount(segment, np.exp(lp), minlength=n) / np.maximum(np.bincount(segment, minlength=n), 1)


def check_calibration_data(logits: np.ndarray, targets: np.ndarray, kind: str, what: str = "the dev data") -> None:
    """Refuse what temperature scaling cannot be fitted on: no rows, non-finite logits, targets out of
    range, or a single class (one class says nothing about how sure the model should be)."""
    if kind not in KINDS:
        raise CalibrationError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    logits, targets = np.asarray(logits), np.asarray(targets)
    if logits.size == 0 or len(logits) == 0:
        raise CalibrationError(f"{what} gives no predictions with a gold label to calibrate on")
    if not np.isfinite(logits).all():
        raise CalibrationError(f"{what}: the model's logits are not all finite")
    if kind == "softmax":
        if targets.shape != logits.shape[:1] or targets.min() < 0 or targets.max() >= logits.shape[1]:
            raise CalibrationError(f"{what}: targets must be class indices below {logits.shape[1]}")
        if len(np.unique(targets)) < 2:
            raise CalibrationError(f"{what} has one class only (every gold label is class {int(targets[0])}): "
                                   "calibration needs examples of at least two")
    else:
        if targets.shape != logits.shape or not np.isin(targets, (0, 1)).all():
            raise CalibrationError(f"{what}: multi-label targets must be 0/1, one per logit")
        if targets.min() == targets.max():
            raise CalibrationError(f"{what} has one class only (every gold value is {int(targets.flat[0])}): "
                                   "calibration needs positives and negatives")


def minimise_over_temperature(nll: Callable[[float], float], bounds: Tuple[float, float] = TEMPERATURE_RANGE
                              ) -> float:
    """The temperature of least `nll` within `bounds`: the best of a log-spaced grid, refined by a bounded
    scalar search between its neighbours (so a flat or non-convex objective is still searched whole)."""
    from scipy.optimize import minimize_scalar

    grid = np.exp(np.linspace(np.log(bounds[0]), np.log(bounds[1]), 161))
    values = [nll(float(t)) for t in grid]
    best = int(np.argmin(values))
    low, high = np.log(grid[max(best - 1, 0)]), np.log(grid[min(best + 1, len(grid) - 1)])
    result = minimize_scalar(lambda u: nll(float(np.exp(u))), bounds=(low, high), method="bounded",
                             options={"xatol": 1e-8})
    return float(np.exp(result.x)) if result.fun <= values[best] else float(grid[best])


def fit_temperature(logits: np.ndarray, targets: np.ndarray, kind: str = "softmax",
                    bounds: Tuple[float, float] = TEMPERATURE_RANGE) -> float:
    """The temperature T minimising `temperature_nll` of the logits within `bounds` (Guo et al. 2017)."""
    check_calibration_data(logits, targets, kind)
    logits = np.asarray(logits, dtype=np.float64)
    return minimise_over_temperature(lambda t: temperature_nll(logits, targets, t, kind), bounds)


def fit_segment_temperature(log_probs: np.ndarray, chosen: np.ndarray, segment: np.ndarray, right: np.ndarray,
                            bounds: Tuple[float, float] = TEMPERATURE_RANGE, product: bool = False) -> float:
    """The temperature whose segment scores (`segment_scores`) best predict whether each segment is right:
    least binary NLL. For NER this calibrates `ent._.score` itself: an entity's score is the mean of its
    words' tag probabilities, and it is right when it is exactly a gold entity."""
    right = np.asarray(right).astype(bool)
    if len(right) == 0:
        raise CalibrationError("the dev data gives no scored prediction to calibrate on")
    if right.all() or not right.any():
        raise CalibrationError(f"every scored prediction on the dev data is {'right' if right.all() else 'wrong'}: "
                               "calibration needs right and wrong ones")
    if np.isnan(log_probs).any() or not np.isfinite(log_probs[np.arange(len(chosen)), chosen]).all():
        raise CalibrationError("the dev data: the model's scores are not all finite")
    return minimise_over_temperature(lambda t: segment_nll(log_probs, chosen, segment, right, t, product), bounds)


def segment_nll(log_probs: np.ndarray, chosen: np.ndarray, segment: np.ndarray, right: np.ndarray,
                temperature: float, product: bool = False) -> float:
    """Mean binary NLL of whether each segment is right under its score at the temperature."""
    s = np.clip(segment_scores(log_probs, chosen, segment, len(right), temperature, product), 1e-12, 1 - 1e-12)
    return float(-np.where(right, np.log(s), np.log1p(-s)).mean())


@dataclass
class TemperatureProblem:
    """What a head's temperature is fitted on: logits and targets (`kind` softmax or sigmoid), or for
    scores made of several rows' probabilities (`kind` segments: rows' logits, the chosen class of each,
    the segment each row belongs to, whether each segment is right, and whether its score is the rows'
    mean or `product`)."""

    kind: str
    logits: np.ndarray
    targets: np.ndarray
    chosen: Optional[np.ndarray] = None
    segment: Optional[np.ndarray] = None
    product: bool = False

    @property
    def decisions(self) -> int:
        return int(len(self.targets))

    def nll(self, temperature: float) -> float:
        if self.kind != "segments":
            return temperature_nll(self.logits, self.targets, temperature, self.kind)
        return segment_nll(self.logits, self.chosen, self.segment, self.targets, temperature, self.product)

    def fit(self) -> float:
        if self.kind == "segments":
            return fit_segment_temperature(self.logits, self.chosen, self.segment, self.targets,
                                           product=self.product)
        return fit_temperature(self.logits, self.targets, self.kind)


@dataclass
class Reliability:
    """Per equal-width confidence bin: how many decisions, their mean confidence and the share right."""

    edges: np.ndarray
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray

    @property
    def ece(self) -> float:
        """Expected calibration error: the count-weighted mean gap between confidence and accuracy."""
        n = self.count.sum()
        return float((self.count * np.abs(self.accuracy - self.confidence)).sum() / n) if n else 0.0

    def rows(self) -> List[Dict[str, float]]:
        return [{"low": float(lo), "high": float(hi), "count": int(c), "confidence": float(p), "accuracy": float(a)}
                for lo, hi, c, p, a in zip(self.edges[:-1], self.edges[1:], self.count, self.confidence,
                                           self.accuracy) if c]


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> Reliability:
    """Decisions binned by confidence over [0, 1] in `bins` equal widths, each bin (low, high] (the first
    also holds 0), as in Guo et al. and `sklearn.calibration.calibration_curve`'s uniform strategy."""
    confidence = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count, np.bincount(index, confidence, minlength=bins) / count, 0.0)
        accuracy = np.where(count, np.bincount(index, correct, minlength=bins) / count, 0.0)
    return Reliability(edges, count, mean_conf, accuracy)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> float:
    return reliability(confidence, correct, bins).ece


def brier_score(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Mean squared gap between each decision's confidence and whether it was right (0/1)."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    return float(((confidence - correct) ** 2).mean()) if len(confidence) else 0.0


def best_f1_threshold(scores: np.ndarray, gold: np.ndarray) -> Tuple[float, float]:
    """The threshold (decide at or above it) maximising F1 of one label's decisions on dev, and that F1.
    The threshold lies halfway between the lowest score kept and the highest left out (every cut of the
    sorted scores is tried)."""
    scores, gold = np.asarray(scores, dtype=np.float64), np.asarray(gold).astype(bool)
    if not gold.any():
        raise CalibrationError("no gold positive: the label needs dev docs that have it to tune a threshold")
    order = np.argsort(-scores, kind="stable")
    s, g = scores[order], gold[order]
    cut = np.flatnonzero(np.r_[s[1:] < s[:-1], True])  # keep s[:k+1]: only where the score changes
    tp = np.cumsum(g)[cut]
    f1 = 2 * tp / (cut + 1 + gold.sum())
    best = int(np.argmax(f1))
    k = int(cut[best])
    threshold = s[k] if k + 1 == len(s) else (s[k] + s[k + 1]) / 2
    return float(threshold), float(f1[best])


@dataclass
class PrecisionRecall:
    """Precision and recall of the decisions kept at each threshold (scores at or above it), best first."""

    thresholds: np.ndarray
    precision: np.ndarray
    recall: np.ndarray

    def threshold_for(self, min_precision: float) -> Optional[float]:
        """The lowest threshold whose kept decisions reach `min_precision` (most recall at that precision);
        None when none does."""
        ok = np.flatnonzero(self.precision >= min_precision)
        return float(self.thresholds[ok[-1]]) if len(ok) else None


def precision_recall(scores: np.ndarray, correct: np.ndarray, n_gold: int) -> PrecisionRecall:
    """The precision-recall curve of scored predictions (each right or wrong) against `n_gold` gold items,
    one point per distinct score."""
    scores, correct = np.asarray(scores, dtype=np.float64), np.asarray(correct).astype(bool)
    order = np.argsort(-scores, kind="stable")
    s, c = scores[order], correct[order]
    cut = np.flatnonzero(np.r_[s[1:] < s[:-1], True]) if len(s) else np.zeros(0, dtype=np.int64)
    tp = np.cumsum(c)[cut] if len(s) else np.zeros(0)
    return PrecisionRecall(s[cut], tp / (cut + 1), tp / max(n_gold, 1))


def best_null_threshold(null_margin: np.ndarray, answer_f1: np.ndarray, impossible: np.ndarray
                        ) -> Tuple[float, float]:
    """SQuAD 2.0's no-answer threshold: a question gets no answer when its null score beats its best answer
    by more than the threshold (`null_margin` = null - best). Returns the threshold maximising mean F1 (an
    unanswerable question scores 1 without an answer, 0 with one; an answerable one its answer's F1, 0
    without) and that F1, as the official evaluation's `find_best_thresh`."""
    margin = np.asarray(null_margin, dtype=np.float64)
    f1, impossible = np.asarray(answer_f1, dtype=np.float64), np.asarray(impossible).astype(bool)
    if not impossible.any():
        raise CalibrationError("the dev data has no unanswerable question: the no-answer threshold needs "
                               "SQuAD 2.0-style data with some (is_impossible)")
    answered_score = np.where(impossible, 0.0, f1)
    order = np.argsort(margin, kind="stable")
    m, kept, abstained = margin[order], answered_score[order], impossible[order].astype(np.float64)
    cut = np.flatnonzero(np.r_[m[1:] > m[:-1], True])  # threshold m[k]: questions up to k answer, the rest abstain
    answer_sum = np.cumsum(kept)[cut]
    abstain_sum = abstained.sum() - np.cumsum(abstained)[cut]
    thresholds = np.r_[m[0] - 1.0, m[cut]]  # (below every margin: no question answers)
    totals = np.r_[abstained.sum(), answer_sum + abstain_sum] / len(m)
    best = int(np.argmax(totals))
    return float(thresholds[best]), float(totals[best])


def summary(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> Dict[str, float]:
    """ECE, Brier and the counts behind them, for metrics.json."""
    return {"ece": expected_calibration_error(confidence, correct, bins), "brier": brier_score(confidence, correct),
            "decisions": int(len(confidence)), "accuracy": float(np.mean(correct)) if len(correct) else 0.0,
            "mean_confidence": float(np.mean(confidence)) if len(confidence) else 0.0}
