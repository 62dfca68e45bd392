"""``tools.score_folder``: offline batch scoring with the serving Scorer."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from config.paths import REPO_ROOT as REPO
from core.scoring import Scorer
from tools.score_folder import CSV_FIELDS, main
from tools.tiny_model import elpv_samples


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three real ELPV cells (one in a sub-folder, one as JPEG), a corrupt PNG, a truncated JPEG, a note."""
    normal, defect = elpv_samples(2, 1)
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    shutil.copy(normal[0], root / "a_good.png")
    Image.open(normal[1]).convert("RGB").save(root / "b_good.jpg", quality=95)
    shutil.copy(defect[0], root / "sub" / "c_defect.png")
    (root / "d_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    jpeg = (root / "b_good.jpg").read_bytes()
    (root / "e_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "notes.txt").write_text("not an image, not scored")
    return root


def read_rows(out: Path) -> list[dict[str, str]]:
    with (out / "results.csv").open() as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == CSV_FIELDS
        return list(reader)


def test_scores_every_image_and_reports_failures(
    folder: Path, tmp_path: Path, serving_model_dir: Path
) -> None:
    out = tmp_path / "out"
    code = main([str(folder), "--out", str(out), "--model-dir", str(serving_model_dir), "--recursive"])
    assert code == 1  # some files failed, the run still finished

    rows = {r["file"]: r for r in read_rows(out)}
    assert set(rows) == {"a_good.png", "b_good.jpg", "sub/c_defect.png", "d_corrupt.png", "e_truncated.jpg"}
    scorer = Scorer.from_dir(serving_model_dir)
    for name in ("a_good.png", "b_good.jpg", "sub/c_defect.png"):
        row = rows[name]
        assert row["error"] == ""
        assert row["model_version"] == scorer.metadata.registry_version
        assert float(row["threshold"]) == scorer.threshold
        # Same score as the Lambda's Scorer gives for the same file.
        expected = scorer.score(Image.open(folder / name).convert("RGB"))
        assert float(row["score"]) == pytest.approx(expected.score, abs=1e-5)
        assert row["is_anomalous"] == str(expected.is_anomalous).lower()
        overlay = out / row["overlay"]
        with Image.open(overlay) as im, Image.open(folder / name) as src:
            assert im.size == src.size
    for name in ("d_corrupt.png", "e_truncated.jpg"):
        assert rows[name]["error"] and rows[name]["score"] == "" and rows[name]["overlay"] == ""


def test_cli_non_recursive_all_good(folder: Path, tmp_path: Path, serving_model_dir: Path) -> None:
    for bad in ("d_corrupt.png", "e_truncated.jpg"):
        (folder / bad).unlink()
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "tools.score_folder", str(folder), "--out", str(out)]
    proc = subprocess.run(
        [*cli, "--model-dir", str(serving_model_dir), "--no-overlays"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "scored 2, failed 0" in proc.stderr
    rows = read_rows(out)
    assert [r["file"] for r in rows] == ["a_good.png", "b_good.jpg"]
    assert all(r["overlay"] == "" for r in rows) and not (out / "overlays").exists()


def test_refuses_without_images_or_model(tmp_path: Path, serving_model_dir: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--out", str(tmp_path / "o"), "--model-dir", str(serving_model_dir)]) == 2
    (empty / "x.png").write_bytes(b"x")
    assert main([str(empty), "--out", str(tmp_path / "o"), "--model-dir", str(tmp_path / "no-model")]) == 2
