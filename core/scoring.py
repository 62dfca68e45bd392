"""Score one image with the exported anomalib ONNX model and draw its heat-map overlay.

The ONNX graph already contains anomalib's pre-processing (resize + the backbone's input normalisation)
and post-processing (min-max normalisation so that ``threshold`` is 0.5 and the anomaly map
is in [0, 1]); see ``docs/contracts.md`` section 5. Serving feeds it ``float32[1, 3, H, W]``
RGB in [0, 1] made by :func:`core.preprocess.model_input` - the same function that wrote the
training images - with the resize policy and bit-depth rule recorded in ``metadata.json``.
Only numpy, Pillow and ONNX Runtime are used so the Lambda image stays small and torch-free.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from core.contract import ModelMetadata, load_metadata
from core.preprocess import map_to_original, model_input, to_rgb8

log = logging.getLogger(__name__)

PRECISION_ENV = "MODEL_PRECISION"
PRECISIONS = ("fp32", "int8")


class ScoringError(RuntimeError):
    """The model could not be loaded or produced an unusable output."""


def model_precision(value: str | None = None) -> str:
    """Which model to serve: ``value``, else env ``MODEL_PRECISION``, else ``fp32``; the one parser.

    ``int8`` asks for metadata.json's quantized model (``int8.model_file``), which exists only when it
    passed its validation accuracy gate. A value outside :data:`PRECISIONS` is an error at cold start
    rather than a silent fp32, because a typo would otherwise hide that the setting did nothing.
    """
    raw = value if value is not None else os.environ.get(PRECISION_ENV, "")
    precision = raw.strip().lower() or "fp32"
    if precision not in PRECISIONS:
        raise ScoringError(f"{PRECISION_ENV}={raw!r}: must be one of {', '.join(PRECISIONS)}")
    return precision


@dataclass(frozen=True)
class ScoreResult:
    """Outcome of scoring one image.

    ``anomaly_map`` is ``float32[H, W]`` in [0, 1] at the model's input size; ``timings`` holds
    milliseconds for ``preprocess``, ``inference`` and ``postprocess``.
    """

    score: float
    is_anomalous: bool
    threshold: float
    anomaly_map: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    # The resize policy the map was made under; pass it to overlay() so the map lands on the image.
    resize: str = "stretch"


def configure_runtime_environment() -> None:
    """Point cache/temp dirs at a writable place before anything might write under HOME.

    On Lambda, HOME and the code directory are read-only and only ``/tmp`` is writable. ONNX
    Runtime itself writes nothing unless asked (no optimised-model file, no profiling), but
    libraries that honour XDG cache dirs would otherwise fail at first use. Existing values win.
    """
    tmp = tempfile.gettempdir()
    os.environ.setdefault("XDG_CACHE_HOME", os.path.join(tmp, ".cache"))
    home = os.environ.get("HOME")
    if not home or not os.access(home, os.W_OK):
        os.environ["HOME"] = tmp


def default_intra_op_threads() -> int:
    """Threads for one inference: env ``ORT_INTRA_OP_THREADS``, else the CPUs this process may use.

    Lambda grants vCPUs in proportion to memory (1 vCPU per ~1.77 GB); ORT's own default can
    oversubscribe when ``os.cpu_count()`` reports host CPUs, so we use the affinity mask.
    """
    env = os.environ.get("ORT_INTRA_OP_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def create_session(model_path: Path, intra_op_threads: int = 1):  # -> onnxruntime.InferenceSession
    """A CPU ONNX Runtime session tuned for one request at a time: the only place one is built.

    Serving, evaluate's ONNX check, promote's verification and the benchmarks all score through
    this, so "the ONNX model matches torch" is established with the settings that serve it.
    Fails with :class:`ScoringError` naming the file.
    """
    import onnxruntime as ort

    # Telemetry is only emitted on Windows builds, but switch it off explicitly anyway.
    ort.disable_telemetry_events()
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: Lambda logs are billed and searched
    try:
        return ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types; surface them uniformly
        raise ScoringError(f"{model_path}: ONNX Runtime could not load the model ({exc})") from exc


class Scorer:
    """An ONNX Runtime session plus the metadata needed to feed it and read its outputs.

    Create once per process (Lambda cold start) with :meth:`from_dir`; :meth:`score` is then
    safe to call for every request.
    """

    def __init__(self, metadata: ModelMetadata, session, precision: str = "fp32") -> None:
        self.metadata = metadata
        self.session = session
        # what is actually served ("int8" only when the quantized model was found and loaded)
        self.precision = precision
        self._check_session()

    @property
    def model_sha256(self) -> str:
        """sha256 of the file this scorer runs (the INT8 file's when ``precision`` is ``int8``).

        What a result should name: the fp32 hash would be wrong when the quantized model scored it.
        """
        int8 = self.metadata.int8
        if self.precision == "int8" and int8 is not None and int8.model_sha256 is not None:
            return int8.model_sha256
        return self.metadata.model_sha256

    @classmethod
    def from_dir(
        cls,
        model_dir: Path | str,
        *,
        intra_op_threads: int | None = None,
        verify_sha256: bool = True,
        precision: str | None = None,
    ) -> Scorer:
        """Validate ``metadata.json`` in ``model_dir`` and load the model it names.

        ``precision`` (default: env ``MODEL_PRECISION``, see :func:`model_precision`) ``int8`` loads
        the quantized model when metadata.json has one that passed its gate; otherwise the fp32
        model is served and a warning says why, so one setting can be rolled out to every camera
        and Lambda whether or not the current champion has an INT8 version. ``self.precision``
        says which one runs.
        """
        configure_runtime_environment()
        wanted = model_precision(precision)
        metadata = load_metadata(model_dir, verify_sha256=verify_sha256)
        threads = intra_op_threads or default_intra_op_threads()
        path, served = metadata.model_path, "fp32"
        if wanted == "int8":
            if metadata.int8_path is not None:
                path, served = metadata.int8_path, "int8"
            else:
                why = metadata.int8.why if metadata.int8 is not None else "metadata.json has no int8 block"
                log.warning("int8 requested but not available (%s); serving the fp32 model", why)
        return cls(metadata, create_session(path, threads), precision=served)

    def _check_session(self) -> None:
        """Fail at load time if the graph does not match metadata (names, static input shape)."""
        meta = self.metadata
        inputs = {i.name: i for i in self.session.get_inputs()}
        if meta.input.name not in inputs:
            raise ScoringError(f"model has no input {meta.input.name!r} (inputs: {sorted(inputs)})")
        expected = [1, meta.input.channels, meta.input.height, meta.input.width]
        shape = list(inputs[meta.input.name].shape)
        static_mismatch = any(isinstance(d, int) and d != e for d, e in zip(shape, expected, strict=False))
        if len(shape) != 4 or static_mismatch:
            raise ScoringError(f"model input shape {shape} does not match metadata {expected}")
        outputs = {o.name for o in self.session.get_outputs()}
        for name in (meta.score_output, meta.anomaly_map_output):
            if name not in outputs:
                raise ScoringError(f"model has no output {name!r} (outputs: {sorted(outputs)})")

    @property
    def threshold(self) -> float:
        """Decision threshold on ``pred_score`` (0.5 for anomalib's normalised scores)."""
        return self.metadata.threshold

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """The shared pre-processing (bit depth, ``metadata.input.geometry``) -> ``float32[1,3,H,W]``.

        Raises :class:`core.preprocess.PreprocessError` (a ``ValueError``) for an image mode
        or pixel range the rule does not cover.
        """
        spec = self.metadata.input
        return model_input(image, (spec.height, spec.width), spec.resize)

    def map_to_image(self, anomaly_map: np.ndarray, image: Image.Image) -> np.ndarray:
        """The model-size anomaly map placed back on ``image``'s own pixels (undoes the policy)."""
        return map_to_original(anomaly_map, image.width, image.height, self.metadata.input.resize)

    def score(self, image: Image.Image | bytes) -> ScoreResult:
        """Score one image (a PIL image or encoded JPEG/PNG bytes)."""
        if isinstance(image, bytes | bytearray | memoryview):
            image = Image.open(io.BytesIO(bytes(image)))
        t0 = time.perf_counter()
        batch = self.preprocess(image)
        t1 = time.perf_counter()
        meta = self.metadata
        raw_score, raw_map = self.session.run(
            [meta.score_output, meta.anomaly_map_output], {meta.input.name: batch}
        )
        t2 = time.perf_counter()
        score_values = np.asarray(raw_score, dtype=np.float64).reshape(-1)
        if score_values.size != 1 or not np.isfinite(score_values[0]):
            raise ScoringError(f"model output {meta.score_output!r} is not one finite number: {raw_score!r}")
        score = float(score_values[0])
        anomaly_map = _to_2d_map(np.asarray(raw_map), meta.anomaly_map_output)
        t3 = time.perf_counter()
        return ScoreResult(
            score=score,
            is_anomalous=score >= meta.threshold,
            threshold=meta.threshold,
            anomaly_map=anomaly_map,
            timings={
                "preprocess": (t1 - t0) * 1000.0,
                "inference": (t2 - t1) * 1000.0,
                "postprocess": (t3 - t2) * 1000.0,
            },
            resize=meta.input.resize,
        )


def _to_2d_map(raw: np.ndarray, name: str) -> np.ndarray:
    """Squeeze ``[1,1,H,W]`` / ``[1,H,W]`` / ``[H,W]`` to ``float32[H,W]`` clipped to [0, 1]."""
    array = raw
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ScoringError(f"model output {name!r} has shape {raw.shape}; expected [1,1,H,W] or [1,H,W]")
    array = np.nan_to_num(array.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=0.0)
    return np.clip(array, 0.0, 1.0)


def heat_colormap(values: np.ndarray) -> np.ndarray:
    """Map ``[0, 1]`` floats to uint8 RGB with a jet-like ramp (blue → cyan → yellow → red).

    A piecewise-linear approximation of matplotlib's ``jet``, so overlays look like the ones
    the evaluation stage draws, without shipping matplotlib in the Lambda image.
    """
    v = np.clip(values, 0.0, 1.0).astype(np.float32)
    red = np.clip(1.5 - np.abs(4.0 * v - 3.0), 0.0, 1.0)
    green = np.clip(1.5 - np.abs(4.0 * v - 2.0), 0.0, 1.0)
    blue = np.clip(1.5 - np.abs(4.0 * v - 1.0), 0.0, 1.0)
    return (np.stack([red, green, blue], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def overlay(
    image: Image.Image,
    anomaly_map: np.ndarray,
    *,
    alpha: float = 0.5,
    image_format: Literal["PNG", "JPEG"] = "PNG",
    resize: str = "stretch",
) -> bytes:
    """Blend the coloured anomaly map over the image at the image's own size; return encoded bytes.

    The map is mapped back through the resize policy ``resize`` (letterbox padding dropped,
    centre-crop borders left unscored) and upsampled bilinearly as floats (no 8-bit banding),
    so operators see the heat map on the picture the camera actually took - drawn with the
    same bit-depth rule the model used, so a 16-bit image is not shown as a white sheet.
    """
    base = to_rgb8(image).astype(np.float32)
    heat_map = np.asarray(anomaly_map, dtype=np.float32)
    if heat_map.ndim != 2:
        raise ValueError(f"anomaly_map must be 2-D, got shape {heat_map.shape}")
    if heat_map.shape != base.shape[:2]:
        heat_map = map_to_original(heat_map, base.shape[1], base.shape[0], resize)
    colours = heat_colormap(heat_map).astype(np.float32)
    blended = (1.0 - alpha) * base + alpha * colours
    out = Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    buffer = io.BytesIO()
    if image_format == "JPEG":
        out.save(buffer, format="JPEG", quality=90)
    else:
        # compress_level 1: overlays are written once and rarely read; CPU time is billed.
        out.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
