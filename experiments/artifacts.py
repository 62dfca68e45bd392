"""File names the stages hand to each other (train writes them, evaluate and promote read them).

Why a module of its own: evaluate used to import ``CHECKPOINT_NAME`` from the train stage script,
which made the evaluate stage depend on (and rerun with) every edit of train.py. Names both sides
need live here, below both.
"""

from __future__ import annotations

CHECKPOINT_NAME = "model.ckpt"  # build/models/<model>/: the Lightning checkpoint
TRAIN_RECORD = "train.json"  # build/models/<model>/: fit time, memory, device, threshold record
