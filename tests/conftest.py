"""Shared pytest fixtures.

Kept torch-free at import time: serving tests must be collectable in a venv that only has
``serving/requirements.txt`` (+ pytest, moto). The tiny model is built lazily, or taken from
``SERVING_MODEL_DIR`` when that points at a prebuilt model folder.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Session fixtures of the slow tests, defined beside their helpers and registered here once, so one
# instance serves every folder: the team's MLflow server (PostgreSQL + S3) and the shared pipeline run.
from tests.pipeline_run import scratch_pipeline, shared_pipeline  # noqa: F401  (fixtures)
from tests.team_server import team_server, use_server  # noqa: F401  (fixtures)

#: Fixtures that start PostgreSQL + the MLflow server or train a real pipeline: only slow tests take
#: them (``make test-fast`` runs ``-m "not slow"``).
SLOW_FIXTURES = frozenset({"team_server", "use_server", "shared_pipeline", "scratch_pipeline"})
#: The modules whose tests take them. Under ``-n 2 --dist loadgroup`` these run in one xdist worker,
#: so the session starts one server and trains the shared pipeline once (see the scheduler below).
SERVER_MODULES = frozenset(
    {
        "tests/test_pipeline_e2e.py",
        "tests/experiments/test_tracking_server.py",
        "tests/experiments/test_dvc_queue.py",
        "tests/registry/test_select_concurrency.py",
    }
)
#: Commands a fast test must not start (the real pipeline, its stages, the server, the browser).
SLOW_COMMANDS = (
    ("dvc", "repro"),
    ("dvc", "exp"),
    ("dvc", "queue"),
    ("initdb",),
    ("chromium",),
)

_FAST_TEST: list[str] = []  # nodeid of the fast test being set up or run, if any
_TRAINING_ALLOWED: list[bool] = []  # non-empty while serving_model_dir builds the tiny model

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def serving_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder shaped like ``serving/model/`` (``model.onnx`` + ``metadata.json``), 64x64 input.

    Built once per session from a tiny PaDiM (see ``tools/tiny_model.py``), unless
    ``SERVING_MODEL_DIR`` names a prebuilt one (e.g. in a torch-free venv).
    """
    prebuilt = os.environ.get("SERVING_MODEL_DIR")
    if prebuilt:
        path = Path(prebuilt)
        if not (path / "metadata.json").is_file():
            raise RuntimeError(f"SERVING_MODEL_DIR={prebuilt} has no metadata.json")
        return path
    from tools.tiny_model import build_tiny_model

    _TRAINING_ALLOWED.append(True)  # the one training fast tests may take (see _guard_fit)
    try:
        return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), image_size=64)
    finally:
        _TRAINING_ALLOWED.pop()


def _atomic_dynamodb_writes() -> None:
    """Make moto's DynamoDB writes atomic, as DynamoDB's are.

    moto's threaded server evaluates a ``ConditionExpression`` and then writes without a lock, so two
    concurrent conditional puts of one key can both succeed (seen under CPU load: two different
    images both answered 200 for one idempotency key). Real DynamoDB evaluates the condition and
    writes the item atomically; the storage code relies on that, so the test server must too.
    """
    import functools
    import threading

    from moto.dynamodb.models import DynamoDBBackend

    if getattr(DynamoDBBackend, "_vi_atomic", False):
        return
    lock = threading.RLock()
    for name in ("put_item", "update_item", "delete_item", "transact_write_items"):
        original = getattr(DynamoDBBackend, name)

        @functools.wraps(original)
        def locked(self: Any, *args: Any, __original: Any = original, **kwargs: Any) -> Any:
            with lock:
                return __original(self, *args, **kwargs)

        setattr(DynamoDBBackend, name, locked)
    DynamoDBBackend._vi_atomic = True


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A real local AWS endpoint (moto's threaded HTTP server on 127.0.0.1, random port).

    Yields the endpoint URL. Tests talk to it over HTTP through ordinary boto3 clients,
    so retries, error codes and serialisation are the real ones.
    """
    from moto.server import ThreadedMotoServer

    _atomic_dynamodb_writes()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point every boto3 client at the moto server with dummy credentials; returns the endpoint.

    Also resets moto's state so each test starts from an empty account.
    """
    import urllib.request

    for key, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_DYNAMODB", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    request = urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10):
        pass
    return moto_server


# --------------------------------------------------------------------------------------------------
# Fast / slow: `make test-fast` = `pytest -m "not slow"` must stay free of training, dvc runs and servers
# --------------------------------------------------------------------------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Fail collection when a test not marked slow, or outside SERVER_MODULES, takes a slow fixture."""
    wrong = []
    for item in items:
        heavy = SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if not heavy:
            continue
        if item.get_closest_marker("slow") is None:
            wrong.append(f"{item.nodeid} takes {', '.join(sorted(heavy))} but is not marked slow")
        if item.nodeid.split("::")[0] not in SERVER_MODULES:
            wrong.append(f"{item.nodeid} takes {', '.join(sorted(heavy))}: add its module to SERVER_MODULES")
    if wrong:
        raise pytest.UsageError("tests/conftest.py:\n  " + "\n  ".join(wrong))


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup``: every test of SERVER_MODULES in one worker, the others spread as ``load``.

    (pytest-xdist's own loadgroup reads ``xdist_group`` marks through node ids, which pytest 9 no
    longer lets a plugin rewrite, so the group is decided here from the node id's module.)
    """
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ServerGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "team-server" if nodeid.split("::")[0] in SERVER_MODULES else nodeid

    return ServerGroupScheduling(config, log)


def _slow_command(args: Any) -> str | None:
    if isinstance(args, (str, bytes, os.PathLike)):
        return None  # a shell string: not used by these tests
    argv = [os.path.basename(os.fsdecode(a)) for a in args]
    for pattern in SLOW_COMMANDS:
        n = len(pattern)
        if any(tuple(argv[i : i + n]) == pattern for i in range(len(argv) - n + 1)):
            return " ".join(argv)
    return None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "subprocess.Popen" and _FAST_TEST:
        command = _slow_command(args[1])
        if command:
            raise RuntimeError(f"{_FAST_TEST[0]} is not marked slow but runs `{command}`")


def _guard_fit(trainer_module: Any) -> None:
    """A fast test (its body or its fixtures) may not train: Lightning's ``Trainer.fit`` refuses."""
    trainer = trainer_module.Trainer
    if getattr(trainer.fit, "_vi_guarded", False):
        return
    real = trainer.fit

    def fit(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _FAST_TEST and not _TRAINING_ALLOWED:
            raise RuntimeError(f"{_FAST_TEST[0]} is not marked slow but trains a model (Trainer.fit)")
        return real(self, *args, **kwargs)

    fit._vi_guarded = True  # type: ignore[attr-defined]
    trainer.fit = fit


class _GuardOnImport:
    """Meta-path hook: applies ``_guard_fit`` when Lightning's trainer module is first imported."""

    MODULE = "lightning.pytorch.trainer.trainer"
    _busy = False

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != self.MODULE or _GuardOnImport._busy:
            return None
        import importlib.util

        _GuardOnImport._busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            _GuardOnImport._busy = False
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def guarded_exec(module: Any) -> None:
            exec_module(module)
            _guard_fit(module)

        spec.loader.exec_module = guarded_exec  # type: ignore[method-assign]
        return spec


def pytest_configure(config: pytest.Config) -> None:
    sys.addaudithook(_audit)
    if _GuardOnImport.MODULE in sys.modules:
        _guard_fit(sys.modules[_GuardOnImport.MODULE])
    else:
        sys.meta_path.insert(0, _GuardOnImport())


@contextlib.contextmanager
def _fast_phase(item: pytest.Item) -> Iterator[None]:
    fast = item.get_closest_marker("slow") is None
    if fast:
        _FAST_TEST.append(item.nodeid)
    try:
        yield
    finally:
        if fast:
            _FAST_TEST.clear()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _fast_phase(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _fast_phase(item):
        return (yield)
