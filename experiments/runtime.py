"""Process-level setup shared by the stages: seeding/determinism and resource measurement.

Same data + same params must give the same metrics, so every stage seeds Python, NumPy and torch
through Lightning (``workers=True`` also seeds dataloader workers) and asks torch for deterministic
kernels. ``warn_only`` keeps the few CPU ops without a deterministic variant usable, with a warning
instead of a crash.
"""

from __future__ import annotations

import os
import resource
import sys


def seed_everything(seed: int) -> None:
    """Seed every RNG the pipeline touches and switch torch to deterministic algorithms."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch
    from lightning.pytorch import seed_everything as lightning_seed

    lightning_seed(seed, workers=True, verbose=False)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (``ru_maxrss`` is KiB on Linux, B on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def quiet_third_party_warnings() -> None:
    """Silence known, harmless warnings so stage logs show what matters (progress, metrics, errors)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*xFormers.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*deterministic.*", category=UserWarning)
    logging.getLogger("timm.models._builder").setLevel(logging.ERROR)
