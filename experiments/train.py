"""DVC stage ``train@<model>``: fit one anomalib model on ``build/dataset`` and save its checkpoint.

Usage: ``python -m experiments.train <model> [--params params.yaml] [--dataset build/dataset]
[--out build/models]``.

Outputs (``build/models/<model>/``):

* ``model.ckpt`` - the Lightning checkpoint (weights/memory bank plus the post-processor's
  threshold and min/max learned on the validation split, which the ONNX export bakes in);
* ``train.json`` - wall-clock fit time, peak resident memory and the device the fit ran on
  (``train.accelerator: auto`` picks a GPU when there is one), for the benchmarks and MLflow.

Only the knobs of ``params.yaml`` matter (seeded, deterministic kernels, ``num_workers`` from
params), so the same data and params give the same model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from config.params import Params, as_params, load_params
from config.paths import REPO_ROOT
from experiments.artifacts import CHECKPOINT_NAME, DATASET_DIR, ENGINE_DIR, MODELS_DIR, TRAIN_RECORD
from experiments.backbones import BackboneError
from experiments.datamodule import DatasetLayoutError, build_datamodule, split_record
from experiments.models import backbone_spec, build_model, input_normalization, model_params
from experiments.runtime import peak_rss_mb, quiet_third_party_warnings, seed_everything, stage_main


def device_used(engine: Any) -> dict[str, str]:
    """The device the trainer really ran on, e.g. ``{"device": "cuda:0", "device_name": "NVIDIA L4"}``."""
    import platform

    device = engine.trainer.strategy.root_device
    if device.type == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return {"device": str(device), "device_name": name}


def make_engine(
    params: Params | Mapping[str, Any], model_name: str, scratch: Path, callbacks: list | None = None
) -> Any:
    """An anomalib ``Engine`` on ``train.accelerator`` with the progress bar on and no logger.

    ``scratch`` receives anomalib's versioned working folders; it is wiped first so reruns do not
    pile up ``v0, v1, ...`` directories.
    """
    from anomalib.engine import Engine

    params = as_params(params)
    shutil.rmtree(scratch, ignore_errors=True)
    epochs = model_params(model_name, params)["max_epochs"]
    return Engine(
        accelerator=params.train.accelerator,
        devices=1,
        max_epochs=epochs,
        # Validation only learns the threshold and min/max normalisation (no early stopping), so
        # for multi-epoch models (STFPM) run it once, after the last epoch, not every epoch.
        check_val_every_n_epoch=epochs,
        default_root_dir=scratch,
        logger=False,
        enable_progress_bar=True,
        deterministic="warn",
        callbacks=callbacks or [],
    )


def train(
    model_name: str,
    params: Params | Mapping[str, Any],
    dataset: Path,
    out_dir: Path,
    work_dir: Path = REPO_ROOT / ENGINE_DIR,
) -> dict[str, Any]:
    """Fit ``model_name`` and write ``model.ckpt`` + ``train.json`` into ``out_dir``; return the record.

    ``work_dir`` takes anomalib's scratch folders (not a DVC output).
    """
    from anomalib.callbacks.checkpoint import ModelCheckpoint

    params = as_params(params)
    seed_everything(params.need("seed"))
    quiet_third_party_warnings()
    model = build_model(model_name, params)
    datamodule = build_datamodule(params, dataset)

    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    checkpoint = ModelCheckpoint(
        dirpath=out_dir,
        filename=Path(CHECKPOINT_NAME).stem,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    engine = make_engine(params, model_name, work_dir / model_name, [checkpoint])

    start, cpu_start = time.perf_counter(), time.process_time()
    engine.fit(model=model, datamodule=datamodule)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

    ckpt = out_dir / CHECKPOINT_NAME
    if not ckpt.is_file():  # e.g. a model/trainer combination that skipped the callback
        engine.trainer.save_checkpoint(ckpt)
    record = {
        "model": model_name,
        "train_time_s": round(seconds, 3),
        # CPU seconds of this process: on a shared machine wall time inflates, this does much less.
        "train_cpu_s": round(cpu_seconds, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "n_train_images": len(datamodule.train_data),
        "n_val_images": len(datamodule.val_data),
        "epochs": int(engine.trainer.current_epoch),
        "image_threshold_raw": float(model.post_processor.image_threshold),
        # train.threshold policy as applied: method used (f1 or normal_quantile) and why, counts
        "threshold": model.post_processor.threshold_record,
        "splits": split_record(datamodule, dataset),
        **device_used(engine),
        "backbone": backbone_spec(params).describe(),
        "input_normalization": input_normalization(model),  # backbone.normalize, as the model applies it
        "checkpoint": str(ckpt.relative_to(REPO_ROOT) if ckpt.is_relative_to(REPO_ROOT) else ckpt),
    }
    (out_dir / TRAIN_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


@stage_main("train", DatasetLayoutError, BackboneError)
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a key of params.yaml: models")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--dataset", type=Path, default=Path(DATASET_DIR))
    parser.add_argument("--out", type=Path, default=Path(MODELS_DIR), help="gets <model>/")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    model_params(args.model, params)  # fail on bad params before importing torch
    record = train(args.model, params, args.dataset, args.out / args.model)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    sys.exit(main())
