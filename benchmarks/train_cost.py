"""Cost of one training epoch per model with the default params, measured in CPU seconds.

``python -m benchmarks.train_cost [model ...] [--batches 3]``

Why CPU seconds: the development machine is shared by several jobs, so wall time says more about
the neighbours than about the model. The process's CPU time for a few real training steps
(``limit_train_batches``), divided by the cores torch uses, estimates the wall time on an idle
machine; scaled to the number of batches of ``build/dataset`` it gives the epoch cost that
``max_epochs`` in params.yaml is chosen by (the default ``dvc repro`` must stay under 15 minutes).
Run ``dvc repro prepare`` first. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from config.params import Params, load_params
from config.paths import REPO_ROOT as REPO


def measure(name: str, params: Params, dataset: Path, batches: int) -> dict[str, float]:
    """Fit ``batches`` training batches (+1 validation batch) and time them."""
    import torch
    from anomalib.engine import Engine

    from experiments.datamodule import build_datamodule
    from experiments.models import build_model
    from experiments.runtime import quiet_third_party_warnings, seed_everything

    seed_everything(params.need("seed"))
    quiet_third_party_warnings()
    model = build_model(name, params)
    datamodule = build_datamodule(params, dataset)
    engine = Engine(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=batches,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=REPO / "build" / "engine" / f"cost-{name}",
    )
    wall, cpu = time.perf_counter(), time.process_time()
    engine.fit(model=model, datamodule=datamodule)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    n_train = len(datamodule.train_data)
    per_epoch = math.ceil(n_train / params.train.batch_size)
    threads = torch.get_num_threads()
    return {
        "cpu_s_per_batch": cpu / batches,
        "wall_s_per_batch": wall / batches,
        "batches_per_epoch": per_epoch,
        "est_idle_epoch_s": cpu / batches * per_epoch / threads,
        "threads": threads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="keys of params.yaml: models (default: all)")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--dataset", type=Path, default=REPO / "build" / "dataset")
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    names = args.models or params.model_names
    print(f"{'model':<16}{'CPU s/batch':>12}{'wall s/batch':>13}{'batches':>9}{'est. idle epoch s':>19}")
    for name in names:
        row = measure(name, params, args.dataset, args.batches)
        print(
            f"{name:<16}{row['cpu_s_per_batch']:>12.1f}{row['wall_s_per_batch']:>13.1f}"
            f"{row['batches_per_epoch']:>9}{row['est_idle_epoch_s']:>19.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
