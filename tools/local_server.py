"""Serve the Lambda handler over local HTTP, translating requests the way API Gateway (REST) does.

``python -m tools.local_server --port 8080 [--host 127.0.0.1] [--local-aws] [--caller-arn ARN]``

Production is an API Gateway REST API with Lambda proxy integration, so each HTTP request becomes
the REST (payload 1.0) event that service sends, built by :func:`serving.rest_event.build_event`
(the builder the edge agent's HTTP API uses too): ``resource`` (the route template) and ``path``
(as sent, percent-encoding kept), ``httpMethod``, ``headers`` (last value of a repeated header) and
``multiValueHeaders``, ``queryStringParameters`` and ``multiValueQueryStringParameters``, decoded
``pathParameters``, ``stageVariables``, ``requestContext`` (``resourcePath``, ``httpMethod``,
``stage``, ``path`` with the stage, ``requestId``, ``extendedRequestId``, ``identity`` with
``sourceIp``, ``userAgent``, ``userArn``, ``accessKey``, ...) and a body that is base64-encoded
(``isBase64Encoded``) exactly when its content type is one of the API's binary media types
(:data:`serving.events.IMAGE_CONTENT_TYPES`, which infra/ also deploys). A request no route serves
gets REST API Gateway's own ``403 {"message":"Missing Authentication Token"}`` without reaching
the handler, as in production.

Identity: the deployed API uses IAM auth, which fills ``identity.userArn``/``accessKey`` from the
verified signature. This server verifies nothing: it takes the access key from a SigV4
``Authorization`` header if one is sent and the ARN from ``--caller-arn`` (e.g. a camera's, see
:mod:`serving.identity`), so the handler's caller rules can be exercised locally.

The connection is guarded as a front door should be: a missing, repeated, non-ASCII or non-numeric
``Content-Length`` is a 400 (411 for a chunked body), a body over 10 MB a 413, and an upload that
stalls is cut off with a 408 after a bounded time (per read and in total), so no thread waits on a
client forever.

The handler is the deployed one (``serving.app.handler``), so local behaviour — validation,
scoring, persistence — is the Lambda's. Storage goes wherever the standard AWS environment
variables point; ``--local-aws`` starts an in-process moto server (main venv only) and
creates the results table and bucket there, so the whole flow runs offline.

To run it from another program use :func:`spawn`: the handler logs one JSON line per request
to stdout (as on Lambda, where stdout goes to CloudWatch), so a parent that pipes stdout must
keep reading it — once the pipe buffer (64 KiB on Linux, ~100 requests) is full, the logging
call blocks while holding the log handler's lock and every request thread stops behind it.
"""

from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any
from urllib.parse import urlsplit

from serving.rest_event import ACCOUNT_ID, api_gateway_request_id, build_event
from serving.routes import ROUTES, match_route

Handler = Callable[[dict[str, Any], Any], Any]

__all__ = ["ROUTES", "build_event", "make_server", "match_route", "spawn"]

# API Gateway's hard request limit (REST and HTTP APIs alike).
MAX_REQUEST_BYTES = 10 * 1024 * 1024
# How long a client may take: per socket read (also while idle between keep-alive requests), and
# in total for one request (read + body budget). So a stalled or trickling client cannot hold a
# thread forever.
READ_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 60.0
_CONTENT_LENGTH = re.compile(r"[0-9]{1,12}")


@dataclass
class LocalContext:
    """The attributes of Lambda's context object that handlers commonly read."""

    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    function_name: str = "visual-inspection-local"
    function_version: str = "$LATEST"
    memory_limit_in_mb: int = 2048
    timeout_s: float = 30.0
    log_group_name: str = "/aws/lambda/visual-inspection-local"
    log_stream_name: str = "local"
    started: float = field(default_factory=time.monotonic)

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:us-east-1:{ACCOUNT_ID}:function:{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.timeout_s - (time.monotonic() - self.started)) * 1000))


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def to_http_response(result: Any) -> HttpResponse:
    """Map a Lambda proxy result to HTTP as API Gateway does (``headers`` and ``multiValueHeaders``).

    A dict with ``statusCode`` is used as is; anything else is a 200 JSON body.
    """
    if not (isinstance(result, dict) and "statusCode" in result):
        body = json.dumps(result).encode()
        return HttpResponse(200, [("content-type", "application/json")], body)
    raw = result.get("body") or ""
    body = base64.b64decode(raw) if result.get("isBase64Encoded") else str(raw).encode("utf-8")
    headers = [(str(k), str(v)) for k, v in (result.get("headers") or {}).items()]
    for name, values in (result.get("multiValueHeaders") or {}).items():
        headers += [(str(name), str(v)) for v in values]
    headers += [("set-cookie", str(c)) for c in result.get("cookies") or []]
    return HttpResponse(int(result["statusCode"]), headers, body)


def _json_message(status: int, message: str, *extra: tuple[str, str]) -> HttpResponse:
    return HttpResponse(
        status,
        [("content-type", "application/json"), *extra],
        json.dumps({"message": message}).encode(),
    )


class _DeadlineReader(io.RawIOBase):
    """The connection's reads, each bounded by ``read_timeout`` and all by the request's deadline."""

    def __init__(self, sock: socket.socket, owner: Any, read_timeout: float) -> None:
        self.sock, self.owner, self.read_timeout = sock, owner, read_timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.owner.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        self.sock.settimeout(min(self.read_timeout, left))
        return self.sock.recv_into(buffer)


class _Refused(Exception):
    """The connection's request cannot reach the handler; answered with ``response`` and closed."""

    def __init__(self, response: HttpResponse) -> None:
        super().__init__(response.status)
        self.response = response


def make_request_handler(
    handler: Handler,
    *,
    quiet: bool = False,
    caller_arn: str | None = None,
    read_timeout: float = READ_TIMEOUT_S,
    body_timeout: float = BODY_TIMEOUT_S,
) -> type[BaseHTTPRequestHandler]:
    """A ``BaseHTTPRequestHandler`` subclass that turns each request into one handler call."""

    class ApiGatewayRequestHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as API Gateway clients expect
        server_version = "local-apigw"
        timeout = read_timeout  # every socket read, including the request line and headers

        def _serve(self) -> None:
            request_id = api_gateway_request_id()
            try:
                body = self._read_body()
            except _Refused as refused:
                self._send(refused.response, request_id, close=True)
                return
            path = urlsplit(self.path).path
            route = match_route(self.command, path)
            if route is None:  # REST API Gateway's answer for a resource/method it does not have
                self._send(
                    _json_message(
                        403,
                        "Missing Authentication Token",
                        ("x-amzn-ErrorType", "MissingAuthenticationTokenException"),
                    ),
                    request_id,
                )
                return
            event = build_event(
                method=self.command,
                target=self.path,
                headers=list(self.headers.items()),
                body=body,
                resource=route[0],
                path_parameters=route[1],
                source_ip=self.client_address[0],
                host=self.headers.get("host")
                or f"{self.server.server_address[0]}:{self.server.server_address[1]}",
                request_id=request_id,
                caller_arn=caller_arn,
            )
            try:
                response = to_http_response(handler(event, LocalContext()))
            except Exception:  # what API Gateway shows when the function errors
                traceback.print_exc(file=sys.stderr)
                response = _json_message(502, "Internal server error")
            self._send(response, request_id)

        def setup(self) -> None:
            super().setup()
            self.deadline = time.monotonic() + read_timeout + body_timeout
            self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self, read_timeout))

        def handle_one_request(self) -> None:
            # One budget per request for the wait, the request line, the headers and the body: a
            # client that sends a byte just often enough never trips the per-read timeout alone.
            self.deadline = time.monotonic() + read_timeout + body_timeout
            super().handle_one_request()

        def _read_body(self) -> bytes:
            """The body per a valid ``Content-Length``, within the request's time budget."""
            lengths = self.headers.get_all("content-length") or []
            if not lengths:
                if self.headers.get("transfer-encoding"):
                    raise _Refused(_json_message(411, "Length Required"))
                return b""
            raw = lengths[0].strip()
            if len(set(lengths)) > 1 or not _CONTENT_LENGTH.fullmatch(raw):
                # Only ASCII digits: int() would also take '١٢' or '１２' (and raise on '²').
                raise _Refused(_json_message(400, "Bad Request: invalid Content-Length"))
            length = int(raw)
            if length > MAX_REQUEST_BYTES:
                raise _Refused(_json_message(413, "Request Entity Too Large"))
            try:
                body = self.rfile.read(length)
            except TimeoutError as exc:
                raise _Refused(_json_message(408, "Request Timeout")) from exc
            if len(body) < length:  # the client closed before sending the whole body
                raise _Refused(_json_message(400, "Bad Request: incomplete body"))
            return body

        def _send(self, response: HttpResponse, request_id: str, *, close: bool = False) -> None:
            self.send_response(response.status)
            names = {name.lower() for name, _ in response.headers}
            for name, value in response.headers:
                self.send_header(name, value)
            if "content-type" not in names:
                self.send_header("content-type", "application/json")
            self.send_header("x-amzn-RequestId", request_id)
            self.send_header("date", formatdate(usegmt=True))
            self.send_header("content-length", str(len(response.body)))
            if close:
                self.send_header("connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(response.body)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _serve

        def log_message(self, format: str, *args: Any) -> None:
            if not quiet:
                super().log_message(format, *args)

    return ApiGatewayRequestHandler


class _LocalApiServer(ThreadingHTTPServer):
    request_queue_size = 128


def make_server(
    handler: Handler,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    quiet: bool = False,
    caller_arn: str | None = None,
    read_timeout: float = READ_TIMEOUT_S,
    body_timeout: float = BODY_TIMEOUT_S,
) -> ThreadingHTTPServer:
    """A threaded HTTP server (one thread per connection) in front of ``handler``.

    The listen backlog is 128, not socketserver's 5: with dozens of clients connecting at
    once, a full accept queue makes the kernel drop or reset connections (client errors).
    """
    request_handler = make_request_handler(
        handler, quiet=quiet, caller_arn=caller_arn, read_timeout=read_timeout, body_timeout=body_timeout
    )
    server = _LocalApiServer((host, port), request_handler)
    server.daemon_threads = True
    return server


def start_local_aws() -> Any:
    """Start moto on 127.0.0.1, point boto3 at it and create the results table and bucket.

    Needs ``moto[server]`` (main venv, not the image). Returns the running server.
    """
    from moto.server import ThreadedMotoServer

    from serving.storage import create_resources

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
    for key, value in (
        ("AWS_ACCESS_KEY_ID", "local"),
        ("AWS_SECRET_ACCESS_KEY", "local"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("RESULTS_TABLE", "inspection-results"),
        ("RESULTS_BUCKET", "inspection-results"),
    ):
        os.environ.setdefault(key, value)
    create_resources(os.environ["RESULTS_TABLE"], os.environ["RESULTS_BUCKET"])
    print(f"local AWS (moto) at {os.environ['AWS_ENDPOINT_URL']}", file=sys.stderr, flush=True)
    return server


@dataclass
class ServerProcess:
    """A running ``python -m tools.local_server`` child (see :func:`spawn`)."""

    url: str
    process: subprocess.Popen[bytes]
    tail: collections.deque[str]  # its last stdout lines (handler logs), for error messages


@contextmanager
def spawn(
    args: tuple[str, ...] = ("--quiet",),
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    log: IO[str] | None = None,
    startup_timeout: float = 300.0,
) -> Iterator[ServerProcess]:
    """Run the server in a subprocess on a free 127.0.0.1 port; yield it once it listens.

    Its stdout is read to the end by a background thread (copied to ``log`` if given, the
    last lines kept in ``tail``) so the handler's per-request log lines can never fill the
    pipe and block the server. stderr goes to ``log`` too, or is discarded. The process is
    terminated (then killed) on exit.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "tools.local_server", "--host", "127.0.0.1", "--port", "0", *args],
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdout=subprocess.PIPE,
        stderr=log if log is not None else subprocess.DEVNULL,
    )
    assert process.stdout is not None
    stdout = process.stdout
    tail: collections.deque[str] = collections.deque(maxlen=50)
    found: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        for raw in iter(stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            if not found and line.startswith("listening on "):
                found.append(line.split()[-1])
                ready.set()
            tail.append(line.rstrip("\n"))
            if log is not None:
                log.write(line)
                log.flush()
        ready.set()  # EOF: the process ended (before listening, if ``found`` is empty)

    drainer = threading.Thread(target=drain, name="local-server-stdout", daemon=True)
    drainer.start()
    try:
        if not ready.wait(startup_timeout) or not found:
            output = "\n".join(tail)
            raise RuntimeError(f"local server did not start (exit code {process.poll()}):\n{output}")
        yield ServerProcess(found[0], process, tail)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        drainer.join(timeout=5)
        stdout.close()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: load the handler (and the model) once, then serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m tools.local_server", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port (printed on stdout)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--local-aws", action="store_true", help="start moto and create table + bucket")
    parser.add_argument("--quiet", action="store_true", help="no per-request access log")
    parser.add_argument(
        "--caller-arn", help="requestContext.identity.userArn of every request (IAM auth's caller)"
    )
    args = parser.parse_args(argv)

    moto = start_local_aws() if args.local_aws else None
    from serving.app import handler  # imported after the AWS env is final: clients are built at import

    server = make_server(handler, args.host, args.port, quiet=args.quiet, caller_arn=args.caller_arn)
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if moto is not None:
            moto.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
