"""Where the stages put what they hand to each other: the one definition of the build layout.

Why a module of its own: evaluate used to import ``CHECKPOINT_NAME`` from the train stage script
(so every edit of train.py reran evaluate), and each stage script spelled its default paths its own
way. The stage scripts take these as their argparse defaults and ``tools.dvc_yaml`` writes them
into dvc.yaml's ``cmd``/``deps``/``outs``, so a path is written here once. Paths are relative to
the working directory, like every path a stage is given (DVC runs every stage from the repo root).
"""

from __future__ import annotations

from pathlib import PurePosixPath

DATASET_DIR = PurePosixPath("build/dataset")  # prepare's output: train / val / test splits
PREPARE_REPORT = PurePosixPath("build/prepare/report.json")
MODELS_DIR = PurePosixPath("build/models")  # train: <MODELS_DIR>/<model>/
EVAL_DIR = PurePosixPath("build/eval")  # evaluate: <EVAL_DIR>/<model>/
REGISTRY_DIR = PurePosixPath("build/registry")  # select: selection.json, champion.json
ENGINE_DIR = PurePosixPath("build/engine")  # anomalib's scratch folders (not a DVC output)

CHECKPOINT_NAME = "model.ckpt"  # <MODELS_DIR>/<model>/: the Lightning checkpoint
TRAIN_RECORD = "train.json"  # <MODELS_DIR>/<model>/: fit time, memory, device, threshold record
