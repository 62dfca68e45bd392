"""The "pixel AUROC and AU-PRO where masks exist" path, which the default ELPV data (no masks) never runs.

A tiny MVTec-layout data set is built from real ELPV cells: normal cells for training and testing,
plus "defect" cells made by painting a clearly visible synthetic defect (a bright blob or scratch at
a seeded random place) on normal cells, each with its binary mask
``ground_truth/defect/<stem>_mask.png``. It goes through the real prepare validation (masks
accepted and copied), then a tiny PaDiM train + evaluate at 64 px, as in test_pipeline_units.py.

A mask without its image is already rejected (naming the file) by
``tests/experiments/test_data.py::test_validation_failures_name_the_file``.
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

from tests.experiments.test_pipeline_units import (
    BASE_PARAMS,
    assert_image_metrics_match_engine_test,
    assert_image_metrics_match_scores,
)

pytestmark = pytest.mark.slow  # trains models (make test-fast skips them)

N_TRAIN, N_TEST_GOOD, N_TEST_DEFECT = 12, 6, 6
SEED = 7


def _paint_defect(image: Image.Image, rng: random.Random, spots: int = 0) -> tuple[Image.Image, Image.Image]:
    """Return ``(image with a bright blob or scratch, its 0/255 mask)``; both the image's size/mode.

    ``spots`` adds that many small bright squares (more mask regions, as real masks often have).
    """
    width, height = image.size
    defect, mask = image.copy(), Image.new("L", image.size, 0)
    draw, mask_draw = ImageDraw.Draw(defect), ImageDraw.Draw(mask)
    side = min(width, height)
    if rng.random() < 0.5:  # blob: ellipse of 1/8 .. 1/5 of the cell
        rx, ry = (rng.randint(side // 16, side // 10) for _ in range(2))
        cx, cy = rng.randint(rx + 5, width - rx - 5), rng.randint(ry + 5, height - ry - 5)
        box = (cx - rx, cy - ry, cx + rx, cy + ry)
        draw.ellipse(box, fill=255)
        mask_draw.ellipse(box, fill=255)
    else:  # scratch: a thick line across a good part of the cell
        margin = side // 10
        start = (rng.randint(margin, width - margin), rng.randint(margin, height // 3))
        end = (rng.randint(margin, width - margin), rng.randint(2 * height // 3, height - margin))
        thickness = max(side // 25, 3)
        draw.line([start, end], fill=255, width=thickness)
        mask_draw.line([start, end], fill=255, width=thickness)
    for _ in range(spots):
        x, y = rng.randint(4, width - 12), rng.randint(4, height - 12)
        draw.rectangle((x, y, x + 6, y + 6), fill=255)
        mask_draw.rectangle((x, y, x + 6, y + 6), fill=255)
    return defect, mask


def _raw_data(
    root: Path,
    n_train: int = N_TRAIN,
    n_good: int = N_TEST_GOOD,
    n_defect: int = N_TEST_DEFECT,
    spots: int = 0,
) -> None:
    """``data/``-like MVTec folder: train/good, test/good, test/defect + ground_truth/defect masks."""
    from tools.tiny_model import elpv_samples

    normal, _ = elpv_samples(n_normal=n_train + n_good + n_defect, n_defect=0)
    assert len(normal) == n_train + n_good + n_defect
    rng = random.Random(SEED)
    groups = {
        "train/good": normal[:n_train],
        "test/good": normal[n_train : n_train + n_good],
        "test/defect": normal[n_train + n_good :],
    }
    for sub, paths in groups.items():
        (root / sub).mkdir(parents=True)
        for path in paths:
            with Image.open(path) as im:
                image = im.copy()
            if sub == "test/defect":
                image, mask = _paint_defect(image, rng, spots)
                mask_path = root / "ground_truth/defect" / f"{path.stem}_mask.png"
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                mask.save(mask_path)
            image.save(root / sub / f"{path.stem}.png")


def test_masks_pass_prepare_and_give_pixel_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from experiments import prepare
    from experiments.datamodule import mask_dirs
    from experiments.evaluate import evaluate
    from experiments.train import train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    raw = tmp_path / "data"
    _raw_data(raw)
    with Image.open(next((raw / "ground_truth/defect").iterdir())) as m:
        values = set(np.unique(np.asarray(m)).tolist())
    assert values == {0, 255}

    # --- prepare: the real validation accepts the masks and copies them beside their images ------
    params = copy.deepcopy(BASE_PARAMS)
    params["data"] = {
        "root": str(raw),
        "image_size": 64,
        "max_train": N_TRAIN,
        "max_test_good": N_TEST_GOOD,
        "max_test_defect": N_TEST_DEFECT,
    }
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    dataset, report_path = tmp_path / "dataset", tmp_path / "prepare" / "report.json"
    report = prepare.prepare(params_path, dataset, report_path)
    assert report["masks"] == {"available": N_TEST_DEFECT, "selected": N_TEST_DEFECT}
    for split in ("val", "test"):  # half of the defects set the threshold (F1), half are scored
        masks = sorted(p.name for p in (dataset / "ground_truth" / split / "defect").iterdir())
        assert masks == sorted(p.name for p in (dataset / split / "defect").iterdir())
        assert len(masks) == N_TEST_DEFECT // 2
    assert mask_dirs(dataset) == ["ground_truth/test/defect"]

    # --- tiny train + evaluate: pixel metrics appear next to the image metrics --------------------
    models_dir, work = tmp_path / "models", tmp_path / "engine"
    record = train("padim", params, dataset, models_dir / "padim", work_dir=work)
    assert record["threshold"]["image"]["method"] == "f1"
    assert record["threshold"]["pixel"]["method"] == "f1"  # validation has masks: pixel F1 too
    out = tmp_path / "eval" / "padim"
    summary = evaluate("padim", params, dataset, models_dir, out, use_mlflow=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert summary["metrics"] == metrics
    assert metrics["test_synthetic"] == 0.0 and summary["test_set"] == "real"
    for key in ("image_AUROC", "image_F1Score", "onnx_image_AUROC", "pixel_AUROC", "pixel_AUPRO"):
        assert key in metrics, key
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    # Bright blobs/scratches on a mid-grey cell must be located far better than chance.
    assert metrics["pixel_AUROC"] > 0.5, metrics
    assert "pixel_PRO" not in metrics  # anomalib's fixed-threshold PRO is gone
    print({k: metrics[k] for k in ("pixel_AUROC", "pixel_AUPRO", "image_AUROC", "image_F1Score")})
    # image metrics from evaluate's own pass: those of scores.csv, and anomalib's engine.test ones
    assert_image_metrics_match_scores(out, summary)
    assert_image_metrics_match_engine_test("padim", params, dataset, models_dir, metrics, work)


#: Peak resident memory the evaluate subprocess may reach; a watchdog kills it above this. The set
#: below has 24 scored defect images with ~6 mask regions each at 256 px: anomalib's old PRO path
#: built a ``pixels x regions`` int64 mesh of 30 * 65536 * ~150 * 8 B ~ 2.4 GB on top of the
#: process (~1 GB), so it could not finish under this limit; the histogram path adds a few MB.
#: (An address-space rlimit is no use here: oneDNN reserves virtual memory it never touches.)
RSS_LIMIT_MB = 2000


def _run_under_rss_limit(cmd: list[str], limit_mb: float, timeout_s: float) -> tuple[int, str, float]:
    """Run ``cmd``, polling its resident memory; kill it when above ``limit_mb``.

    Returns ``(returncode, stderr tail, highest RSS seen in MB)``; returncode -9 means killed.
    """
    import subprocess
    import tempfile
    import time

    peak = 0.0
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                rss_kb = next(
                    int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")
                )
                peak = max(peak, rss_kb / 1024)
            except (OSError, StopIteration):
                pass
            if peak > limit_mb or time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.05)
        err.seek(0)
        return proc.returncode, err.read()[-3000:], peak


def test_masked_evaluate_runs_under_a_memory_limit(tmp_path: Path) -> None:
    import sys

    from experiments import prepare
    from experiments.train import train

    raw = tmp_path / "data"
    _raw_data(raw, n_train=12, n_good=6, n_defect=24, spots=5)
    params = copy.deepcopy(BASE_PARAMS)
    params["data"] = {
        "root": str(raw),
        "image_size": 256,
        "max_train": 12,
        "max_test_good": 6,
        "max_test_defect": 24,
        "max_val_good": 2,
        "val_defect_ratio": 0.0,  # every defect is scored; validation is normal-only
    }
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(params))
    dataset = tmp_path / "dataset"
    prepare.prepare(params_path, dataset, tmp_path / "report.json")
    models_dir = tmp_path / "models"
    train("padim", params, dataset, models_dir / "padim", work_dir=tmp_path / "engine")

    cmd = [sys.executable, "-m", "experiments.evaluate", "padim", "--params", str(params_path)]
    cmd += [
        "--dataset",
        str(dataset),
        "--models",
        str(models_dir),
        "--out",
        str(tmp_path / "eval"),
        "--no-mlflow",
    ]
    returncode, stderr, peak_mb = _run_under_rss_limit(cmd, RSS_LIMIT_MB, timeout_s=900)
    assert peak_mb <= RSS_LIMIT_MB, f"evaluate exceeded {RSS_LIMIT_MB} MB resident and was killed"
    assert returncode == 0, stderr
    metrics = json.loads((tmp_path / "eval" / "padim" / "metrics.json").read_text())
    summary = json.loads((tmp_path / "eval" / "padim" / "summary.json").read_text())
    assert summary["splits"]["scored"]["n_anomalous"] == 24
    assert summary["threshold_policy"]["image"]["method"] == "normal_quantile"
    assert 0.5 < metrics["pixel_AUROC"] <= 1.0 and 0.0 < metrics["pixel_AUPRO"] <= 1.0
    print(
        {k: metrics[k] for k in ("eval_peak_rss_mb", "pixel_AUROC", "pixel_AUPRO")},
        f"polled peak {peak_mb:.0f} MB",
    )
    assert metrics["eval_peak_rss_mb"] < RSS_LIMIT_MB
