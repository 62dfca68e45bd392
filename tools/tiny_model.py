"""Build a real, tiny anomalib ONNX model plus its ``metadata.json`` for tests.

Serving, registry and benchmark tests need a genuine anomalib export (same graph
structure, same output names, same post-processing) but cannot afford the real
pipeline. This trains PaDiM on a handful of ELPV cells at 64x64 with a randomly
initialised ResNet-18 (nothing is downloaded), exports it the way the contract in
``docs/contracts.md`` section 5 prescribes, and writes schema-version-1 metadata.

Everything torch-related is imported inside :func:`build_tiny_model` so that merely
importing this module stays cheap and torch-free.
"""

from __future__ import annotations

import csv
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image

from core.contract import SCHEMA_VERSION, input_block
from core.files import sha256_file

N_NORMAL = 16
N_DEFECT = 8
FIXTURE_SEED = 42


def elpv_root() -> Path:
    """Locate the data folder of the installed ``elpv-dataset`` wheel (no network needed)."""
    import importlib.util

    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or spec.origin is None:
        raise RuntimeError("elpv-dataset is not installed; it provides the fixture images")
    return Path(spec.origin).parent / "data"


def elpv_samples(n_normal: int = N_NORMAL, n_defect: int = N_DEFECT) -> tuple[list[Path], list[Path]]:
    """Return the first ``n_normal`` normal (p=0) and ``n_defect`` defective (p>=2/3) cell paths.

    Deterministic (file order of ``labels.csv``) so every test session sees the same images.
    """
    root = elpv_root()
    normal: list[Path] = []
    defect: list[Path] = []
    with (root / "labels.csv").open() as fh:
        for row in csv.reader(fh, delimiter=" ", skipinitialspace=True):
            if len(row) < 2:
                continue
            path, prob = root / row[0], float(row[1])
            if prob == 0.0 and len(normal) < n_normal:
                normal.append(path)
            elif prob >= 2 / 3 - 1e-6 and len(defect) < n_defect:
                defect.append(path)
            if len(normal) >= n_normal and len(defect) >= n_defect:
                break
    return normal, defect


def _materialise(paths: list[Path], out: Path) -> None:
    """Copy ELPV cells as RGB PNGs (anomalib's Folder datamodule reads RGB)."""
    out.mkdir(parents=True, exist_ok=True)
    for p in paths:
        with Image.open(p) as im:
            im.convert("RGB").save(out / p.name)


def build_tiny_model(out_dir: Path, image_size: int = 64) -> Path:
    """Train a tiny PaDiM, export it to ONNX and write ``metadata.json`` into ``out_dir``.

    Returns ``out_dir``, which then looks exactly like ``serving/model/`` (``model.onnx`` +
    ``metadata.json``). Takes a few seconds on 2 CPU cores.
    """
    from anomalib.data import Folder
    from anomalib.engine import Engine
    from anomalib.models import Padim
    from lightning.pytorch import seed_everything

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(FIXTURE_SEED, workers=True)

    with tempfile.TemporaryDirectory(prefix="tiny-model-") as tmp_str:
        tmp = Path(tmp_str)
        normal, defect = elpv_samples()
        _materialise(normal, tmp / "data" / "good")
        _materialise(defect, tmp / "data" / "defect")

        datamodule = Folder(
            name="elpv_tiny",
            root=tmp / "data",
            normal_dir="good",
            abnormal_dir="defect",
            normal_split_ratio=0.25,
            train_batch_size=8,
            eval_batch_size=8,
            num_workers=0,
            seed=FIXTURE_SEED,
        )
        model = Padim(
            backbone="resnet18",
            layers=["layer1", "layer2"],
            pre_trained=False,
            n_features=32,
            pre_processor=Padim.configure_pre_processor((image_size, image_size)),
            evaluator=False,
            visualizer=False,
        )
        engine = Engine(
            max_epochs=1,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            default_root_dir=tmp / "engine",
        )
        engine.fit(model=model, datamodule=datamodule)

        # The pipeline's own export: batch 1, fixed size, opset 18, weights inside model.onnx.
        from experiments.export import export_onnx

        model_file = export_onnx(model, out_dir, image_size)

        raw_threshold = float(model.post_processor.image_threshold)

    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    output_names = [o.name for o in graph.output]
    input_name = graph.input[0].name
    if "pred_score" not in output_names or "anomaly_map" not in output_names:
        raise RuntimeError(f"unexpected ONNX outputs {output_names}")

    metadata = {
        "schema_version": SCHEMA_VERSION,
        "model_file": "model.onnx",
        "model_sha256": sha256_file(model_file),
        "model_name": "padim",
        "registered_model": "visual-inspection",
        "registry_version": "0",
        "run_id": "tiny-fixture",
        "input": input_block(input_name, image_size, image_size),
        "normalisation": {
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "applied": "inside_model",
        },
        "outputs": {"score": "pred_score", "anomaly_map": "anomaly_map"},
        "threshold": 0.5,
        "raw_threshold": raw_threshold,
        "metrics": {},
        "git_commit": "0" * 40,
        "data_version": "elpv-tiny-fixture",
        "exported_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    (out_dir / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return out_dir


def tiny_split_dataset(root: Path) -> Path:
    """ELPV cells in prepare's layout: 8 normal for training, 3 for validation, 4 normal + 4 defective
    for test (normal-only validation: the threshold is a normal quantile)."""
    import shutil

    normal, defect = elpv_samples(n_normal=15, n_defect=4)
    groups = (
        ("train/good", normal[:8]),
        ("val/good", normal[8:11]),
        ("test/good", normal[11:]),
        ("test/defect", defect),
    )
    for sub, paths in groups:
        (root / sub).mkdir(parents=True)
        for path in paths:
            shutil.copyfile(path, root / sub / path.name)
    return root


if __name__ == "__main__":  # pragma: no cover - manual use: python -m tools.tiny_model OUT_DIR
    import sys

    print(build_tiny_model(Path(sys.argv[1] if len(sys.argv) > 1 else "build/tiny-model")))
