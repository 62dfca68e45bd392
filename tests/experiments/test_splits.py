"""Splits, mask pairing and the normal-images-only path (issue #6, items 2-4 of w6a's part).

* Masks named ``anomaly-1_mask.png`` .. ``anomaly-20_mask.png`` (Lookout for Vision style): anomalib
  pairs masks with images by sorted order, and ``anomaly-1_mask`` sorts after ``anomaly-19_mask``
  while ``anomaly-1`` sorts before ``anomaly-10``; before the fix the datamodule raised
  ``MisMatchError``. Each mask here has a size unique to its image, so a wrong pairing is seen.
* A folder with only ``train/good`` goes through prepare, train and evaluate: the threshold is a
  normal quantile of held-out validation normals, the test split is synthetic and labelled so in
  metrics.json, summary.json and MLflow.
* Validation and test never share an image, and the reports list both.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from config.params import DataSection
from experiments.data_validation import (
    DataLayout,
    DataValidationError,
    plan_splits,
    scan_layout,
)
from tests.experiments.test_pipeline_units import BASE_PARAMS


def _square(path: Path, side: int, value: int, size: int = 64, background: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((size, size), background, dtype=np.uint8)
    array[4 : 4 + side, 4 : 4 + side] = value
    Image.fromarray(array).save(path)


def _params_file(tmp_path: Path, root: Path, **data: object) -> Path:
    params = copy.deepcopy(BASE_PARAMS)
    params["data"] = {
        "root": str(root),
        "image_size": 64,
        "max_train": 40,
        "max_test_good": 10,
        "max_test_defect": 40,
        "max_val_good": 5,
        "val_defect_ratio": 0.0,
        **data,
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_masks_pair_by_name_not_sorted_order(tmp_path: Path) -> None:
    from experiments import prepare
    from experiments.datamodule import build_datamodule

    raw = tmp_path / "data"
    for i in range(12):
        _square(raw / "train/good" / f"good-{i}.png", 0, 0)
    for i in range(3):
        _square(raw / "test/good" / f"good-t{i}.png", 0, 0)
    for i in range(1, 21):  # anomaly-i has an i+10 px square; its mask marks exactly that square
        _square(raw / "test/crack" / f"anomaly-{i}.png", i + 10, 250)
        _square(raw / "ground_truth/crack" / f"anomaly-{i}_mask.png", i + 10, 255, background=0)
    assert sorted(p.name for p in (raw / "ground_truth/crack").iterdir())[:3] == [
        "anomaly-10_mask.png",
        "anomaly-11_mask.png",
        "anomaly-12_mask.png",
    ]
    layout = scan_layout(raw)
    assert all(Path(m).stem == f"{Path(img).stem}_mask" for img, m in layout.masks.items())

    params_path = _params_file(tmp_path, raw)
    dataset = tmp_path / "dataset"
    prepare.prepare(params_path, dataset, tmp_path / "report.json")
    datamodule = build_datamodule(yaml.safe_load(params_path.read_text()), dataset)
    datamodule.setup()
    frame = datamodule.test_data.samples
    defects = frame[frame.label_index == 1]
    assert len(defects) == 20
    for image, mask in zip(defects.image_path, defects.mask_path, strict=True):
        i = int(Path(image).stem.split("-")[1])
        with Image.open(mask) as m:
            assert int((np.asarray(m) > 0).sum()) == (i + 10) ** 2, (image, mask)


def test_mask_naming_rules(tmp_path: Path) -> None:
    raw = tmp_path / "data"
    _square(raw / "train/good/g.png", 0, 0)
    _square(raw / "test/crack/a.png", 5, 250)
    _square(raw / "test/crack/a_mask.png", 5, 250)  # an image whose name looks like a mask name
    _square(raw / "ground_truth/crack/a_mask.png", 5, 255, background=0)
    with pytest.raises(DataValidationError, match="ambiguous mask name"):
        scan_layout(raw)
    (raw / "test/crack/a_mask.png").unlink()
    (raw / "ground_truth/crack/a_mask.png").rename(raw / "ground_truth/crack/a.png")  # <stem>.png works too
    assert scan_layout(raw).masks == {"test/crack/a.png": "ground_truth/crack/a.png"}


def _plan(n_train: int, n_test_good: int, n_defect: int, **kw: object) -> object:
    layout = DataLayout(
        train_good=[f"train/good/{i:03d}.png" for i in range(n_train)],
        test_good=[f"test/good/{i:03d}.png" for i in range(n_test_good)],
        test_defect={"crack": [f"test/crack/{i:03d}.png" for i in range(n_defect)]} if n_defect else {},
    )
    values = {"max_train": 1000, "max_test_good": 100, "max_test_defect": 100, "max_val_good": 50}
    values |= {"val_defect_ratio": 0.5} | kw
    return plan_splits(layout, DataSection(root="data", image_size=64, **values), seed=1)


def test_split_plan_is_disjoint_and_bounded() -> None:
    plan = _plan(100, 0, 0)  # normal images only
    groups = plan.groups()
    assert plan.synthetic and not plan.val_defect and not plan.test_defect
    assert (len(plan.val_good), len(plan.test_good), len(plan.train)) == (20, 20, 60)  # 20 % held out twice
    every = [p for paths in groups.values() for p in paths]
    assert len(every) == len(set(every)) == 100
    assert _plan(100, 0, 0).groups() == groups  # deterministic

    plan = _plan(500, 30, 9)
    assert len(plan.val_good) == 50 and len(plan.test_good) == 30 and len(plan.train) == 450
    assert (len(plan.val_defect), len(plan.test_defect)) == (4, 5) and not set(plan.val_defect) & set(
        plan.test_defect
    )
    assert len(_plan(500, 30, 1).test_defect) == 1  # at least one defect is always scored
    assert len(_plan(500, 30, 9, val_defect_ratio=0.0).val_defect) == 0
    with pytest.raises(DataValidationError, match="too few"):
        _plan(2, 0, 0)
    with pytest.raises(DataValidationError, match="needs at least 2"):
        _plan(9, 0, 0)  # 1 held-out normal: no room for synthetic anomalies and normals


@pytest.mark.slow  # trains a model (make test-fast skips it)
def test_normal_images_only_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train/good only -> prepare -> train -> evaluate on synthetic anomalies, labelled as such."""
    import mlflow

    from experiments import prepare
    from experiments.evaluate import evaluate
    from experiments.train import train
    from tools.tiny_model import elpv_samples

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    raw = tmp_path / "data" / "train" / "good"
    raw.mkdir(parents=True)
    normal, _ = elpv_samples(n_normal=30, n_defect=0)
    for path in normal:
        with Image.open(path) as im:
            im.save(raw / f"{path.stem}.png")

    params_path = _params_file(tmp_path, tmp_path / "data", max_val_good=5, max_test_good=6)
    params = yaml.safe_load(params_path.read_text())
    dataset, report_path = tmp_path / "dataset", tmp_path / "prepare" / "report.json"
    report = prepare.prepare(params_path, dataset, report_path)
    assert report["test_set"] == "synthetic"
    assert report["selected"] == {"test/good": 6, "train/good": 19, "val/good": 5}
    val_files, test_files = report["splits"]["val"]["files"], report["splits"]["test"]["files"]
    assert not {Path(f).name for f in val_files} & {Path(f).name for f in test_files}

    models_dir, work = tmp_path / "models", tmp_path / "engine"
    record = train("padim", params, dataset, models_dir / "padim", work_dir=work)
    assert record["threshold"]["image"]["method"] == "normal_quantile"  # f1 asked, impossible: fallback
    assert "no anomalous" in record["threshold"]["image"]["why"]
    assert record["threshold"]["image"]["n_normal"] == 5 and record["threshold"]["image"]["n_anomalous"] == 0
    assert record["n_val_images"] == 5

    out = tmp_path / "eval" / "padim"
    summary = evaluate("padim", params, dataset, models_dir, out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_synthetic"] == 1.0 and summary["test_set"] == "synthetic"
    for key in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics)
    assert "pixel_PRO" not in metrics
    assert summary["raw_threshold"] == pytest.approx(record["threshold"]["image"]["value"])
    splits = summary["splits"]
    assert splits["threshold_set_by"]["files"] == val_files
    assert splits["threshold_set_by"]["n_anomalous"] == 0
    assert splits["scored"]["n_anomalous"] == 3 and splits["scored"]["n_normal"] == 3  # half synthetic
    assert splits["scored"]["files"] == test_files
    from tests.experiments.test_pipeline_units import (
        assert_image_metrics_match_engine_test,
        assert_image_metrics_match_scores,
    )

    # image metrics from evaluate's own pass: those of scores.csv, and anomalib's engine.test ones
    # (the same synthetic anomalies: drawn after the same seeding)
    assert_image_metrics_match_scores(out, summary)
    assert_image_metrics_match_engine_test("padim", params, dataset, models_dir, metrics, work)
    run = mlflow.get_run(summary["run_id"])
    assert run.data.tags["test_set"] == "synthetic" and run.data.params["test_set"] == "synthetic"

    # the selection over this run says it ranked by a metric on synthetic anomalies
    from registry.select import choose, selection_document

    one_model = {
        **params,
        "models": {"padim": params["models"]["padim"]},
        "selection": {"metric": "image_AUROC"},
    }
    selection, _ = choose(one_model, tmp_path / "eval")
    document = selection_document(selection)
    assert document["test_set"] == "synthetic" and "synthetic anomalies" in document["ranked_by"]
    assert document["champion"] == "padim" and "[synthetic anomalies" in document["reason"]
