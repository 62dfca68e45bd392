"""Streaming pixel metrics against exact references, and the threshold policy.

The histogram metrics must equal sklearn's ``roc_auc_score`` and the MVTec AD AU-PRO (exact,
sorting every pixel: ``brute_force_aupro``) up to binning; a fixed-threshold PRO or a wrong FPR
normalisation would be off by far more than the tolerance used here.
"""

from __future__ import annotations

import numpy as np
import pytest

from config.params import ParamsError
from experiments.metrics import StreamingPixelMetrics, ThresholdPolicy, brute_force_aupro, normal_quantile


def _masked_set(n: int, size: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Maps with blob-shaped defects of varying size and strength; a third of the images are normal."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    maps, masks = [], []
    for i in range(n):
        amap = rng.normal(0.0, 1.0, (size, size))
        mask = np.zeros((size, size), dtype=np.uint8)
        if i % 3:
            for _ in range(rng.integers(1, 4)):
                cy, cx, r = rng.integers(4, size - 4), rng.integers(4, size - 4), rng.integers(1, size // 6)
                blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                mask[blob] = 255
                amap[blob] += rng.uniform(0.3, 3.0)  # some regions easy, some hard
        maps.append(amap.astype(np.float32))
        masks.append(mask)
    return maps, masks


def test_streaming_metrics_match_exact_references() -> None:
    from sklearn.metrics import roc_auc_score

    maps, masks = _masked_set(24, 48, seed=3)
    flat_scores = np.concatenate([m.ravel() for m in maps])
    lo, hi = float(np.percentile(flat_scores, 1)), float(np.percentile(flat_scores, 99))
    acc = StreamingPixelMetrics(lo, hi)
    for amap, mask in zip(maps, masks, strict=True):
        acc.update(amap, mask)
    got = acc.compute()

    auroc = roc_auc_score(np.concatenate([m.ravel() > 0 for m in masks]), flat_scores)
    aupro = brute_force_aupro(maps, masks)
    assert got["pixel_AUROC"] == pytest.approx(auroc, abs=1e-4)
    assert got["pixel_AUPRO"] == pytest.approx(aupro, abs=2e-3)
    assert 0.3 < aupro < 0.95  # the set is neither trivial nor hopeless: the comparison means something
    # AU-PRO is invariant to a monotone transform of the scores and to the bin placement.
    acc2 = StreamingPixelMetrics(lo * 10 - 5, hi * 10 + 50)
    for amap, mask in zip(maps, masks, strict=True):
        acc2.update(np.exp(amap), mask)
    again = acc2.compute()
    assert again["pixel_AUPRO"] == pytest.approx(aupro, abs=5e-3)
    assert again["pixel_AUROC"] == pytest.approx(auroc, abs=1e-3)


def test_aupro_extremes_and_region_weighting() -> None:
    size = 32
    mask = np.zeros((size, size), np.uint8)
    mask[2:4, 2:4] = 1  # small region, 4 px
    mask[10:30, 10:30] = 1  # big region, 400 px
    perfect = mask.astype(np.float32) + 0.01 * np.random.default_rng(0).random((size, size))
    acc = StreamingPixelMetrics(0.0, 1.0)
    acc.update(perfect, mask)
    assert acc.compute()["pixel_AUPRO"] == pytest.approx(1.0, abs=1e-3)
    assert acc.state.n_regions == 2

    # Find only the big region: pixel AUROC stays high but PRO averages regions, so about 0.5.
    big_only = perfect.copy()
    big_only[2:4, 2:4] = 0.0
    acc = StreamingPixelMetrics(0.0, 1.0)
    acc.update(big_only, mask)
    result = acc.compute()
    assert result["pixel_AUROC"] > 0.98
    assert result["pixel_AUPRO"] == pytest.approx(brute_force_aupro([big_only], [mask]), abs=2e-3)
    assert 0.45 < result["pixel_AUPRO"] < 0.55

    no_defects = StreamingPixelMetrics(0.0, 1.0)
    no_defects.update(perfect, np.zeros_like(mask))
    assert all(np.isnan(v) for v in no_defects.compute().values())
    with pytest.raises(ValueError, match="differ in size"):
        no_defects.update(perfect, mask[:16])


def test_threshold_policy_params_and_quantile() -> None:
    assert ThresholdPolicy.from_params({}) == ThresholdPolicy("f1", 0.99)
    policy = ThresholdPolicy.from_params(
        {"train": {"threshold": {"method": "normal_quantile", "quantile": 0.9}}}
    )
    assert policy == ThresholdPolicy("normal_quantile", 0.9)
    for bad, match in (
        ({"method": "otsu"}, "method"),
        ({"quantile": 1.5}, "quantile"),
        ({"qantile": 1}, "unknown"),
    ):
        with pytest.raises(ParamsError, match=match):
            ThresholdPolicy.from_params({"train": {"threshold": bad}})
    scores = np.arange(1, 101, dtype=float)
    assert normal_quantile(scores, 0.95) == 96.0  # a scored value; 4 % of normals above it
    assert normal_quantile(scores, 1.0) == 100.0
