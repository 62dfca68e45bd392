"""Process-level setup shared by the stages: seeding/determinism and resource measurement.

Same data + same params must give the same metrics, so every stage seeds Python, NumPy and torch
through Lightning (``workers=True`` also seeds dataloader workers) and asks torch for deterministic
kernels. ``warn_only`` keeps the few CPU ops without a deterministic variant usable, with a warning
instead of a crash.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import sys
from collections.abc import Callable
from typing import Any


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
    """Peak resident memory of this process's own image so far, in MiB.

    Linux reads ``VmHWM`` from ``/proc/self/status``, not ``ru_maxrss``: Linux carries ``ru_maxrss``
    across ``execve``, so a stage started by a large parent (a test runner at 2 GB, say) would report
    the parent's peak as its own. ``VmHWM`` belongs to the address space the stage got at exec.
    Elsewhere ``ru_maxrss`` is the best there is (KiB on Linux, bytes on macOS).
    """
    with (
        contextlib.suppress(OSError, ValueError, IndexError),
        open("/proc/self/status", encoding="ascii") as fh,
    ):
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
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


class StageError(Exception):
    """An error the user fixes (input data, a path, the order of stages): shown as one line, exit 1."""


def _user_error_types(extra: tuple[type[BaseException], ...]) -> tuple[type[BaseException], ...]:
    from config.params import ParamsError

    return (ParamsError, StageError, FileNotFoundError, *extra)


def stage_main(
    stage: str, *errors: type[BaseException]
) -> Callable[[Callable[..., int | None]], Callable[..., int]]:
    """Decorate a stage's ``main``: a params or data error becomes ONE line on stderr and exit code 1.

    Why one wrapper for every stage (prepare, train, evaluate, select, promote, make_data, the
    Lookout import): DVC prints a stage's stderr; a 60-line traceback for a typo in params.yaml
    hides the one line that says which key is wrong and how to fix it. ``errors`` adds the
    stage's own error classes to the always-handled ones (``ParamsError``, ``StageError``,
    ``FileNotFoundError``). Anything else is a bug and keeps its traceback. ``VI_TRACEBACK=1``
    shows the traceback of handled errors too, for debugging.

    The wrapped ``main`` returns an int (``None`` counts as 0), so ``sys.exit(main())`` works.
    """

    def decorate(func: Callable[..., int | None]) -> Callable[..., int]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> int:
            try:
                result = func(*args, **kwargs)
            except _user_error_types(errors) as exc:
                if os.environ.get("VI_TRACEBACK") == "1":
                    raise
                message = " ".join(str(exc).split()) or type(exc).__name__
                print(f"{stage}: error: {message}", file=sys.stderr)
                return 1
            return 0 if result is None else int(result)

        return wrapper

    return decorate
