"""The figures the stages draw, as PNG bytes (matplotlib without a display): a confusion matrix, a
reliability diagram, a precision-recall curve."""

import io
from typing import Any, Dict, Optional

import numpy as np

from ...core.calibration import PrecisionRecall, Reliability


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    _pyplot().close(fig)
    return buf.getvalue()


def confusion_png(confusion: Dict[str, Any]) -> bytes:
    """The confusion matrix (rows gold, columns predicted) as PNG bytes."""
    plt = _pyplot()
    labels, matrix = confusion["labels"], np.array(confusion["matrix"])
    size = min(4 + 0.25 * len(labels), 24)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8 if len(labels) > 20 else 10)
    ax.set_yticks(range(len(labels)), labels, fontsize=8 if len(labels) > 20 else 10)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    if len(labels) <= 20:
        for (i, j), n in np.ndenumerate(matrix):
            ax.text(j, i, str(n), ha="center", va="center", color="white" if n > matrix.max() / 2 else "black")
    return _png(fig)


def reliability_png(curves: Dict[str, Reliability], title: str) -> bytes:
    """A reliability diagram: accuracy against mean confidence per bin, one line per curve (e.g. before
    and after calibration, ECE in the legend), the diagonal being perfect calibration; bin counts below."""
    plt = _pyplot()
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    width = None
    for name, curve in curves.items():
        used = curve.count > 0
        ax.plot(curve.confidence[used], curve.accuracy[used], marker="o", label=f"{name} (ECE {curve.ece:.3f})")
        centres = (curve.edges[:-1] + curve.edges[1:]) / 2
        width = (curve.edges[1] - curve.edges[0]) / (len(curves) + 1)
        shift = (list(curves).index(name) - (len(curves) - 1) / 2) * width
        counts.bar(centres + shift, curve.count, width=width, label=name)
    ax.set_ylabel("share right")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    counts.set_xlabel("confidence")
    counts.set_ylabel("decisions")
    counts.set_yscale("log" if width and max(int(c.count.max()) for c in curves.values()) > 100 else "linear")
    return _png(fig)


def precision_recall_png(curve: PrecisionRecall, title: str, threshold: Optional[float] = None) -> bytes:
    """Precision against recall as the score threshold falls; the chosen threshold marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(curve.recall, curve.precision, linewidth=1.5)
    if threshold is not None and len(curve.thresholds):
        at = int(np.flatnonzero(curve.thresholds >= threshold)[-1]) if (curve.thresholds >= threshold).any() else 0
        ax.plot([curve.recall[at]], [curve.precision[at]], marker="o", color="red",
                label=f"threshold {threshold:.3f}: P {curve.precision[at]:.3f}, R {curve.recall[at]:.3f}")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    return _png(fig)
