"""The champion-selection rule: a pure function of candidate metrics and ``params.yaml: selection``.

Why a separate, side-effect-free module: the rule decides what goes to production, so it must be
testable without MLflow, deterministic (same inputs → same champion and the same reason text, on any
machine, in any input order) and explainable (every candidate gets a verdict and a "why").

The rule, in order:

1. A candidate is *ineligible* when the selection metric is missing or not a finite number, when it
   is slower than ``max_latency_ms`` or larger than ``max_size_mb`` (or those figures are missing,
   because an unmeasured model cannot be shown to fit), or when its ONNX export disagrees with the
   torch model by more than ``max_onnx_abs_diff`` (the served graph would not be the evaluated one).
2. Among eligible candidates the metric is higher-is-better. Every candidate within
   ``tie_tolerance`` of the best counts as tied with it.
3. Ties are broken by the lower ``tie_breaker`` (ONNX latency by default), then by the other cost
   (size or latency), then by name, so the outcome is total and never depends on dict order.

The outcome states what it ranked by (``ranked_by``, ``test_set``): the metric, and whether the test
split held real defects or anomalib's synthetic anomalies (``test_synthetic`` in metrics.json, set
when the data has normal images only). Candidates scored on different kinds of test set are not
comparable, so mixing them is an error.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from config.params import SELECTION_METRICS, TIE_BREAKERS, ParamsError, SelectionSection, parse

#: Metrics the rule may rank by (higher is better) and costs it may break ties by (lower is better):
#: defined with the typed ``selection`` section (config.params), which allows exactly these.
HIGHER_IS_BETTER: tuple[str, ...] = SELECTION_METRICS
LOWER_IS_BETTER: tuple[str, ...] = TIE_BREAKERS
#: Default ceiling on |ONNX - torch| of pred_score: the typed section's default.
DEFAULT_MAX_ONNX_ABS_DIFF = SelectionSection.model_fields["max_onnx_abs_diff"].default
#: Float slack so that a difference of exactly ``tie_tolerance`` still counts as a tie.
_EPS = 1e-12


class SelectionError(ValueError):
    """Invalid ``selection`` params or candidate data (a configuration/programming problem)."""


class NoEligibleCandidateError(SelectionError):
    """Every candidate failed a ceiling or lacks the metric; nothing may be promoted."""

    def __init__(self, message: str, verdicts: tuple[Verdict, ...]) -> None:
        super().__init__(message)
        self.verdicts = verdicts


class SelectionRule(SelectionSection):
    """Validated ``params.yaml: selection`` (the typed section, plus what the rule derives from it).

    Unknown keys are errors rather than ignored, because a typo such as ``max_latancy_ms`` would
    otherwise silently disable a production ceiling.
    """

    @property
    def secondary_breaker(self) -> str:
        """The cost compared after the tie-breaker: size when breaking by latency, else latency."""
        return "model_size_mb" if self.tie_breaker != "model_size_mb" else "latency_ms"

    @classmethod
    def from_params(cls, selection: Mapping[str, Any] | SelectionSection) -> SelectionRule:
        """The rule of a ``selection`` section (a mapping is validated; errors are SelectionError)."""
        if isinstance(selection, SelectionSection):
            selection = selection.model_dump()
        try:
            return parse(cls, selection, "selection")
        except ParamsError as exc:
            raise SelectionError(str(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, recorded in selection.json so the decision can be re-derived."""
        return self.model_dump()


@dataclass(frozen=True)
class Candidate:
    """One evaluated model: its name and its metrics (``build/eval/<name>/metrics.json``)."""

    name: str
    metrics: Mapping[str, Any]


@dataclass(frozen=True)
class Verdict:
    """The rule's decision about one candidate, as recorded in selection.json."""

    name: str
    eligible: bool
    why: str
    metric: float | None
    latency_ms: float | None
    model_size_mb: float | None
    onnx_max_abs_diff: float | None
    rank: int | None = None
    tied_with_best: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Selection:
    """The outcome: champion name, one-line reason, and a verdict per candidate (sorted by name)."""

    champion: str
    reason: str
    rule: SelectionRule
    verdicts: tuple[Verdict, ...] = field(default_factory=tuple)
    test_set: str = "real"

    @property
    def ranked_by(self) -> str:
        """What the ranking measured, in words (selection.json, registry tags)."""
        if self.test_set == "synthetic":
            where = (
                "anomalib's synthetic anomalies on held-out normal images (the data has no defect "
                "images yet): a proxy, not a measure of real defect detection"
            )
        else:
            where = "the held-out test images with real defects"
        return f"{self.rule.metric} (higher is better) on {where}"

    def verdict(self, name: str) -> Verdict:
        for v in self.verdicts:
            if v.name == name:
                return v
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule.to_dict(),
            "test_set": self.test_set,
            "ranked_by": self.ranked_by,
            "champion": self.champion,
            "reason": self.reason,
            "candidates": [v.to_dict() for v in self.verdicts],
        }


def _finite(value: Any) -> float | None:
    """The value as a float if it is a real finite number, else None (missing, NaN, inf, text)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _fmt_metric(value: float | None) -> str:
    """Metric values with at least three decimals (``0.910``, ``0.9123``), as people quote AUROC."""
    if value is None:
        return "n/a"
    text = f"{value:.4f}".rstrip("0")
    decimals = len(text.split(".")[1]) if "." in text else 0
    return text + "0" * max(0, 3 - decimals)


def _cost_phrase(key: str, winner: Verdict, other: Verdict) -> str:
    """E.g. ``faster 12 ms vs 85 ms`` or ``smaller 3.1 MB vs 40 MB``."""
    a, b = getattr(winner, key), getattr(other, key)
    if key == "model_size_mb":
        return f"smaller {_fmt(a)} MB vs {_fmt(b)} MB"
    return f"faster {_fmt(a)} ms vs {_fmt(b)} ms"


def _judge(candidate: Candidate, rule: SelectionRule) -> Verdict:
    m = candidate.metrics
    metric = _finite(m.get(rule.metric))
    latency = _finite(m.get("latency_ms"))
    size = _finite(m.get("model_size_mb"))
    diff = _finite(m.get("onnx_max_abs_diff"))
    problems: list[str] = []
    if metric is None:
        raw = m.get(rule.metric)
        problems.append(f"{rule.metric} missing" if raw is None else f"{rule.metric} is not finite ({raw!r})")
    if rule.max_latency_ms is not None:
        if latency is None:
            problems.append("latency_ms missing (needed for max_latency_ms)")
        elif latency > rule.max_latency_ms:
            problems.append(f"latency_ms {_fmt(latency)} > max {_fmt(rule.max_latency_ms)}")
    if rule.max_size_mb is not None:
        if size is None:
            problems.append("model_size_mb missing (needed for max_size_mb)")
        elif size > rule.max_size_mb:
            problems.append(f"model_size_mb {_fmt(size)} > max {_fmt(rule.max_size_mb)}")
    if rule.max_onnx_abs_diff is not None:
        if diff is None:
            problems.append("onnx_max_abs_diff missing (ONNX export not verified)")
        elif diff > rule.max_onnx_abs_diff:
            problems.append(f"onnx_max_abs_diff {diff:.3g} > max {rule.max_onnx_abs_diff:.3g}")
    return Verdict(
        name=candidate.name,
        eligible=not problems,
        why="; ".join(problems) if problems else "eligible",
        metric=metric,
        latency_ms=latency,
        model_size_mb=size,
        onnx_max_abs_diff=diff,
    )


def _cost_key(v: Verdict, rule: SelectionRule) -> tuple[float, float, str]:
    # Missing costs (possible only when no ceiling demands them) sort last.
    first = getattr(v, rule.tie_breaker, None)
    second = getattr(v, rule.secondary_breaker, None)
    return (math.inf if first is None else first, math.inf if second is None else second, v.name)


def _tie_explanation(champ: Verdict, other: Verdict, rule: SelectionRule) -> str:
    """Why ``champ`` beat a tied ``other``: the first cost that differs, else the name."""
    for key in (rule.tie_breaker, rule.secondary_breaker):
        a, b = getattr(champ, key, None), getattr(other, key, None)
        if a != b:
            return f"{champ.name} {_cost_phrase(key, champ, other)}"
    return f"identical {rule.tie_breaker} and {rule.secondary_breaker}, {champ.name} first by name"


def select(candidates: Iterable[Candidate], rule: SelectionRule) -> Selection:
    """Apply the rule; raise :class:`NoEligibleCandidateError` if nothing qualifies."""
    cands = list(candidates)
    names = [c.name for c in cands]
    if not cands:
        raise SelectionError("no candidates to select from")
    if len(set(names)) != len(names):
        raise SelectionError(f"duplicate candidate names: {sorted(names)}")

    test_set = _test_set(cands)
    judged = sorted((_judge(c, rule) for c in cands), key=lambda v: v.name)
    eligible = [v for v in judged if v.eligible]
    if not eligible:
        detail = "; ".join(f"{v.name}: {v.why}" for v in judged)
        raise NoEligibleCandidateError(
            f"no eligible candidate under selection rule (metric={rule.metric}, "
            f"max_latency_ms={rule.max_latency_ms}, max_size_mb={rule.max_size_mb}, "
            f"max_onnx_abs_diff={rule.max_onnx_abs_diff}): {detail}",
            tuple(judged),
        )

    best = max(v.metric for v in eligible if v.metric is not None)
    tied = [v for v in eligible if v.metric is not None and best - v.metric <= rule.tie_tolerance + _EPS]
    rest = [v for v in eligible if v not in tied]
    tied.sort(key=lambda v: _cost_key(v, rule))
    rest.sort(key=lambda v: (-(v.metric or 0.0), *_cost_key(v, rule)))
    ranking = tied + rest
    champ = ranking[0]

    reason = _reason(champ, best, tied, rest, judged, rule)
    if test_set == "synthetic":
        reason += " [synthetic anomalies: no real defect images]"
    tied_names = {v.name for v in tied}
    ranks = {v.name: i + 1 for i, v in enumerate(ranking)}
    verdicts = tuple(
        Verdict(**{**v.to_dict(), "rank": ranks.get(v.name), "tied_with_best": v.name in tied_names})
        for v in judged
    )
    return Selection(champion=champ.name, reason=reason, rule=rule, verdicts=verdicts, test_set=test_set)


def _test_set(cands: list[Candidate]) -> str:
    """``synthetic`` or ``real`` (metrics without ``test_synthetic`` predate the flag: real)."""
    kinds = {c.name: "synthetic" if _finite(c.metrics.get("test_synthetic")) else "real" for c in cands}
    if len(set(kinds.values())) > 1:
        detail = ", ".join(f"{name}: {kind}" for name, kind in sorted(kinds.items()))
        raise SelectionError(
            f"candidates were scored on different test sets ({detail}); re-run evaluate for all models"
        )
    return next(iter(kinds.values()))


def _reason(
    champ: Verdict,
    best: float,
    tied: list[Verdict],
    rest: list[Verdict],
    judged: list[Verdict],
    rule: SelectionRule,
) -> str:
    """One human-readable sentence, e.g.
    ``padim: image_AUROC 0.912 (highest; patchcore 0.91 within tie tolerance 0.005, padim faster 12 ms
    vs 85 ms)``."""
    head = f"{champ.name}: {rule.metric} {_fmt_metric(champ.metric)}"
    parts: list[str] = []
    others_tied = [v for v in tied if v is not champ]
    if champ.metric == best:
        parts.append("highest" if others_tied or rest else "only eligible candidate")
    else:
        top = max(tied, key=lambda v: (v.metric or 0.0, v.name))
        parts.append(
            f"within tie tolerance {_fmt(rule.tie_tolerance)} of {top.name} {_fmt_metric(top.metric)}; "
            f"{_tie_explanation(champ, top, rule)}"
        )
        others_tied = [v for v in others_tied if v is not top]
    for v in others_tied:
        parts.append(
            f"{v.name} {_fmt_metric(v.metric)} within tie tolerance {_fmt(rule.tie_tolerance)}, "
            f"{_tie_explanation(champ, v, rule)}"
        )
    if rest and not others_tied and champ.metric == best:
        runner = rest[0]
        parts.append(f"next {runner.name} {_fmt_metric(runner.metric)}")
    ineligible = [f"{v.name} ({v.why})" for v in judged if not v.eligible]
    if ineligible:
        parts.append(f"ineligible: {', '.join(ineligible)}")
    return f"{head} ({'; '.join(parts)})"
