"""Score every image in a folder offline with the serving model.

``python -m tools.score_folder IN_DIR --out OUT_DIR [--model-dir DIR] [--recursive] [--no-overlays]``

Uses the same :class:`core.scoring.Scorer` as the Lambda, so offline scores are the ones
production would give (same model file, same pre-processing, same threshold). Writes
``OUT_DIR/results.csv`` with one row per image — ``file, score, is_anomalous, threshold,
model_version, overlay, error`` — and heat-map overlays under ``OUT_DIR/overlays/``. A file
that cannot be read or scored gets a row with ``error`` filled in and the run goes on; rows
are flushed as they are written, so an interrupted run keeps what it did.

Exit code: 0 when every image was scored, 1 when some failed, 2 when nothing could start
(no model, no images). Needs only the serving requirements (no PyYAML, no torch, no tqdm).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from core.contract import ModelMetadataError
from core.scoring import Scorer, ScoringError, overlay

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
CSV_FIELDS = ("file", "score", "is_anomalous", "threshold", "model_version", "overlay", "error")
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "model"


@dataclass(frozen=True)
class Summary:
    """Counts of one run, for the caller and the exit code."""

    scored: int
    failed: int
    anomalous: int
    seconds: float


def find_images(root: Path, *, recursive: bool) -> list[Path]:
    """Image files under ``root`` (by extension, hidden files skipped), in a stable order."""
    candidates = root.rglob("*") if recursive else root.iterdir()
    return sorted(
        p
        for p in candidates
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def load_image(path: Path) -> Image.Image:
    """Open and fully decode an image (Pillow's decompression-bomb limit stays in force).

    The mode is kept (16-bit grey stays 16-bit): the scorer's shared pre-processing applies the
    bit-depth rule; converting to RGB here would clip every 16-bit pixel to white.
    """
    with Image.open(path) as image:
        image.load()
        return image.copy()


class Progress:
    """A stderr counter: rewritten in place on a terminal, one line per ~10% otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.tty = sys.stderr.isatty()
        self.step = max(1, total // 10)

    def update(self, done: int, name: str) -> None:
        if self.tty:
            print(f"\r[{done}/{self.total}] {name[:60]:<60}", end="", file=sys.stderr, flush=True)
        elif done % self.step == 0 or done == self.total:
            print(f"[{done}/{self.total}]", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def score_images(
    scorer: Scorer, root: Path, images: list[Path], out_dir: Path, *, overlays: bool = True
) -> Iterator[dict[str, str]]:
    """Yield one CSV row per image; failures become rows with ``error`` set."""
    version = scorer.metadata.registry_version
    for path in images:
        rel = path.relative_to(root).as_posix()
        row = dict.fromkeys(CSV_FIELDS, "")
        row.update(file=rel, threshold=f"{scorer.threshold:g}", model_version=version)
        try:
            image = load_image(path)
            result = scorer.score(image)
            row.update(score=f"{result.score:.6f}", is_anomalous=str(result.is_anomalous).lower())
            if overlays:
                target = out_dir / "overlays" / Path(rel).with_suffix(".png")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(overlay(image, result.anomaly_map, resize=result.resize))
                row["overlay"] = target.relative_to(out_dir).as_posix()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, ScoringError) as exc:
            row["error"] = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        yield row


def run(
    in_dir: Path, out_dir: Path, scorer: Scorer, *, recursive: bool = False, overlays: bool = True
) -> Summary:
    """Score ``in_dir`` into ``out_dir/results.csv`` (+ overlays) and return the counts."""
    started = time.perf_counter()
    images = find_images(in_dir, recursive=recursive)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress(len(images))
    scored = failed = anomalous = 0
    with (out_dir / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for done, row in enumerate(score_images(scorer, in_dir, images, out_dir, overlays=overlays), 1):
            writer.writerow(row)
            fh.flush()
            if row["error"]:
                failed += 1
            else:
                scored += 1
                anomalous += row["is_anomalous"] == "true"
            progress.update(done, row["file"])
    progress.close()
    return Summary(scored, failed, anomalous, time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see the module docstring for the exit codes)."""
    parser = argparse.ArgumentParser(prog="python -m tools.score_folder", description=__doc__.splitlines()[0])
    parser.add_argument("in_dir", type=Path, help="folder of images")
    parser.add_argument("--out", type=Path, required=True, help="output folder (results.csv, overlays/)")
    parser.add_argument(
        "--model-dir", type=Path, default=Path(os.environ.get("MODEL_DIR") or DEFAULT_MODEL_DIR)
    )
    parser.add_argument("--recursive", action="store_true", help="include sub-folders")
    parser.add_argument("--no-overlays", dest="overlays", action="store_false", help="CSV only")
    args = parser.parse_args(argv)

    if not args.in_dir.is_dir():
        print(f"error: {args.in_dir} is not a folder", file=sys.stderr)
        return 2
    if not find_images(args.in_dir, recursive=args.recursive):
        print(f"error: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {args.in_dir}", file=sys.stderr)
        return 2
    try:
        scorer = Scorer.from_dir(args.model_dir)
    except (ModelMetadataError, ScoringError) as exc:
        print(f"error: cannot load the model: {exc}", file=sys.stderr)
        return 2
    summary = run(args.in_dir, args.out, scorer, recursive=args.recursive, overlays=args.overlays)
    print(
        f"scored {summary.scored}, failed {summary.failed}, anomalous {summary.anomalous} "
        f"in {summary.seconds:.1f}s -> {args.out / 'results.csv'}",
        file=sys.stderr,
    )
    return 1 if summary.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
