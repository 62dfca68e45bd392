"""Pixel metrics in bounded memory, and the image-threshold policy.

Why this module exists
----------------------
anomalib's pixel metrics keep every pixel of every test image (``AUROC``) or, for ``PRO``, build a
``pixels x regions`` tensor under deterministic mode (10.9 GB for 200 masked images at 256 px), and
that ``PRO`` is the overlap at one fixed threshold, not the AU-PRO that papers report. Here both
pixel metrics are computed from fixed-bin histograms, so memory does not grow with the number of
test images (a few MB whatever the test set):

* ``pixel_AUROC``: ROC over all test pixels (mask > 0 is positive), from a positive and a negative
  score histogram.
* ``pixel_AUPRO``: the MVTec AD definition (Bergmann et al., IJCV 2021, ``compute_pro`` in the
  MVTec evaluation code): regions are the 8-connected components of each ground-truth mask, PRO(t)
  is the mean over all regions of the fraction of the region scored >= t, FPR(t) is over all
  normal pixels of all test images, and AU-PRO is the area under PRO(FPR) for FPR in [0, 0.3],
  divided by 0.3. The mean over regions streams exactly: every pixel of region r adds ``1/|r|`` to
  a weighted histogram, whose tail sum at t is ``sum_r overlap_r(t)``.

Histograms are over a monotone squashing of the raw score, ``0.5 + atan(z)/pi`` with
``z = (score - centre) / half_range`` taken from the validation statistics, so both metrics are
those of the raw maps up to ties within one of ``N_BINS`` bins (the tests bound the gap to sklearn
and to a brute-force AU-PRO), and far outliers still land in distinct bins.

The threshold policy (``train.threshold`` in params.yaml) is also here, because it is the other
number the pipeline derives from validation scores: ``f1`` (anomalib's F1-optimal threshold, needs
anomalous validation images) or ``normal_quantile`` (the ``quantile`` of the held-out normal
validation scores). ``f1`` falls back to ``normal_quantile`` when validation holds no anomalous
image, because the F1 threshold is then undefined (anomalib picks an extreme score).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from config.params import Params, ThresholdSection, as_params

N_BINS = 1 << 16
AUPRO_FPR_LIMIT = 0.3
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------- streaming pixel metrics
def _trapezoid(x: np.ndarray, y: np.ndarray, x_max: float | None = None) -> float:
    """Area under the polyline (x ascending), optionally cut at ``x_max`` with linear interpolation."""
    if x_max is not None:
        keep = x <= x_max
        cut_y = float(np.interp(x_max, x, y)) if x[-1] > x_max else None
        x, y = x[keep], y[keep]
        if cut_y is not None:
            x, y = np.append(x, x_max), np.append(y, cut_y)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


@dataclass
class PixelMetricState:
    """Running histograms; see the module docstring. Memory: 3 x ``N_BINS`` float64 (1.5 MB)."""

    centre: float
    half_range: float
    negatives: np.ndarray
    positives: np.ndarray
    region_weight: np.ndarray
    n_regions: int = 0
    n_images: int = 0


class StreamingPixelMetrics:
    """Accumulate (anomaly map, ground-truth mask) pairs one image at a time; ``compute`` at the end.

    ``score_low``/``score_high`` only place the bins (the validation min/max of the raw maps is a
    good choice): scores outside still count, in increasingly coarse bins.
    """

    def __init__(self, score_low: float, score_high: float, n_bins: int = N_BINS) -> None:
        if not (math.isfinite(score_low) and math.isfinite(score_high)):
            score_low, score_high = 0.0, 1.0
        half = (score_high - score_low) / 2.0
        self.n_bins = n_bins
        self.state = PixelMetricState(
            centre=(score_high + score_low) / 2.0,
            half_range=half if half > 0 else 1.0,
            negatives=np.zeros(n_bins),
            positives=np.zeros(n_bins),
            region_weight=np.zeros(n_bins),
        )

    def _bins(self, scores: np.ndarray) -> np.ndarray:
        z = (scores.astype(np.float64) - self.state.centre) / self.state.half_range
        u = 0.5 + np.arctan(z) / np.pi  # strictly monotone onto (0, 1)
        return np.clip((u * self.n_bins).astype(np.int64), 0, self.n_bins - 1)

    def update(self, anomaly_map: np.ndarray, mask: np.ndarray) -> None:
        """Add one image. ``anomaly_map`` and ``mask`` are HxW of the same size; mask > 0 is defective."""
        from scipy import ndimage

        scores = np.asarray(anomaly_map).reshape(np.asarray(anomaly_map).shape[-2:])
        truth = np.asarray(mask).reshape(np.asarray(mask).shape[-2:]) > 0
        if scores.shape != truth.shape:
            raise ValueError(f"anomaly map {scores.shape} and mask {truth.shape} differ in size")
        bins = self._bins(scores).ravel()
        flat = truth.ravel()
        s = self.state
        s.negatives += np.bincount(bins[~flat], minlength=self.n_bins)
        if flat.any():
            s.positives += np.bincount(bins[flat], minlength=self.n_bins)
            labels, n_regions = ndimage.label(truth, structure=_EIGHT_CONNECTED)
            sizes = np.bincount(labels.ravel(), minlength=n_regions + 1).astype(np.float64)
            weights = np.zeros_like(sizes)
            weights[1:] = 1.0 / sizes[1:]
            s.region_weight += np.bincount(bins, weights=weights[labels.ravel()], minlength=self.n_bins)
            s.n_regions += int(n_regions)
        s.n_images += 1

    def _tail_rates(self, hist: np.ndarray, total: float) -> np.ndarray:
        """Rate of mass scored >= each bin's lower edge, from the highest bin down, starting at 0."""
        tail = np.cumsum(hist[::-1]) / total
        return np.concatenate(([0.0], tail))

    def compute(self) -> dict[str, float]:
        """``pixel_AUROC`` and ``pixel_AUPRO`` (NaN when there are no defective pixels)."""
        s = self.state
        n_neg, n_pos = float(s.negatives.sum()), float(s.positives.sum())
        if n_pos == 0 or n_neg == 0:
            return {"pixel_AUROC": float("nan"), "pixel_AUPRO": float("nan")}
        fpr = self._tail_rates(s.negatives, n_neg)
        tpr = self._tail_rates(s.positives, n_pos)
        pro = np.minimum(self._tail_rates(s.region_weight, float(s.n_regions)), 1.0)
        return {
            "pixel_AUROC": _trapezoid(fpr, tpr),
            "pixel_AUPRO": _trapezoid(fpr, pro, AUPRO_FPR_LIMIT) / AUPRO_FPR_LIMIT,
        }


def brute_force_aupro(
    maps: list[np.ndarray], masks: list[np.ndarray], fpr_limit: float = AUPRO_FPR_LIMIT
) -> float:
    """Exact AU-PRO as in the MVTec AD evaluation code (sort every pixel); the reference for tests.

    Holds every pixel in memory: use it on small sets only.
    """
    from scipy import ndimage

    scores, fp_step, pro_step = [], [], []
    n_ok = n_regions = 0
    for amap, mask in zip(maps, masks, strict=True):
        labels, n = ndimage.label(np.asarray(mask) > 0, structure=_EIGHT_CONNECTED)
        ok = labels == 0
        n_ok += int(ok.sum())
        n_regions += n
        pro = np.zeros(labels.shape)
        for k in range(1, n + 1):
            region = labels == k
            pro[region] = 1.0 / region.sum()
        scores.append(np.asarray(amap, dtype=np.float64).ravel())
        fp_step.append(ok.ravel().astype(np.float64))
        pro_step.append(pro.ravel())
    flat = np.concatenate(scores)
    order = np.argsort(flat, kind="stable")[::-1]
    flat = flat[order]
    fprs = np.cumsum(np.concatenate(fp_step)[order]) / n_ok
    pros = np.cumsum(np.concatenate(pro_step)[order]) / n_regions
    keep = np.append(np.diff(flat) != 0, True)  # one point per distinct threshold
    fprs = np.concatenate(([0.0], np.minimum(fprs[keep], 1.0), [1.0]))
    pros = np.concatenate(([0.0], np.minimum(pros[keep], 1.0), [1.0]))
    return _trapezoid(fprs, pros, fpr_limit) / fpr_limit


# --------------------------------------------------------------------------------- threshold policy
@dataclass(frozen=True)
class ThresholdPolicy:
    """Validated ``train.threshold``: ``{method: f1 | normal_quantile, quantile: 0.99}``."""

    method: str  # config.params.THRESHOLD_METHODS
    quantile: float

    @classmethod
    def from_section(cls, section: ThresholdSection) -> ThresholdPolicy:
        """The policy of the typed ``train.threshold`` section."""
        return cls(method=section.method, quantile=section.quantile)

    @classmethod
    def from_params(cls, params: Params | Mapping[str, Any]) -> ThresholdPolicy:
        """The policy of a whole params file (validated if it is a mapping)."""
        return cls.from_section(as_params(params).train.threshold)


def normal_quantile(scores: np.ndarray, quantile: float) -> float:
    """The ``quantile`` of normal scores ("higher" interpolation: a value that was actually scored,
    so at most ``1 - quantile`` of the normal validation images lie above it)."""
    return float(np.quantile(np.asarray(scores, dtype=np.float64).ravel(), quantile, method="higher"))


def make_post_processor(policy: ThresholdPolicy) -> Any:
    """An anomalib ``PostProcessor`` whose image and pixel thresholds follow ``policy``.

    Normalisation (min/max on validation) is anomalib's; only the threshold metrics are replaced.
    After validation, ``post_processor.threshold_record`` says which method was used and on how many
    normal/anomalous validation images (train.json records it).
    """
    import torch
    from anomalib.metrics import AnomalibMetric
    from anomalib.metrics.threshold.f1_adaptive_threshold import _F1AdaptiveThreshold
    from anomalib.post_processing import PostProcessor
    from torchmetrics.utilities.data import dim_zero_cat

    class _PolicyThreshold(_F1AdaptiveThreshold):
        """F1-optimal when allowed and possible, else the normal quantile; records what it did."""

        def __init__(self, method: str, quantile: float, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.method, self.quantile = method, quantile
            self.record: dict[str, Any] = {}

        def compute(self) -> torch.Tensor:
            target = dim_zero_cat(self.target).flatten()
            preds = dim_zero_cat(self.preds).flatten()
            n_anomalous, n_normal = int((target == 1).sum()), int((target == 0).sum())
            if n_normal == 0:
                raise RuntimeError("threshold: the validation split has no normal image")
            used, why = self.method, "params"
            if self.method == "f1" and n_anomalous == 0:
                used, why = "normal_quantile", "validation has no anomalous samples: F1 threshold undefined"
            if used == "f1":
                value = super().compute()
            else:
                value = torch.tensor(normal_quantile(preds[target == 0].cpu().numpy(), self.quantile))
                self.value = value
            self.record = {
                "method": used,
                "why": why,
                "quantile": self.quantile if used == "normal_quantile" else None,
                "n_normal": n_normal,
                "n_anomalous": n_anomalous,
                "value": float(value),
            }
            return value

    class PolicyThreshold(AnomalibMetric, _PolicyThreshold):  # type: ignore[misc]
        """``_PolicyThreshold`` reading its inputs from batch fields, like anomalib's thresholds."""

    class PolicyPostProcessor(PostProcessor):
        """anomalib's post-processor with the pipeline's threshold policy."""

        def __init__(self) -> None:
            super().__init__()
            kw = {"method": policy.method, "quantile": policy.quantile, "strict": False}
            self._image_threshold_metric = PolicyThreshold(fields=["pred_score", "gt_label"], **kw)
            self._pixel_threshold_metric = PolicyThreshold(fields=["anomaly_map", "gt_mask"], **kw)
            self.threshold_record: dict[str, Any] = {}

        def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            image_metric, pixel_metric = self._image_threshold_metric, self._pixel_threshold_metric
            image_called, pixel_called = image_metric.update_called, pixel_metric.update_called
            super().on_validation_epoch_end(trainer, pl_module)
            self.threshold_record = {
                "image": image_metric.record if image_called else None,
                # No masks in validation: anomalib then uses the image threshold for the maps too.
                "pixel": pixel_metric.record if pixel_called else "same as image (validation has no masks)",
            }

    return PolicyPostProcessor()
