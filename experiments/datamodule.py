"""The anomalib ``Folder`` datamodule over ``build/dataset`` (MVTec AD layout), built one way only.

Train and evaluate must see the *same* splits: anomalib learns the image threshold and the
min/max normalisation on the validation split during ``fit`` and stores them in the checkpoint,
so evaluate has to rebuild an identical datamodule (same seed, same split settings) to test on
exactly the held-out remainder.

Layout::

    <root>/train/good/*.png                normal training images
    <root>/test/good/*.png                 normal test images
    <root>/test/<defect>/*.png             one folder per defect type (ELPV: "defect")
    <root>/ground_truth/<defect>/*_mask.png  optional pixel masks, all-or-nothing
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from experiments.config import ParamsError

if TYPE_CHECKING:
    from anomalib.data import Folder

DATASET_NAME = "elpv"
VAL_SPLIT_MODES = ("from_test", "same_as_test", "synthetic")


class DatasetLayoutError(RuntimeError):
    """``build/dataset`` does not have the MVTec layout the pipeline expects."""


def defect_dirs(root: Path) -> list[str]:
    """Relative paths of the defect folders under ``test/`` (every folder except ``good``), sorted."""
    test = root / "test"
    dirs = sorted(p.name for p in test.iterdir() if p.is_dir() and p.name != "good") if test.is_dir() else []
    return [f"test/{name}" for name in dirs]


def mask_dirs(root: Path) -> list[str]:
    """``ground_truth/<defect>`` for every defect folder, or ``[]`` when the data set has no masks.

    Partial masks are an error: anomalib pairs masks with images by sorted order, so a missing
    folder would silently shift every pairing.
    """
    gt = root / "ground_truth"
    if not gt.is_dir():
        return []
    wanted = [f"ground_truth/{Path(d).name}" for d in defect_dirs(root)]
    missing = [d for d in wanted if not (root / d).is_dir()]
    if missing:
        raise DatasetLayoutError(f"{gt} exists but has no mask folder(s) {missing}")
    return wanted


def check_layout(root: Path) -> None:
    """Fail early, naming the folder, instead of deep inside anomalib's dataframe code."""
    for rel in ("train/good", "test/good"):
        folder = root / rel
        if not folder.is_dir() or not any(folder.iterdir()):
            raise DatasetLayoutError(
                f"{folder} is missing or empty (run the prepare stage: dvc repro prepare)"
            )
    if not defect_dirs(root):
        raise DatasetLayoutError(f"{root / 'test'} has no defect folder (e.g. test/defect)")


def build_datamodule(params: Mapping[str, Any], root: Path) -> Folder:
    """The pipeline's datamodule: batch sizes, workers, split and seed all come from ``params``."""
    from anomalib.data import Folder

    root = Path(root)
    check_layout(root)
    train = params.get("train") or {}
    split_mode = train.get("val_split_mode", "from_test")
    if split_mode not in VAL_SPLIT_MODES:
        raise ParamsError(
            f"params.yaml: train.val_split_mode must be one of {VAL_SPLIT_MODES}, got {split_mode!r}"
        )
    split_ratio = train.get("val_split_ratio", 0.5)
    if isinstance(split_ratio, bool) or not isinstance(split_ratio, int | float) or not 0 < split_ratio < 1:
        raise ParamsError(f"params.yaml: train.val_split_ratio must be in (0, 1), got {split_ratio!r}")
    masks = mask_dirs(root)
    return Folder(
        name=DATASET_NAME,
        root=root,
        normal_dir="train/good",
        abnormal_dir=defect_dirs(root),
        normal_test_dir="test/good",
        mask_dir=masks or None,
        train_batch_size=int(train.get("batch_size", 16)),
        eval_batch_size=int(train.get("batch_size", 16)),
        num_workers=int(train.get("num_workers", 0)),
        val_split_mode=split_mode,
        val_split_ratio=float(split_ratio),
        seed=int(params["seed"]),
    )
