"""Import an Amazon Lookout for Vision (SageMaker Ground Truth) data set into ``data/`` (MVTec AD layout).

Usage::

    python -m experiments.import_lookout --manifest M --images DIR [--out data]
    python -m experiments.import_lookout --train-manifest T --test-manifest S --images DIR [--out data]

Why: Lookout for Vision users already have their images labelled in this format (one JSON object per
line: ``source-ref``, ``anomaly-label`` + ``anomaly-label-metadata``, and for segmentation projects
``anomaly-mask-ref`` + ``anomaly-mask-ref-metadata.internal-color-map``). This turns it into what
``prepare`` reads, without any AWS call:

* ``source-ref`` / ``anomaly-mask-ref`` may be ``s3://bucket/key`` or relative paths; they are found
  under ``--images`` (and ``--masks``, default the same folder) by the longest matching tail of the
  key: ``DIR/<key>``, then ``DIR/<key without its first folder>``, ... down to ``DIR/<file name>``.
* ``anomaly-label`` 0 = normal, 1 = anomaly (Lookout's convention); the metadata's ``class-name``
  must agree when present.
* Normal images: with one ``--manifest`` (no train/test distinction, like Lookout's single-dataset
  projects) a seeded, order-independent share (``--test-fraction``, default 0.2) goes to
  ``test/good``: ranked by sha256(seed + source-ref), so the split does not depend on line order and
  is the same on every machine. With ``--train-manifest``/``--test-manifest`` the manifests decide.
* Anomalies always go to ``test/<defect>`` (training uses normal images only). ``<defect>`` is the
  mask's class name when the mask holds one class, ``combined`` when it holds several, else
  ``anomaly``.
* Masks become binary ``ground_truth/<defect>/<stem>_mask.png`` (0/255, mode L): a pixel is defective
  when its colour is one of the colour map's classes; black, transparent pixels and a class
  named ``BACKGROUND`` are background (anti-aliased edges: a class pixel counts when its alpha is
  at least 128); any other colour is an error (a wrong colour map would
  otherwise silently drop defects). Masks must have their image's size.
* Output names are ``<n>_<original stem>`` with a fixed-width running number ``n``, so image and mask
  sort in the same order whatever the original names (``anomaly-1`` vs ``anomaly-10``) and two files
  with the same name in different S3 folders cannot collide. Image bytes are copied unchanged.
* ``import.csv`` maps every output file to its manifest line and ``source-ref``; ``README.txt`` says
  where the data came from; ``--license FILE`` is copied to ``LICENSE.txt`` and ``--attribution`` is
  written into the README, so a licence travels with the data.
* Atomic: everything is written to a temp sibling of ``--out`` and renamed into place; a bad line
  leaves the previous ``--out`` untouched. Every error names the manifest line and the fix.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.files import atomic_directory
from experiments.runtime import StageError, stage_main

DEFAULT_LABEL_ATTRIBUTE = "anomaly-label"
DEFAULT_MASK_ATTRIBUTE = "anomaly-mask-ref"
DEFAULT_TEST_FRACTION = 0.2
GOOD = "good"
MASK_SUFFIX = "_mask"  # same convention as experiments.data_validation
BACKGROUND_CLASS = "background"
_SAFE = re.compile(r"[^a-z0-9_-]+")


class LookoutImportError(StageError):
    """A manifest line cannot be imported; the message names the line and the fix."""


@dataclass
class Record:
    """One manifest line, resolved to local files."""

    manifest: Path
    line: int
    source_ref: str
    image: Path
    anomalous: bool
    split: str | None  # "train" / "test" from the manifest it came from, None for a single manifest
    mask_ref: str | None = None
    mask: Path | None = None
    colour_map: dict[tuple[int, int, int], str] = field(default_factory=dict)
    background: set[tuple[int, int, int]] = field(default_factory=set)

    @property
    def where(self) -> str:
        return f"{self.manifest}:{self.line}"


def _hex_colour(value: object, where: str) -> tuple[int, int, int]:
    text = str(value).strip().lstrip("#")
    if not re.fullmatch(r"[0-9a-fA-F]{6}", text):
        raise LookoutImportError(
            f"{where}: colour map hex-color {value!r} is not #RRGGBB; fix the manifest's colour map"
        )
    return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)


def resolve_ref(ref: str, roots: Sequence[Path], where: str, what: str) -> Path:
    """Find ``ref`` (``s3://bucket/key`` or a relative path) under one of ``roots`` by its longest tail."""
    key = ref[len("s3://") :].split("/", 1)[1] if ref.startswith("s3://") and "/" in ref[5:] else ref
    parts = [p for p in PurePosixPath(key.lstrip("/")).parts if p not in ("", ".")]
    if not parts or ".." in parts:
        raise LookoutImportError(f"{where}: {what} {ref!r} is not a file path; fix the manifest line")
    tried: list[Path] = []
    for root in roots:
        for start in range(len(parts)):
            candidate = root.joinpath(*parts[start:])
            if candidate.is_file():
                return candidate
            tried.append(candidate)
    raise LookoutImportError(
        f"{where}: {what} {ref!r} not found (looked for {tried[-1]} and {len(tried) - 1} longer paths); "
        f"copy the file there or pass the folder that holds it with --images/--masks"
    )


def _label(obj: Mapping[str, Any], attribute: str, where: str) -> bool:
    if attribute not in obj:
        raise LookoutImportError(
            f"{where}: no {attribute!r} key; every line needs a label (0 normal, 1 anomaly) "
            f"or pass --label-attribute with your labelling job's attribute name"
        )
    value = obj[attribute]
    if (
        isinstance(value, bool)
        or value not in (0, 1)
        or (isinstance(value, float) and not value.is_integer())
    ):
        raise LookoutImportError(
            f"{where}: unknown {attribute} {value!r}; expected 0 (normal) or 1 (anomaly)"
        )
    anomalous = value == 1
    meta = obj.get(f"{attribute}-metadata")
    if isinstance(meta, Mapping) and isinstance(meta.get("class-name"), str):
        name = meta["class-name"].strip().lower()
        expected = "anomaly" if anomalous else "normal"
        if name in ("normal", "anomaly") and name != expected:
            raise LookoutImportError(
                f"{where}: {attribute} is {value} but its metadata class-name is {meta['class-name']!r}; "
                "fix one of them"
            )
    return anomalous


def _colour_map(obj: Mapping[str, Any], attribute: str, where: str) -> tuple[dict, set]:
    meta = obj.get(f"{attribute}-metadata")
    cmap = meta.get("internal-color-map") if isinstance(meta, Mapping) else None
    if not isinstance(cmap, Mapping) or not cmap:
        raise LookoutImportError(
            f"{where}: {attribute} given without {attribute}-metadata.internal-color-map; "
            "add the colour map Ground Truth wrote, or drop masks with --no-masks"
        )
    classes: dict[tuple[int, int, int], str] = {}
    background = {(0, 0, 0)}
    for entry in cmap.values():
        if not isinstance(entry, Mapping) or "hex-color" not in entry:
            raise LookoutImportError(
                f"{where}: colour map entry {entry!r} has no hex-color; fix the manifest"
            )
        colour = _hex_colour(entry["hex-color"], where)
        name = str(entry.get("class-name", "anomaly")).strip()
        if name.lower() == BACKGROUND_CLASS:
            background.add(colour)
        else:
            classes[colour] = name
    background -= set(classes)
    return classes, background


def read_manifest(
    path: Path,
    image_roots: Sequence[Path],
    mask_roots: Sequence[Path],
    split: str | None,
    label_attribute: str = DEFAULT_LABEL_ATTRIBUTE,
    mask_attribute: str = DEFAULT_MASK_ATTRIBUTE,
    use_masks: bool = True,
) -> list[Record]:
    """Parse and resolve every line of one manifest; raise LookoutImportError naming the first bad line."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a BOM from Windows editors
    except (OSError, UnicodeDecodeError) as exc:
        raise LookoutImportError(
            f"{path}: cannot read manifest ({exc}); pass an existing JSON-lines file"
        ) from exc
    records: list[Record] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise LookoutImportError(
                f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); fix or remove the line"
            ) from exc
        if not isinstance(obj, Mapping):
            raise LookoutImportError(f"{where}: expected a JSON object per line, got {type(obj).__name__}")
        ref = obj.get("source-ref")
        if not isinstance(ref, str) or not ref.strip():
            raise LookoutImportError(
                f"{where}: missing 'source-ref' (the image's s3:// or relative path); fix the line"
            )
        anomalous = _label(obj, label_attribute, where)
        record = Record(path, number, ref, resolve_ref(ref, image_roots, where, "image"), anomalous, split)
        mask_ref = obj.get(mask_attribute)
        if use_masks and anomalous and mask_ref is not None:
            if not isinstance(mask_ref, str) or not mask_ref.strip():
                raise LookoutImportError(f"{where}: {mask_attribute} must be a path string, got {mask_ref!r}")
            record.mask_ref = mask_ref
            record.mask = resolve_ref(mask_ref, mask_roots, where, "mask")
            record.colour_map, record.background = _colour_map(obj, mask_attribute, where)
        records.append(record)
    if not records:
        raise LookoutImportError(
            f"{path}: manifest has no lines; pass the manifest Ground Truth or Lookout exported"
        )
    return records


def binary_mask(record: Record, image_size: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    """0/255 mask of ``record.mask`` from its colour map, and the class names present in it."""
    assert record.mask is not None
    try:
        with Image.open(record.mask) as im:
            rgba = np.asarray(im.convert("RGBA"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise LookoutImportError(
            f"{record.where}: mask {record.mask} is unreadable ({exc}); re-export it"
        ) from exc
    height, width = rgba.shape[:2]
    if (width, height) != image_size:
        raise LookoutImportError(
            f"{record.where}: mask {record.mask} is {width}x{height} but its image is "
            f"{image_size[0]}x{image_size[1]}; a mask must cover its image pixel for pixel"
        )
    rgb = rgba[..., :3].reshape(-1, 3).astype(np.uint32)
    # Ground Truth's masks are anti-aliased through alpha (the cookie masks use 255 alpha levels of
    # one green): a pixel belongs to the defect when its class colour is at least half opaque.
    opaque = rgba[..., 3].reshape(-1) >= 128
    # One integer per colour: np.unique on 1-D keys is ~50x faster than on RGB rows.
    keys, inverse = np.unique((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2], return_inverse=True)
    inverse = inverse.reshape(-1)
    visible_keys = set(np.unique(inverse[opaque]).tolist())
    defect = np.zeros(len(keys), dtype=bool)
    present: list[str] = []
    for index, key in enumerate(keys.tolist()):
        colour = (key >> 16, (key >> 8) & 255, key & 255)
        visible = index in visible_keys
        if colour in record.colour_map:
            defect[index] = True
            if visible:
                present.append(record.colour_map[colour])
        elif colour not in record.background and visible:
            hex_colour = "#{:02X}{:02X}{:02X}".format(*colour)
            known = ", ".join(f"#{r:02X}{g:02X}{b:02X}" for r, g, b in record.colour_map)
            raise LookoutImportError(
                f"{record.where}: mask {record.mask} has colour {hex_colour}, which is not in the colour map "
                f"({known}) nor background; add it to internal-color-map or fix the mask"
            )
    mask = (defect[inverse] & opaque).reshape(height, width)
    return (mask.astype(np.uint8) * 255), sorted(set(present))


def _image_size(record: Record) -> tuple[int, int]:
    try:
        with Image.open(record.image) as im:
            im.load()
            return im.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise LookoutImportError(
            f"{record.where}: image {record.image} is unreadable ({exc}); replace the file"
        ) from exc


def _folder_name(name: str) -> str:
    safe = _SAFE.sub("-", name.strip().lower()).strip("-")
    return safe if safe and safe != GOOD else "anomaly"


def split_normals(records: Sequence[Record], seed: int, fraction: float) -> set[str]:
    """source-refs of the normal images held out for test/good (single-manifest case).

    Ranked by sha256(seed:source-ref), so independent of line order; at least one image goes to
    each side when there are two or more normal images (``prepare`` needs both).
    """
    normals = sorted({r.source_ref for r in records if not r.anomalous and r.split is None})
    ranked = sorted(normals, key=lambda ref: (hashlib.sha256(f"{seed}:{ref}".encode()).hexdigest(), ref))
    n_test = round(fraction * len(ranked))
    if len(ranked) >= 2:
        n_test = min(max(n_test, 1), len(ranked) - 1)
    return set(ranked[:n_test])


@dataclass
class Planned:
    record: Record
    rel: str  # output path of the image, relative to the data root
    mask_rel: str | None = None
    mask: np.ndarray | None = None
    defect: str = GOOD


def plan_import(records: Sequence[Record], seed: int, test_fraction: float) -> list[Planned]:
    """Decide every output path; check masks; raise LookoutImportError naming the line on any problem."""
    seen: dict[str, Record] = {}
    for record in records:
        key = str(record.image.resolve())
        if key in seen:
            raise LookoutImportError(
                f"{record.where}: image {record.source_ref!r} is already listed at {seen[key].where}; "
                "remove the duplicate line"
            )
        seen[key] = record
    with_mask = [r for r in records if r.anomalous and r.mask is not None]
    without = [r for r in records if r.anomalous and r.mask is None]
    if with_mask and without:
        raise LookoutImportError(
            f"{without[0].where}: anomaly without a mask while {len(with_mask)} others have masks; "
            " pixel metrics need a mask for every anomaly: add it, or pass --no-masks"
        )
    held_out = split_normals(records, seed, test_fraction)
    width = max(4, len(str(len(records))))
    plan: list[Planned] = []
    for index, record in enumerate(records, start=1):
        stem = f"{index:0{width}d}_{_SAFE.sub('-', record.image.stem).strip('-') or 'image'}"
        suffix = record.image.suffix.lower()
        if not record.anomalous:
            test = record.split == "test" if record.split else record.source_ref in held_out
            plan.append(Planned(record, f"{'test' if test else 'train'}/{GOOD}/{stem}{suffix}"))
            continue
        size = _image_size(record)
        item = Planned(record, "")
        classes: list[str] = []
        if record.mask is not None:
            item.mask, classes = binary_mask(record, size)
        item.defect = (
            _folder_name(classes[0]) if len(classes) == 1 else ("combined" if classes else "anomaly")
        )
        item.rel = f"test/{item.defect}/{stem}{suffix}"
        if item.mask is not None:
            item.mask_rel = f"ground_truth/{item.defect}/{stem}{MASK_SUFFIX}.png"
        plan.append(item)
    folders = {p.rel.rsplit("/", 1)[0] for p in plan}
    for needed, hint in (("train/good", "normal training images"), ("test/good", "normal test images")):
        if needed not in folders:
            raise LookoutImportError(
                f"no {hint} after the import ({needed} would be empty); label more images normal"
                + (" or use --test-fraction" if needed == "test/good" else "")
            )
    if not any(p.record.anomalous for p in plan):
        print(
            "import_lookout: note: no anomalies in the manifest(s); test/ holds normal images only",
            file=sys.stderr,
        )
    return plan


def _png_bytes(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def write_import(
    plan: Sequence[Planned],
    out: Path,
    manifests: Sequence[Path],
    attribution: str | None,
    license_file: Path | None,
) -> dict[str, int]:
    """Write the planned tree atomically into ``out``; return file counts per folder."""
    counts: dict[str, int] = {}
    with atomic_directory(out) as tmp:
        for item in plan:
            target = tmp / item.rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(item.record.image, target)  # bytes unchanged, no re-encoding
            folder = item.rel.rsplit("/", 1)[0]
            counts[folder] = counts.get(folder, 0) + 1
            if item.mask is not None and item.mask_rel is not None:
                (tmp / item.mask_rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / item.mask_rel).write_bytes(_png_bytes(item.mask))
                counts[item.mask_rel.rsplit("/", 1)[0]] = counts.get(item.mask_rel.rsplit("/", 1)[0], 0) + 1
        rows = io.StringIO()
        writer = csv.writer(rows, lineterminator="\n")
        writer.writerow(["file", "label", "defect", "mask", "manifest", "line", "source_ref", "mask_ref"])
        for item in plan:
            r = item.record
            writer.writerow(
                [
                    item.rel,
                    int(r.anomalous),
                    item.defect,
                    item.mask_rel or "",
                    r.manifest.name,
                    r.line,
                    r.source_ref,
                    r.mask_ref or "",
                ]
            )
        (tmp / "import.csv").write_text(rows.getvalue(), encoding="utf-8")
        summary = "\n".join(f"  {folder:<32} {n:5d}" for folder, n in sorted(counts.items()))
        licence = (
            "Licence: see LICENSE.txt.\n" if license_file else "Licence: not given (pass --license FILE).\n"
        )
        readme = (
            "Imported from an Amazon Lookout for Vision / SageMaker Ground Truth manifest by\n"
            "`python -m experiments.import_lookout` (MVTec AD layout; image bytes unchanged; masks made\n"
            "binary from the manifest's colour map). import.csv maps every file to its manifest line.\n\n"
            f"Manifests: {', '.join(m.name for m in manifests)}\n\n{summary}\n\n"
            + (f"{attribution.strip()}\n\n" if attribution else "")
            + licence
        )
        (tmp / "README.txt").write_text(readme, encoding="utf-8")
        if license_file is not None:
            shutil.copyfile(license_file, tmp / "LICENSE.txt")
    return counts


def import_lookout(
    out: Path,
    images: Sequence[Path],
    manifest: Path | None = None,
    train_manifest: Path | None = None,
    test_manifest: Path | None = None,
    masks: Sequence[Path] = (),
    seed: int = 42,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    label_attribute: str = DEFAULT_LABEL_ATTRIBUTE,
    mask_attribute: str = DEFAULT_MASK_ATTRIBUTE,
    use_masks: bool = True,
    attribution: str | None = None,
    license_file: Path | None = None,
) -> dict[str, int]:
    """Import one manifest (seeded split) or a train + test pair into ``out``; return counts per folder."""
    if (manifest is None) == (train_manifest is None and test_manifest is None):
        raise LookoutImportError(
            "pass either --manifest, or --train-manifest (and optionally --test-manifest)"
        )
    if manifest is None and train_manifest is None:
        raise LookoutImportError(
            "--test-manifest needs --train-manifest (normal training images come from it)"
        )
    if not 0.0 < test_fraction < 1.0:
        raise LookoutImportError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    for folder in (*images, *masks):
        if not folder.is_dir():
            raise LookoutImportError(
                f"{folder}: image folder not found; pass the folder the manifest's files are in"
            )
    if license_file is not None and not license_file.is_file():
        raise LookoutImportError(
            f"{license_file}: licence file not found; pass an existing file to --license"
        )
    mask_roots = list(masks) or list(images)
    sources = (
        [(manifest, None)]
        if manifest is not None
        else [(train_manifest, "train"), *([(test_manifest, "test")] if test_manifest else [])]
    )
    records: list[Record] = []
    for path, split in sources:
        assert path is not None
        records += read_manifest(path, images, mask_roots, split, label_attribute, mask_attribute, use_masks)
    plan = plan_import(records, seed, test_fraction)
    return write_import(plan, out, [p for p, _ in sources if p is not None], attribution, license_file)


def _default_seed() -> int:
    """``seed`` of params.yaml (the single place for knobs) when readable, else 42."""
    from config.params import ParamsError, load_params
    from config.paths import PARAMS_FILE

    try:
        return load_params(PARAMS_FILE).need("seed")
    except ParamsError:
        return 42


@stage_main("import_lookout", LookoutImportError)
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, help="one manifest; normal images are split seeded")
    parser.add_argument("--train-manifest", type=Path, help="Lookout's training manifest")
    parser.add_argument("--test-manifest", type=Path, help="Lookout's test manifest")
    parser.add_argument(
        "--images", type=Path, action="append", required=True, help="folder with the images (repeatable)"
    )
    parser.add_argument(
        "--masks", type=Path, action="append", default=[], help="folder with the masks (default: --images)"
    )
    parser.add_argument("--out", type=Path, default=Path("data"))
    parser.add_argument("--seed", type=int, default=None, help="split seed (default: params.yaml seed)")
    parser.add_argument(
        "--test-fraction", type=float, default=DEFAULT_TEST_FRACTION, help="normal images held out"
    )
    parser.add_argument("--label-attribute", default=DEFAULT_LABEL_ATTRIBUTE)
    parser.add_argument("--mask-attribute", default=DEFAULT_MASK_ATTRIBUTE)
    parser.add_argument("--no-masks", action="store_true", help="ignore masks (image-level labels only)")
    parser.add_argument("--attribution", default=None, help="credit/licence line written into README.txt")
    parser.add_argument("--license", type=Path, default=None, help="licence file copied to LICENSE.txt")
    args = parser.parse_args(argv)
    counts = import_lookout(
        args.out,
        args.images,
        manifest=args.manifest,
        train_manifest=args.train_manifest,
        test_manifest=args.test_manifest,
        masks=args.masks,
        seed=_default_seed() if args.seed is None else args.seed,
        test_fraction=args.test_fraction,
        label_attribute=args.label_attribute,
        mask_attribute=args.mask_attribute,
        use_masks=not args.no_masks,
        attribution=args.attribution,
        license_file=args.license,
    )
    summary = ", ".join(f"{folder} {n}" for folder, n in sorted(counts.items()))
    print(f"import_lookout: wrote {args.out} ({summary}); run `dvc add {args.out}` to track it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
