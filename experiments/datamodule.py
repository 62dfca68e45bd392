"""The anomalib datamodule over ``build/dataset``, built one way only, with explicit splits.

Train and evaluate must see the *same* splits: anomalib learns the image threshold and the
min/max normalisation on the validation split during ``fit`` and stores them in the checkpoint,
and evaluate scores the test split. Both splits are folders written by ``prepare`` (disjoint,
seeded), so the validation images are never the scored ones (no peeking)::

    <root>/train/good/                       training normals
    <root>/val/good/, <root>/val/<defect>/   validation (threshold, normalisation); defects optional
    <root>/test/good/, <root>/test/<defect>/ scored; without any test/<defect>, anomalib's
                                             synthetic anomalies on half of test/good (labelled so)
    <root>/ground_truth/<val|test>/<defect>/<image stem>.png   optional masks, all-or-nothing

Masks carry their image's exact stem; anomalib pairs them by sorted order, which is then the same
order, and :func:`_check_pairs` refuses any other pairing instead of trusting it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config.params import Params, as_params

if TYPE_CHECKING:
    from anomalib.data import Folder

DATASET_NAME = "inspection"


class DatasetLayoutError(RuntimeError):
    """``build/dataset`` does not have the layout the pipeline expects."""


def defect_dirs(root: Path, split: str = "test") -> list[str]:
    """Relative paths of the defect folders under ``<split>/`` (every folder except ``good``), sorted."""
    folder = root / split
    dirs = (
        sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name != "good") if folder.is_dir() else []
    )
    return [f"{split}/{name}" for name in dirs]


def mask_dirs(root: Path, split: str = "test") -> list[str]:
    """``ground_truth/<split>/<defect>`` for every defect folder of ``split``, or ``[]`` without masks.

    Partial masks are an error: anomalib pairs masks with images by sorted order, so a missing
    folder would silently shift every pairing.
    """
    gt = root / "ground_truth"
    if not gt.is_dir():
        return []
    wanted = [f"ground_truth/{d}" for d in defect_dirs(root, split)]
    missing = [d for d in wanted if not (root / d).is_dir()]
    if missing:
        raise DatasetLayoutError(f"{gt} exists but has no mask folder(s) {missing}")
    return wanted


def has_masks(root: Path) -> bool:
    """True when the scored split has pixel masks (real defects with masks, or synthetic anomalies)."""
    return bool(mask_dirs(root)) or is_synthetic(root)


def is_synthetic(root: Path) -> bool:
    """No defect images at all: the test split is made of anomalib's synthetic anomalies."""
    return not defect_dirs(root, "test")


def check_layout(root: Path) -> None:
    """Fail early, naming the folder, instead of deep inside anomalib's dataframe code."""
    for rel in ("train/good", "val/good", "test/good"):
        folder = root / rel
        if not folder.is_dir() or not any(folder.iterdir()):
            raise DatasetLayoutError(
                f"{folder} is missing or empty (run the prepare stage: dvc repro prepare)"
            )


def _check_pairs(dataset: Any) -> None:
    """Each anomalous sample's mask must carry exactly its image's stem (anomalib checks a substring)."""
    frame = dataset.samples
    if "mask_path" not in frame:
        return
    for image, mask in zip(frame.image_path, frame.mask_path, strict=True):
        if mask and Path(mask).stem != Path(image).stem:
            raise DatasetLayoutError(f"mask {mask} paired with image {image}: names differ (re-run prepare)")


def _folder_dataset(root: Path, split: str) -> Any:
    """Normal + defect images (and masks) of ``<root>/<split>/`` as an anomalib test-type dataset."""
    from anomalib.data.datasets import FolderDataset
    from anomalib.data.utils import Split

    dataset = FolderDataset(
        name=DATASET_NAME,
        split=Split.TEST,
        root=root,
        normal_dir="train/good",  # only the TRAIN split would use it; it is filtered out here
        normal_test_dir=f"{split}/good",
        abnormal_dir=defect_dirs(root, split) or None,
        mask_dir=mask_dirs(root, split) or None,
    )
    _check_pairs(dataset)
    return dataset


def build_datamodule(params: Params | Mapping[str, Any], root: Path) -> Folder:
    """The pipeline's datamodule: batch sizes, workers and seed come from ``params``, splits from folders."""
    from anomalib.data import Folder
    from anomalib.data.datasets import FolderDataset
    from anomalib.data.utils import Split

    root = Path(root)
    check_layout(root)
    params = as_params(params)
    train = params.train

    class _SplitFolders(Folder):
        """``Folder`` whose validation split is ``val/`` (never the scored ``test/``)."""

        def _setup(self, _stage: str | None = None) -> None:
            self.train_data = FolderDataset(
                name=DATASET_NAME, split=Split.TRAIN, root=root, normal_dir="train/good"
            )
            self.val_data = _folder_dataset(root, "val")
            self.test_data = _folder_dataset(root, "test")

    return _SplitFolders(
        name=DATASET_NAME,
        root=root,
        normal_dir="train/good",
        train_batch_size=train.batch_size,
        eval_batch_size=train.batch_size,
        num_workers=train.num_workers,
        val_split_mode="from_dir",  # val_data is set by _setup
        # from_dir keeps test/ as is; synthetic replaces it with anomalies painted on half of test/good
        test_split_mode="synthetic" if is_synthetic(root) else "from_dir",
        seed=params.need("seed"),
    )


def split_record(datamodule: Any, root: Path) -> dict[str, Any]:
    """Which images set the threshold (val) and which were scored (test): counts, names and a hash.

    Synthetic anomalous images live in a temporary folder and are named by index, so for them the
    record lists the normal source images of ``test/good`` instead.
    """
    import hashlib

    def describe(frame: Any, base: Path | None) -> dict[str, Any]:
        paths = [Path(p).resolve() for p in frame.image_path]
        names = sorted(
            p.relative_to(base).as_posix() if base and p.is_relative_to(base) else p.name for p in paths
        )
        labels = [int(x) for x in frame.label_index]
        return {
            "n_normal": labels.count(0),
            "n_anomalous": labels.count(1),
            "sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
            "files": names,
        }

    root = Path(root).resolve()
    test = describe(datamodule.test_data.samples, root)
    if is_synthetic(root):
        sources = sorted(f"test/good/{p.name}" for p in (root / "test" / "good").iterdir())
        test |= {"files": sources, "sha256": hashlib.sha256("\n".join(sources).encode()).hexdigest()}
    return {
        "test_set": "synthetic" if is_synthetic(root) else "real",
        "threshold_set_by": describe(datamodule.val_data.samples, root),
        "scored": test,
    }
