"""A fault-injecting HTTP proxy on 127.0.0.1 between boto3 and the local AWS server (moto).

Each request is classified as an AWS operation — DynamoDB by its ``X-Amz-Target`` header
(``dynamodb:PutItem``), S3 by method and path (``s3:PutObject``, ``s3:DeleteObject``,
``s3:ListObjectsV2``, ...) — and the first matching armed :class:`Fault` decides what happens:

* ``close_before``: close the client connection; the request never reaches the server.
* ``drop_after_write``: forward, let the server apply it, then close without answering.
* ``error_after_write``: forward, then answer 500 ``InternalError`` (the write did happen).
* ``status_500`` / ``status_503``: answer an AWS-shaped error without forwarding.
* ``delay``: wait ``delay_s`` before forwarding (a write that lands after the client gave up).

Faults fire a bounded number of ``times``; everything is loopback-only, every socket has a
timeout, and :meth:`FaultProxy.wait_idle` waits (bounded) for delayed requests to land.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

ACTIONS = ("close_before", "drop_after_write", "error_after_write", "status_500", "status_503", "delay")
SOCKET_TIMEOUT_S = 10.0


@dataclass
class Fault:
    operation: str  # e.g. "dynamodb:PutItem", "s3:PutObject"
    action: str
    times: int = 1
    delay_s: float = 0.0
    fired: int = 0

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown fault action {self.action!r}; one of {ACTIONS}")


@dataclass
class _Request:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return ""


def operation_of(request: _Request) -> str:
    """``service:Operation`` of a DynamoDB (JSON protocol) or path-style S3 request."""
    target = request.header("x-amz-target")
    if target:
        return "dynamodb:" + target.rsplit(".", 1)[-1]
    split = urlsplit(request.target)
    parts = split.path.lstrip("/").split("/", 1)
    has_key = len(parts) == 2 and parts[1] != ""
    query = parse_qs(split.query, keep_blank_values=True)
    if not has_key:
        if request.method == "GET":
            return "s3:ListObjectsV2" if query.get("list-type") == ["2"] else "s3:ListObjects"
        if request.method == "POST" and "delete" in query:
            return "s3:DeleteObjects"
        return f"s3:{request.method}Bucket"
    return "s3:" + {
        "PUT": "PutObject",
        "GET": "GetObject",
        "HEAD": "HeadObject",
        "DELETE": "DeleteObject",
    }.get(request.method, request.method)


def _read_line(reader) -> bytes:
    line = reader.readline(65537)
    if not line:
        raise ConnectionError("peer closed")
    return line


def _read_headers(reader) -> list[tuple[str, str]]:
    headers = []
    while True:
        line = _read_line(reader)
        if line in (b"\r\n", b"\n"):
            return headers
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))


def _read_body(reader, headers: list[tuple[str, str]], *, until_close: bool = False) -> bytes:
    lookup = {k.lower(): v for k, v in headers}
    if "chunked" in lookup.get("transfer-encoding", "").lower():
        chunks = []
        while True:
            size = int(_read_line(reader).split(b";")[0].strip(), 16)
            if size == 0:
                while _read_line(reader) not in (b"\r\n", b"\n"):
                    pass
                return b"".join(chunks)
            chunks.append(reader.read(size))
            reader.read(2)
    if "content-length" in lookup:
        return reader.read(int(lookup["content-length"]))
    return reader.read() if until_close else b""


def _error_response(operation: str, status: int) -> bytes:
    if operation.startswith("dynamodb:"):
        kind = "InternalServerError" if status == 500 else "ServiceUnavailable"
        body = json.dumps(
            {"__type": f"com.amazonaws.dynamodb.v20120810#{kind}", "message": "injected"}
        ).encode()
        content_type = "application/x-amz-json-1.0"
    else:
        kind = "InternalError" if status == 500 else "SlowDown"
        body = f"<Error><Code>{kind}</Code><Message>injected fault</Message></Error>".encode()
        content_type = "application/xml"
    reason = "Internal Server Error" if status == 500 else "Service Unavailable"
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\nx-amzn-requestid: fault\r\n\r\n"
    )
    return head.encode() + body


@dataclass
class FaultProxy:
    """Start with :meth:`start`; point boto3 at :attr:`url`; arm faults with :meth:`add`."""

    upstream: str
    faults: list[Fault] = field(default_factory=list)
    log: list[tuple[str, str]] = field(default_factory=list)  # (operation, action or "pass")

    def __post_init__(self) -> None:
        split = urlsplit(self.upstream)
        if split.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError("the fault proxy only forwards to loopback")
        self._upstream = (split.hostname, split.port or 80)
        self._lock = threading.Lock()
        self._inflight = 0
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self._stopped = threading.Event()
        self._clients: set[socket.socket] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.getsockname()[1]}"

    def add(self, operation: str, action: str, times: int = 1, delay_s: float = 0.0) -> Fault:
        fault = Fault(operation, action, times, delay_s)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def fired(self) -> list[tuple[str, str]]:
        return [entry for entry in self.log if entry[1] != "pass"]

    def start(self) -> FaultProxy:
        threading.Thread(target=self._accept, name="fault-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._server.close()
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            with contextlib.suppress(OSError):
                client.close()

    def wait_idle(self, timeout: float = 15.0) -> None:
        """Wait until no request is being forwarded (delayed writes have landed), bounded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._inflight == 0:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"fault proxy still forwarding after {timeout} s")

    # -- internals ------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            client.settimeout(SOCKET_TIMEOUT_S)
            with self._lock:
                self._clients.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _take(self, operation: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.operation == operation and fault.fired < fault.times:
                    fault.fired += 1
                    self.log.append((operation, fault.action))
                    return fault
            self.log.append((operation, "pass"))
            return None

    def _serve(self, client: socket.socket) -> None:
        reader = client.makefile("rb")
        try:
            while not self._stopped.is_set():
                try:
                    request_line = _read_line(reader).decode("latin-1").strip()
                except (ConnectionError, OSError):
                    return
                if not request_line:
                    return
                method, target, _ = request_line.split(" ", 2)
                headers = _read_headers(reader)
                request = _Request(method, target, headers, b"")
                if "100-continue" in request.header("expect").lower():
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                request.body = _read_body(reader, headers)
                if not self._handle(client, request):
                    return
        except (OSError, ValueError, ConnectionError):
            return
        finally:
            with self._lock:
                self._clients.discard(client)
            reader.close()
            client.close()

    def _handle(self, client: socket.socket, request: _Request) -> bool:
        """Apply the fault (if any) to one request; False when the client connection must close."""
        operation = operation_of(request)
        fault = self._take(operation)
        action = fault.action if fault else "pass"
        if action == "close_before":
            return False
        if action in ("status_500", "status_503"):
            client.sendall(_error_response(operation, 500 if action == "status_500" else 503))
            return True
        with self._lock:
            self._inflight += 1
        try:
            if action == "delay" and fault is not None:
                time.sleep(fault.delay_s)
            status_line, headers, body = self._forward(request)
        finally:
            with self._lock:
                self._inflight -= 1
        if action == "drop_after_write":
            return False
        if action == "error_after_write":
            client.sendall(_error_response(operation, 500))
            return True
        keep = [
            (k, v)
            for k, v in headers
            if k.lower() not in ("content-length", "transfer-encoding", "connection")
        ]
        head = status_line + "".join(f"{k}: {v}\r\n" for k, v in keep)
        length = (
            len(body)
            if request.method != "HEAD"
            else int(dict((k.lower(), v) for k, v in headers).get("content-length", 0))
        )
        head += f"content-length: {length}\r\n\r\n"
        client.sendall(head.encode("latin-1") + (body if request.method != "HEAD" else b""))
        return True

    def _forward(self, request: _Request) -> tuple[str, list[tuple[str, str]], bytes]:
        """Send one request upstream on a fresh connection; return status line, headers, body."""
        with socket.create_connection(self._upstream, timeout=SOCKET_TIMEOUT_S) as upstream:
            skip = {"expect", "connection", "transfer-encoding", "content-length"}
            lines = [f"{request.method} {request.target} HTTP/1.1"]
            lines += [f"{k}: {v}" for k, v in request.headers if k.lower() not in skip]
            lines += [f"content-length: {len(request.body)}", "connection: close"]
            upstream.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.body)
            reader = upstream.makefile("rb")
            try:
                status_line = _read_line(reader).decode("latin-1")
                while status_line.split(" ")[1].startswith("1"):  # skip 100 Continue
                    _read_headers(reader)
                    status_line = _read_line(reader).decode("latin-1")
                headers = _read_headers(reader)
                body = b"" if request.method == "HEAD" else _read_body(reader, headers, until_close=True)
            finally:
                reader.close()
        return status_line, headers, body
