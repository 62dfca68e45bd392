"""The answer beyond the score: confidence, anomaly mask, anomalous area and regions.

Works only on what :class:`core.scoring.ScoreResult` already has (``anomaly_map`` in [0, 1]
at the model's input size, ``score``) plus the decision threshold in force, so it does not
depend on how the image was pre-processed. Pure numpy + Pillow (no scipy/OpenCV in the image).

Definitions (also in docs/api.md):

* ``confidence`` — how far the score is from the threshold, relative to the room on that side:
  ``(score - t) / (1 - t)`` when anomalous, ``(t - score) / t`` when normal, clipped to [0, 1].
  0 means "on the threshold" (a coin toss), 1 means the score is at the end of its range.
* ``mask`` — pixels whose anomaly-map value (bilinearly upsampled to the working image) is
  >= the threshold; anomalib normalises the map with the same 0.5-centred scheme as the score.
* ``anomalous_area_pct`` — the mask's share of the image, in percent.
* ``regions`` — 8-connected components of the mask, largest peak first, at most
  :data:`MAX_REGIONS`, each with its bounding box in the ORIGINAL image's pixel coordinates
  (``x``, ``y``, ``width``, ``height``), its ``peak_score`` and its ``area_pct``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

MAX_REGIONS = 20


def confidence(score: float, threshold: float) -> float:
    """Distance of ``score`` from ``threshold`` as a fraction of the room on its side, in [0, 1]."""
    s = min(1.0, max(0.0, float(score)))
    t = min(1.0, max(0.0, float(threshold)))
    if s >= t:
        room = 1.0 - t
        value = (s - t) / room if room > 0 else 1.0
    else:
        value = (t - s) / t if t > 0 else 1.0
    return round(min(1.0, max(0.0, value)), 6)


@dataclass(frozen=True)
class Analysis:
    """Mask-derived facts about one scored image (see the module docstring)."""

    mask: np.ndarray  # bool[h, w] at the working image's size
    anomalous_area_pct: float
    regions: list[dict[str, Any]] = field(default_factory=list)


def upsample(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``float32[h, w]`` map resized bilinearly (as a float image, no banding) to ``size=(w, h)``."""
    heat = np.asarray(anomaly_map, dtype=np.float32)
    if heat.shape == (size[1], size[0]):
        return heat
    resized = Image.fromarray(heat, mode="F").resize(size, Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def _all_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, starts, stops)`` of every horizontal True run, row-major, in one numpy pass."""
    height, width = mask.shape
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    rows, cols = np.nonzero(np.diff(padded, axis=1))  # alternating run starts and stops per row
    return rows[0::2], cols[0::2], cols[1::2]


def label_regions(mask: np.ndarray, values: np.ndarray) -> list[dict[str, Any]]:
    """8-connected components of ``mask`` from row runs + union-find (no scipy in the image).

    Returns ``{"x0", "y0", "x1", "y1", "pixels", "peak"}`` per component in mask coordinates
    (``x1``/``y1`` exclusive). Python loops over runs only, not pixels.
    """
    rows, starts, stops = _all_runs(np.asarray(mask, dtype=bool))
    if rows.size == 0:
        return []
    # A sentinel after the last pixel keeps every run's end a valid index for reduceat.
    flat = np.append(np.asarray(values, dtype=np.float32).reshape(-1), np.float32(-np.inf))
    width = mask.shape[1]
    bounds = np.empty(rows.size * 2, dtype=np.int64)
    bounds[0::2] = rows * width + starts
    bounds[1::2] = rows * width + stops
    peaks = np.maximum.reduceat(flat, bounds)[0::2]  # max over each [start, stop)
    parent = list(range(rows.size))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_list, start_list, stop_list = rows.tolist(), starts.tolist(), stops.tolist()
    prev_begin = prev_end = 0  # index range of the previous row's runs
    i = 0
    while i < len(row_list):
        y = row_list[i]
        j = i
        while j < len(row_list) and row_list[j] == y:
            j += 1
        has_previous = prev_end > prev_begin and row_list[prev_begin] == y - 1
        for k in range(i, j):
            if not has_previous:
                break
            for m in range(prev_begin, prev_end):
                if start_list[m] <= stop_list[k] and start_list[k] <= stop_list[m]:  # incl. diagonals
                    a, b = find(k), find(m)
                    if a != b:
                        parent[max(a, b)] = min(a, b)
        prev_begin, prev_end = i, j
        i = j
    boxes: dict[int, dict[str, Any]] = {}
    for k, (y, start, stop) in enumerate(zip(row_list, start_list, stop_list, strict=True)):
        root = find(k)
        peak = float(peaks[k])
        box = boxes.get(root)
        if box is None:
            boxes[root] = {
                "x0": start,
                "y0": y,
                "x1": stop,
                "y1": y + 1,
                "pixels": stop - start,
                "peak": peak,
            }
        else:
            box["x0"], box["x1"] = min(box["x0"], start), max(box["x1"], stop)
            box["y1"] = y + 1
            box["pixels"] += stop - start
            box["peak"] = max(box["peak"], peak)
    return list(boxes.values())


def analyse(
    anomaly_map: np.ndarray,
    threshold: float,
    working_size: tuple[int, int],
    original_size: tuple[int, int],
    *,
    max_regions: int = MAX_REGIONS,
) -> Analysis:
    """Mask, area and regions of ``anomaly_map`` at ``threshold``; boxes in original pixels."""
    values = upsample(anomaly_map, working_size)
    mask = values >= np.float32(threshold)
    total = mask.size
    area = round(100.0 * float(mask.sum()) / total, 4) if total else 0.0
    sx = original_size[0] / working_size[0]
    sy = original_size[1] / working_size[1]
    regions = []
    for comp in sorted(
        label_regions(mask, values), key=lambda c: (-c["peak"], -c["pixels"], c["y0"], c["x0"])
    ):
        x0, y0 = int(np.floor(comp["x0"] * sx)), int(np.floor(comp["y0"] * sy))
        x1 = min(original_size[0], int(np.ceil(comp["x1"] * sx)))
        y1 = min(original_size[1], int(np.ceil(comp["y1"] * sy)))
        regions.append(
            {
                "x": x0,
                "y": y0,
                "width": x1 - x0,
                "height": y1 - y0,
                "peak_score": round(comp["peak"], 6),
                "area_pct": round(100.0 * comp["pixels"] / total, 4),
            }
        )
    return Analysis(mask=mask, anomalous_area_pct=area, regions=regions[:max_regions])


def mask_png(mask: np.ndarray) -> bytes:
    """1-bit PNG of the mask (white = anomalous): a few KB even for megapixel images."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=bool)).convert("1").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
