"""The DVC default remote: a local folder that works in any clone, and a real push → pull round trip.

The round trip runs the real ``dvc`` CLI in a throwaway git + DVC repo whose ``.dvc/config`` is a copy
of this repository's, so it also proves that the checked-in relative remote URL resolves inside
whatever folder the repository is cloned to. Offline, a few seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.model_fixture import elpv_samples

REPO = Path(__file__).resolve().parents[2]
DVC = str(Path(sys.executable).parent / "dvc")


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_"))}
    return env | {
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(tmp / "site-cache"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": str(tmp / "home"),
    }


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_repo_has_a_default_local_remote_inside_the_checkout() -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    assert _run([DVC, "remote", "default"], REPO, env).strip() == "local"
    line = next(x for x in _run([DVC, "remote", "list"], REPO, env).splitlines() if x.startswith("local"))
    # ../.dvc-store in .dvc/config is relative to .dvc/, i.e. <checkout>/.dvc-store wherever it lives.
    assert line.split()[1:] == [str(REPO / ".dvc-store"), "(default)"]
    # The store itself is never committed to git.
    ignored = subprocess.run(["git", "check-ignore", "-q", ".dvc-store/files/md5/00/x"], cwd=REPO)
    assert ignored.returncode == 0, "/.dvc-store/ must be in .gitignore"


def test_push_then_pull_restores_identical_bytes(tmp_path: Path) -> None:
    repo = tmp_path / "clone"
    repo.mkdir()
    env = _env(tmp_path)
    (tmp_path / "home").mkdir()
    _run(["git", "init", "-q"], repo, env)
    _run([DVC, "init", "-q"], repo, env)
    # This repository's own config: default remote "local" = ../.dvc-store, relative to .dvc/.
    shutil.copyfile(REPO / ".dvc" / "config", repo / ".dvc" / "config")

    normal, defect = elpv_samples(n_normal=2, n_defect=1)
    for folder, paths in (("train/good", normal), ("test/defect", defect)):
        (repo / "data" / folder).mkdir(parents=True)
        for p in paths:
            shutil.copyfile(p, repo / "data" / folder / p.name)  # real PNG bytes, unchanged
    original = _tree(repo / "data")
    assert len(original) == 3

    _run([DVC, "add", "-q", "data"], repo, env)
    assert (repo / "data.dvc").is_file()
    _run([DVC, "push", "-q"], repo, env)  # no -r: the default remote
    store = repo / ".dvc-store"
    assert store.is_dir() and len([p for p in store.rglob("*") if p.is_file()]) == 4  # 3 files + .dir

    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    _run([DVC, "pull", "-q"], repo, env)
    assert _tree(repo / "data") == original
    assert "Cache and remote 'local' are in sync" in _run([DVC, "status", "--cloud"], repo, env)
