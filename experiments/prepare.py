"""DVC stage ``prepare``: validate ``data/`` and copy a deterministic subset into ``build/dataset/``.

Reads ``seed`` and ``data.*`` from params.yaml, validates every image (and mask) of ``data/`` with
``experiments.data_validation`` (exit 1 with one message naming the offending file or folder),
splits it with ``plan_splits`` (train / validation / test, disjoint, seeded) and writes::

    build/dataset/train/good/                 training normals
    build/dataset/val/good/, val/<defect>/    validation: sets the threshold and normalisation
    build/dataset/test/good/, test/<defect>/  scored; no test/<defect> = synthetic anomalies
    build/dataset/ground_truth/<val|test>/<defect>/<image stem>.png   masks, under the image's own stem

Masks are written under their image's exact stem because anomalib pairs masks with images by
sorted order: ``anomaly-1_mask`` sorts after ``anomaly-19_mask`` while ``anomaly-1`` sorts before
``anomaly-10``, so source names would be mis-paired. ``build/prepare/report.json`` lists which
images set the threshold (val) and which are scored (test). Every image is written as the shared
pre-processing (:func:`core.preprocess.fit_image`: bit-depth rule, then ``data.resize`` to
``image_size``) makes it, masks with the same geometry (:func:`~core.preprocess.fit_mask`), so
the models train on exactly the pixels serving will feed them; an 8-bit grey/RGB file that already
has that size is copied byte for byte (its pixels are the same).
The output is byte-identical across runs (no timestamps, sorted everything).

Usage: ``python -m experiments.prepare [--params params.yaml]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from config.params import load_params
from core.files import atomic_directory
from core.preprocess import PreprocessError, fit_image, fit_mask
from experiments.artifacts import DATASET_DIR, PREPARE_REPORT
from experiments.data_validation import (
    DataValidationError,
    SplitPlan,
    check_image,
    check_mask,
    dvc_dir_md5,
    plan_splits,
    recorded_md5,
    scan_layout,
)
from experiments.runtime import stage_main


def _needs_rewrite(src: Path, size: int) -> bool:
    """False when ``fit_image`` would return the file's own pixels (8-bit L/RGB at ``size``)."""
    with Image.open(src) as im:
        return not (im.mode in ("L", "RGB") and im.size == (size, size))


def _write_file(src: Path, dest: Path, size: int, resize: str, is_mask: bool = False) -> None:
    """Write ``src`` as the model will see it (``fit_image``/``fit_mask``) as a PNG at ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        try:
            pixels = fit_mask(im, size, resize) if is_mask else fit_image(im, size, resize)
        except PreprocessError as exc:
            raise DataValidationError(f"{src}: {exc}") from exc
    if (
        pixels.ndim == 3
        and (pixels[:, :, 0] == pixels[:, :, 1]).all()
        and (pixels[:, :, 1] == pixels[:, :, 2]).all()
    ):
        pixels = pixels[:, :, 0]  # grey: anomalib's RGB conversion replicates it back, same pixels
    Image.fromarray(pixels).save(dest, format="PNG")


def _destinations(plan: SplitPlan) -> dict[str, str]:
    """Source path (relative to data/) -> path under build/dataset, keeping the file name."""
    dest: dict[str, str] = {}
    for group, paths in plan.groups().items():
        split = {"train": "train", "val_good": "val", "val_defect": "val"}.get(group, "test")
        for rel in paths:
            category = Path(rel).parent.name  # "good" for train/test normals, else the defect
            dest[rel] = f"{split}/{category}/{Path(rel).name}"
    if len(set(dest.values())) != len(dest):  # e.g. train/good/a.png and test/good/a.png both in test
        seen: dict[str, str] = {}
        for rel, target in dest.items():
            if target in seen:
                raise DataValidationError(
                    f"{rel} and {seen[target]} would both become build/dataset/{target}; rename one"
                )
            seen[target] = rel
    return dest


def files_sha256(paths: list[str]) -> str:
    """sha256 of the sorted, newline-joined relative paths: a short id of a split's membership."""
    return hashlib.sha256("\n".join(sorted(paths)).encode("utf-8")).hexdigest()


def prepare(params_path: Path, out: Path, report_path: Path) -> dict[str, Any]:
    """Run the stage; return the report (also written to ``report_path``)."""
    params = load_params(params_path)
    p, seed = params.need("data"), params.need("seed")
    root, resize = Path(p.root), p.resize
    layout = scan_layout(root)
    progress = tqdm(layout.images(), desc="validate", unit="img", mininterval=1.0)
    infos = {rel: check_image(root / rel) for rel in progress}
    for image, mask in layout.masks.items():
        check_mask(root / mask, infos[image])

    plan = plan_splits(layout, p, seed)
    destinations = _destinations(plan)
    chosen = list(destinations)
    sizes = sorted({infos[rel].size for rel in chosen})
    rewrite = {rel for rel in chosen if _needs_rewrite(root / rel, p.image_size)}
    resize_to = p.image_size if rewrite else None

    files: list[str] = []
    split_files: dict[str, list[str]] = {}
    with atomic_directory(out) as tmp:
        for rel in tqdm(chosen, desc="copy", unit="img", mininterval=1.0):
            dest = destinations[rel]
            if rel in rewrite:
                dest = Path(dest).with_suffix(".png").as_posix()
                _write_file(root / rel, tmp / dest, p.image_size, resize)
            else:
                (tmp / dest).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / rel, tmp / dest)  # bytes unchanged: already model pixels
            files.append(dest)
            split_files.setdefault(dest.split("/", 1)[0], []).append(dest)
            if rel in layout.masks:
                split, category = Path(dest).parts[:2]
                mask_rel = f"ground_truth/{split}/{category}/{Path(dest).stem}.png"
                _write_file(root / layout.masks[rel], tmp / mask_rel, p.image_size, resize, is_mask=True)
                files.append(mask_rel)

    def by_folder(paths: list[str]) -> dict[str, int]:
        return dict(sorted(Counter(Path(rel).parent.as_posix() for rel in paths).items()))

    dvc_file = root.parent / f"{root.name}.dvc"
    recorded, actual = recorded_md5(dvc_file), dvc_dir_md5(root)
    if recorded is not None and recorded != actual:
        warning = f"prepare: warning: {root} (md5 {actual}) differs from {dvc_file} ({recorded})"
        print(warning, file=sys.stderr)
    report = {
        "data_root": root.as_posix(),
        "data_version": actual,  # DVC md5 of data/; equals data.dvc's md5 when in sync
        "data_dvc_md5": recorded,
        "params": {
            "seed": seed,
            "image_size": p.image_size,
            "max_train": p.max_train,
            "max_test_good": p.max_test_good,
            "max_test_defect": p.max_test_defect,
            "max_val_good": p.max_val_good,
            "val_defect_ratio": p.val_defect_ratio,
        },
        # Which images set the threshold/normalisation (val) and which are scored (test): disjoint
        # from each other and from train. "synthetic": no defect images, so the test split gets
        # anomalib's synthetic anomalies on half of test/good.
        "test_set": "synthetic" if plan.synthetic else "real",
        "splits": {
            split: {
                "count": len(paths),
                "sha256": files_sha256(paths),
                "files": sorted(paths) if split != "train" else None,
            }
            for split, paths in sorted(split_files.items())
        },
        "sources": {group: len(paths) for group, paths in plan.groups().items()},
        "available": by_folder(layout.images()),
        "selected": by_folder(list(destinations.values())),  # folders of build/dataset
        "masks": {"available": len(layout.masks), "selected": sum(rel in layout.masks for rel in chosen)},
        "sizes_seen": dict(sorted(Counter(info.size for info in infos.values()).items())),
        "modes_seen": dict(sorted(Counter(info.mode for info in infos.values()).items())),
        "selected_sizes": sizes,
        "resized_to": resize_to,  # null: bytes copied unchanged (all chosen images were model-ready)
        "resize": resize,
        "rewritten": len(rewrite),
        "files": sorted(files),
    }
    report_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_report = report_path.with_name(f".{report_path.name}.tmp-{os.getpid()}")
    tmp_report.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp_report, report_path)
    return report


@stage_main("prepare", DataValidationError)
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=Path(DATASET_DIR))
    parser.add_argument("--report", type=Path, default=Path(PREPARE_REPORT))
    args = parser.parse_args(argv)
    report = prepare(args.params, args.out, args.report)
    selected = ", ".join(f"{k} {v}" for k, v in report["selected"].items())
    print(f"prepare: {args.out}: {selected}; data_version {report['data_version']}; report {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
