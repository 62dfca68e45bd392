"""Materialise the default data set into ``data/`` (MVTec AD layout) from the ``elpv-dataset`` wheel.

Source: the ELPV data set (Buerhop-Lutz, Deitsch et al., "A Benchmark for Visual Identification of
Defective Solar Cells in Electroluminescence Imagery", EU PVSEC 2018), shipped on PyPI as the
``elpv-dataset`` wheel (package dir ``elpv_dataset/data``: ``images/*.png``, 300x300 8-bit grayscale,
and ``labels.csv`` = ``path  defect_probability  mono|poly``).

Licence: the images and labels are licensed under Creative Commons Attribution-NonCommercial-ShareAlike
4.0 International (CC BY-NC-SA 4.0, https://creativecommons.org/licenses/by-nc-sa/4.0/). Non-commercial
use only; ``data/LICENSE.txt`` and ``data/README.txt`` carry the attribution with the data.

Rules (kept here, in one place):

* normal    = defect probability 0      -> ``train/good`` (~80 %) or ``test/good`` (~20 %);
* defective = defect probability >= 2/3 -> ``test/defect``;
* ambiguous = defect probability 1/3    -> left out (neither clearly normal nor clearly defective,
  so they would only add label noise to an unsupervised benchmark).

The train/test split of normal cells is a stable hash of the file name (sha256), not a random draw,
so it is identical on every machine and does not depend on the order of ``labels.csv``. PNG bytes
are copied unchanged (no re-encoding), so the folder and its DVC md5 are byte-identical everywhere.

The folder is written to a temporary sibling and renamed into place, so an interrupted run never
leaves a half-written ``data/``. Re-running on a correct ``data/`` touches nothing. When ``data.dvc``
exists next to the output folder, the folder's DVC md5 is checked against it.

Usage: ``python -m experiments.make_data [--out data] [--limit N]``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from core.files import atomic_directory
from experiments.data_validation import dir_md5, dvc_dir_md5, recorded_md5
from experiments.runtime import stage_main

PACKAGE = "elpv_dataset"
DISTRIBUTION = "elpv-dataset"
TEST_PERCENT = 20  # share of normal cells held out for testing
_TOL = 1e-6

LICENSE_TEXT = """\
The images in this folder are from the ELPV data set ("elpv-dataset" on PyPI,
https://github.com/zae-bayern/elpv-dataset), copyright the ELPV authors
(Buerhop-Lutz, Deitsch, Maier, Gallwitz, Berger, Doll, Hauch, Camus, Brabec et al.).

They are licensed under the Creative Commons Attribution-NonCommercial-ShareAlike 4.0
International License (CC BY-NC-SA 4.0):
https://creativecommons.org/licenses/by-nc-sa/4.0/
https://creativecommons.org/licenses/by-nc-sa/4.0/legalcode

Non-commercial use only. For commercial use, contact the ELPV authors.

Changes made: a subset of the cells was selected and the files were arranged into
folders (MVTec AD layout); the image files themselves are byte-for-byte unchanged.
This folder, as a whole, is shared under the same licence (CC BY-NC-SA 4.0).
"""


@dataclass(frozen=True)
class Cell:
    """One row of the wheel's labels.csv."""

    name: str  # file name, e.g. "cell0001.png"
    source: Path  # absolute path of the PNG inside the installed wheel
    probability: Fraction  # 0, 1/3, 2/3 or 1
    cell_type: str  # "mono" or "poly"


def package_data_dir() -> Path:
    """Locate ``elpv_dataset/data`` in the installed wheel without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"make_data: the {DISTRIBUTION} wheel is not installed (pip install {DISTRIBUTION})")
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not (data_dir / "labels.csv").is_file():
        raise SystemExit(f"make_data: {data_dir / 'labels.csv'} missing from the {DISTRIBUTION} wheel")
    return data_dir


def _parse_probability(text: str, where: str) -> Fraction:
    """Map the float in labels.csv to an exact fraction, so the class rules have no float edge cases."""
    value = float(text)
    for known in (Fraction(0), Fraction(1, 3), Fraction(2, 3), Fraction(1)):
        if abs(value - float(known)) < _TOL:
            return known
    raise ValueError(f"{where}: unexpected defect probability {text!r} (expected 0, 1/3, 2/3 or 1)")


def read_labels(data_dir: Path) -> list[Cell]:
    """Parse labels.csv (whitespace separated: path, probability, type; no header)."""
    labels = data_dir / "labels.csv"
    cells: list[Cell] = []
    for lineno, line in enumerate(labels.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        where = f"{labels}:{lineno}"
        if len(parts) != 3:
            raise ValueError(f"{where}: expected 3 columns (path probability type), got {len(parts)}")
        rel, prob, cell_type = parts
        if cell_type not in ("mono", "poly"):
            raise ValueError(f"{where}: unexpected cell type {cell_type!r}")
        source = data_dir / rel
        if not source.is_file():
            raise ValueError(f"{where}: image {source} is missing from the wheel")
        cells.append(Cell(Path(rel).name, source, _parse_probability(prob, where), cell_type))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise ValueError(f"{labels}: duplicate file names")
    return sorted(cells, key=lambda c: c.name)


def is_test_normal(name: str) -> bool:
    """Stable ~20 % hold-out of normal cells: sha256 of the file name, so it is machine-independent."""
    bucket = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % 100
    return bucket < TEST_PERCENT


def plan_layout(cells: Iterable[Cell], limit: int | None = None) -> dict[str, Cell]:
    """Map relative output path -> source cell. ``limit`` caps each folder (for fast tests only)."""
    folders: dict[str, list[Cell]] = {"train/good": [], "test/good": [], "test/defect": []}
    for cell in cells:
        if cell.probability == 0:
            folders["test/good" if is_test_normal(cell.name) else "train/good"].append(cell)
        elif cell.probability >= Fraction(2, 3):
            folders["test/defect"].append(cell)
        # probability 1/3: ambiguous, deliberately left out
    plan: dict[str, Cell] = {}
    for folder, members in folders.items():
        for cell in members[:limit] if limit is not None else members:
            plan[f"{folder}/{cell.name}"] = cell
    return plan


def _version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - wheel located but no metadata
        return "unknown"


def text_files(plan: dict[str, Cell], cells: list[Cell], limit: int | None) -> dict[str, bytes]:
    """README.txt, LICENSE.txt and labels.csv (provenance of every file); deterministic, no timestamps."""
    folders = ("train/good", "test/good", "test/defect")
    counts = {f: sum(1 for p in plan if p.startswith(f + "/")) for f in folders}
    ambiguous = sum(1 for c in cells if c.probability == Fraction(1, 3))
    limited = f" Limited to {limit} per folder (test build)." if limit is not None else ""
    readme = f"""\
Solar-cell electroluminescence images in MVTec AD layout, generated by
`python -m experiments.make_data` from the PyPI wheel {DISTRIBUTION}=={_version()}
(https://pypi.org/project/{DISTRIBUTION}/, https://github.com/zae-bayern/elpv-dataset).

Licence: CC BY-NC-SA 4.0 (non-commercial) - see LICENSE.txt.

  train/good   {counts["train/good"]:5d}  normal cells (defect probability 0), training pool
  test/good    {counts["test/good"]:5d}  normal cells held out (sha256(file name) % 100 < {TEST_PERCENT})
  test/defect  {counts["test/defect"]:5d}  defective cells (defect probability 2/3 or 1)

Left out: {ambiguous} cells with defect probability 1/3 (ambiguous).{limited}
No pixel masks: ELPV has image-level labels only.
labels.csv lists every file with its original defect probability and module type.

Please cite: Buerhop-Lutz, C.; Deitsch, S.; Maier, A.; Gallwitz, F.; Berger, S.; Doll, B.;
Hauch, J.; Camus, C. & Brabec, C. J. A Benchmark for Visual Identification of Defective Solar
Cells in Electroluminescence Imagery. EU PVSEC 2018. DOI: 10.4229/35thEUPVSEC20182018-5CV.3.15
"""
    rows = ["file,probability,type"]
    for rel, cell in sorted(plan.items()):
        rows.append(f"{rel},{cell.probability},{cell.cell_type}")
    return {
        "README.txt": readme.encode("utf-8"),
        "LICENSE.txt": LICENSE_TEXT.encode("utf-8"),
        "labels.csv": ("\n".join(rows) + "\n").encode("utf-8"),
    }


def _existing_files(root: Path) -> tuple[set[str], set[str]]:
    files: set[str] = set()
    dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).as_posix()
        for d in dirnames:
            dirs.add(d if rel == "." else f"{rel}/{d}")
        for f in filenames:
            files.add(f if rel == "." else f"{rel}/{f}")
    return files, dirs


def is_up_to_date(out: Path, plan: dict[str, Cell], texts: dict[str, bytes]) -> bool:
    """True if ``out`` holds exactly the planned files with exactly the planned bytes."""
    if not out.is_dir():
        return False
    files, dirs = _existing_files(out)
    expected = set(plan) | set(texts)
    expected_dirs = {"train", "train/good", "test", "test/good", "test/defect"}
    if files != expected or dirs != expected_dirs:
        return False
    for rel, content in texts.items():
        if (out / rel).read_bytes() != content:
            return False
    for rel, cell in plan.items():
        target = out / rel
        if target.stat().st_size != cell.source.stat().st_size:
            return False
        if target.read_bytes() != cell.source.read_bytes():
            return False
    return True


def _write_tree(tmp: Path, plan: dict[str, Cell], texts: dict[str, bytes]) -> None:
    for folder in ("train/good", "test/good", "test/defect"):
        (tmp / folder).mkdir(parents=True, exist_ok=True)
    for rel, content in texts.items():
        (tmp / rel).write_bytes(content)
    for rel, cell in sorted(plan.items()):
        shutil.copyfile(cell.source, tmp / rel)  # bytes unchanged, no re-encoding


def embedded_md5(limit: int | None = None) -> str:
    """The DVC md5 the embedded set would have in ``data/``, computed without writing it."""
    cells = read_labels(package_data_dir())
    plan = plan_layout(cells, limit)
    return dir_md5({**{rel: cell.source for rel, cell in plan.items()}, **text_files(plan, cells, limit)})


def materialise(out: Path, limit: int | None = None) -> bool:
    """Create ``out`` atomically; return True if anything was written, False if it was already correct."""
    cells = read_labels(package_data_dir())
    plan = plan_layout(cells, limit)
    texts = text_files(plan, cells, limit)
    if is_up_to_date(out, plan, texts):
        return False
    with atomic_directory(out) as tmp:
        _write_tree(tmp, plan, texts)
    return True


@stage_main("make_data", ValueError, OSError)
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data", help="output folder (default: data)")
    parser.add_argument(
        "--limit", type=int, default=None, help="at most N images per folder (tests only; default: all)"
    )
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    out = Path(args.out)
    dvc_file = out.parent / f"{out.name}.dvc"
    expected = recorded_md5(dvc_file)
    if expected is not None and expected != embedded_md5(args.limit):
        # data.dvc tracks the user's own images: never replace them with the embedded set.
        if out.is_dir() and dvc_dir_md5(out) == expected:
            print(f"make_data: {out} holds the data {dvc_file} tracks (md5 {expected}); nothing written")
            return 0
        print(
            f"make_data: ERROR: {dvc_file} tracks other data than the embedded {DISTRIBUTION} set and {out} "
            f"{'differs from it' if out.exists() else 'is missing'}; nothing written.\n"
            f"  Restore the tracked data with `dvc pull` or `dvc checkout --force {dvc_file}`, "
            f"or record what {out} holds now with `dvc add {out}`.",
            file=sys.stderr,
        )
        return 1

    start = time.perf_counter()
    changed = materialise(out, args.limit)
    counts = {f: len(list((out / f).iterdir())) for f in ("train/good", "test/good", "test/defect")}
    summary = ", ".join(f"{k} {v}" for k, v in counts.items())
    verb = "wrote" if changed else "up to date, nothing changed:"
    print(f"make_data: {verb} {out} ({summary}) in {time.perf_counter() - start:.1f}s")

    if expected is None:
        print(f"make_data: no {dvc_file}; run `dvc add {out}` to track it")
        return 0
    actual = dvc_dir_md5(out)
    if actual != expected:
        print(
            f"make_data: ERROR: {out} has DVC md5 {actual} but {dvc_file} records {expected}.\n"
            f"  The generated data differs from the tracked version (different {DISTRIBUTION} wheel or a "
            f"changed make_data/--limit?).\n"
            f"  If the change is intended, run `dvc add {out}` and commit {dvc_file}; otherwise restore "
            f"the tracked data with `dvc checkout {dvc_file}` (or `dvc pull`).",
            file=sys.stderr,
        )
        return 1
    print(f"make_data: {out} matches {dvc_file} (md5 {actual})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
