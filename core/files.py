"""File rules every side shares: a streamed sha256 and an atomic swap of a folder.

Why here: the model contract is checked by sha256 when it is written (promote), shipped (release),
loaded (serving, edge) and converted (backbones); a data or model folder is replaced by stages,
promote and the edge agent. One definition each, so they cannot drift. Standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed so large models do not need to fit in memory twice."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(out: Path) -> None:
    """Remove temp folders left by killed runs (``.<name>.tmp-<pid>`` whose process is gone)."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        with contextlib.suppress(ValueError):
            pid = int(stale.name.rsplit("-", 1)[1])
            if pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(stale, ignore_errors=True)


def swap_directory(staged: Path, out: Path) -> None:
    """Replace ``out`` by ``staged`` with renames on one file system; put ``out`` back on failure.

    Readers see the old folder or the new one, never a mix: the only moments without ``out`` are
    between two renames, and a failed second rename restores the first.
    """
    backup = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(backup, ignore_errors=True)
    had_old = out.exists() or out.is_symlink()
    if had_old:
        os.replace(out, backup)
    try:
        os.replace(staged, out)
    except BaseException:
        if had_old:
            os.replace(backup, out)
        raise
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yield an empty temp sibling of ``out``; on success swap it into place, on error drop it.

    Why: a data or model folder is read by DVC, by every stage and by serving; a run killed half-way
    (or a bad input found after the first files were written) must leave the previous ``out``
    untouched, never a half-written one. The temp folder is a sibling so the swap is a rename.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        swap_directory(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
