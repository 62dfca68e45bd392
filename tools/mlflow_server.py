"""Start the team's shared MLflow tracking server: PostgreSQL backend store, S3 artifact store.

Why this shape: one tracking server that every engineer, DVC run and reviewer points at with
``MLFLOW_TRACKING_URI`` alone. Runs and the Model Registry live in PostgreSQL (concurrent writers
are safe there, unlike sqlite on a shared folder); artifacts live in S3 and the server *proxies*
them (``--serve-artifacts``, ``mlflow-artifacts:`` URIs), so clients and reviewers need no S3
credentials, only the server does.

Compose-free: everything is a local process this script starts and stops.

- PostgreSQL: ``--backend-store-uri postgresql://...`` uses an existing server (e.g. RDS). Without
  it the script runs its own cluster from the Debian ``postgresql`` package (``initdb`` + ``pg_ctl``
  in ``--pg-data``, TCP on 127.0.0.1 only). PostgreSQL refuses to run as root, so as root the
  cluster is owned by, and run as, the ``postgres`` system user the package creates.
- S3: ``--artifacts-destination s3://bucket/prefix``; endpoint and credentials come from the
  standard AWS variables (``MLFLOW_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL`` for an S3-compatible
  server). ``--local-s3`` starts a moto S3 server on 127.0.0.1 instead, for trying it without AWS.

Usage (``make mlflow-server`` runs the first line)::

    python -m tools.mlflow_server --local-s3                       # everything local, port 5000
    python -m tools.mlflow_server --artifacts-destination s3://team-bucket/mlflow \\
        --backend-store-uri postgresql://mlflow:pw@db:5432/mlflow \\
        --host 0.0.0.0 --allowed-hosts 'mlflow.example:5000'
    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000                   # then dvc repro / select / promote
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DB = "mlflow"
DEFAULT_USER = "mlflow"
START_TIMEOUT_S = 300
#: Dummy credentials for the local moto S3 server (never real ones).
LOCAL_S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "local",
    "AWS_SECRET_ACCESS_KEY": "local",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class ServerError(RuntimeError):
    """A component could not be started; the message names it and the fix."""


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for tests and ``--port 0``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin_dir() -> Path:
    """The venv's bin folder: ``mlflow`` and ``moto_server`` are installed beside this Python."""
    return Path(sys.executable).parent


def pg_binary(name: str) -> str:
    """Path of a PostgreSQL server program. Debian keeps them off PATH in /usr/lib/postgresql/N/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]), reverse=True
    )
    if candidates:
        return str(candidates[0])
    raise ServerError(
        f"PostgreSQL program {name!r} not found: install the server (`apt-get install -y postgresql`, "
        "done by `make system-deps`) or pass --backend-store-uri postgresql://... of an existing server"
    )


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _as_pg_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its programs as the package's ``postgres`` user."""
    if not _is_root():
        return cmd
    runuser = shutil.which("runuser")
    if runuser is None:
        raise ServerError("running as root needs `runuser` (util-linux) to start PostgreSQL as 'postgres'")
    return [runuser, "-u", "postgres", "--", *cmd]


def _chown_to_pg(path: Path) -> None:
    if _is_root():
        shutil.chown(path, user="postgres", group="postgres")


def wait_http(url: str, proc: subprocess.Popen[bytes] | None, log: Path | None, timeout: float) -> None:
    """Poll ``url`` until it answers 200; fail early with the log if the process died."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            raise ServerError(f"{url}: process exited with {proc.returncode}\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            raise ServerError(f"{url} not up within {timeout:.0f}s\n{tail}")
        time.sleep(0.3)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server started in its own session, with its children (uvicorn forks workers)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclass
class Postgres:
    """A PostgreSQL cluster in ``data_dir`` listening on 127.0.0.1:``port`` (TCP only)."""

    data_dir: Path
    port: int
    user: str = DEFAULT_USER
    database: str = DEFAULT_DB

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, cmd: list[str]) -> None:
        proc = subprocess.run(_as_pg_user(cmd), capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise ServerError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")

    def start(self) -> Postgres:
        """initdb (first time only), start, create the database if missing."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _chown_to_pg(self.data_dir)
        if not (self.data_dir / "PG_VERSION").exists():
            # trust on 127.0.0.1 only: the cluster is local to this host; use a managed server with
            # passwords (--backend-store-uri) for anything reachable from other machines.
            self._run([
                pg_binary("initdb"), "-D", str(self.data_dir), "-U", self.user,
                "--auth=trust", "--encoding=UTF8", "--locale=C",
            ])  # fmt: skip
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data_dir}"
        self._run([
            pg_binary("pg_ctl"), "-D", str(self.data_dir), "-o", options,
            "-l", str(self.data_dir / "server.log"), "-w", "-t", "120", "start",
        ])  # fmt: skip
        self._create_database()
        return self

    def _create_database(self) -> None:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            conn.close()

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            with contextlib.suppress(ServerError):
                self._run([pg_binary("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"])


def start_moto_s3(port: int, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A moto server (S3 protocol) on 127.0.0.1:port, in its own session; returns (process, URL)."""
    url = f"http://127.0.0.1:{port}"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(_bin_dir() / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_http(f"{url}/moto-api/", proc, log, 60)
    return proc, url


def ensure_bucket(destination: str, env: Mapping[str, str]) -> None:
    """Create the artifact bucket when it does not exist (so a first start just works)."""
    import boto3
    from botocore.exceptions import ClientError

    bucket = destination.removeprefix("s3://").split("/", 1)[0]
    endpoint = env.get("MLFLOW_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL") or None
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
        region_name=env.get("AWS_DEFAULT_REGION", "us-east-1"),
    )
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
            raise ServerError(f"artifact bucket {bucket!r}: {exc}") from exc
        s3.create_bucket(Bucket=bucket)


@dataclass
class Stack:
    """What :func:`shared_server` started; ``url`` is the ``MLFLOW_TRACKING_URI`` to hand out."""

    url: str
    backend_uri: str
    artifacts_destination: str
    s3_endpoint: str | None
    env: dict[str, str]
    log: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)


@contextlib.contextmanager
def shared_server(
    *,
    work_dir: Path,
    port: int = 5000,
    host: str = "127.0.0.1",
    backend_store_uri: str | None = None,
    pg_data: Path | None = None,
    pg_port: int | None = None,
    artifacts_destination: str = "s3://mlflow-artifacts/mlflow",
    local_s3: bool = False,
    workers: int = 1,
    allowed_hosts: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[Stack]:
    """Start PostgreSQL (unless given), optionally moto S3, and ``mlflow server``; stop all on exit."""
    work_dir.mkdir(parents=True, exist_ok=True)
    log = work_dir / "mlflow-server.log"
    server_env = {k: v for k, v in (env or os.environ).items() if not k.startswith("MLFLOW_TRACKING")}
    server_env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1")
    if not artifacts_destination.startswith("s3://"):
        raise ServerError(f"--artifacts-destination must be an s3:// URI, got {artifacts_destination!r}")
    processes: list[subprocess.Popen[bytes]] = []
    pg: Postgres | None = None
    try:
        s3_endpoint = server_env.get("MLFLOW_S3_ENDPOINT_URL") or server_env.get("AWS_ENDPOINT_URL")
        if local_s3:
            moto, s3_endpoint = start_moto_s3(free_port(), work_dir / "moto.log")
            processes.append(moto)
            server_env.update(LOCAL_S3_CREDENTIALS)
        if s3_endpoint:
            server_env["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint
        ensure_bucket(artifacts_destination, server_env)
        if backend_store_uri is not None and backend_store_uri.startswith("postgresql://"):
            # SQLAlchemy 2.1's default PostgreSQL driver is psycopg 3; the pinned driver is psycopg2.
            backend_store_uri = "postgresql+psycopg2://" + backend_store_uri.removeprefix("postgresql://")
        if backend_store_uri is None:
            # Parents of the data dir must be traversable by 'postgres' when root: a fresh temp dir.
            data = pg_data or Path(tempfile.mkdtemp(prefix="mlflow-pg-"))
            pg = Postgres(data, pg_port or free_port()).start()
            backend_store_uri = pg.uri
        cmd = [
            str(_bin_dir() / "mlflow"), "server",
            "--backend-store-uri", backend_store_uri,
            "--artifacts-destination", artifacts_destination,
            "--serve-artifacts",
            "--host", host, "--port", str(port), "--workers", str(workers),
        ]  # fmt: skip
        if allowed_hosts:
            cmd += ["--allowed-hosts", allowed_hosts]
        with log.open("ab") as out:
            proc = subprocess.Popen(
                cmd, cwd=work_dir, env=server_env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        processes.append(proc)
        url = f"http://127.0.0.1:{port}" if host in ("0.0.0.0", "127.0.0.1") else f"http://{host}:{port}"
        wait_http(f"{url}/health", proc, log, START_TIMEOUT_S)
        yield Stack(url, backend_store_uri, artifacts_destination, s3_endpoint, server_env, log, processes)
    finally:
        for proc in reversed(processes):
            stop_process(proc)
        if pg is not None:
            pg.stop()
            if pg_data is None:
                shutil.rmtree(pg.data_dir, ignore_errors=True)


def _default_pg_data() -> Path:
    # As root the folder must be reachable by 'postgres' (not under /root, which is 0700).
    if _is_root():
        return Path("/var/lib/visual-inspection/mlflow-pg")
    share = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return share / "visual-inspection" / "mlflow-pg"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--backend-store-uri", help="existing PostgreSQL; default: run a local cluster")
    parser.add_argument("--pg-data", type=Path, default=None, help="cluster folder (kept across starts)")
    parser.add_argument("--pg-port", type=int, default=5433)
    parser.add_argument("--artifacts-destination", default="s3://mlflow-artifacts/mlflow")
    parser.add_argument("--local-s3", action="store_true", help="start a local moto S3 server (no AWS)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--allowed-hosts", help="host:port names clients use, when not localhost")
    parser.add_argument("--work-dir", type=Path, default=Path("build/mlflow-server"), help="logs")
    args = parser.parse_args(argv)
    try:
        with shared_server(
            work_dir=args.work_dir,
            port=args.port,
            host=args.host,
            backend_store_uri=args.backend_store_uri,
            # moto keeps S3 objects in memory only: with --local-s3 the database is temporary too, so
            # a restart never leaves runs whose artifacts are gone (unless --pg-data asks for it).
            pg_data=args.pg_data or (None if args.backend_store_uri or args.local_s3 else _default_pg_data()),
            pg_port=args.pg_port,
            artifacts_destination=args.artifacts_destination,
            local_s3=args.local_s3,
            workers=args.workers,
            allowed_hosts=args.allowed_hosts,
        ) as stack:
            print(f"MLflow tracking server: {stack.url}  (log: {stack.log})")
            print(f"  backend store: {stack.backend_uri}")
            via = stack.s3_endpoint or "AWS S3"
            print(f"  artifacts:     {stack.artifacts_destination} via {via} (proxied)")
            print(f"  export MLFLOW_TRACKING_URI={stack.url}   # Ctrl-C stops everything", flush=True)
            stop = {"now": False}
            signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
            with contextlib.suppress(KeyboardInterrupt):
                while not stop["now"] and all(p.poll() is None for p in stack.processes):
                    time.sleep(1)
    except ServerError as exc:
        print(f"mlflow-server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
