"""DVC remotes: the default local folder, and the team's S3 remote (push/pull, run cache, clone flow).

The round trip runs the real ``dvc`` CLI in a throwaway git + DVC repo whose ``.dvc/config`` is a copy
of this repository's, so it also proves that the checked-in relative remote URL resolves inside
whatever folder the repository is cloned to. Offline, a few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from config.paths import REPO_ROOT as REPO
from tools.tiny_model import elpv_samples

DVC = str(Path(sys.executable).parent / "dvc")
AWS_ENV_DUMMY = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


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


# --------------------------------------------------------------------------------------------------
# The team flow with an S3 remote (moto server on 127.0.0.1 speaking the S3 protocol)
# --------------------------------------------------------------------------------------------------

STATS_STAGE = '''\
"""Tiny stage: count the data files and their bytes; log each real execution to $RUN_LOG."""
import json, os, pathlib, yaml
scale = yaml.safe_load(open("params.yaml"))["scale"]
files = sorted(p for p in pathlib.Path("data").rglob("*") if p.is_file())
pathlib.Path("out").mkdir(exist_ok=True)
stats = {"files": len(files), "bytes": sum(p.stat().st_size for p in files) * scale}
pathlib.Path("out/stats.json").write_text(json.dumps(stats))
with open(os.environ["RUN_LOG"], "a") as log:
    log.write(os.getcwd() + "\\n")
'''

STATS_DVC_YAML = """\
stages:
  stats:
    cmd: python stats.py
    deps: [data, stats.py]
    params: [scale]
    outs: [out]
"""


def _s3_env(tmp: Path, endpoint: str) -> dict[str, str]:
    from tests.conftest import AWS_TEST_ENV

    env = _env(tmp) | AWS_TEST_ENV | {"RUN_LOG": str(tmp / "runs.log")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for key in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        env.pop(key, None)  # the endpoint comes from the remote config, as in the README
    return env


def _runs(tmp: Path) -> int:
    log = tmp / "runs.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.mark.slow  # dvc repro (make test-fast skips it)
def test_s3_remote_team_flow_push_pull_and_run_cache(tmp_path: Path, aws_env: str) -> None:
    """Engineer A pushes data, outputs and run cache to S3; B clones, pulls, and nothing reruns."""
    import boto3

    boto3.client("s3", endpoint_url=aws_env).create_bucket(Bucket="team-dvc")
    (tmp_path / "home").mkdir()
    env = _s3_env(tmp_path, aws_env)
    a = tmp_path / "engineer-a"
    a.mkdir()
    _run(["git", "init", "-q", "-b", "main"], a, env)
    for key, value in (("user.name", "a"), ("user.email", "a@example.invalid")):
        _run(["git", "config", key, value], a, env)
    _run([DVC, "init", "-q"], a, env)
    shutil.copyfile(REPO / ".dvc" / "config", a / ".dvc" / "config")
    # The README's commands: an S3 default remote; endpointurl only for an S3-compatible server.
    _run([DVC, "remote", "add", "-d", "team", "s3://team-dvc/store"], a, env)
    _run([DVC, "remote", "modify", "team", "endpointurl", aws_env], a, env)
    normal, defect = elpv_samples(n_normal=3, n_defect=1)
    for folder, paths in (("train/good", normal), ("test/defect", defect)):
        (a / "data" / folder).mkdir(parents=True)
        for p in paths:
            shutil.copyfile(p, a / "data" / folder / p.name)
    (a / "stats.py").write_text(STATS_STAGE)
    (a / "dvc.yaml").write_text(STATS_DVC_YAML)
    (a / "params.yaml").write_text("scale: 2\n")
    _run([DVC, "add", "-q", "data"], a, env)
    assert "Running stage 'stats'" in _run([DVC, "repro"], a, env)
    assert _runs(tmp_path) == 1
    _run(["git", "add", "-A"], a, env)
    _run(["git", "commit", "-qm", "data + pipeline"], a, env)
    _run([DVC, "push", "--run-cache"], a, env)

    s3 = boto3.client("s3", endpoint_url=aws_env)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="team-dvc", Prefix="store/").get("Contents", [])]
    assert any(k.startswith("store/files/md5/") for k in keys), keys
    assert any(k.startswith("store/runs/") for k in keys), f"run cache not pushed: {keys}"

    # Engineer B: clone → dvc pull → dvc repro reuses everything (no stage reruns).
    b = tmp_path / "engineer-b"
    _run(["git", "clone", "-q", str(a), str(b)], tmp_path, env)
    assert not (b / "data").exists()
    _run([DVC, "pull"], b, env)
    assert _tree(b / "data") == _tree(a / "data")
    assert (b / "out" / "stats.json").read_bytes() == (a / "out" / "stats.json").read_bytes()
    out = _run([DVC, "repro"], b, env)
    assert "Running stage" not in out, out
    assert _runs(tmp_path) == 1
    assert "Cache and remote 'team' are in sync" in _run([DVC, "status", "--cloud"], b, env)

    # Engineer C has no dvc.lock for this state (e.g. params moved back and forth on a branch): the
    # pulled run cache still lets `dvc repro` restore the outputs instead of running the stage.
    c = tmp_path / "engineer-c"
    _run(["git", "clone", "-q", str(a), str(c)], tmp_path, env)
    (c / "dvc.lock").unlink()
    _run([DVC, "pull", "data.dvc"], c, env)
    # --pull: fetch the run cache and the outputs it names from the remote when a stage misses.
    out = _run([DVC, "repro", "--pull"], c, env)
    assert "Running stage" not in out and "cached" in out.lower(), out
    assert _runs(tmp_path) == 1
    assert json.loads((c / "out" / "stats.json").read_text()) == json.loads(
        (a / "out" / "stats.json").read_text()
    )


def test_s3_remote_missing_bucket_is_a_clear_error(tmp_path: Path, aws_env: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=aws_env).create_bucket(Bucket="team-dvc")
    repo = tmp_path / "repo"
    repo.mkdir()
    env = _env(tmp_path)
    (tmp_path / "home").mkdir()
    _run(["git", "init", "-q"], repo, env)
    _run([DVC, "init", "-q"], repo, env)
    _run([DVC, "remote", "add", "-d", "team", "s3://no-such-bucket-here/store"], repo, env)
    _run([DVC, "remote", "modify", "team", "endpointurl", aws_env], repo, env)
    (repo / "data").mkdir()
    (repo / "data" / "a.txt").write_text("a")
    _run([DVC, "add", "-q", "data"], repo, env)
    proc = subprocess.run(
        [DVC, "push"], cwd=repo, env=env | AWS_ENV_DUMMY, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "no-such-bucket-here" in proc.stderr or "bucket" in proc.stderr.lower(), proc.stderr
