"""A fault-injecting HTTP proxy on loopback, in front of the tests' HTTP file server or their S3 server (moto).

Clients talk to :attr:`FaultProxy.url` as if it were the server; the proxy forwards each request and, for a
deterministic fraction of them, answers with a fault instead: a connection reset (TCP RST, before any byte of the
answer), a stall (no answer until the client gives up), a truncated body (the headers promise more than is sent,
then a reset), or an HTTP error — 429, 500, 503; for S3, 500 ``InternalError`` and 503 ``SlowDown`` with S3's XML
error body, as botocore parses it.

Which requests fail does not depend on timing or concurrency: each request is keyed by method, path and byte
range, and the *n*-th time a key is seen it fails iff a random number seeded by ``(seed, key, n)`` is below
``rate`` — and never more than ``max_in_a_row`` times running, so that a client making ``max_in_a_row + 1``
attempts always gets through.  :attr:`FaultProxy.fail` makes chosen paths fail always (403, 404, 503), for
sources that are gone, forbidden or down.  Requests are counted by path, and faults by kind.

``scripts/bench_remote.py`` measures reads through it.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: Fault kinds: ``reset``, ``stall``, ``truncate``, or an HTTP status answered instead of the file.
KINDS = ("reset", "stall", "truncate", 429, 500, 503)
#: Headers that belong to one connection, not to the request or answer forwarded.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade"}
#: What S3 says with each status (code, message), for botocore to parse.
_S3_ERRORS = {403: ("AccessDenied", "Access Denied"), 404: ("NoSuchKey", "The specified key does not exist."),
              429: ("SlowDown", "Please reduce your request rate."), 500: ("InternalError", "We encountered an "
                                                                        "internal error. Please try again."),
              503: ("SlowDown", "Please reduce your request rate.")}


class FaultProxy:
    """A threaded HTTP/1.1 proxy for ``upstream`` (``http://127.0.0.1:PORT``) on a free loopback port.

    ``rate`` is the fraction of requests that fail, with kinds drawn from ``kinds``; ``stall`` is how long a
    stalled request hangs before its connection is reset (longer than the client's timeout); ``s3`` gives HTTP
    errors S3's XML bodies.  Settings may be changed while it runs.
    """

    def __init__(self, upstream: str, *, rate: float = 0.0, kinds: tuple[Any, ...] = KINDS, seed: int = 0,
                 max_in_a_row: int = 2, stall: float = 5.0, s3: bool = False) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.rate, self.kinds, self.seed, self.max_in_a_row, self.stall, self.s3 = \
            rate, tuple(kinds), seed, max_in_a_row, stall, s3
        #: path (no query) → HTTP status answered to every request for it
        self.fail: dict[str, int] = {}
        self.requests: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        self._seen: Counter[str] = Counter()
        self._running: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self._server.handle_error = lambda request, address: None  # type: ignore[method-assign]  # resets are the point
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self.injected.clear()
            self._seen.clear()
            self._running.clear()

    def decide(self, method: str, path: str, byte_range: str | None) -> Any:
        """The fault for this request (a kind of :data:`KINDS`), or None to forward it."""
        bare = urllib.parse.urlsplit(path).path
        key = f"{method} {path} {byte_range}"
        with self._lock:
            self.requests[bare] += 1
            if bare in self.fail:
                self.injected[str(self.fail[bare])] += 1
                return self.fail[bare]
            n = self._seen[key]
            self._seen[key] += 1
            draw = random.Random(f"{self.seed}|{key}|{n}")
            if self.rate <= 0 or draw.random() >= self.rate or self._running[key] >= self.max_in_a_row:
                self._running[key] = 0
                return None
            self._running[key] += 1
            kind = self.kinds[int(draw.random() * len(self.kinds))]
            self.injected[str(kind)] += 1
            return kind

    def forward(self, connection: http.client.HTTPConnection, method: str, path: str, headers: Any,
                body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        """The upstream's answer to one request: status, headers to pass on, body."""
        sent = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP}
        connection.request(method, path, body=body or None, headers=sent)
        response = connection.getresponse()
        data = response.read()
        kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP | {"content-length"}]
        length = response.getheader("Content-Length") if method == "HEAD" else str(len(data))
        return response.status, kept + ([("Content-Length", length)] if length is not None else []), data

    def error_body(self, status: int) -> bytes:
        if not self.s3 or status not in _S3_ERRORS:
            return f"injected fault: HTTP {status}\n".encode()
        code, message = _S3_ERRORS[status]
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f'<RequestId>fault</RequestId></Error>').encode()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 and web servers keep connections
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        proxy: FaultProxy = self.server.proxy
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fault = proxy.decide(self.command, self.path, self.headers.get("Range"))
        if fault == "reset":
            return self._reset()
        if fault == "stall":
            time.sleep(proxy.stall)
            return self._reset()
        if isinstance(fault, int):
            data = proxy.error_body(fault)
            self.send_response(fault)
            self.send_header("Content-Type", "application/xml" if proxy.s3 else "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            return
        try:
            status, headers, data = proxy.forward(self._upstream(), self.command, self.path, self.headers, body)
        except (OSError, http.client.HTTPException):
            self.__dict__.pop("upstream", None)
            return self._reset()
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault == "truncate" and len(data) > 1:
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            return self._reset()
        self.wfile.write(data)

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _upstream(self) -> http.client.HTTPConnection:
        """This client connection's own keep-alive connection to the upstream server."""
        if "upstream" not in self.__dict__:
            host, port = self.server.proxy.upstream
            self.__dict__["upstream"] = http.client.HTTPConnection(host, port, timeout=60)
        return self.__dict__["upstream"]

    def _reset(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0), as a failing load balancer or NAT does."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass


def _serve_until_stdin_closes() -> None:
    """Subprocess mode, for benchmarks (the proxy's threads then do not compete with the client for its GIL):
    ``python tests/faults.py (--upstream URL | --serve DIR) [--s3] [--rate R] [--kinds reset,503] [--seed N]``
    prints the port, proxies until stdin closes, then prints its counters as one JSON line."""
    import argparse
    import json
    import sys
    from pathlib import Path

    parser = argparse.ArgumentParser()
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--upstream", help="server to proxy, http://127.0.0.1:PORT")
    where.add_argument("--serve", type=Path, help="folder to serve over HTTP (the tests' LocalHTTP) and proxy")
    parser.add_argument("--s3", action="store_true", help="answer errors with S3's XML bodies")
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--kinds", default=",".join(map(str, KINDS)))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    server = None
    if args.serve is not None:
        import logging

        from conftest import LocalHTTP

        logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "task queue depth" under load is expected
        server = LocalHTTP(args.serve)
    kinds = tuple(int(k) if k.isdigit() else k for k in args.kinds.split(","))
    proxy = FaultProxy(args.upstream or server.url, rate=args.rate, kinds=kinds, seed=args.seed, s3=args.s3)
    print(proxy.url.rsplit(":", 1)[1], flush=True)
    sys.stdin.read()
    print(json.dumps({"requests": sum(proxy.requests.values()), "injected": dict(proxy.injected)}), flush=True)
    proxy.stop()
    if server is not None:
        server.stop()


if __name__ == "__main__":
    _serve_until_stdin_closes()
