"""Image → score → analysis → overlay + mask bytes: the one scoring flow every adapter runs.

Why here: the Lambda (``serving/``) and the line-side agent (``edge/``) must give the same answer
for the same image and model - same score, verdict, mask and regions. If each adapter chained
``Scorer.score`` → ``map_to_image`` → ``analyse`` → ``mask_png`` → ``overlay`` itself, the two
chains could drift (a different threshold source, the overlay drawn on another map). So both call
:func:`inspect_image` and only differ in where the image comes from and where the result goes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from core.answer import Analysis, analyse, confidence, mask_png
from core.scoring import Scorer, ScoreResult, overlay


@dataclass(frozen=True)
class Inspection:
    """Everything one scored image yields, before it is stored anywhere."""

    score: float
    threshold: float
    threshold_source: str  # "request" (per-request override) or "model"
    sensitivity: float | None
    analysis: Analysis
    overlay_png: bytes
    mask_png: bytes
    working_size: tuple[int, int]
    original_size: tuple[int, int]
    result: ScoreResult
    # score (preprocess, inference, postprocess), analyse, overlay: see inspect_image
    latency_ms: dict[str, float] = field(default_factory=dict)

    @property
    def is_anomalous(self) -> bool:
        """The verdict: the score at or above the threshold in force."""
        return self.score >= self.threshold

    def answer_fields(self) -> dict[str, Any]:
        """The answer fields stored next to the score (``ResultRecord.extra`` on every side)."""
        return {
            "confidence": confidence(self.score, self.threshold),
            "threshold_source": self.threshold_source,
            "sensitivity": self.sensitivity,
            "anomalous_area_pct": self.analysis.anomalous_area_pct,
            "regions": self.analysis.regions,
            "mask_width": self.working_size[0],
            "mask_height": self.working_size[1],
        }


@contextmanager
def _phase(latency: dict[str, float], name: str) -> Iterator[None]:
    """Milliseconds of the block into ``latency[name]``, also when it raises."""
    started = time.perf_counter()
    try:
        yield
    finally:
        latency[name] = (time.perf_counter() - started) * 1000.0


def inspect_image(
    scorer: Scorer,
    image: Image.Image,
    original_size: tuple[int, int],
    *,
    threshold: float | None = None,
    sensitivity: float | None = None,
    latency: dict[str, float] | None = None,
) -> Inspection:
    """Score ``image`` (the working image) and derive mask, regions and overlay from one heat map.

    ``original_size`` is the camera's size before any reduction (region boxes are reported in it);
    ``threshold`` is a per-request override, else the model's threshold applies. Phases, in ms, go
    to :attr:`Inspection.latency_ms` and, when given, into ``latency`` as each ends (also when one
    raises, so a failed request still logs how far it got), under the Lambda's phase names:
    ``score`` (with the scorer's ``preprocess``, ``inference``, ``postprocess``), ``analyse`` (heat
    map on the image, mask, area, regions) and ``overlay`` (overlay and mask PNG encoding).
    """
    phases: dict[str, float] = {}
    try:
        with _phase(phases, "score"):
            result = scorer.score(image)
        phases.update(result.timings)  # preprocess, inference, postprocess

        with _phase(phases, "analyse"):
            in_force = threshold if threshold is not None else scorer.threshold
            # The model-size map placed back on the working image through the resize policy
            # (letterbox padding dropped), once: mask, regions and overlay all read these pixels.
            heat = scorer.map_to_image(result.anomaly_map, image)
            analysis = analyse(heat, in_force, image.size, original_size)

        with _phase(phases, "overlay"):  # both PNG encodings
            overlay_bytes = overlay(image, heat)
            mask_bytes = mask_png(analysis.mask)
    finally:
        if latency is not None:
            latency.update(phases)
    return Inspection(
        score=result.score,
        threshold=in_force,
        threshold_source="request" if threshold is not None else "model",
        sensitivity=sensitivity,
        analysis=analysis,
        overlay_png=overlay_bytes,
        mask_png=mask_bytes,
        working_size=(image.width, image.height),
        original_size=original_size,
        result=result,
        latency_ms=phases,
    )
