"""INT8 version of the champion: ONNX Runtime static quantization, gated on validation AUROC.

Why static (calibrated) quantization of the backbone only:

* The anomalib graph is a feature extractor (almost all of the compute: convolutions) followed by a
  small scoring head (PaDiM's Mahalanobis distance, PatchCore's nearest-neighbour search, the
  Gaussian blur of the map, the min-max normalisation that puts the threshold at 0.5). The head
  ranks images by small differences of large distances; 8 bits over its whole range would erase
  exactly those differences, while it costs little time. So only the backbone's multi-channel
  convolutions (and the ReLU/Clip/residual Add/MaxPool nodes fed solely by them) are quantized;
  the single-channel blur convolution and everything after the features stay float32.
* Static, because activations are then integer too (dynamic quantization only covers MatMul/Gemm
  weights and would leave the convolutions float). Calibration uses the *validation normals*
  prepared by :func:`core.preprocess.model_input` with the champion's resize policy: the pixels
  serving feeds the model. QDQ format, per-channel int8 weights (EfficientNet-Lite's depthwise
  convolutions have very different ranges per channel), MinMax ranges.

The gate: fp32 and INT8 score the whole validation split (``build/dataset/val``: good + defects,
masks under ``ground_truth/val`` when present) through serving's own session builder
(:func:`core.scoring.create_session`); the INT8 model is used only when its image AUROC is at
most ``quantize.max_image_auroc_drop`` below the fp32 one and its pixel AUROC (when masks exist)
at most ``quantize.max_pixel_auroc_drop`` below. Image AUROC is sklearn's ``roc_auc_score`` (as in
``experiments.evaluate``), pixel AUROC :class:`experiments.metrics.StreamingPixelMetrics` (as in
evaluate), over the served ``anomaly_map`` (normalised to [0, 1]: the raw maps are not graph
outputs).

Torch-free: onnx, onnxruntime, numpy, Pillow, scikit-learn (and scipy for pixel metrics).
Usage (a quick look outside the pipeline): ``python -m registry.quantize MODEL.onnx OUT.onnx
[--dataset build/dataset] [--params params.yaml] [--size 256] [--resize letterbox]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from config.params import Params, QuantizeSection, as_params
from core.preprocess import DEFAULT_RESIZE, RESIZE_POLICIES, model_input
from experiments.datamodule import defect_dirs

INT8_FILE = "model.int8.onnx"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SCORE_OUTPUT = "pred_score"
MAP_OUTPUT = "anomaly_map"
METHOD = (
    "onnxruntime static QDQ of the backbone convolutions (per-channel symmetric int8 weights, uint8 "
    "activations, MinMax on validation normals); anomaly-map blur made separable (exact), head float32"
)
# Nodes that may join the quantized region when every data input comes from it (see the docstring).
_FOLLOWERS = ("Relu", "Clip", "Add", "MaxPool")


class QuantizeError(RuntimeError):
    """The INT8 model could not be produced or measured; the message says why."""


class QuantizeSettings(QuantizeSection):
    """``params.yaml: quantize``, typed once in :mod:`config.params` (absent = disabled, so older params
    files keep their behaviour); this subclass only adds the reader the stages call."""

    @classmethod
    def from_params(cls, params: Params | Mapping[str, Any]) -> QuantizeSettings:
        """The ``quantize`` section of ``params`` (a bad value is one line naming its key)."""
        section = as_params(params).quantize
        return cls(enabled=False) if section is None else cls.model_validate(section.model_dump())


@dataclass(frozen=True)
class Sample:
    """One validation image: its path, label (1 = defective) and mask path (None without a mask)."""

    path: Path
    label: int
    mask: Path | None = None


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def validation_samples(dataset: Path) -> list[Sample]:
    """``val/good`` (label 0) and every ``val/<defect>`` (label 1), masks from ``ground_truth/val``.

    Sorted, so calibration and scoring are deterministic (promote must be byte-reproducible).
    """
    samples = [Sample(p, 0) for p in _images(dataset / "val" / "good")]
    for rel in defect_dirs(dataset, "val"):
        category = Path(rel).name
        mask_dir = dataset / "ground_truth" / "val" / category
        for path in _images(dataset / rel):
            mask = mask_dir / f"{path.stem}.png"
            samples.append(Sample(path, 1, mask if mask.is_file() else None))
    return samples


def load_input(path: Path, size: tuple[int, int], resize: str) -> np.ndarray:
    """``float32[1,3,H,W]`` exactly as serving prepares it (:func:`core.preprocess.model_input`)."""
    from PIL import Image

    with Image.open(path) as image:
        return model_input(image, size, resize)


def _calibration_reader(inputs: list[np.ndarray], input_name: str) -> Any:
    """An ONNX Runtime ``CalibrationDataReader`` over already prepared inputs."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter(inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._items, None)
            return None if x is None else {input_name: x}

        def rewind(self) -> None:
            self._items = iter(inputs)

    return _Reader()


def backbone_nodes(model: Any) -> list[str]:
    """Names of the nodes to quantize: multi-channel Convs plus the followers fed only by the region.

    A Conv with one output channel is the anomaly-map blur (part of the scoring head), so it stays
    float. The region then grows forward through ReLU/Clip/residual Add/MaxPool nodes whose every
    non-constant input is produced inside it; the scoring head is reached only through other ops.
    """
    initialisers = {init.name: init for init in model.graph.initializer}
    constants = set(initialisers) | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    region_outputs: set[str] = set()
    selected: list[str] = []
    for node in model.graph.node:  # ONNX nodes are topologically sorted
        pick = False
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in initialisers:
            pick = int(initialisers[node.input[1]].dims[0]) > 1
        elif node.op_type in _FOLLOWERS:
            data = [i for i in node.input if i and i not in constants]
            pick = bool(data) and all(i in region_outputs for i in data)
        if pick:
            if not node.name:
                raise QuantizeError(f"a {node.op_type} node has no name; cannot select it for quantization")
            selected.append(node.name)
            region_outputs.update(node.output)
    return selected


def separable_blur(model: Any, tolerance: float = 1e-6) -> int:
    """Replace each single-channel KxK Conv with a rank-1 kernel by a Kx1 and a 1xK Conv, in place.

    Why: the Gaussian blur of the anomaly map (33x33 on a 256x256 map for sigma 4) costs ~1,100
    multiply-adds a pixel, more than half of a PaDiM or PatchCore inference on one core, and it
    must stay float (it ranks images). A Gaussian kernel is the outer product of two 1-D kernels,
    so two 1-D passes give the same map (up to float rounding) for 2K instead of K^2 operations.
    Only kernels whose second singular value is below ``tolerance`` x the first are rewritten.
    Returns the number of Convs rewritten.
    """
    import onnx
    from onnx import helper, numpy_helper

    initialisers = {init.name: init for init in model.graph.initializer}
    used = [i for n in model.graph.node for i in n.input]
    nodes: list[Any] = []
    rewritten = 0
    for node in model.graph.node:
        weight = initialisers.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (
            attrs.get("group", 1) == 1
            and set(attrs.get("strides", [1, 1])) == {1}
            and set(attrs.get("dilations", [1, 1])) == {1}
            and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
        )
        if weight is None or list(weight.dims[:2]) != [1, 1] or len(weight.dims) != 4 or not plain:
            nodes.append(node)
            continue
        kernel = numpy_helper.to_array(weight)[0, 0].astype(np.float64)
        u, sv, vt = np.linalg.svd(kernel)
        if min(kernel.shape) < 2 or sv[1] > tolerance * sv[0] or used.count(node.input[1]) != 1:
            nodes.append(node)
            continue
        sign = -1.0 if u[:, 0].sum() < 0 else 1.0
        column = (sign * u[:, 0] * np.sqrt(sv[0])).astype(np.float32).reshape(1, 1, -1, 1)
        row = (sign * vt[0] * np.sqrt(sv[0])).astype(np.float32).reshape(1, 1, 1, -1)
        top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
        col_name, row_name, mid = (
            f"{node.input[1]}.column",
            f"{node.input[1]}.row",
            f"{node.output[0]}.column",
        )
        model.graph.initializer.remove(weight)
        model.graph.initializer.extend(
            [numpy_helper.from_array(column, col_name), numpy_helper.from_array(row, row_name)]
        )
        nodes.append(
            helper.make_node(
                "Conv", [node.input[0], col_name], [mid], name=f"{node.name}.column",
                kernel_shape=[column.shape[2], 1], pads=[top, 0, bottom, 0],
            )
        )  # fmt: skip
        nodes.append(
            helper.make_node(
                "Conv", [mid, row_name, *node.input[2:]], list(node.output), name=f"{node.name}.row",
                kernel_shape=[1, row.shape[3]], pads=[0, left, 0, right],
            )
        )  # fmt: skip
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return rewritten


def quantize_model(fp32: Path, out: Path, calibration: list[np.ndarray]) -> Path:
    """Write the INT8 (QDQ) version of ``fp32`` to ``out``, calibrated on ``calibration`` inputs.

    Steps: ONNX Runtime's pre-processing (shape inference, constant folding), the exact separable
    rewrite of the map blur (:func:`separable_blur`), then static quantization of
    :func:`backbone_nodes`. Any failure is a :class:`QuantizeError` naming ``fp32``.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise QuantizeError("no calibration images (the validation split has no normal image)")
    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            model = onnx.load(str(prepared))
            separable_blur(model)
            onnx.save(model, str(prepared))
            nodes = backbone_nodes(model)
            if not nodes:
                raise QuantizeError(f"{fp32}: no multi-channel convolution found to quantize")
            quantize_static(
                str(prepared),
                str(out),
                _calibration_reader(calibration, model.graph.input[0].name),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                # uint8 activations with a zero point (ReLU6 outputs are >= 0: a symmetric int8 range
                # would waste half its codes), symmetric int8 weights: ORT's u8s8 kernels (VNNI on x86)
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=nodes,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"WeightSymmetric": True},
            )
        except QuantizeError:
            raise
        except Exception as exc:  # the quantizer raises assorted types; one error names the file
            raise QuantizeError(f"{fp32}: ONNX Runtime static quantization failed ({exc})") from exc
    return out


@dataclass(frozen=True)
class SplitScores:
    """A model's validation outputs: image scores, and pixel AUROC when masks exist."""

    scores: list[float]
    image_auroc: float | None
    pixel_auroc: float | None


def score_split(model: Path, samples: Sequence[Sample], size: tuple[int, int], resize: str) -> SplitScores:
    """Score every sample through serving's session builder; image AUROC and (masks) pixel AUROC."""
    from sklearn.metrics import roc_auc_score

    from core.preprocess import fit_mask
    from core.scoring import ScoringError, create_session
    from experiments.metrics import StreamingPixelMetrics

    try:
        session = create_session(model)
    except ScoringError as exc:
        raise QuantizeError(str(exc)) from exc
    input_name = session.get_inputs()[0].name
    with_masks = any(s.mask is not None for s in samples)
    pixel = StreamingPixelMetrics(0.0, 1.0) if with_masks else None
    scores: list[float] = []
    for sample in samples:
        score, amap = session.run(
            [SCORE_OUTPUT, MAP_OUTPUT], {input_name: load_input(sample.path, size, resize)}
        )
        value = float(np.asarray(score, dtype=np.float64).reshape(-1)[0])
        if not math.isfinite(value):
            raise QuantizeError(f"{model}: pred_score of {sample.path} is {value}")
        scores.append(value)
        if pixel is not None:
            if sample.mask is not None:
                from PIL import Image

                with Image.open(sample.mask) as im:
                    mask = fit_mask(im, size, resize)
            else:
                mask = np.zeros(size, dtype=np.uint8)  # a normal image: every pixel is negative
            pixel.update(np.asarray(amap).reshape(size), mask)
    labels = [s.label for s in samples]
    image_auroc = float(roc_auc_score(labels, scores)) if len(set(labels)) == 2 else None
    pixel_auroc = None
    if pixel is not None:
        value = pixel.compute()["pixel_AUROC"]
        pixel_auroc = value if math.isfinite(value) else None
    return SplitScores(scores=scores, image_auroc=image_auroc, pixel_auroc=pixel_auroc)


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict and the figures it was made on (``None`` = not measurable)."""

    passed: bool
    why: str
    val_image_AUROC_fp32: float | None = None
    val_image_AUROC_int8: float | None = None
    val_pixel_AUROC_fp32: float | None = None
    val_pixel_AUROC_int8: float | None = None


def apply_gate(fp32: SplitScores, int8: SplitScores, settings: QuantizeSettings) -> GateResult:
    """Pass only if image AUROC drops by <= the limit and pixel AUROC (when measurable) too.

    Without a measurable image AUROC (validation has no defect image) the drop is unknown, so the
    INT8 model is refused: the gate exists to bound the accuracy cost, not to assume it away.
    """
    figures = {
        "val_image_AUROC_fp32": fp32.image_auroc,
        "val_image_AUROC_int8": int8.image_auroc,
        "val_pixel_AUROC_fp32": fp32.pixel_auroc,
        "val_pixel_AUROC_int8": int8.pixel_auroc,
    }
    if fp32.image_auroc is None or int8.image_auroc is None:
        return GateResult(
            False, "validation has no defect image: image AUROC drop cannot be measured", **figures
        )
    reasons = []
    image_drop = fp32.image_auroc - int8.image_auroc
    parts = [
        f"image AUROC {fp32.image_auroc:.4f} -> {int8.image_auroc:.4f} "
        f"(drop {image_drop:+.4f}, max {settings.max_image_auroc_drop})"
    ]
    if image_drop > settings.max_image_auroc_drop:
        reasons.append("image AUROC drop too large")
    if fp32.pixel_auroc is not None and int8.pixel_auroc is not None:
        pixel_drop = fp32.pixel_auroc - int8.pixel_auroc
        parts.append(
            f"pixel AUROC {fp32.pixel_auroc:.4f} -> {int8.pixel_auroc:.4f} "
            f"(drop {pixel_drop:+.4f}, max {settings.max_pixel_auroc_drop})"
        )
        if pixel_drop > settings.max_pixel_auroc_drop:
            reasons.append("pixel AUROC drop too large")
    else:
        parts.append("pixel AUROC not measured (no validation masks)")
    verdict = "; ".join(reasons) if reasons else "within the gate"
    return GateResult(not reasons, f"{verdict}: {', '.join(parts)}", **figures)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def quantize_and_gate(
    fp32: Path,
    out: Path,
    dataset: Path,
    size: tuple[int, int],
    resize: str,
    settings: QuantizeSettings,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Quantize ``fp32`` into ``out``, measure both on validation, apply the gate.

    ``threshold`` (metadata.json's, on ``pred_score``) is only used to report how many validation
    verdicts INT8 changes (``val_decision_agreement``); the gate itself is on AUROC, as specified.

    Returns the ``int8`` block of metadata.json minus the file fields (the caller adds
    ``model_file``/``model_sha256`` when it keeps the file). ``out`` is deleted when the gate fails,
    so a refused model can never be served by accident.
    """
    samples = validation_samples(dataset)
    normals = [s for s in samples if s.label == 0]
    if not normals:
        raise QuantizeError(f"{dataset / 'val' / 'good'}: no validation normals to calibrate on")
    calibration = [load_input(s.path, size, resize) for s in normals[: settings.calibration_images]]
    quantize_model(fp32, out, calibration)
    before = score_split(fp32, samples, size, resize)
    after = score_split(out, samples, size, resize)
    gate = apply_gate(before, after, settings)
    if not gate.passed:
        out.unlink(missing_ok=True)
    fp32_scores, int8_scores = np.asarray(before.scores), np.asarray(after.scores)
    diffs = np.abs(fp32_scores - int8_scores)
    agreement = float(np.mean((fp32_scores >= threshold) == (int8_scores >= threshold)))
    figures = {k: _round(v) if isinstance(v, float) else v for k, v in asdict(gate).items()}
    return {
        "passed_gate": figures.pop("passed"),
        **figures,
        "max_image_auroc_drop": settings.max_image_auroc_drop,
        "max_pixel_auroc_drop": settings.max_pixel_auroc_drop,
        "val_max_abs_score_diff": _round(float(diffs.max())),
        "val_decision_agreement": _round(agreement),
        "n_val_images": len(samples),
        "n_calibration_images": len(calibration),
        "method": METHOD,
    }


def mlflow_metrics(block: Mapping[str, Any]) -> dict[str, float]:
    """The figures of an ``int8`` block as MLflow metrics (``quantize_*``; missing ones left out)."""
    keys = ("val_image_AUROC_fp32", "val_image_AUROC_int8", "val_pixel_AUROC_fp32", "val_pixel_AUROC_int8")
    metrics = {f"quantize_{k}": float(block[k]) for k in keys if isinstance(block.get(k), int | float)}
    metrics["quantize_passed_gate"] = 1.0 if block.get("passed_gate") else 0.0
    return metrics


def _main(argv: Iterable[str] | None = None) -> int:
    from config.params import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dataset", type=Path, default=Path("build/dataset"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--resize", default=DEFAULT_RESIZE, choices=RESIZE_POLICIES)
    args = parser.parse_args(list(argv) if argv is not None else None)
    settings = QuantizeSettings.from_params(load_params(args.params))
    block = quantize_and_gate(
        args.model, args.out, args.dataset, (args.size, args.size), args.resize, settings
    )
    print(json.dumps(block, indent=2))
    return 0 if block["passed_gate"] else 1


if __name__ == "__main__":
    sys.exit(_main())
