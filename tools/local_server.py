"""Serve the Lambda handler over local HTTP, translating requests the way API Gateway does.

``python -m tools.local_server --port 8080 [--host 127.0.0.1] [--local-aws]``

Each HTTP request becomes an API Gateway HTTP API (payload format 2.0) event, built as the
real service builds it: ``rawPath``/``rawQueryString``, lower-cased headers (repeated ones
joined with commas), ``cookies``, ``requestContext`` with a request id in API Gateway's
format, ``pathParameters`` for the routes in :data:`serving.routes.ROUTES`, and a body
that is base64-encoded (``isBase64Encoded``) unless its content type is text. The handler's
proxy response (status, headers, cookies, possibly base64 body) is written back verbatim.
Unmatched routes get API Gateway's own ``404 {"message":"Not Found"}``.

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
import json
import os
import secrets
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
from urllib.parse import parse_qsl, unquote, urlsplit

from serving.routes import ROUTES, match_route

Handler = Callable[[dict[str, Any], Any], Any]

__all__ = ["ROUTES", "build_event", "make_server", "match_route", "spawn"]

# API Gateway's hard request limit for HTTP APIs.
MAX_REQUEST_BYTES = 10 * 1024 * 1024
ACCOUNT_ID = "123456789012"
API_ID = "local"
TEXT_TYPES = {
    "application/json",
    "application/javascript",
    "application/xml",
    "application/yaml",
    "application/x-www-form-urlencoded",
}


def api_gateway_request_id() -> str:
    """An id shaped like HTTP API's (``apigw-requestid``): 14 base64 characters plus ``=``."""
    # URL-safe alphabet: a "/" would be rewritten by the handler (ids become S3 key parts).
    return base64.urlsafe_b64encode(secrets.token_bytes(10)).decode()[:14] + "="


def is_text_content(content_type: str | None) -> bool:
    """Whether API Gateway passes the body as text (else it base64-encodes it)."""
    if not content_type:
        return False
    media = content_type.split(";")[0].strip().lower()
    return media.startswith("text/") or media in TEXT_TYPES or media.endswith(("+json", "+xml"))


def build_event(
    *,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes,
    route_key: str,
    path_parameters: dict[str, str],
    source_ip: str,
    host: str,
    request_id: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The HTTP API payload-2.0 event API Gateway sends to Lambda for this request."""
    split = urlsplit(target)
    now = time.time() if now is None else now
    merged: dict[str, str] = {}
    cookies: list[str] = []
    for name, value in headers:
        key = name.lower()
        if key == "cookie":
            cookies += [c.strip() for c in value.split(";") if c.strip()]
            continue
        merged[key] = f"{merged[key]},{value}" if key in merged else value
    merged.setdefault("x-forwarded-for", source_ip)
    merged.setdefault("x-forwarded-proto", "http")
    query: dict[str, str] = {}
    for key, value in parse_qsl(split.query, keep_blank_values=True):
        query[key] = f"{query[key]},{value}" if key in query else value

    request_id = request_id or api_gateway_request_id()
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": route_key,
        "rawPath": split.path,
        "rawQueryString": split.query,
        "headers": merged,
        "requestContext": {
            "accountId": ACCOUNT_ID,
            "apiId": API_ID,
            "domainName": host,
            "domainPrefix": host.split(".")[0].split(":")[0],
            "http": {
                "method": method,
                "path": unquote(split.path),
                "protocol": "HTTP/1.1",
                "sourceIp": source_ip,
                "userAgent": merged.get("user-agent", ""),
            },
            "requestId": request_id,
            "routeKey": route_key,
            "stage": "$default",
            "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "timeEpoch": int(now * 1000),
        },
        "isBase64Encoded": False,
    }
    if cookies:
        event["cookies"] = cookies
    if query:
        event["queryStringParameters"] = query
    if path_parameters:
        event["pathParameters"] = path_parameters
    if body:
        if is_text_content(merged.get("content-type")):
            try:
                event["body"] = body.decode("utf-8")
            except UnicodeDecodeError:
                event["body"], event["isBase64Encoded"] = base64.b64encode(body).decode(), True
        else:
            event["body"], event["isBase64Encoded"] = base64.b64encode(body).decode(), True
    return event


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
    """Map a Lambda proxy result to HTTP as API Gateway (payload 2.0) does.

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


def _json_message(status: int, message: str) -> HttpResponse:
    return HttpResponse(
        status, [("content-type", "application/json")], json.dumps({"message": message}).encode()
    )


def make_request_handler(handler: Handler, *, quiet: bool = False) -> type[BaseHTTPRequestHandler]:
    """A ``BaseHTTPRequestHandler`` subclass that turns each request into one handler call."""

    class ApiGatewayRequestHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as API Gateway clients expect
        server_version = "local-apigw"

        def _serve(self) -> None:
            request_id = api_gateway_request_id()
            raw_length = (self.headers.get("content-length") or "0").strip()
            if not raw_length.isdigit():  # API Gateway answers a bad Content-Length with 400
                self._send(_json_message(400, "Bad Request: invalid Content-Length"), request_id, close=True)
                return
            length = int(raw_length)
            if length > MAX_REQUEST_BYTES:
                self._send(_json_message(413, "Request Entity Too Large"), request_id, close=True)
                return
            body = self.rfile.read(length) if length else b""
            path = urlsplit(self.path).path
            route = match_route(self.command, path)
            if route is None:
                self._send(_json_message(404, "Not Found"), request_id)
                return
            event = build_event(
                method=self.command,
                target=self.path,
                headers=list(self.headers.items()),
                body=body,
                route_key=route[0],
                path_parameters=route[1],
                source_ip=self.client_address[0],
                host=self.headers.get("host")
                or f"{self.server.server_address[0]}:{self.server.server_address[1]}",
                request_id=request_id,
            )
            try:
                response = to_http_response(handler(event, LocalContext()))
            except Exception:  # what API Gateway shows when the function errors
                traceback.print_exc(file=sys.stderr)
                response = _json_message(500, "Internal Server Error")
            self._send(response, request_id)

        def _send(self, response: HttpResponse, request_id: str, *, close: bool = False) -> None:
            self.send_response(response.status)
            names = {name.lower() for name, _ in response.headers}
            for name, value in response.headers:
                self.send_header(name, value)
            if "content-type" not in names:
                self.send_header("content-type", "application/json")
            self.send_header("apigw-requestid", request_id)
            self.send_header("date", formatdate(usegmt=True))
            self.send_header("content-length", str(len(response.body)))
            if close:
                self.send_header("connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(response.body)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:
            if not quiet:
                super().log_message(format, *args)

    return ApiGatewayRequestHandler


class _LocalApiServer(ThreadingHTTPServer):
    request_queue_size = 128


def make_server(
    handler: Handler, host: str = "127.0.0.1", port: int = 8080, *, quiet: bool = False
) -> ThreadingHTTPServer:
    """A threaded HTTP server (one thread per connection) in front of ``handler``.

    The listen backlog is 128, not socketserver's 5: with dozens of clients connecting at
    once, a full accept queue makes the kernel drop or reset connections (client errors).
    """
    server = _LocalApiServer((host, port), make_request_handler(handler, quiet=quiet))
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
    args = parser.parse_args(argv)

    moto = start_local_aws() if args.local_aws else None
    from serving.app import handler  # imported after the AWS env is final: clients are built at import

    server = make_server(handler, args.host, args.port, quiet=args.quiet)
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
