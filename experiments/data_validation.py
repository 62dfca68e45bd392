"""Validation of ``data/`` (MVTec AD layout) and the split plan, as pure, typed functions.

(The ``data`` params are typed once, in :class:`config.params.DataSection`.)

Why a separate module: the ``prepare`` stage, the tests and any later tool (e.g. a data check in CI)
need the same rules, and every rule must fail with one message that names the offending file or
folder, so a broken data set is fixed in minutes rather than debugged inside a training run.

Decisions (also recorded in ``build/prepare/report.json``):

* Images may differ in size and aspect ratio: ``prepare`` writes every image through
  :func:`core.preprocess.fit_image` (policy ``data.resize``), the function serving uses too.
* Images must be in a mode :mod:`core.preprocess` has a rule for (8/16-bit grey, RGB, palette,
  alpha, CMYK...; 16-bit is scaled by its range, never clipped) and at least ``MIN_SIDE`` pixels on
  each side; anything else is an error naming the file.
* Masks (``ground_truth/<defect>/<stem>_mask.png``, or ``<stem>.png``) are optional but
  all-or-nothing: either no masks at all, or one per defect image, paired by name (never by sorted
  order). Partial masks would make pixel metrics silently wrong.
* Only ``train/good`` is required: without ``test/`` (the usual first day, before any defect has
  been collected) normal test images are held out from ``train/good`` and the pipeline evaluates on
  synthetic anomalies (see ``plan_splits``).
* Subsets are chosen by ranking sha256(seed + relative path), ties broken by name: deterministic,
  independent of file-system order and of Python's RNG, and stable when files are added.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from PIL import Image, UnidentifiedImageError

from config.params import DataSection
from core.preprocess import SUPPORTED_MODES, PreprocessError, to_float_rgb

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MIN_SIDE = 32
GOOD = "good"
MASK_SUFFIX = "_mask"
# PIL modes accepted for images: those the shared pre-processing has a rule for.
IMAGE_MODES = SUPPORTED_MODES
MASK_MODES = ("1", "L", "P")
_TOP_LEVEL = ("train", "test", "ground_truth")


class DataValidationError(ValueError):
    """``data/`` is unusable; the message names the offending file or folder."""


@dataclass(frozen=True)
class ImageInfo:
    """What ``check_image`` learned about one image."""

    width: int
    height: int
    mode: str

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass
class DataLayout:
    """Relative (posix) paths of the images of an MVTec AD folder, each list sorted."""

    train_good: list[str] = field(default_factory=list)
    test_good: list[str] = field(default_factory=list)
    test_defect: dict[str, list[str]] = field(default_factory=dict)  # defect category -> images
    masks: dict[str, str] = field(default_factory=dict)  # defect image -> its mask

    def images(self) -> list[str]:
        defects = [p for cat in sorted(self.test_defect) for p in self.test_defect[cat]]
        return [*self.train_good, *self.test_good, *defects]

    def defect_images(self) -> list[str]:
        return [p for cat in sorted(self.test_defect) for p in self.test_defect[cat]]


def _visible(entries: Iterable[Path]) -> list[Path]:
    """Hidden entries (.DS_Store, editor files) are not data; everything else is checked."""
    return sorted((p for p in entries if not p.name.startswith(".")), key=lambda p: p.name)


def _list_images(folder: Path, root: Path) -> list[str]:
    """Images of one category folder; any other visible entry is an error (it is a mistake)."""
    images: list[str] = []
    stems: dict[str, Path] = {}
    for entry in _visible(folder.iterdir()):
        if entry.is_dir():
            raise DataValidationError(f"unexpected folder {entry} (category folders hold image files only)")
        if entry.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataValidationError(
                f"unexpected file {entry} (not an image; expected one of {', '.join(IMAGE_EXTENSIONS)})"
            )
        if entry.stem in stems:
            raise DataValidationError(f"duplicate image name {entry} (same stem as {stems[entry.stem]})")
        stems[entry.stem] = entry
        images.append(entry.relative_to(root).as_posix())
    return images


def _require_dir(path: Path, hint: str = "") -> None:
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "not found"
        raise DataValidationError(f"{path}: {what}{hint}")


def scan_layout(root: Path) -> DataLayout:
    """Check the folder structure and list the images; does not open any image."""
    _require_dir(root, " (run `python -m experiments.make_data` or `dvc pull`)")
    for entry in _visible(root.iterdir()):
        if entry.is_dir() and entry.name not in _TOP_LEVEL:
            raise DataValidationError(f"unexpected folder {entry} (expected only {', '.join(_TOP_LEVEL)})")
    layout = DataLayout()

    train = root / "train"
    _require_dir(train)
    for entry in _visible(train.iterdir()):
        if entry.name != GOOD:
            raise DataValidationError(f"unexpected entry {entry} (train/ holds only good/: unsupervised)")
    _require_dir(train / GOOD)
    layout.train_good = _list_images(train / GOOD, root)
    if not layout.train_good:
        raise DataValidationError(f"{train / GOOD}: no training images")

    test = root / "test"
    if test.exists():  # optional: without it, test normals are held out from train/good
        _require_dir(test)
        for entry in _visible(test.iterdir()):
            if not entry.is_dir():
                raise DataValidationError(f"unexpected file {entry} (test/ holds category folders only)")
            if entry.name == GOOD:
                layout.test_good = _list_images(entry, root)
            else:
                layout.test_defect[entry.name] = _list_images(entry, root)
                if not layout.test_defect[entry.name]:
                    raise DataValidationError(f"{entry}: empty defect folder (remove it or add its images)")

    gt = root / "ground_truth"
    if gt.exists():
        _require_dir(gt)
        layout.masks = _scan_masks(gt, root, layout)
    return layout


def _scan_masks(gt: Path, root: Path, layout: DataLayout) -> dict[str, str]:
    """Pair ``ground_truth/<defect>/<stem>_mask.png`` (or ``<stem>.png``) with ``test/<defect>/<stem>.*``.

    Pairing is by exact stem, so ``anomaly-1_mask`` can only belong to ``anomaly-1`` whatever the
    sort order of the names; a mask name that fits two images (``a`` and ``a_mask``) is an error.
    """
    masks: dict[str, str] = {}
    for category in _visible(gt.iterdir()):
        if not category.is_dir():
            raise DataValidationError(f"unexpected file {category} (ground_truth/ holds defect folders only)")
        if category.name == GOOD:
            raise DataValidationError(f"{category}: normal images have no masks")
        images = {Path(p).stem: p for p in layout.test_defect.get(category.name, [])}
        for mask in _list_images(category, root):
            stem = Path(mask).stem
            candidates = [stem, stem[: -len(MASK_SUFFIX)]] if stem.endswith(MASK_SUFFIX) else [stem]
            matches = [images[c] for c in candidates if c in images]
            if not matches:
                expected = root / "test" / category.name / f"{candidates[-1]}.png"
                raise DataValidationError(
                    f"{root / mask}: mask without image (no {expected}; "
                    f"name masks <image stem>{MASK_SUFFIX}.png)"
                )
            if len(matches) > 1:
                raise DataValidationError(
                    f"{root / mask}: ambiguous mask name, fits both {matches[0]} and {matches[1]}"
                )
            if matches[0] in masks:
                raise DataValidationError(
                    f"{root / mask}: second mask for {root / matches[0]} ({masks[matches[0]]})"
                )
            masks[matches[0]] = mask
    if masks:
        for image in layout.defect_images():
            if image not in masks:
                img = Path(image)
                expected = root / "ground_truth" / img.parent.name / f"{img.stem}{MASK_SUFFIX}.png"
                raise DataValidationError(
                    f"{root / image}: defect image without mask (masks are all-or-nothing; no {expected})"
                )
    return masks


def check_image(path: Path) -> ImageInfo:
    """Fully decode one image (a header check misses truncated files) and check mode and size."""
    try:
        with Image.open(path) as im:
            im.verify()  # checksums (PNG CRCs) without decoding
        with Image.open(path) as im:
            im.load()  # decodes every pixel: catches truncation and broken compressed data
            info = ImageInfo(im.width, im.height, im.mode)
            if im.mode in ("I", "F"):  # modes whose pixel range is only known after decoding
                to_float_rgb(im)
    except PreprocessError as exc:
        raise DataValidationError(f"{path}: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataValidationError(f"{path}: unreadable or corrupt image ({exc})") from exc
    if info.mode not in IMAGE_MODES:
        raise DataValidationError(
            f"{path}: unsupported image mode {info.mode!r} (save it as 8/16-bit grayscale or RGB PNG)"
        )
    if min(info.width, info.height) < MIN_SIDE:
        raise DataValidationError(f"{path}: image is {info.size}, smaller than {MIN_SIDE} px on a side")
    return info


def check_mask(path: Path, image: ImageInfo) -> None:
    """A mask must decode, be single-channel and match its image's size pixel for pixel."""
    try:
        with Image.open(path) as im:
            im.load()
            mode, width, height = im.mode, im.width, im.height
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataValidationError(f"{path}: unreadable or corrupt mask ({exc})") from exc
    if mode not in MASK_MODES:
        raise DataValidationError(f"{path}: mask mode {mode!r} is not single-channel (expected 1, L or P)")
    if (width, height) != (image.width, image.height):
        raise DataValidationError(f"{path}: mask is {width}x{height} but its image is {image.size}")


def _ranked(paths: Sequence[str], seed: int, salt: str = "") -> list[str]:
    """``paths`` in the order of sha256(salt + seed + path), ties by name."""
    return sorted(paths, key=lambda p: (hashlib.sha256(f"{salt}{seed}:{p}".encode()).hexdigest(), p))


def select_subset(paths: Sequence[str], k: int, seed: int) -> list[str]:
    """Deterministically choose ``min(k, len(paths))`` paths; returned sorted by name."""
    return sorted(_ranked(paths, seed)[:k])


#: At most this share of train/good is held out for validation (and again for testing, when
#: data/ has no test/good), so that small folders still leave most images for training.
HOLDOUT_SHARE = 0.2


@dataclass(frozen=True)
class SplitPlan:
    """Which source images go where; every list sorted, the lists pairwise disjoint.

    ``val_*`` set the threshold and the min/max normalisation, ``test_*`` are scored, and neither
    is ever trained on. ``synthetic`` means there is no defect image: the test split gets anomalib's
    synthetic anomalies painted on half of ``test_good``.
    """

    train: list[str]
    val_good: list[str]
    val_defect: list[str]
    test_good: list[str]
    test_defect: list[str]

    @property
    def synthetic(self) -> bool:
        return not self.test_defect

    def groups(self) -> dict[str, list[str]]:
        return {
            "train": self.train,
            "val_good": self.val_good,
            "val_defect": self.val_defect,
            "test_good": self.test_good,
            "test_defect": self.test_defect,
        }


def plan_splits(layout: DataLayout, p: DataSection, seed: int) -> SplitPlan:
    """Split deterministically (hash ranking, see ``select_subset``) into train / val / test.

    * val normals: ``min(max_val_good, 20 % of train/good)`` held-out train/good images;
    * test normals: ``max_test_good`` of test/good, or, without test/good, another held-out 20 % of
      train/good (at most ``max_test_good``);
    * train: up to ``max_train`` of what is left of train/good;
    * defects: ``max_test_defect`` chosen, of which a seeded ``val_defect_ratio`` share goes to
      validation (so that the F1 threshold can be learned) and the rest is scored; with ratio 0 the
      validation split is normal-only and the threshold is a normal quantile.
    """
    pool = _ranked(layout.train_good, seed, "split:")
    share = max(1, int(len(pool) * HOLDOUT_SHARE))
    n_val = min(p.max_val_good, share)
    val_good, pool = pool[:n_val], pool[n_val:]
    if layout.test_good:
        test_good = select_subset(layout.test_good, p.max_test_good, seed)
    else:
        n_test = min(p.max_test_good, share)
        test_good, pool = pool[:n_test], pool[n_test:]
    train = pool[: p.max_train]
    if not train:
        raise DataValidationError(
            f"{Path(p.root) / 'train' / GOOD}: {len(layout.train_good)} image(s) are too few to hold out "
            "validation "
            f"{'' if layout.test_good else 'and test '}normals and still train (need at least "
            f"{2 if layout.test_good else 3})"
        )
    if not layout.defect_images() and len(test_good) < 2:
        where = Path(p.root) / ("test" if layout.test_good else "train") / GOOD
        raise DataValidationError(
            f"{where}: {len(test_good)} normal test image(s); without defect images the test split "
            "paints synthetic anomalies on half of them, so it needs at least 2 (add images or raise "
            "data.max_test_good)"
        )
    defects = select_subset(layout.defect_images(), p.max_test_defect, seed)
    n_val_defect = min(round(len(defects) * p.val_defect_ratio), max(len(defects) - 1, 0))
    val_defect = sorted(_ranked(defects, seed, "val:")[:n_val_defect])
    test_defect = sorted(set(defects) - set(val_defect))
    return SplitPlan(sorted(train), sorted(val_good), val_defect, sorted(test_good), test_defect)


def dvc_dir_md5(root: Path) -> str:
    """The md5 that ``dvc add`` records for a directory (DVC 3 ``.dir`` hash).

    md5(json.dumps(sorted [{"md5": <file md5>, "relpath": <posix path>}], sort_keys=True)) + ".dir".
    Computed here instead of calling DVC so that it needs no DVC lock or cache write (other DVC
    commands may be running in the same repo); a test checks it against dvc-data itself.
    """
    files = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            files[path.relative_to(root).as_posix()] = path
    return dir_md5(files)


def dir_md5(files: Mapping[str, Path | bytes]) -> str:
    """The DVC ``.dir`` md5 of a folder given as ``{relative posix path: file or its bytes}``.

    Lets make_data know the md5 of the folder it would write before writing it.
    """
    entries = []
    for rel, source in files.items():
        digest = hashlib.md5()
        if isinstance(source, bytes):
            digest.update(source)
        else:
            with open(source, "rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    digest.update(chunk)
        entries.append({"md5": digest.hexdigest(), "relpath": rel})
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def recorded_md5(dvc_file: Path) -> str | None:
    """The md5 of the (single) output recorded in a ``.dvc`` file, or None if there is none."""
    if not dvc_file.is_file():
        return None
    meta = yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}
    outs = meta.get("outs") or []
    return outs[0].get("md5") if outs else None
