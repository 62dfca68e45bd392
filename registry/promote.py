"""DVC stage ``promote``: fetch ``models:/<name>@<alias>`` and write ``serving/model/`` (contract §5).

Why the model comes from the registry and not from ``build/eval``: what is served must be exactly
what the registry alias says is the champion (that is what humans audit and roll back). The local
evaluation export is used only as a cross-check: the downloaded graph must load in ONNX Runtime with
the contract's input ``float32[1,3,S,S]`` and give the same ``pred_score`` on a few real test images,
otherwise the registry and the evaluated model have drifted apart and nothing is promoted.

Atomicity: everything is written into a temporary sibling directory, validated with the serving
side's own ``core.contract.load_metadata``, and only then swapped in by rename, so a failure at
any point leaves the previous ``serving/model/`` untouched.

Determinism: ``exported_at`` is the registry version's creation time, not "now", so promoting the
same version twice yields byte-identical files.

INT8 (``params.yaml: quantize``, :mod:`registry.quantize`): when enabled, the promoted fp32 model is
also quantized and both are scored on the validation split; ``model.int8.onnx`` is written next to
``model.onnx`` only if the accuracy gate passes. metadata.json's ``int8`` block records the gate's
figures and verdict either way, and the same figures are logged as ``quantize_*`` metrics to the
champion's MLflow run. A quantization that fails outright is recorded as a refused gate (the fp32
champion is still promoted): INT8 is an optional speed-up, never a reason to keep an old model.

Usage: ``python -m registry.promote [--params params.yaml] [--out serving/model] [--eval-dir build/eval]
[--dataset build/dataset] [--n-images 4] [--atol 1e-4]``. ``REGISTRY_PROMOTE_OUT`` overrides the
output directory (tests use it to keep the repo's ``serving/model`` untouched).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config.params import Params, as_params
from core.contract import SCHEMA_VERSION, input_block, load_metadata
from core.files import sha256_file, swap_directory
from core.preprocess import PreprocessError, check_resize, model_input
from experiments.artifacts import DATASET_DIR, EVAL_DIR, REGISTRY_DIR
from experiments.backbones import IMAGENET_MEAN, IMAGENET_STD
from experiments.runtime import stage_main
from registry.quantize import INT8_FILE, QuantizeError, QuantizeSettings, mlflow_metrics, quantize_and_gate
from registry.rule import SelectionError
from registry.select import (
    CHAMPION_FILE,
    EvalSummary,
    RegistryError,
    _read_json,
    alias_version,
    registry_params,
)

if TYPE_CHECKING:
    import numpy as np
    from mlflow import MlflowClient

log = logging.getLogger("registry.promote")

MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
SCORE_OUTPUT = "pred_score"
MAP_OUTPUT = "anomaly_map"
# summaries written before backbone.normalize existed: anomalib's default ImageNet statistics
IMAGENET_NORMALISATION = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DEFAULT_ATOL = 1e-4
DEFAULT_N_IMAGES = 4
OUT_ENV = "REGISTRY_PROMOTE_OUT"


class PromoteError(RuntimeError):
    """The champion cannot be promoted; the message says what to fix. serving/model is untouched."""


def summary_image_size(summary: EvalSummary) -> tuple[int, int]:
    """``image_size`` from the summary as ``(height, width)``; accepts ``S`` or ``[H, W]``."""
    raw = summary.get("image_size")
    if isinstance(raw, int) and not isinstance(raw, bool) and raw > 0:
        return raw, raw
    if (
        isinstance(raw, list | tuple)
        and len(raw) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in raw)
    ):
        return int(raw[0]), int(raw[1])
    raise PromoteError(f"{summary.path}: image_size must be a positive int or [height, width], got {raw!r}")


#: What a summary.json written before the resize policy was recorded was evaluated with: a plain
#: stretch. A fact about old files (not a default of the policy, which is data.resize's).
LEGACY_SUMMARY_RESIZE = "stretch"


def summary_resize(summary: EvalSummary) -> str:
    """The resize policy the champion was trained and evaluated with (``summary.json: resize``)."""
    try:
        return check_resize(summary.get("resize", LEGACY_SUMMARY_RESIZE), f"{summary.path}: resize")
    except PreprocessError as exc:
        raise PromoteError(str(exc)) from exc


def _normalisation(summary: EvalSummary) -> dict[str, Any]:
    """The input mean/std inside the champion's ONNX graph (``summary.json: input_normalization``)."""
    raw = summary.get("input_normalization", IMAGENET_NORMALISATION)
    ok = isinstance(raw, dict) and all(
        isinstance(raw.get(k), list)
        and len(raw[k]) == 3
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in raw[k])
        for k in ("mean", "std")
    )
    if not ok:
        raise PromoteError(
            f"{summary.path}: input_normalization must be {{mean: [3 numbers], std: [3 numbers]}}, "
            f"got {raw!r}"
        )
    return {
        "mean": [float(v) for v in raw["mean"]],
        "std": [float(v) for v in raw["std"]],
        "applied": "inside_model",
    }


def _finite_number(summary: EvalSummary, key: str) -> float:
    value = summary.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PromoteError(f"{summary.path}: {key} must be a finite number, got {value!r}")
    return float(value)


def resolve_champion(
    client: MlflowClient, name: str, alias: str, eval_dir: Path, models: Sequence[str]
) -> tuple[Any, EvalSummary]:
    """The version behind ``name@alias`` and the evaluation summary of the same run.

    Refuses if the alias is missing, or if it points at a run that none of the current evaluation
    summaries describe (metadata such as the threshold would then be wrong for the model).
    """
    from registry.select import load_summary

    version = alias_version(client, name, alias)
    if version is None:
        raise PromoteError(
            f"registered model {name!r} has no alias {alias!r} (or does not exist) in "
            f"{client.tracking_uri}; run the `select` stage first (dvc repro select)"
        )
    # A broken summary of some other model must not block promoting the champion; report it only
    # if the champion's own summary cannot be found.
    summaries: list[EvalSummary] = []
    problems: list[str] = []
    for model in sorted(models):
        try:
            summaries.append(load_summary(eval_dir, model))
        except RegistryError as exc:
            problems.append(str(exc))
    matching = [s for s in summaries if s.run_id == version.run_id]
    if not matching:
        known = ", ".join([*(f"{s.model}={s.run_id}" for s in summaries), *problems])
        raise PromoteError(
            f"{name}@{alias} is version {version.version} from run {version.run_id}, which matches no "
            f"evaluation summary in {eval_dir} ({known}); re-run `select` so the alias and build/eval agree"
        )
    return version, matching[0]


def download_onnx(client: MlflowClient, name: str, alias: str, version: str, dst: Path) -> Path:
    """Download the champion and return it as one self-contained ``model.onnx``.

    The alias was resolved to ``version`` once, up front, and that exact version is downloaded
    (``models:/name/version``): if someone moved the alias meanwhile, the bytes still match the
    ``registry_version`` and run id written to metadata.json.

    MLflow's ONNX flavour may store weights as external data next to the graph; serving and the
    metadata hash need a single file, so the graph is re-serialised with the weights inlined.
    """
    import mlflow
    import onnx
    import yaml

    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}",
            dst_path=str(dst),
            tracking_uri=client.tracking_uri,
            registry_uri=getattr(client, "_registry_uri", None) or client.tracking_uri,
        )
    )
    mlmodel = local / "MLmodel"
    onnx_name = MODEL_FILE
    if mlmodel.is_file():
        flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {})
        if "onnx" not in flavors:
            raise PromoteError(
                f"{name}@{alias} (version {version}) has no ONNX flavour (flavours: {sorted(flavors)})"
            )
        onnx_name = flavors["onnx"].get("data", MODEL_FILE)
    src = local / onnx_name
    if not src.is_file():
        raise PromoteError(
            f"{name}@{alias} (version {version}): {onnx_name} not found in the downloaded model"
        )
    model = onnx.load(str(src), load_external_data=True)
    out = dst / f"single-{MODEL_FILE}"
    onnx.save_model(model, str(out), save_as_external_data=False)
    return out


def load_images(dataset: Path, n: int, size: tuple[int, int], resize: str) -> list[tuple[str, np.ndarray]]:
    """Up to ``n`` test images (half good, half defect, sorted) as ``float32[1,3,H,W]`` RGB in [0, 1].

    Prepared by :func:`core.preprocess.model_input` with the champion's resize policy: the
    function the serving side applies (contract §5).
    """
    from PIL import Image

    test = dataset / "test"
    groups = sorted(p for p in test.iterdir() if p.is_dir()) if test.is_dir() else []
    per_group = [
        sorted(f for f in g.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()) for g in groups
    ]
    picked: list[Path] = []
    while len(picked) < n and any(per_group):
        for files in per_group:
            if files and len(picked) < n:
                picked.append(files.pop(0))
    if not picked:
        raise PromoteError(f"{test}: no test images to verify the champion with (run the prepare stage)")
    arrays = []
    for path in picked:
        with Image.open(path) as im:
            arrays.append((str(path), model_input(im, size, resize)))
    return arrays


def _session(path: Path) -> Any:
    """Serving's own ONNX Runtime session (one thread), its load error as a :class:`PromoteError`."""
    from core.scoring import ScoringError, create_session

    try:
        return create_session(path)
    except ScoringError as exc:
        raise PromoteError(str(exc)) from exc


def verify(
    candidate: Path,
    reference: Path,
    size: tuple[int, int],
    dataset: Path,
    n: int,
    atol: float,
    resize: str,
) -> str:
    """Check input spec and outputs, and ``pred_score`` against the evaluated export; return input name."""
    import numpy as np

    sess = _session(candidate)
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise PromoteError(f"champion ONNX has {len(inputs)} inputs, expected 1")
    inp = inputs[0]
    expected = [1, 3, size[0], size[1]]
    if list(inp.shape) != expected:
        raise PromoteError(f"champion ONNX input {inp.name!r} has shape {inp.shape}, expected {expected}")
    if inp.type != "tensor(float)":
        raise PromoteError(f"champion ONNX input {inp.name!r} is {inp.type}, expected tensor(float)")
    outputs = {o.name for o in sess.get_outputs()}
    missing = {SCORE_OUTPUT, MAP_OUTPUT} - outputs
    if missing:
        raise PromoteError(f"champion ONNX lacks outputs {sorted(missing)} (has {sorted(outputs)})")
    if not reference.is_file():
        raise PromoteError(f"{reference}: evaluated ONNX export not found; cannot cross-check the champion")
    ref = _session(reference)
    ref_input = ref.get_inputs()[0].name
    worst = 0.0
    for path, x in load_images(dataset, n, size, resize):
        got = np.asarray(sess.run([SCORE_OUTPUT], {inp.name: x})[0], dtype=np.float64).ravel()
        want = np.asarray(ref.run([SCORE_OUTPUT], {ref_input: x})[0], dtype=np.float64).ravel()
        if got.shape != want.shape or not np.all(np.isfinite(got)):
            raise PromoteError(f"{path}: champion pred_score {got} is not comparable with reference {want}")
        diff = float(np.max(np.abs(got - want)))
        worst = max(worst, diff)
        if diff > atol:
            raise PromoteError(
                f"{path}: registry champion pred_score {got.tolist()} differs from {reference} "
                f"{want.tolist()} by {diff:.3g} > tolerance {atol:g}; the registry and build/eval disagree"
            )
    log.info("champion agrees with %s (max |pred_score diff| %.3g)", reference, worst)
    return inp.name


def build_metadata(
    *, model_path: Path, input_name: str, size: tuple[int, int], summary: EvalSummary, name: str, version: Any
) -> dict[str, Any]:
    """metadata.json exactly per contract §5 (schema_version 2: the input records the resize policy)."""
    metrics = {
        k: float(v)
        for k, v in sorted(summary.metrics.items())
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    created_ms = getattr(version, "creation_timestamp", None)
    exported_at = (
        datetime.fromtimestamp(created_ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if isinstance(created_ms, int | float)
        else datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    )
    return {
        "schema_version": SCHEMA_VERSION,
        "model_file": MODEL_FILE,
        "model_sha256": sha256_file(model_path),
        "model_name": summary.model,
        "registered_model": name,
        "registry_version": str(version.version),
        "run_id": summary.run_id,
        "input": input_block(input_name, size[0], size[1], summary_resize(summary)),
        "normalisation": _normalisation(summary),
        "outputs": {"score": SCORE_OUTPUT, "anomaly_map": MAP_OUTPUT},
        "threshold": _finite_number(summary, "threshold"),
        "raw_threshold": _finite_number(summary, "raw_threshold"),
        "metrics": metrics,
        "git_commit": str(summary.get("git_commit", "")),
        "data_version": str(summary.get("data_version", "")),
        "exported_at": exported_at,
    }


def build_int8(
    staged: Path,
    dataset: Path,
    size: tuple[int, int],
    resize: str,
    settings: QuantizeSettings,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Quantize ``staged/model.onnx``, gate it on validation; the ``int8`` block of metadata.json.

    ``model_file``/``model_sha256`` are set only when the gate passed (the file is then in
    ``staged``); otherwise they are ``null`` and no INT8 file exists.
    """
    target = staged / INT8_FILE
    try:
        block = quantize_and_gate(staged / MODEL_FILE, target, dataset, size, resize, settings, threshold)
    except QuantizeError as exc:
        target.unlink(missing_ok=True)
        log.warning("INT8 not produced: %s", exc)
        return {
            "model_file": None,
            "model_sha256": None,
            "passed_gate": False,
            "why": f"quantization failed: {exc}",
        }
    passed = block["passed_gate"]
    files = {
        "model_file": INT8_FILE if passed else None,
        "model_sha256": sha256_file(target) if passed else None,
    }
    log.info("INT8 %s: %s", "kept" if passed else "refused", block["why"])
    return {**files, **block}


def log_int8_metrics(client: MlflowClient, run_id: str, block: Mapping[str, Any]) -> None:
    """Log the INT8 gate's figures (``quantize_*``) to the champion's MLflow run, in one batch."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, 0) for key, value in sorted(mlflow_metrics(block).items())]
    client.log_batch(run_id, metrics=metrics)


def validate_model_dir(model_dir: Path) -> None:
    """Run the serving side's own metadata validation (the Lambda's cold-start check)."""
    try:
        load_metadata(model_dir, verify_sha256=True)
    except ValueError as exc:
        raise PromoteError(f"promoted model fails serving validation: {exc}") from exc


def promote(
    params: Params | Mapping[str, Any],
    *,
    out: Path,
    eval_dir: Path,
    dataset: Path,
    n_images: int = DEFAULT_N_IMAGES,
    atol: float = DEFAULT_ATOL,
    client: MlflowClient | None = None,
    champion_file: Path | None = None,
) -> dict[str, Any]:
    """The whole stage; returns the metadata written to ``out/metadata.json``."""
    params = as_params(params)
    name, alias = registry_params(params)
    quantize = QuantizeSettings.from_params(params)
    models = params.model_names
    if client is None:
        from registry.mlflow_client import get_client

        client = get_client()
    version, summary = resolve_champion(client, name, alias, eval_dir, models)
    check_champion_file(champion_file, version)
    size = summary_image_size(summary)
    log.info(
        "promoting %s@%s = version %s (%s, run %s)",
        name,
        alias,
        version.version,
        summary.model,
        version.run_id,
    )

    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="promote-download-") as tmp:
            model_file = download_onnx(client, name, alias, str(version.version), Path(tmp))
            reference = eval_dir / summary.model / "onnx" / MODEL_FILE
            input_name = verify(model_file, reference, size, dataset, n_images, atol, summary_resize(summary))
            shutil.copyfile(model_file, staged / MODEL_FILE)
        metadata = build_metadata(
            model_path=staged / MODEL_FILE,
            input_name=input_name,
            size=size,
            summary=summary,
            name=name,
            version=version,
        )
        if quantize.enabled:
            metadata["int8"] = build_int8(
                staged, dataset, size, summary_resize(summary), quantize, metadata["threshold"]
            )
        (staged / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
        # mkdtemp makes the folder 0700; the Lambda image runs as a non-root user and must read it.
        staged.chmod(0o755)
        for item in staged.iterdir():
            item.chmod(0o644)
        validate_model_dir(staged)
        if "int8" in metadata:  # before the swap: a failure here leaves serving/model untouched
            log_int8_metrics(client, version.run_id, metadata["int8"])
        swap_directory(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    log.info("wrote %s (sha256 %s)", out, metadata["model_sha256"])
    return metadata


def check_champion_file(path: Path | None, version: Any) -> None:
    """Warn when ``build/registry/champion.json`` (the DVC dep) names another version than the alias.

    Not an error: an operator may have moved the alias by hand (a rollback); the alias wins because
    it is what the registry says is in production. The warning makes the divergence visible.
    """
    if path is None or not path.is_file():
        return
    with contextlib.suppress(RegistryError):
        record = _read_json(path)
        if isinstance(record, dict) and str(record.get("version")) != str(version.version):
            log.warning(
                "%s says version %s but the alias points at version %s; promoting the alias",
                path,
                record.get("version"),
                version.version,
            )


@stage_main("promote", SelectionError, RegistryError, PromoteError)
def main(argv: Sequence[str] | None = None) -> int:
    from config.params import ParamsError, load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument(
        "--out", type=Path, default=None, help="default: $REGISTRY_PROMOTE_OUT or serving.model_dir"
    )
    parser.add_argument("--eval-dir", type=Path, default=Path(EVAL_DIR))
    parser.add_argument("--dataset", type=Path, default=Path(DATASET_DIR))
    parser.add_argument("--champion", type=Path, default=Path(REGISTRY_DIR, CHAMPION_FILE))
    parser.add_argument("--n-images", type=int, default=DEFAULT_N_IMAGES)
    parser.add_argument("--atol", type=float, default=DEFAULT_ATOL)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params)
        out = args.out or os.environ.get(OUT_ENV) or (params.serving and params.serving.model_dir)
        if not out:
            raise PromoteError("no output directory: pass --out or set params.yaml serving.model_dir")
        metadata = promote(
            params,
            out=Path(out),
            eval_dir=args.eval_dir,
            dataset=args.dataset,
            n_images=args.n_images,
            atol=args.atol,
            champion_file=args.champion,
        )
    except (ParamsError, SelectionError, RegistryError, PromoteError) as exc:
        print(f"promote: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(metadata, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
