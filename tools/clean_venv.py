"""A venv holding only ``serving/requirements.txt`` (+ the Lambda runtime interface client).

It stands in for the Lambda image's Python environment (no Docker engine here): if the
handler imports and scores in it, nothing from the training stack is needed at runtime.
Built once and reused from ``.cache/serving-venv-<hash>``; the hash covers the
requirements file, the awslambdaric pin and the interpreter version, so any change
builds a fresh one. Used by ``tests/serving/test_clean_venv.py`` and ``benchmarks/serving.py``.
"""

from __future__ import annotations

import fcntl
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

from config.paths import REPO_ROOT as REPO

SERVING_REQUIREMENTS = REPO / "serving" / "requirements.txt"
CACHE = REPO / ".cache"


def ric_requirement() -> str:
    """The ``awslambdaric==X`` pin from requirements.txt (the Dockerfile installs the same)."""
    match = re.search(r"^awslambdaric==\S+", (REPO / "requirements.txt").read_text(), re.MULTILINE)
    if not match:
        raise RuntimeError("requirements.txt has no awslambdaric pin")
    return match.group(0)


def venv_dir() -> Path:
    """Where the venv for the current requirements lives (it may not exist yet)."""
    digest = hashlib.sha256()
    digest.update(SERVING_REQUIREMENTS.read_bytes())
    digest.update(ric_requirement().encode())
    digest.update(f"{sys.version_info.major}.{sys.version_info.minor}".encode())
    return CACHE / f"serving-venv-{digest.hexdigest()[:12]}"


def python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv(timeout: float = 900) -> Path:
    """Return the venv, building it first if needed (under a lock; pip's cache keeps it quick)."""
    target = venv_dir()
    marker = target / ".complete"
    if marker.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "serving-venv.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return target
        shutil.rmtree(target, ignore_errors=True)  # a half-built one from an interrupted run
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True, timeout=timeout)
        pip = [str(python(target)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run(
            [*pip, "-r", str(SERVING_REQUIREMENTS), ric_requirement()], check=True, timeout=timeout
        )
        marker.write_text(ric_requirement() + "\n")
    return target


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def installed_mb(path: Path) -> float:
    """Total size of the files under ``path`` in MB (what the image layer would hold)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


def pip_list(venv: Path) -> dict[str, str]:
    """``{name: version}`` installed in ``venv``."""
    out = subprocess.run(
        [str(python(venv)), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.lower().split("==", 1) for line in out.splitlines() if "==" in line)
