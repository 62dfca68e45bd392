"""Evaluation artefacts that are pictures or curves: ROC/PR CSVs for ``dvc plots`` and heat maps.

The CSVs are what DVC overlays across models and experiments (``dvc plots show/diff``), so they
hold plain columns (``fpr,tpr`` and ``recall,precision``) with fixed float formatting, which keeps
them byte-identical between identical runs. Figures are rendered with matplotlib's non-interactive
backend (stages run headless).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FLOAT_FMT = "{:.6f}"


def roc_pr(labels: Sequence[int], scores: Sequence[float]) -> dict[str, np.ndarray]:
    """ROC (fpr, tpr) and precision-recall curves of image scores; label 1 = defective."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    fpr, tpr, _ = roc_curve(y, s)
    precision, recall, _ = precision_recall_curve(y, s)
    return {"fpr": fpr, "tpr": tpr, "precision": precision, "recall": recall}


def write_curve(path: Path, x_name: str, x: np.ndarray, y_name: str, y: np.ndarray) -> Path:
    """Write a two-column CSV with a header (the format ``dvc plots`` expects)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow([x_name, y_name])
        for a, b in zip(x, y, strict=True):
            writer.writerow([FLOAT_FMT.format(float(a)), FLOAT_FMT.format(float(b))])
    return path


def curve_figure(x: np.ndarray, y: np.ndarray, x_label: str, y_label: str, title: str) -> Any:
    """A small matplotlib figure of one curve (for ``mlflow.log_figure``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    ax.plot(x, y, lw=1.5)
    if x_label == "fpr":
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    ax.set(xlabel=x_label, ylabel=y_label, title=title, xlim=(0, 1), ylim=(0, 1.02))
    fig.tight_layout()
    return fig


def save_heatmap(
    path: Path,
    image: np.ndarray,
    anomaly_map: np.ndarray,
    title: str,
) -> Path:
    """Save the image next to an overlay of its anomaly map (both HxW; map in [0, 1]).

    The map is shown on a fixed 0..1 colour scale: after anomalib's normalisation 0.5 is the
    decision threshold, so colours mean the same thing in every picture.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.2), dpi=100)
    axes[0].imshow(image, cmap="gray" if image.ndim == 2 else None)
    axes[0].set_title("input", fontsize=8)
    axes[1].imshow(image, cmap="gray" if image.ndim == 2 else None)
    shown = axes[1].imshow(anomaly_map, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
    axes[1].set_title("anomaly map (0.5 = threshold)", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path
