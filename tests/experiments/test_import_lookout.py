"""``experiments.import_lookout`` on Amazon's real Lookout for Vision cookie sample and on broken manifests.

The cookie set (CC BY-SA 4.0, ``tests/data/lookout-cookies/README.md``) has the real manifest and
mask PNGs (anti-aliased palette masks with alpha, names ``anomaly-1`` .. ``anomaly-32`` that sort
differently from their ``_mask`` names). ``LOOKOUT_COOKIES_DIR`` points the tests at the original
folder instead of the repository's copy.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from config.paths import REPO_ROOT
from experiments import import_lookout
from experiments.data_validation import dvc_dir_md5

COOKIES = Path(os.environ.get("LOOKOUT_COOKIES_DIR") or REPO_ROOT / "tests" / "data" / "lookout-cookies")
FILES = COOKIES / "dataset-files"
MANIFEST = FILES / "manifests" / "template.manifest"
GREEN = (0x23, 0xA4, 0x36)  # the manifest's "cracked" colour


def _run(out: Path, *extra: str, manifest: Path = MANIFEST, images: Path = FILES) -> int:
    return import_lookout.main(
        ["--manifest", str(manifest), "--images", str(images), "--out", str(out), *extra]
    )


def test_cookie_set_imports_to_mvtec_layout_with_binary_aligned_masks(tmp_path: Path) -> None:
    out = tmp_path / "data"
    rc = _run(
        out, "--seed", "42", "--license", str(COOKIES / "LICENSE"), "--attribution", "Cookies, CC BY-SA 4.0"
    )
    assert rc == 0
    train = sorted((out / "train" / "good").iterdir())
    test_good = sorted((out / "test" / "good").iterdir())
    defects = sorted((out / "test" / "cracked").iterdir())
    masks = sorted((out / "ground_truth" / "cracked").iterdir())
    assert len(train) + len(test_good) == 31 and len(test_good) == round(0.2 * 31)
    assert len(defects) == 32 and len(masks) == 32
    assert sorted(os.listdir(out / "test")) == ["cracked", "good"]  # the mask's class name names the folder
    # Sorted images and sorted masks pair one to one by stem (anomalib pairs them by sorted order).
    assert [m.name for m in masks] == [f"{d.stem}_mask.png" for d in defects]
    manifest = [json.loads(line) for line in MANIFEST.read_text().splitlines()]
    by_name = {Path(row["source-ref"]).stem: row for row in manifest}
    for image, mask in zip(defects, masks, strict=True):
        original = by_name[image.stem.split("_", 1)[1]]
        assert image.read_bytes() == (FILES / original["source-ref"]).read_bytes()  # bytes unchanged
        with Image.open(mask) as m, Image.open(image) as im:
            assert m.mode == "L" and m.size == im.size
            values = np.asarray(m)
        assert set(np.unique(values)) <= {0, 255} and (values == 255).any()
        # Independent check against the source mask: green at >= half opacity is the defect.
        with Image.open(FILES / original["anomaly-mask-ref"]) as src:
            rgba = np.asarray(src.convert("RGBA"))
        expected = (rgba[..., :3] == GREEN).all(axis=-1) & (rgba[..., 3] >= 128)
        assert np.array_equal(values == 255, expected)
    assert "Attribution-ShareAlike 4.0" in (out / "LICENSE.txt").read_text()
    assert "Cookies, CC BY-SA 4.0" in (out / "README.txt").read_text()
    rows = (out / "import.csv").read_text().splitlines()
    assert len(rows) == 1 + 63 and rows[0].startswith("file,label,defect,mask,manifest,line")
    assert not list(tmp_path.glob(".data.*"))  # no temp folder left behind


def test_split_is_seeded_and_deterministic(tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert _run(tmp_path / name, "--seed", "7") == 0
    assert _run(tmp_path / "c", "--seed", "8", "--test-fraction", "0.2") == 0
    assert dvc_dir_md5(tmp_path / "a") == dvc_dir_md5(tmp_path / "b")
    names = {n: sorted(p.name for p in (tmp_path / n / "test" / "good").iterdir()) for n in "ac"}
    assert len(names["a"]) == len(names["c"]) and names["a"] != names["c"]


def test_s3_refs_map_onto_the_local_folder_and_two_manifests_decide_the_split(tmp_path: Path) -> None:
    lines = [json.loads(line) for line in MANIFEST.read_text().splitlines()]
    normals = [row for row in lines if row["anomaly-label"] == 0]
    anomalies = [row for row in lines if row["anomaly-label"] == 1]
    for row in lines:  # as getting_started.py rewrites them for S3
        row["source-ref"] = "s3://my-bucket/cookies/" + row["source-ref"]
        if "anomaly-mask-ref" in row:
            row["anomaly-mask-ref"] = "s3://my-bucket/cookies/" + row["anomaly-mask-ref"]
    train, test = tmp_path / "train.manifest", tmp_path / "test.manifest"
    train.write_text("".join(json.dumps(r) + "\n" for r in normals[:25] + anomalies[:2]))
    test.write_text("".join(json.dumps(r) + "\n" for r in normals[25:] + anomalies[2:5]))
    out = tmp_path / "data"
    args = [
        "--train-manifest",
        str(train),
        "--test-manifest",
        str(test),
        "--images",
        str(FILES),
        "--out",
        str(out),
    ]
    assert import_lookout.main(args) == 0
    assert len(list((out / "train" / "good").iterdir())) == 25
    assert len(list((out / "test" / "good").iterdir())) == len(normals) - 25
    assert len(list((out / "test" / "cracked").iterdir())) == 5  # anomalies never train
    assert len(list((out / "ground_truth" / "cracked").iterdir())) == 5


def _broken(tmp_path: Path, case: str) -> tuple[Path, Path, int]:
    """A copy of the cookie manifest (and, for the mask case, of its files) broken at one line."""
    lines = MANIFEST.read_text().splitlines()
    images = FILES
    line = 3  # 1-based line that gets broken
    row = json.loads(lines[line - 1])
    if case == "bad_json":
        lines[line - 1] = lines[line - 1][:-5]
    elif case == "missing_file":
        row["source-ref"] = "training-images/no-such-cookie.jpg"
        lines[line - 1] = json.dumps(row)
    elif case == "unknown_label":
        row["anomaly-label"] = 2
        lines[line - 1] = json.dumps(row)
    elif case == "label_contradicts_metadata":
        row["anomaly-label"] = 0
        lines[line - 1] = json.dumps(row)
    elif case == "colour_not_in_map":
        images = tmp_path / "files"
        shutil.copytree(FILES, images)
        mask = images / row["anomaly-mask-ref"]
        with Image.open(mask) as im:
            rgba = np.asarray(im.convert("RGBA")).copy()
        rgba[10:20, 10:20] = (255, 0, 0, 255)  # a red scribble the colour map does not know
        Image.fromarray(rgba, "RGBA").save(mask)
    manifest = tmp_path / "broken.manifest"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, images, line


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("bad_json", "not valid JSON"),
        ("missing_file", "not found"),
        ("unknown_label", "unknown anomaly-label 2"),
        ("label_contradicts_metadata", "class-name"),
        ("colour_not_in_map", "#FF0000"),
    ],
)
def test_malformed_manifest_is_one_line_naming_the_line_and_leaves_data_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, needle: str
) -> None:
    out = tmp_path / "data"
    (out / "train" / "good").mkdir(parents=True)
    (out / "marker.txt").write_text("previous data")
    manifest, images, line = _broken(tmp_path, case)
    capsys.readouterr()
    assert _run(out, manifest=manifest, images=images) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("import_lookout: error: ") and f"{manifest}:{line}" in err and needle in err, err
    assert (out / "marker.txt").read_text() == "previous data"  # atomic: the old folder is untouched
    assert not list(tmp_path.glob(".data.tmp-*"))


def test_partial_masks_and_missing_args_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [json.loads(line) for line in MANIFEST.read_text().splitlines()]
    del lines[4]["anomaly-mask-ref"]
    manifest = tmp_path / "partial.manifest"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    capsys.readouterr()
    assert _run(tmp_path / "data", manifest=manifest) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{manifest}:5" in err and "--no-masks" in err
    assert _run(tmp_path / "data", "--no-masks", manifest=manifest) == 0
    assert not (tmp_path / "data" / "ground_truth").exists()
    assert import_lookout.main(["--images", str(FILES), "--out", str(tmp_path / "x")]) == 1
    assert "--manifest" in capsys.readouterr().err


@pytest.mark.slow  # trains a model (make test-fast skips it)
def test_pipeline_runs_on_the_imported_cookie_set_with_pixel_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """import -> prepare -> train -> evaluate (PaDiM, small params) gives pixel metrics from the masks."""
    import mlflow
    import yaml

    from experiments.evaluate import evaluate
    from experiments.prepare import prepare
    from experiments.train import train

    data = tmp_path / "data"
    assert _run(data, "--seed", "42", "--test-fraction", "0.4") == 0
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"] |= {"root": str(data), "image_size": 64, "max_train": 10_000, "max_test_good": 10_000}
    params["data"]["max_test_defect"] = 10_000
    params["models"] = {"padim": {"layers": ["blocks.1", "blocks.2"], "n_features": 16}}
    params["evaluate"] |= {"n_heatmaps": 2, "latency_repeats": 3}
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    dataset, work = tmp_path / "dataset", tmp_path / "engine"
    report = prepare(params_file, dataset, tmp_path / "report.json")
    assert report["masks"]["selected"] == 32
    train("padim", params, dataset, tmp_path / "models" / "padim", work_dir=work)
    try:
        summary = evaluate("padim", params, dataset, tmp_path / "models", tmp_path / "eval" / "padim")
        metrics = summary["metrics"]
        assert 0.5 < metrics["pixel_AUROC"] <= 1.0 and 0.5 < metrics["image_AUROC"] <= 1.0, metrics
        scored = (tmp_path / "eval" / "padim" / "scores.csv").read_text().splitlines()
        assert scored[0] == "image,label,score" and len(scored) - 1 == summary["n_test_images"]
        (dataset_input,) = mlflow.get_run(summary["run_id"]).inputs.dataset_inputs
        assert dataset_input.dataset.digest == dvc_dir_md5(data) and dataset_input.dataset.name == "data"
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]
