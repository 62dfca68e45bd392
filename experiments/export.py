"""ONNX export of a trained anomalib module, and the checks that make it safe to serve.

Why each step:

* anomalib's own ``to_onnx`` is used so the graph carries the pre-processing (resize + ImageNet
  normalisation) and post-processing (min-max normalisation, threshold 0.5) exactly as trained.
* ``dynamic_axes=None`` fixes the input to ``[1, 3, S, S]``: serving scores one image at a time,
  and a static graph is what the latency numbers must describe. anomalib otherwise marks the batch
  axis dynamic and dynamo traces it with an example batch of 2; :func:`input_shape` checks the
  result instead of trusting the flag.
* Weights the dynamo exporter may write beside the graph (``model.onnx.data``) are folded back in,
  so ``model.onnx`` is one self-contained file (the MLflow model, the registry and the Lambda
  image all move a single file).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ONNX_FILE = "model.onnx"
# The dynamo exporter implements opset 18; asking for less makes it attempt (and, for Pad, fail)
# a down-conversion with a noisy traceback. ONNX Runtime >= 1.14 runs opset 18.
OPSET = 18


def export_onnx(model: Any, out_dir: Path, image_size: int) -> Path:
    """Export ``model`` to ``out_dir/model.onnx`` (batch 1, fixed ``image_size``), self-contained."""
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / ONNX_FILE
    with tempfile.TemporaryDirectory(prefix="onnx-export-", dir=out_dir) as tmp:
        path = model.to_onnx(
            Path(tmp), input_size=(image_size, image_size), dynamic_axes=None, opset_version=OPSET
        )
        proto = onnx.load(str(path), load_external_data=True)
        onnx.save_model(proto, str(target), save_as_external_data=False)
    for leftover in out_dir.glob(ONNX_FILE + ".data"):
        leftover.unlink()
    shape = input_shape(target)
    if shape != [1, 3, image_size, image_size]:
        raise RuntimeError(
            f"{target}: graph input shape {shape}, expected [1, 3, {image_size}, {image_size}]"
        )
    return target


def input_shape(path: Path) -> list[int | str]:
    """The graph input's shape; symbolic (dynamic) dimensions come back as their names."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]


def run_ort(session: Any, image: np.ndarray) -> dict[str, np.ndarray]:
    """Run one ``float32[1,3,S,S]`` image, returning outputs by name."""
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {session.get_inputs()[0].name: image})
    return dict(zip(names, values, strict=True))


def median_latency_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds after ``warmup`` untimed calls.

    The median rather than the mean: other processes share the 2 cores, and a few preempted calls
    should not move the number.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def file_size_mb(path: Path) -> float:
    """Size in MiB of ``path`` plus any external-data file next to it."""
    size = path.stat().st_size
    extra = path.with_name(path.name + ".data")
    if extra.is_file():
        size += extra.stat().st_size
    return size / (1024 * 1024)
