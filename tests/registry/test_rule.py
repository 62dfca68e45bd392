"""The selection rule: ranking, tie-breaking, ceilings, bad values and parameter validation."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import yaml

from registry.rule import (
    DEFAULT_MAX_ONNX_ABS_DIFF,
    Candidate,
    NoEligibleCandidateError,
    SelectionError,
    SelectionRule,
    select,
)

PARAMS = {
    "metric": "image_AUROC",
    "tie_tolerance": 0.005,
    "tie_breaker": "latency_ms",
    "max_latency_ms": 250,
    "max_size_mb": 250,
}
RULE = SelectionRule.from_params(PARAMS)


def cand(
    name: str, auroc: float | None, latency: float = 10.0, size: float = 5.0, diff: float = 1e-6
) -> Candidate:
    metrics: dict[str, object] = {"latency_ms": latency, "model_size_mb": size, "onnx_max_abs_diff": diff}
    if auroc is not None:
        metrics["image_AUROC"] = auroc
    return Candidate(name, metrics)


def test_highest_metric_wins_outside_tolerance() -> None:
    sel = select([cand("padim", 0.90, latency=5), cand("patchcore", 0.95, latency=80)], RULE)
    assert sel.champion == "patchcore"
    assert sel.reason == "patchcore: image_AUROC 0.950 (highest; next padim 0.900)"
    assert sel.verdict("patchcore").rank == 1 and sel.verdict("padim").rank == 2


def test_tie_broken_by_lower_latency_and_reason_explains() -> None:
    sel = select([cand("patchcore", 0.910, latency=85), cand("padim", 0.912, latency=12)], RULE)
    assert sel.champion == "padim"
    assert sel.reason == (
        "padim: image_AUROC 0.912 (highest; patchcore 0.910 within tie tolerance 0.005, "
        "padim faster 12 ms vs 85 ms)"
    )
    assert sel.verdict("patchcore").tied_with_best


def test_faster_model_slightly_below_best_wins_the_tie() -> None:
    sel = select([cand("patchcore", 0.913, latency=85), cand("padim", 0.910, latency=12)], RULE)
    assert sel.champion == "padim"
    assert "within tie tolerance 0.005 of patchcore 0.913" in sel.reason
    assert "padim faster 12 ms vs 85 ms" in sel.reason


def test_difference_exactly_at_tolerance_is_a_tie() -> None:
    sel = select([cand("a", 0.912, latency=50), cand("b", 0.907, latency=10)], RULE)
    assert sel.champion == "b"


def test_tie_on_latency_broken_by_size_then_name() -> None:
    sel = select([cand("b", 0.9, latency=10, size=9), cand("a", 0.9, latency=10, size=3)], RULE)
    assert sel.champion == "a" and "smaller 3 MB vs 9 MB" in sel.reason
    sel = select([cand("b", 0.9), cand("a", 0.9)], RULE)
    assert sel.champion == "a" and "first by name" in sel.reason


def test_size_as_tie_breaker() -> None:
    rule = SelectionRule.from_params({**PARAMS, "tie_breaker": "model_size_mb"})
    sel = select([cand("fast", 0.9, latency=1, size=50), cand("small", 0.9, latency=90, size=2)], rule)
    assert sel.champion == "small"


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"latency": 251.0}, "latency_ms 251 > max 250"),
        ({"size": 300.0}, "model_size_mb 300 > max 250"),
        ({"diff": 0.5}, "onnx_max_abs_diff 0.5 > max"),
        ({"auroc": float("nan")}, "image_AUROC is not finite"),
        ({"auroc": None}, "image_AUROC missing"),
    ],
)
def test_ceilings_and_bad_metrics_make_ineligible(kwargs: dict, why: str) -> None:
    args = {"auroc": 0.99, **kwargs}
    bad = cand("bad", args.pop("auroc"), **args)
    sel = select([bad, cand("ok", 0.6)], RULE)
    assert sel.champion == "ok"
    verdict = sel.verdict("bad")
    assert not verdict.eligible and why in verdict.why and verdict.rank is None
    assert f"ineligible: bad ({verdict.why})" in sel.reason


def test_missing_cost_is_ineligible_when_a_ceiling_needs_it() -> None:
    c = Candidate("x", {"image_AUROC": 0.9, "model_size_mb": 1.0, "onnx_max_abs_diff": 0.0})
    with pytest.raises(NoEligibleCandidateError, match="latency_ms missing"):
        select([c], RULE)


def test_no_eligible_candidate_names_every_failure() -> None:
    with pytest.raises(NoEligibleCandidateError) as info:
        select([cand("slow", 0.9, latency=999), cand("nan", float("nan"))], RULE)
    msg = str(info.value)
    assert "no eligible candidate" in msg
    assert "slow: latency_ms 999 > max 250" in msg and "nan: image_AUROC is not finite" in msg
    assert len(info.value.verdicts) == 2


def test_single_candidate_reason() -> None:
    sel = select([cand("padim", 0.8)], RULE)
    assert sel.reason == "padim: image_AUROC 0.800 (only eligible candidate)"


def test_deterministic_regardless_of_input_order() -> None:
    cands = [
        cand("padim", 0.912, latency=12),
        cand("patchcore", 0.910, latency=85),
        cand("stfpm", 0.99, latency=400),
        cand("dfm", 0.911, latency=12, size=1),
    ]
    docs = {json.dumps(select(p, RULE).to_dict(), sort_keys=True) for p in itertools.permutations(cands)}
    assert len(docs) == 1
    assert json.loads(docs.pop())["champion"] == "dfm"


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (
            {"metric": "accuracy"},
            r"selection\.metric: must be one of image_AUROC, image_F1Score, pixel_AUROC",
        ),
        ({"metric": None}, r"selection\.metric: must be one of .* \(got None\)"),
        ({"tie_breaker": "speed"}, r"selection\.tie_breaker: must be one of latency_ms, model_size_mb"),
        ({"max_latency_ms": -1}, r"max_latency_ms: must be null or a number > 0 \(got -1\)"),
        ({"max_size_mb": 0}, r"max_size_mb: must be null or a number > 0 \(got 0\)"),
        ({"tie_tolerance": -0.1}, r"tie_tolerance: must be a number >= 0 \(got -0\.1\)"),
        ({"tie_tolerance": math.nan}, r"tie_tolerance: must be a number >= 0 \(got nan\)"),
        ({"max_size_mb": "big"}, r"max_size_mb: must be null or a number > 0 \(got 'big'\)"),
        ({"max_latancy_ms": 10}, r"selection: unknown key\(s\) \['max_latancy_ms'\]"),
    ],
)
def test_invalid_params_rejected(override: dict, match: str) -> None:
    with pytest.raises(SelectionError, match=match):
        SelectionRule.from_params({**PARAMS, **override})


def test_metric_required_and_defaults() -> None:
    with pytest.raises(SelectionError, match=r"missing selection\.metric"):
        SelectionRule.from_params({})
    rule = SelectionRule.from_params({"metric": "image_F1Score"})
    assert rule.max_latency_ms is None and rule.max_onnx_abs_diff == DEFAULT_MAX_ONNX_ABS_DIFF


def test_repo_params_are_valid() -> None:
    """The committed params.yaml must always parse into a rule (a typo there would stop the pipeline)."""
    from config.tracking_uri import REPO_ROOT

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    rule = SelectionRule.from_params(params["selection"])
    assert rule.metric == params["selection"]["metric"]


def test_selection_states_what_it_ranked_by_and_refuses_mixed_test_sets() -> None:
    real = select([cand("padim", 0.90), cand("dfm", 0.80)], RULE)
    assert real.test_set == "real" and real.to_dict()["ranked_by"].startswith(
        "image_AUROC (higher is better) on"
    )
    assert "real defects" in real.ranked_by and "synthetic" not in real.reason

    def synth(name: str, auroc: float, flag: float = 1.0) -> Candidate:
        c = cand(name, auroc)
        return Candidate(name, {**c.metrics, "test_synthetic": flag})

    sel = select([synth("padim", 0.90), synth("dfm", 0.80)], RULE)
    doc = sel.to_dict()
    assert doc["test_set"] == "synthetic" and "synthetic anomalies" in doc["ranked_by"]
    assert sel.reason.endswith("[synthetic anomalies: no real defect images]")
    assert select([synth("padim", 0.9, 0.0), cand("dfm", 0.8)], RULE).test_set == "real"
    with pytest.raises(SelectionError, match=r"different test sets \(dfm: real, padim: synthetic\)"):
        select([synth("padim", 0.90), cand("dfm", 0.80)], RULE)
    assert "pixel_AUPRO" in SelectionRule.from_params({"metric": "pixel_AUPRO"}).metric
