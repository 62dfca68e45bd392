"""Accuracy benchmark: the pipeline's own stages on whole data sets, with bootstrap confidence intervals.

Usage::

    python -m benchmarks.accuracy                                  # ELPV (all of it) + cookies, all models
    python -m benchmarks.accuracy --datasets elpv --no-settings    # params.yaml's defaults only
    python -m benchmarks.accuracy --datasets cookies --models padim dfm
    python -m benchmarks.accuracy --datasets elpv --set models.padim.layers='[blocks.2, blocks.4]'
    python -m benchmarks.accuracy --report-only --work build/bench-accuracy   # table from a previous run
    python -m benchmarks.accuracy --datasets cookies --score-split val --set data.image_size=384  # tuning

Tuning (no peeking): ``--score-split val`` scores the *validation* split instead of the test split
(outputs in ``<work>/<data set>/eval-val/``; the table marks such rows ``(val)``). Choose layers,
sizes and models on those figures; report the test split's figures, which the choice never saw.

What it runs: for each data set, the same stage scripts ``dvc repro`` runs (``experiments.prepare``,
``experiments.train <model>``, ``experiments.evaluate <model>``), as subprocesses, with a copy of
``params.yaml`` whose ``data.root`` points at the benchmark's data and whose ``data.max_*`` are large
enough to take every image. Then the data set's entry of ``benchmarks/accuracy_settings.yaml``
(overrides chosen on that data set's validation split: layers, channels, coreset size), then
``--set key=value`` (any knob, to measure a proposal). ``--no-settings`` runs params.yaml's defaults.
MLflow logging stays on, into ``<work>/mlflow.db`` so the project's own store is not touched.

Data sets:

* ``elpv``: ``experiments.make_data`` (the embedded default, CC BY-NC-SA 4.0), all 2,329 images.
* ``cookies``: the Amazon Lookout for Vision cookie sample (CC BY-SA 4.0), imported by
  ``experiments.import_lookout`` with its pixel masks. Found at ``--cookies DIR`` (default
  ``$LOOKOUT_COOKIES_DIR`` or ``../shared/datasets/lookout-cookies``).

Printed per model: image AUROC with a bootstrap 95 % interval (1,000 stratified resamples of the scored
test images, seeded), image F1, pixel AUROC and AU-PRO (as evaluate reports them), train and test time,
peak memory of the train and evaluate processes. Why an interval: a cookie test split has a few dozen
images, where one image moves AUROC by several points; the interval shows what the data can support.
Nothing here asserts: the figures are for docs/accuracy.md and for choosing params.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from config.params import ParamsError, as_params, load_params, read_yaml
from config.paths import PARAMS_FILE, REPO_ROOT

DEFAULT_WORK = REPO_ROOT / "build" / "bench-accuracy"
DATASETS = ("elpv", "cookies")
ALL_IMAGES = 1_000_000  # data.max_* large enough to take every image
DEFAULT_SETTINGS = Path(__file__).resolve().parent / "accuracy_settings.yaml"
COOKIES_ATTRIBUTION = (
    "Amazon Lookout for Vision cookie sample (aws-samples/amazon-lookout-for-vision, "
    "computer-vision-defect-detection/cookie-dataset), CC BY-SA 4.0 - see LICENSE.txt."
)


def bootstrap_auroc_ci(
    labels: Sequence[int], scores: Sequence[float], resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """AUROC and its percentile bootstrap interval: ``(auroc, low, high)``.

    Stratified: each resample draws the normal and the defective images separately with replacement,
    keeping both counts, so every resample has both classes (an unstratified draw of a small test set
    can miss a class and has no AUROC). AUROC is the Mann-Whitney statistic with ties counted half,
    computed from average ranks, identical to ``sklearn.metrics.roc_auc_score``.
    """
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D of equal length, got {y.shape} and {s.shape}")
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUROC needs at least one normal (0) and one defective (1) image")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError("resamples must be >= 1 and level in (0, 1)")
    rng = np.random.default_rng(seed)
    point = _auroc_rows(pos[None, :], neg[None, :])[0]
    boot_pos = pos[rng.integers(0, len(pos), size=(resamples, len(pos)))]
    boot_neg = neg[rng.integers(0, len(neg), size=(resamples, len(neg)))]
    values = _auroc_rows(boot_pos, boot_neg)
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(point), float(low), float(high)


def _auroc_rows(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Row-wise AUROC of ``pos`` (R x P) against ``neg`` (R x N) via average ranks (ties count half)."""
    from scipy.stats import rankdata

    n_pos, n_neg = pos.shape[1], neg.shape[1]
    ranks = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    return (ranks[:, :n_pos].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def histogram_auroc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """AUROC from score histograms on shared ascending bins, row-wise (``pos``, ``neg``: R x B counts).

    A positive in bin b beats every negative in lower bins and ties (counts half) with those in bin b:
    exact for the binned scores, and O(bins) per resample however many pixels there are.
    """
    below = np.cumsum(neg, axis=-1) - neg
    wins = (pos * (below + 0.5 * neg)).sum(axis=-1)
    return wins / (pos.sum(axis=-1) * neg.sum(axis=-1))


def bootstrap_pixel_auroc_ci(
    pos_hist: np.ndarray,
    neg_hist: np.ndarray,
    labels: Sequence[int],
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Pixel AUROC and its bootstrap interval, resampling whole images (stratified by image label).

    ``pos_hist``/``neg_hist`` (images x bins) count each image's defect / normal pixels per score bin.
    Pixels of one image are correlated, so the unit of resampling is the image, as for image AUROC;
    summing histograms keeps memory at images x bins whatever the image size.
    """
    y = np.asarray(labels, dtype=int)
    rng = np.random.default_rng(seed)
    point = float(histogram_auroc(pos_hist.sum(axis=0), neg_hist.sum(axis=0)))
    weights = np.zeros((resamples, len(y)))
    for cls in (0, 1):
        members = np.flatnonzero(y == cls)
        if len(members) == 0:
            continue
        draws = members[rng.integers(0, len(members), size=(resamples, len(members)))]
        for row in range(resamples):
            np.add.at(weights[row], draws[row], 1.0)
    values = histogram_auroc(weights @ pos_hist, weights @ neg_hist)
    tail = (1 - level) / 2
    low, high = np.nanquantile(values, [tail, 1 - tail])
    return point, float(low), float(high)


def pixel_histograms(
    eval_dir: Path, dataset: Path, rows: Sequence[tuple[str, int]], size: int, resize: str, bins: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """Per scored image, histograms of the exported ONNX model's anomaly map over defect and normal pixels.

    Scores the images the way evaluate does (``experiments.evaluate.load_serving_input`` + ONNX
    Runtime, i.e. what serving deploys); masks are prepare's ``ground_truth/<split>/<defect>/<stem>.png``,
    resized to the map with nearest neighbour; normal images have no defect pixels. Maps are anomalib's
    normalised ``[0, 1]`` maps, binned on ``bins`` equal bins.
    """
    from PIL import Image

    from core.scoring import create_session
    from experiments.evaluate import load_serving_input
    from experiments.export import run_ort

    session = create_session(eval_dir / "onnx" / "model.onnx")
    pos = np.zeros((len(rows), bins))
    neg = np.zeros((len(rows), bins))
    for index, (rel, label) in enumerate(rows):
        image = dataset / rel
        x, _ = load_serving_input(image, size, resize)
        amap = np.asarray(run_ort(session, x)["anomaly_map"], dtype=np.float64).reshape(x.shape[-2:])
        binned = np.clip((amap * bins).astype(int), 0, bins - 1).reshape(-1)
        defect = np.zeros(amap.shape, dtype=bool)
        if label == 1:
            # prepare writes each mask under its image's own stem: ground_truth/<split>/<defect>/<stem>.png
            mask_path = dataset / "ground_truth" / Path(rel).parent / f"{image.stem}.png"
            with Image.open(mask_path) as m:
                resized = m.convert("L").resize((amap.shape[1], amap.shape[0]), Image.Resampling.NEAREST)
            defect = np.asarray(resized) > 0
        flat = defect.reshape(-1)
        pos[index] = np.bincount(binned[flat], minlength=bins)
        neg[index] = np.bincount(binned[~flat], minlength=bins)
    return pos, neg


def _set_key(params: dict[str, Any], dotted: str, value: Any, origin: str = "--set") -> None:
    """``models.padim.n_features`` -> params["models"]["padim"]["n_features"] = value."""
    *parents, leaf = dotted.split(".")
    node = params
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise SystemExit(f"accuracy: {origin} {dotted}: {key} is not a mapping in params.yaml")
    node[leaf] = value


def load_settings(path: Path) -> dict[str, dict[str, Any]]:
    """The per-data-set overrides file: ``{data set: {dotted key: value}}``; one-line errors name it."""
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"accuracy: cannot read settings {path}: {exc}".splitlines()[0]) from exc
    if not isinstance(settings, dict) or not all(isinstance(v, dict) for v in settings.values()):
        raise SystemExit(f"accuracy: {path} must map each data set to {{dotted.key: value}}")
    unknown = sorted(set(settings) - set(DATASETS))
    if unknown:
        raise SystemExit(f"accuracy: {path} names unknown data set(s) {unknown}; known: {list(DATASETS)}")
    return settings


def bench_params(
    data_root: Path,
    models: Sequence[str],
    overrides: Sequence[str],
    settings: dict[str, Any] | None = None,
    origin: str = "settings",
) -> dict[str, Any]:
    """params.yaml with data.root -> ``data_root``, every image taken, only ``models``, then the data
    set's ``settings`` (keys under ``models.<m>`` only for models in the run), then ``--set`` overrides."""
    params = read_yaml(PARAMS_FILE)  # a raw mapping: this writes a params file for the stages
    params["data"]["root"] = str(data_root)
    for key in ("max_train", "max_test_good", "max_test_defect"):
        params["data"][key] = ALL_IMAGES
    unknown = [m for m in models if m not in params["models"]]
    if unknown:
        raise SystemExit(f"accuracy: unknown model(s) {unknown}; params.yaml has {list(params['models'])}")
    params["models"] = {m: params["models"][m] for m in models}
    for key, value in (settings or {}).items():
        parts = key.split(".")
        if parts[0] == "models" and len(parts) > 2 and parts[1] not in models:
            continue  # that model is not in this run
        _set_key(params, key, value, origin)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"accuracy: --set {item!r} must be key=value")
        _set_key(params, key, yaml.safe_load(value))
    try:  # a bad override fails here, in params.yaml's own words, not in the middle of a run
        as_params(params)
    except ParamsError as exc:
        raise SystemExit(f"accuracy: {exc}") from None
    return params


def run_stage(args: list[str], log: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run ``python -m <args>`` from the repo root; return (wall seconds, peak RSS MiB of that process)."""
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"\n$ python -m {' '.join(args)}\n")
        out.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", *args], cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8").strip().splitlines()[-1:]
        raise RuntimeError(
            f"python -m {' '.join(args)} failed ({proc.returncode}): {' '.join(tail)}; see {log}"
        )
    return seconds, usage.ru_maxrss / 1024


def cookies_dir(given: Path | None) -> Path:
    candidates = [given] if given else []
    if os.environ.get("LOOKOUT_COOKIES_DIR"):
        candidates.append(Path(os.environ["LOOKOUT_COOKIES_DIR"]))
    candidates.append(REPO_ROOT.parent / "shared" / "datasets" / "lookout-cookies")
    candidates.append(Path("/work/shared/datasets/lookout-cookies"))
    for path in candidates:
        if path and (path / "dataset-files" / "manifests" / "template.manifest").is_file():
            return path
    raise SystemExit("accuracy: cookie data set not found; pass --cookies DIR (the lookout-cookies folder)")


def materialise(name: str, data: Path, log: Path, env: dict[str, str], args: argparse.Namespace) -> None:
    """Write the data set into ``data`` with the project's own commands."""
    if name == "elpv":
        run_stage(["experiments.make_data", "--out", str(data)], log, env)
        return
    root = cookies_dir(args.cookies)
    run_stage(
        [
            "experiments.import_lookout",
            "--manifest", str(root / "dataset-files" / "manifests" / "template.manifest"),
            "--images", str(root / "dataset-files"),
            "--out", str(data),
            "--test-fraction", str(args.cookies_test_fraction),
            "--license", str(root / "LICENSE"),
            "--attribution", COOKIES_ATTRIBUTION,
        ],
        log,
        env,
    )  # fmt: skip


def run_dataset(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Materialise, prepare, then train + evaluate each model; return one row per model."""
    work = args.work / name
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{(args.work / 'mlflow.db').resolve()}"}
    data = work / "data"
    materialise(name, data, log, env, args)
    settings = args.settings.get(name, {})
    params = bench_params(data.resolve(), args.models, args.set, settings, origin=str(args.settings_file))
    if settings:
        chosen = ", ".join(f"{k}={v}" for k, v in settings.items())
        print(f"accuracy: {name}: settings from {args.settings_file}: {chosen}", file=sys.stderr, flush=True)
    params_file = work / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    dataset, models_dir = work / "dataset", work / "models"
    run_stage(
        ["experiments.prepare", "--params", str(params_file), "--out", str(dataset), "--report",
         str(work / "prepare.json")],
        log,
        env,
    )  # fmt: skip
    scored, eval_dir = dataset_for_split(work, args.score_split)
    rows = []
    for model in args.models:
        print(f"accuracy: {name}/{model}: train ...", file=sys.stderr, flush=True)
        try:
            train_s, train_mb = run_stage(
                ["experiments.train", model, "--params", str(params_file), "--dataset", str(dataset), "--out",
                 str(models_dir)],
                log,
                env,
            )  # fmt: skip
            print(f"accuracy: {name}/{model}: evaluate ...", file=sys.stderr, flush=True)
            eval_s, eval_mb = run_stage(
                ["experiments.evaluate", model, "--params", str(params_file), "--dataset", str(scored),
                 "--models", str(models_dir), "--out", str(eval_dir)],
                log,
                env,
            )  # fmt: skip
        except RuntimeError as exc:
            print(f"accuracy: {name}/{model}: {exc}", file=sys.stderr)
            rows.append({"dataset": name, "model": model, "error": str(exc)})
            continue
        stats = {
            "train_wall_s": train_s,
            "train_peak_mb": train_mb,
            "eval_wall_s": eval_s,
            "eval_peak_mb": eval_mb,
        }
        (eval_dir / model / "bench.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        rows.append(collect_row(name, model, work, args.resamples, args.seed, args.score_split))
        print(render([rows[-1]]), file=sys.stderr, flush=True)
    return rows


def _pro_key(metrics: dict[str, Any]) -> str | None:
    """Key of the AU-PRO metric in metrics.json; the integrated AU-PRO wins over a fixed-threshold PRO."""
    keys = [k for k in metrics if k.startswith("pixel_") and "PRO" in k.upper()]
    integrated = [k for k in keys if "AU" in k.upper().replace("PIXEL_", "")]
    return (integrated or keys or [None])[0]


def eval_folder(split: str) -> str:
    """Folder (under a data set's work dir) of evaluate's outputs for ``--score-split``."""
    return "eval" if split == "test" else "eval-val"


def dataset_for_split(work: Path, split: str) -> tuple[Path, Path]:
    """(data set evaluate scores, its eval folder) for ``--score-split``.

    ``test`` is prepare's own output. ``val`` is a hard-linked view of it whose ``test/`` (and
    ``ground_truth/test/``) are the validation images, so the unchanged evaluate stage scores them.
    """
    dataset = work / "dataset"
    if split == "test":
        return dataset, work / eval_folder(split)
    view = work / "dataset-val"
    shutil.rmtree(view, ignore_errors=True)
    for src, dest in (("train", "train"), ("val", "val"), ("val", "test")):
        shutil.copytree(dataset / src, view / dest, copy_function=os.link)
    for src, dest in (("val", "val"), ("val", "test")):
        if (dataset / "ground_truth" / src).is_dir():
            shutil.copytree(
                dataset / "ground_truth" / src, view / "ground_truth" / dest, copy_function=os.link
            )
    return view, work / eval_folder(split)


def collect_row(
    name: str, model: str, work: Path, resamples: int, seed: int, split: str = "test"
) -> dict[str, Any]:
    """One table row from the stage outputs under ``work`` (metrics.json, scores.csv, bench.json)."""
    eval_dir = work / eval_folder(split) / model
    metrics = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))
    bench = json.loads((eval_dir / "bench.json").read_text()) if (eval_dir / "bench.json").is_file() else {}
    row: dict[str, Any] = {
        "dataset": name if split == "test" else f"{name}(val)",
        "model": model,
        "image_AUROC": metrics.get("image_AUROC"),
        "image_F1Score": metrics.get("image_F1Score"),
        "pixel_AUROC": metrics.get("pixel_AUROC"),
        "AU_PRO": metrics.get(_pro_key(metrics) or "", None),
        "AU_PRO_key": _pro_key(metrics),
        "train_time_s": metrics.get("train_time_s"),
        "test_time_s": metrics.get("test_time_s"),
        # The stage's own VmHWM first: wait4's ru_maxrss also carries whatever peak the parent had.
        "train_peak_mb": metrics.get("train_peak_rss_mb", bench.get("train_peak_mb")),
        "eval_peak_mb": metrics.get("eval_peak_rss_mb", bench.get("eval_peak_mb")),
    }
    scores_csv = eval_dir / "scores.csv"
    if scores_csv.is_file():
        lines = scores_csv.read_text(encoding="utf-8").strip().splitlines()[1:]
        labels = [int(line.rsplit(",", 2)[1]) for line in lines]
        scores = [float(line.rsplit(",", 2)[2]) for line in lines]
        row["n_scored"] = len(labels)
        row["n_scored_defect"] = sum(labels)
        auroc, low, high = bootstrap_auroc_ci(labels, scores, resamples=resamples, seed=seed)
        row |= {"onnx_image_AUROC": auroc, "image_AUROC_ci": [low, high]}
        dataset = work / ("dataset" if split == "test" else "dataset-val")
        if (dataset / "ground_truth").is_dir() and row["pixel_AUROC"] is not None:
            data = load_params(work / "params.yaml").need("data")
            rels = [(line.rsplit(",", 2)[0], label) for line, label in zip(lines, labels, strict=True)]
            pos, neg = pixel_histograms(eval_dir, dataset, rels, data.image_size, data.resize)
            p_auroc, p_low, p_high = bootstrap_pixel_auroc_ci(
                pos, neg, labels, resamples=resamples, seed=seed
            )
            row |= {"onnx_pixel_AUROC": p_auroc, "pixel_AUROC_ci": [p_low, p_high]}
    return row


def champions(rows: Sequence[dict[str, Any]], work: Path, split: str = "test") -> list[str]:
    """Per data set, the model the pipeline's own rule (``registry.rule``, ``params.yaml: selection``)
    would promote from these runs, with the rule's reason: the issue's targets are for the champion."""
    from registry.rule import Candidate, SelectionError, SelectionRule, select

    rule = SelectionRule.from_params(load_params(PARAMS_FILE).need("selection"))
    lines = []
    for name in dict.fromkeys(r["dataset"].removesuffix("(val)") for r in rows):
        folder = work / name / eval_folder(split)
        candidates = [
            Candidate(
                r["model"], json.loads((folder / r["model"] / "metrics.json").read_text(encoding="utf-8"))
            )
            for r in rows
            if r["dataset"].removesuffix("(val)") == name and "error" not in r
        ]
        try:
            chosen = select(candidates, rule)
            lines.append(f"{name}: champion {chosen.champion} - {chosen.reason}")
        except SelectionError as exc:
            lines.append(f"{name}: no champion - {exc}")
    return lines


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return spec.format(value)


def render(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table, one line per (data set, model)."""
    head = (
        f"{'data':<8} {'model':<10} {'n (def)':>9} {'img AUROC [95% CI]':>26} {'img F1':>7} {'pix AUROC':>9} "
        f"{'ONNX pix AUROC [95% CI]':>26} "
        f"{'AU-PRO':>7} {'train s':>8} {'test s':>7} {'train MB':>8} {'eval MB':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['dataset']:<8} {r['model']:<10} FAILED: {r['error'][:120]}")
            continue
        ci = r.get("image_AUROC_ci")
        auroc = _fmt(r.get("onnx_image_AUROC", r.get("image_AUROC")), "{:.4f}")
        cell = f"{auroc} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else auroc
        n = f"{r.get('n_scored', '-')} ({r.get('n_scored_defect', '-')})"
        pci = r.get("pixel_AUROC_ci")
        pixel = f"{r['onnx_pixel_AUROC']:.4f} [{pci[0]:.3f}, {pci[1]:.3f}]" if pci else "-"
        lines.append(
            f"{r['dataset']:<8} {r['model']:<10} {n:>9} {cell:>26} {_fmt(r['image_F1Score'], '{:.4f}'):>7} "
            f"{_fmt(r['pixel_AUROC'], '{:.4f}'):>9} {pixel:>26} {_fmt(r['AU_PRO'], '{:.4f}'):>7} "
            f"{_fmt(r['train_time_s'], '{:.1f}'):>8} {_fmt(r['test_time_s'], '{:.1f}'):>7} "
            f"{_fmt(r['train_peak_mb'], '{:.0f}'):>8} {_fmt(r['eval_peak_mb'], '{:.0f}'):>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    all_models = load_params(PARAMS_FILE).model_names
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument(
        "--models", nargs="+", default=all_models, help=f"default: all ({', '.join(all_models)})"
    )
    parser.add_argument(
        "--work", type=Path, default=DEFAULT_WORK, help="working folder (data, outputs, logs)"
    )
    parser.add_argument("--set", action="append", default=[], help="params override key=value (YAML value)")
    parser.add_argument(
        "--settings", dest="settings_file", type=Path, default=DEFAULT_SETTINGS,
        help="per-data-set overrides chosen on validation (default: benchmarks/accuracy_settings.yaml)",
    )  # fmt: skip
    parser.add_argument(
        "--no-settings",
        action="store_true",
        help="params.yaml's defaults for every data set (no settings file)",
    )
    parser.add_argument("--cookies", type=Path, default=None, help="the lookout-cookies folder")
    parser.add_argument("--cookies-test-fraction", type=float, default=0.4, help="normal cookies held out")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument(
        "--score-split", choices=("test", "val"), default="test",
        help="val: score the validation split (for tuning without touching the test split)",
    )  # fmt: skip
    parser.add_argument("--report-only", action="store_true", help="re-read outputs of an earlier run")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    args.work = args.work.resolve()
    args.settings = {} if args.no_settings else load_settings(args.settings_file)

    rows: list[dict[str, Any]] = []
    for name in args.datasets:
        if args.report_only:
            for model in args.models:
                folder = eval_folder(args.score_split)
                if (args.work / name / folder / model / "metrics.json").is_file():
                    rows.append(
                        collect_row(
                            name, model, args.work / name, args.resamples, args.seed, args.score_split
                        )
                    )
        else:
            rows += run_dataset(name, args)
    print(render(rows))
    if rows:
        print("\n".join(champions(rows, args.work, args.score_split)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
