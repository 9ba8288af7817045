"""Bootstrap confidence intervals over documents, vectorised.

A metric over a test set is a function of sums of per-document statistics (true positives, false
positives and false negatives per entity type; correct decisions per label; exact matches and F1 per
question). A bootstrap replicate draws the documents with replacement: its statistics are the documents'
rows weighed by how often each was drawn, so all replicates at once are one matrix product,
(replicates x docs) counts @ (docs x statistics), and the metric is computed on every replicate's sums
in one numpy expression. The draws are numpy's `default_rng(seed).integers(0, docs, (replicates, docs))`,
row by row: a loop over the same draws, scoring each resampled test set, gives the same replicates.

Pure functions on numpy arrays: no model, no spaCy (the tasks build the statistics from spaCy Examples).
"""

from dataclasses import dataclass
from typing import Callable, Dict, Hashable, Iterator, Optional, Tuple

import numpy as np

from .settings import check_settings, setting

REPLICATES = 1000
LEVEL = 0.95
MAX_CELLS = 4_000_000  # draws held at once (replicates x docs): about 130 MB at the peak (draws, counts)


@dataclass
class BootstrapSettings:
    """How an evaluation's confidence intervals are drawn; options of `sllm evaluate` (--bootstrap-*)."""

    replicates: int = setting(REPLICATES, "bootstrap replicates (test documents resampled with replacement) for "
                                          "each metric's confidence interval; 0: no intervals", ge=0)
    seed: int = setting(0, "seed of the bootstrap's draws (the same seed, the same intervals)")
    level: float = setting(LEVEL, "confidence level of the intervals", gt=0, lt=1)


@dataclass
class DocStatistics:
    """Per-document statistics (`values`, docs x k) and the metrics they give, computed from sums over
    documents (`metrics`: (replicates x k) sums -> {metric: one value per replicate})."""

    values: np.ndarray
    metrics: Callable[[np.ndarray], Dict[Hashable, np.ndarray]]  # (label, 'f') keys: per-label scores
    correct: Optional[np.ndarray] = None  # whether each document's decision is right (McNemar's test), if the
    # task decides one thing per document

    def point(self) -> Dict[Hashable, float]:
        """The metrics on the test set itself (every document once)."""
        return {k: float(v[0]) for k, v in self.metrics(self.values.sum(axis=0, keepdims=True)).items()}


def check_bootstrap(settings: BootstrapSettings) -> BootstrapSettings:
    """The settings, each in its range (a ValueError naming the --bootstrap-* option otherwise)."""
    check_settings(settings, name=lambda field: f"--bootstrap-{field.replace('_', '-')}")
    return settings


def draw_counts(n_docs: int, replicates: int, seed: int, max_cells: int = MAX_CELLS) -> Iterator[np.ndarray]:
    """How often each document is drawn in each replicate, in chunks of (replicates x docs) counts."""
    rng = np.random.default_rng(seed)
    chunk = max(1, max_cells // max(n_docs, 1))
    for start in range(0, replicates, chunk):
        rows = min(chunk, replicates - start)
        drawn = rng.integers(0, n_docs, size=(rows, n_docs))
        flat = (drawn + n_docs * np.arange(rows)[:, None]).ravel()
        yield np.bincount(flat, minlength=rows * n_docs).reshape(rows, n_docs)


def replicate_metrics(stats: DocStatistics, replicates: int = REPLICATES, seed: int = 0,
                      max_cells: int = MAX_CELLS) -> Dict[Hashable, np.ndarray]:
    """Every metric on every replicate: {metric: (replicates,) values}."""
    values = np.asarray(stats.values, dtype=np.float64)
    parts: Dict[Hashable, list] = {}
    for counts in draw_counts(len(values), replicates, seed, max_cells):
        for name, got in stats.metrics(counts @ values).items():
            parts.setdefault(name, []).append(np.asarray(got, dtype=np.float64))
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> Tuple[float, float]:
    """The central `level` interval of the replicates' values (percentile bootstrap)."""
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def intervals(stats: DocStatistics, replicates: int = REPLICATES, seed: int = 0, level: float = LEVEL,
              max_cells: int = MAX_CELLS) -> Dict[Hashable, Tuple[float, float]]:
    """A `level` percentile-bootstrap interval for every metric of `stats`, documents resampled."""
    if replicates == 0 or len(stats.values) == 0:
        return {}
    return {name: percentile_interval(values, level)
            for name, values in replicate_metrics(stats, replicates, seed, max_cells).items()}


def prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 from counts (any shape), 0 where a denominator is 0 (spaCy's PRFScore)."""
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    p = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    r = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
    f = np.divide(2 * p * r, p + r, out=np.zeros_like(tp), where=(p + r) > 0)
    return p, r, f


@dataclass
class PairedDifference:
    """B's metric minus A's on the same documents: the difference, its paired-bootstrap interval, and the
    p-value of "no difference" (the share of replicates whose difference strays from the observed one by as
    much as the observed one strays from 0)."""

    a: float
    b: float
    difference: float
    interval: Tuple[float, float]
    p_value: float

    def to_json(self) -> Dict[str, float]:
        return {"a": self.a, "b": self.b, "difference": self.difference, "interval": list(self.interval),
                "p_value": self.p_value}


def paired_differences(a: DocStatistics, b: DocStatistics, replicates: int = REPLICATES, seed: int = 0,
                       level: float = LEVEL, max_cells: int = MAX_CELLS) -> Dict[Hashable, PairedDifference]:
    """Every metric both statistics give, compared on the same resampled documents: each replicate draws
    one set of documents and scores A and B on it."""
    if len(a.values) != len(b.values):
        raise ValueError(f"a paired comparison needs the same documents: {len(a.values)} and {len(b.values)}")
    va, vb = (np.asarray(x.values, dtype=np.float64) for x in (a, b))
    point_a, point_b = a.point(), b.point()
    keys = [k for k in point_a if k in point_b]
    parts: Dict[Hashable, list] = {k: [] for k in keys}
    for counts in draw_counts(len(va), replicates, seed, max_cells):
        ma, mb = a.metrics(counts @ va), b.metrics(counts @ vb)
        for k in keys:
            parts[k].append(np.asarray(mb[k], dtype=np.float64) - np.asarray(ma[k], dtype=np.float64))
    out = {}
    for k in keys:
        diffs, observed = np.concatenate(parts[k]), point_b[k] - point_a[k]
        extreme = int((np.abs(diffs - observed) >= abs(observed) - 1e-12).sum())
        out[k] = PairedDifference(point_a[k], point_b[k], observed, percentile_interval(diffs, level),
                                  (1 + extreme) / (len(diffs) + 1) if observed else 1.0)
    return out


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> Dict[str, float]:
    """McNemar's exact test on paired right/wrong decisions: the documents only A gets right, only B gets
    right, and the two-sided binomial p-value of their split (1.0 when there are none)."""
    from scipy.stats import binomtest

    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"only_a_right": only_a, "only_b_right": only_b, "p_value": float(p)}
