"""Data part: make_data (ELPV -> data/), data_validation and the prepare stage. Offline, seconds."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from PIL import Image

from config.params import ParamsError, as_params, load_params
from config.paths import REPO_ROOT as REPO
from experiments import make_data, prepare
from experiments.data_validation import (
    dvc_dir_md5,
    recorded_md5,
    scan_layout,
    select_subset,
)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _png(path: Path, size: tuple[int, int] = (64, 64), mode: str = "L", value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode in ("L", "1", "P") else (value,) * len(mode)
    Image.new(mode, size, colour).save(path, format="PNG")
    return path


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """A tiny valid MVTec folder: 8 train/good, 4 test/good, 5 test/defect, 64x64 grayscale."""
    root = tmp_path / "data"
    for i in range(8):
        _png(root / "train/good" / f"n{i:03d}.png", value=i)
    for i in range(4):
        _png(root / "test/good" / f"t{i:03d}.png", value=100 + i)
    for i in range(5):
        _png(root / "test/defect" / f"d{i:03d}.png", value=200 + i)
    (root / "README.txt").write_text("root-level files are ignored\n")
    return root


def _params(tmp_path: Path, root_dir: Path, /, **data: object) -> Path:
    values = {
        "root": str(root_dir),
        "image_size": 64,
        "max_train": 5,
        "max_test_good": 3,
        "max_test_defect": 3,
    }
    values.update(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"seed": 42, "data": values}))
    return path


def _run_prepare(tmp_path: Path, params: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    out, report = tmp_path / "out/dataset", tmp_path / "out/r.json"
    rc = prepare.main(["--params", str(params), "--out", str(out), "--report", str(report)])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


# --- make_data ---------------------------------------------------------------------------------


def test_make_data_is_deterministic_and_idempotent(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert make_data.main(["--out", str(a), "--limit", "4"]) == 0
    assert make_data.main(["--out", str(b), "--limit", "4"]) == 0
    tree = _tree(a)
    assert tree == _tree(b)
    assert {k.rsplit("/", 1)[0] for k in tree if "/" in k} == {"train/good", "test/good", "test/defect"}
    assert sum(k.startswith("test/defect/") for k in tree) == 4
    assert {"LICENSE.txt", "README.txt", "labels.csv"} <= set(tree)
    assert "CC BY-NC-SA 4.0" in tree["LICENSE.txt"].decode()
    # bytes are the wheel's bytes, unchanged
    source = make_data.package_data_dir() / "images"
    for rel, content in tree.items():
        if rel.endswith(".png"):
            assert content == (source / Path(rel).name).read_bytes()
    # re-running changes nothing (not even mtimes); no temp folders are left behind
    mtimes = {p: p.stat().st_mtime_ns for p in a.rglob("*")}
    assert make_data.materialise(a, limit=4) is False
    assert mtimes == {p: p.stat().st_mtime_ns for p in a.rglob("*")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_make_data_repairs_a_modified_folder(tmp_path: Path) -> None:
    out = tmp_path / "d"
    make_data.main(["--out", str(out), "--limit", "2"])
    expected = _tree(out)
    (out / "test/good/extra.png").write_bytes(b"junk")
    next(iter((out / "train/good").iterdir())).write_bytes(b"changed")
    assert make_data.materialise(out, limit=2) is True
    assert _tree(out) == expected


def test_class_rules_leave_out_ambiguous_cells() -> None:
    cells = make_data.read_labels(make_data.package_data_dir())
    plan = make_data.plan_layout(cells)
    by_name = {c.name: c for c in cells}
    for rel, cell in plan.items():
        if rel.startswith("test/defect/"):
            assert cell.probability >= 2 / 3
        else:
            assert cell.probability == 0
    left_out = set(by_name) - {Path(rel).name for rel in plan}
    assert left_out and all(float(by_name[n].probability) == pytest.approx(1 / 3) for n in left_out)
    normal = [c for c in cells if c.probability == 0]
    share = sum(make_data.is_test_normal(c.name) for c in normal) / len(normal)
    assert 0.15 < share < 0.25


def test_dvc_md5_matches_dvc_itself(tmp_path: Path) -> None:
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    out = tmp_path / "d"
    make_data.main(["--out", str(out), "--limit", "3"])
    fs = LocalFileSystem()
    _, _, obj = build(HashFileDB(fs, str(tmp_path / "odb")), str(out), fs, "md5", dry_run=True)
    assert dvc_dir_md5(out) == obj.hash_info.value


def test_make_data_checks_the_dvc_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d"
    assert make_data.main(["--out", str(out), "--limit", "2"]) == 0
    dvc_file = tmp_path / "d.dvc"
    dvc_file.write_text(f"outs:\n- md5: {dvc_dir_md5(out)}\n  path: d\n")
    assert make_data.main(["--out", str(out), "--limit", "2"]) == 0
    assert "matches" in capsys.readouterr().out
    # A file lost from the embedded set is repaired, and the md5 checked again.
    next(iter((out / "train/good").iterdir())).unlink()
    assert make_data.main(["--out", str(out), "--limit", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    # The md5 make_data predicts without writing is the md5 of what it writes.
    assert make_data.embedded_md5(2) == dvc_dir_md5(out)


def test_make_data_never_replaces_the_users_tracked_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make setup` runs make_data; a user who ran `dvc add data` on their own images keeps them."""
    out = tmp_path / "d"
    (out / "train" / "good").mkdir(parents=True)
    (out / "train" / "good" / "mine.png").write_bytes(b"the user's own image")
    dvc_file = tmp_path / "d.dvc"
    dvc_file.write_text(f"outs:\n- md5: {dvc_dir_md5(out)}\n  path: d\n")
    before = _tree(out)
    assert make_data.main(["--out", str(out), "--limit", "2"]) == 0
    assert "nothing written" in capsys.readouterr().out
    assert _tree(out) == before
    # Edited since `dvc add`: still left alone, with the commands that fix it.
    (out / "train" / "good" / "mine.png").write_bytes(b"edited")
    assert make_data.main(["--out", str(out), "--limit", "2"]) == 1
    err = capsys.readouterr().err
    assert "tracks other data" in err and "dvc checkout --force" in err and "differs" in err
    assert (out / "train" / "good" / "mine.png").read_bytes() == b"edited"
    # Missing (a fresh clone before `dvc pull`): nothing written, told to pull.
    import shutil

    shutil.rmtree(out)
    assert make_data.main(["--out", str(out), "--limit", "2"]) == 1
    assert "is missing" in capsys.readouterr().err and not out.exists()


def test_full_default_data_matches_committed_data_dvc(tmp_path: Path) -> None:
    """The default (no --limit) materialisation is exactly what data.dvc records."""
    out = tmp_path / "data"
    make_data.materialise(out)
    counts = {f: len(list((out / f).iterdir())) for f in ("train/good", "test/good", "test/defect")}
    assert counts == {"train/good": 1205, "test/good": 303, "test/defect": 821}
    assert dvc_dir_md5(out) == recorded_md5(REPO / "data.dvc")


# --- params ------------------------------------------------------------------------------------


def test_load_params_reads_the_repo_params() -> None:
    params = load_params(REPO / "params.yaml").need("data")
    assert params.image_size % 32 == 0 and Path(params.root) == Path("data")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_train": -1}, "data.max_train: must be an integer >= 1 (got -1)"),
        ({"max_test_good": 0}, "data.max_test_good: must be an integer >= 1 (got 0)"),
        ({"max_test_defect": "10"}, "data.max_test_defect: must be an integer >= 1 (got '10')"),
        ({"image_size": 100}, "data.image_size: must be an integer >= 32 and a multiple of 32 (got 100)"),
        ({"image_size": 0}, "data.image_size: must be an integer >= 32 and a multiple of 32 (got 0)"),
        ({"image_size": True}, "data.image_size: must be an integer >= 32 and a multiple of 32 (got True)"),
        ({"root": ""}, "data.root: must be a non-empty path (got '')"),
    ],
)
def test_bad_params_fail_naming_the_key(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str], change: dict, message: str
) -> None:
    rc, output = _run_prepare(tmp_path, _params(tmp_path, data_root, **change), capsys)
    assert rc == 1
    assert message in output


def test_missing_params_sections(tmp_path: Path) -> None:
    data = {"root": "data", "image_size": 64, "max_train": 5, "max_test_good": 3, "max_test_defect": 3}
    with pytest.raises(ParamsError, match="missing seed"):
        as_params({"data": data}).need("seed")
    with pytest.raises(ParamsError, match="'data' section"):
        as_params({"seed": 1}).need("data")
    with pytest.raises(ParamsError, match=r"missing data\.max_train"):
        as_params({"seed": 1, "data": {"root": "data", "image_size": 64}})
    with pytest.raises(ParamsError, match=r"nope\.yaml"):
        load_params(tmp_path / "nope.yaml")


# --- data validation ---------------------------------------------------------------------------


def _corrupt(root: Path) -> Path:
    path = root / "train/good/n003.png"
    path.write_bytes(b"this is not a png")
    return path


def _truncated(root: Path) -> Path:
    path = root / "test/good/t001.png"
    Image.effect_noise((128, 128), 64).save(path)  # noise: compressed data spans the whole file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _mask_without_image(root: Path) -> Path:
    return _png(root / "ground_truth/defect/zzz_mask.png")


def _empty_train(root: Path) -> Path:
    for p in (root / "train/good").iterdir():
        p.unlink()
    return root / "train/good"


def _missing_train(root: Path) -> Path:
    for p in (root / "train/good").iterdir():
        p.unlink()
    (root / "train/good").rmdir()
    return root / "train/good"


def _missing_root(root: Path) -> Path:
    for p in sorted(root.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    root.rmdir()
    return root


def _wide_int(root: Path) -> Path:
    """A 32-bit integer TIFF whose values are not 16-bit data: no rule maps it to [0, 1]."""
    import numpy as np

    path = root / "test/defect/d001.tif"
    (root / "test/defect/d001.png").unlink()
    Image.fromarray(np.full((64, 64), 70000, np.int32)).save(path)
    return path


def _tiny(root: Path) -> Path:
    return _png(root / "train/good/n000.png", size=(16, 64))


def _not_an_image(root: Path) -> Path:
    path = root / "test/defect/notes.txt"
    path.write_text("x")
    return path


def _partial_masks(root: Path) -> Path:
    _png(root / "ground_truth/defect/d000_mask.png")
    return root / "test/defect/d001.png"


def _mask_wrong_size(root: Path) -> Path:
    for i in range(5):
        _png(root / f"ground_truth/defect/d{i:03d}_mask.png")
    return _png(root / "ground_truth/defect/d002_mask.png", size=(32, 32))


def _no_defects(root: Path) -> Path:
    for p in (root / "test/defect").iterdir():
        p.unlink()
    return root / "test"


@pytest.mark.parametrize(
    ("breaker", "message"),
    [
        (_corrupt, "unreadable or corrupt image"),
        (_truncated, "unreadable or corrupt image"),
        (_mask_without_image, "mask without image"),
        (_empty_train, "no training images"),
        (_missing_train, "not found"),
        (_missing_root, "not found"),
        (_wide_int, "is not 16-bit data"),
        (_tiny, "smaller than 32 px"),
        (_not_an_image, "not an image"),
        (_partial_masks, "defect image without mask"),
        (_mask_wrong_size, "mask is 32x32 but its image is 64x64"),
        (_no_defects, "empty defect folder"),
    ],
)
def test_validation_failures_name_the_file(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str], breaker, message: str
) -> None:
    offending = breaker(data_root)
    rc, output = _run_prepare(tmp_path, _params(tmp_path, data_root), capsys)
    assert rc == 1
    assert message in output
    assert str(offending) in output
    assert output.count("prepare: error:") == 1
    assert not (tmp_path / "out/dataset").exists()


def test_scan_layout_lists_sorted_relative_paths(data_root: Path) -> None:
    layout = scan_layout(data_root)
    assert layout.train_good == [f"train/good/n{i:03d}.png" for i in range(8)]
    assert layout.defect_images() == [f"test/defect/d{i:03d}.png" for i in range(5)]
    assert layout.masks == {}


# --- subset + prepare --------------------------------------------------------------------------


def test_select_subset_is_deterministic() -> None:
    names = [f"train/good/cell{i:04d}.png" for i in range(200)]
    chosen = select_subset(names, 20, seed=42)
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    assert select_subset(shuffled, 20, seed=42) == chosen == sorted(chosen)
    assert len(set(chosen)) == 20 and set(chosen) <= set(names)
    assert select_subset(names, 20, seed=43) != chosen
    assert select_subset(names, 500, seed=42) == names
    # adding files keeps most of the previous choice (ranking, not a reshuffle)
    grown = select_subset([*names, *(f"train/good/new{i}.png" for i in range(10))], 20, seed=42)
    assert len(set(grown) & set(chosen)) >= 15


def test_prepare_output_and_report(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = _params(tmp_path, data_root)
    rc, _ = _run_prepare(tmp_path, params, capsys)
    assert rc == 0
    out, report_path = tmp_path / "out/dataset", tmp_path / "out/r.json"
    first_tree, first_report = _tree(out), report_path.read_bytes()
    report = json.loads(first_report)
    assert report["available"] == {"test/defect": 5, "test/good": 4, "train/good": 8}
    # 1 of 8 train/good held out for validation (20 %), 2 of the 3 chosen defects (val_defect_ratio 0.5)
    assert report["selected"] == {
        "test/defect": 1,
        "test/good": 3,
        "train/good": 5,
        "val/defect": 2,
        "val/good": 1,
    }
    assert report["test_set"] == "real"
    assert report["splits"]["val"]["files"] == sorted(f for f in first_tree if f.startswith("val/"))
    assert report["splits"]["train"]["count"] == 5 and report["splits"]["train"]["files"] is None
    assert report["sizes_seen"] == {"64x64": 17} and report["modes_seen"] == {"L": 17}
    assert report["resized_to"] is None and report["selected_sizes"] == ["64x64"]
    assert report["data_version"] == dvc_dir_md5(data_root) and report["data_dvc_md5"] is None
    assert report["params"]["seed"] == 42
    assert report["files"] == sorted(first_tree)
    sources = {p.name: p.read_bytes() for p in data_root.rglob("*.png")}
    for rel in report["files"]:  # copied byte for byte, file name kept
        assert first_tree[rel] == sources[Path(rel).name]
    assert "timestamp" not in first_report.decode() and str(tmp_path) in report["data_root"]

    # byte-identical on a second run
    assert _run_prepare(tmp_path, params, capsys)[0] == 0
    assert _tree(out) == first_tree and report_path.read_bytes() == first_report
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dataset", "r.json"]

    # data version comes from <root>.dvc when present
    (data_root.parent / "data.dvc").write_text(f"outs:\n- md5: {dvc_dir_md5(data_root)}\n  path: data\n")
    assert _run_prepare(tmp_path, params, capsys)[0] == 0
    assert json.loads(report_path.read_text())["data_dvc_md5"] == dvc_dir_md5(data_root)


def test_prepare_resizes_mixed_sizes_and_copies_masks(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _png(data_root / "train/good/n000.png", size=(96, 80))
    _png(data_root / "test/defect/d000.png", size=(96, 80), mode="RGB")
    for i in range(5):
        size = (96, 80) if i == 0 else (64, 64)
        _png(data_root / f"ground_truth/defect/d{i:03d}_mask.png", size=size, value=255)
    params = _params(tmp_path, data_root, max_train=8, max_test_defect=5)
    rc, output = _run_prepare(tmp_path, params, capsys)
    assert rc == 0, output
    report = json.loads((tmp_path / "out/r.json").read_text())
    assert report["resized_to"] == 64
    assert report["selected_sizes"] == ["64x64", "96x80"]
    assert report["masks"] == {"available": 5, "selected": 5}
    out = tmp_path / "out/dataset"
    sizes = set()
    for rel in report["files"]:
        with Image.open(out / rel) as im:
            sizes.add(im.size)
    assert sizes == {(64, 64)}
    # masks carry their image's own stem, in the split the image went to
    masks = sorted(p.relative_to(out).as_posix() for p in (out / "ground_truth").rglob("*.png"))
    images = sorted(p.relative_to(out).as_posix() for p in out.glob("*/defect/*.png"))
    assert masks == [f"ground_truth/{rel}" for rel in images] and len(masks) == 5


def test_interrupted_make_data_leaves_no_half_written_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "d"
    make_data.materialise(out, limit=2)
    before = _tree(out)
    (out / "README.txt").write_bytes(b"stale")  # force a rewrite
    before["README.txt"] = b"stale"
    calls = {"n": 0}
    real_copy = make_data.shutil.copyfile

    def flaky_copy(src, dst):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_copy(src, dst)

    monkeypatch.setattr(make_data.shutil, "copyfile", flaky_copy)
    with pytest.raises(KeyboardInterrupt):
        make_data.materialise(out, limit=2)
    assert _tree(out) == before  # old folder untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # temp folder cleaned up
    monkeypatch.undo()
    # a leftover from a killed run (dead pid) is removed by the next run
    (tmp_path / ".d.tmp-999999999").mkdir()
    assert make_data.materialise(out, limit=2) is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
