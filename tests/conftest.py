"""Shared fixtures: a local S3 server (moto) on loopback, with request/byte counters and simulated latency, and a
local HTTP file server.

virtnii's main use is indexing public buckets (OpenNeuro, DANDI) in place, so tests and benchmarks must exercise
the real s3fs/aiobotocore path — listings, ranged GETs, ETags — not an in-memory fake filesystem.  moto's WSGI
app is served by waitress (keep-alive connections, as S3 keeps them) on ``127.0.0.1`` and a free port, fully
offline.  It is wrapped in :class:`MeteredApp`, which counts requests and response bytes (what a cloud bill and
a latency budget count) and can sleep before every request, because the thing virtnii optimises — round trips —
costs nothing on loopback.

The benchmark scripts import :class:`LocalS3` from this file, so the server the tests trust is the one that is
measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pytest

#: Fake credentials, distinctive enough that a test can grep manifests for them.
ACCESS_KEY = "VIRTNIITESTACCESSKEY"
SECRET_KEY = "virtnii-test-secret-key-do-not-write-me"
REGION = "us-east-1"

#: Environment that keeps botocore offline: no shared config, no instance-metadata probes, no proxies on loopback.
S3_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_DEFAULT_REGION": REGION,
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


class MeteredApp:
    """WSGI middleware: sleeps ``latency`` seconds per request, counts requests (by method) and response bytes.

    The sleep happens in the server's per-connection thread, so concurrent clients overlap their waits just as
    they overlap round trips to a real region; a serial client pays it once per request.  Requests under
    ``/_meter/`` control it (``stats``, ``reset``, ``latency?seconds=``) and are neither delayed nor counted, so
    the same calls work whether the server runs in this process or in another.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.latency = 0.0
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.bytes_out = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path.startswith(CONTROL):
            return self._control(path[len(CONTROL):], environ.get("QUERY_STRING", ""), start_response)
        if self.latency:
            time.sleep(self.latency)
        with self._lock:
            self.requests[environ.get("REQUEST_METHOD", "?")] += 1
        return self._metered(self.app(environ, start_response))

    def _metered(self, body: Iterable[bytes]) -> Iterator[bytes]:
        sent = 0
        try:
            for chunk in body:
                sent += len(chunk)
                yield chunk
        finally:
            with self._lock:
                self.bytes_out += sent

    def _control(self, command: str, query: str, start_response: Callable[..., Any]) -> list[bytes]:
        with self._lock:
            if command == "reset":
                self.requests.clear()
                self.bytes_out = 0
            elif command == "latency":
                self.latency = float(urllib.parse.parse_qs(query)["seconds"][0])
            body = json.dumps({"requests": dict(self.requests), "bytes_out": self.bytes_out,
                               "latency": self.latency}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]


CONTROL = "/_meter/"


#: Worker threads of the S3 server: more than a scan's concurrent requests (64), so that simulated round trips
#: (a sleep in a worker) overlap as they would on a real network.
SERVER_THREADS = 128


class S3Server:
    """moto's S3 app behind :class:`MeteredApp`, served by waitress on ``127.0.0.1`` and a free port.

    waitress, not werkzeug's development server (moto's own choice), because werkzeug closes the connection after
    every response: each request then paid a new TCP connection and a new server thread, on both sides of the
    benchmark, which S3 (keep-alive) does not charge.
    """

    def __init__(self) -> None:
        import logging

        import waitress
        from moto.moto_server.werkzeug_app import create_backend_app

        logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "task queue depth" under load is expected
        # moto's S3 app itself: moto's multi-service dispatcher guesses the service of every request under one
        # global lock, which capped the server near 250 requests/s and made the emulator the bottleneck.
        self.app = MeteredApp(create_backend_app("s3"))
        self._server = waitress.create_server(self.app, host="127.0.0.1", port=0, threads=SERVER_THREADS,
                                              connection_limit=4 * SERVER_THREADS, asyncore_use_poll=True,
                                              clear_untrusted_proxy_headers=True)
        self.port = int(self._server.effective_port)

    def serve_forever(self) -> None:
        self._server.run()

    def shutdown(self) -> None:
        stop_waitress(self._server)


def stop_waitress(server: Any) -> None:
    """Close a waitress server's listening socket and every connection, and stop its worker threads."""
    server.close()
    for channel in list(server._map.values()):
        channel.handle_close()
    server.task_dispatcher.shutdown()


@dataclass
class Meter:
    """What the server counted since the last reset: requests by HTTP method, and response body bytes."""

    requests: dict[str, int]
    bytes_out: int

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())


class LocalS3:
    """A moto S3 server on ``127.0.0.1`` and a free port, until :meth:`stop`.

    By default it runs in a daemon thread of this process (fast to start, enough for tests).  Benchmarks pass
    ``separate_process=True``: moto's request handling then does not compete with the client for this
    interpreter's GIL, as a real S3 would not, so the client's timings are its own.  ``storage_options`` are
    ready for s3fs (``s3fs.S3FileSystem(**s3.storage_options)``, ``virtnii.scan(…, storage_options=…)``,
    ``virtnii.open(…, **…)``).
    """

    def __init__(self, separate_process: bool = False) -> None:
        self._server: Any = None
        self._process: subprocess.Popen[str] | None = None
        if separate_process:
            env = {**os.environ, **S3_ENVIRONMENT}
            self._process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, text=True, env=env)
            assert self._process.stdout is not None
            port = int(self._process.stdout.readline())
        else:
            self._server = S3Server()
            port = self._server.port
            self._thread = threading.Thread(target=self._server.serve_forever, name="local-s3", daemon=True)
            self._thread.start()
        self.endpoint = f"http://127.0.0.1:{port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """Fresh s3fs options (a new dict each time, so a caller mutating it cannot leak into other tests)."""
        return {"key": ACCESS_KEY, "secret": SECRET_KEY, "endpoint_url": self.endpoint,
                "client_kwargs": {"region_name": REGION}}

    def filesystem(self, **extra: Any) -> Any:
        """A new (uncached) s3fs filesystem on this server."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options, **extra)

    def create_bucket(self, prefix: str = "bucket") -> str:
        """A new empty bucket with a unique name, so tests never see each other's objects."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.filesystem().call_s3("create_bucket", Bucket=name)  # s3fs.mkdir sends a us-east-1 constraint moto rejects
        return name

    def _control(self, command: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.endpoint}{CONTROL}{command}", timeout=10) as response:
            return json.load(response)

    def set_latency(self, seconds: float) -> None:
        """Delay every following request by ``seconds`` (a simulated round trip)."""
        self._control(f"latency?seconds={seconds}")

    @contextmanager
    def latency(self, seconds: float) -> Iterator[None]:
        """Simulate ``seconds`` of round-trip time on every request inside the block."""
        before = self._control("stats")["latency"]
        self.set_latency(seconds)
        try:
            yield
        finally:
            self.set_latency(before)

    def reset_counters(self) -> None:
        self._control("reset")

    def meter(self) -> Meter:
        """Requests and bytes served since the last :meth:`reset_counters`."""
        stats = self._control("stats")
        return Meter(stats["requests"], stats["bytes_out"])

    def stop(self) -> None:
        if self._process is not None:
            assert self._process.stdin is not None
            self._process.stdin.close()  # the server exits when its stdin closes (also when we die)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        else:
            self._server.shutdown()
            self._thread.join(timeout=10)


class LocalHTTP:
    """A static file server for ``root`` on ``127.0.0.1`` (waitress + werkzeug's ``send_file``): byte ranges,
    ETag and Last-Modified, as a lab's web server or a CDN serves a BIDS folder.

    With ``gzip_encoding=True`` (or set later) it labels ``.gz`` files ``Content-Encoding: gzip`` the way Apache's
    ``AddEncoding x-gzip .gz`` and werkzeug's defaults do: clients then see no size and may unzip the bytes.
    With ``ranges=False`` (or ``server.ranges = False`` later) it ignores ``Range`` and always sends whole files,
    as ``python -m http.server`` does.
    Requests are counted by path in ``requests``.
    """

    def __init__(self, root: Path, gzip_encoding: bool = False, ranges: bool = True) -> None:
        import waitress
        from werkzeug.exceptions import HTTPException
        from werkzeug.utils import send_from_directory

        self.root = root
        self.ranges = ranges
        self.gzip_encoding = gzip_encoding
        self.requests: Counter[str] = Counter()
        #: path → HTTP status to answer instead of the file (e.g. 403, 500)
        self.fail: dict[str, int] = {}

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ["PATH_INFO"].lstrip("/")
            self.requests[path] += 1
            if path in self.fail:
                start_response(f"{self.fail[path]} Refused", [("Content-Length", "0")])
                return [b""]
            # an explicit mimetype stops werkzeug from guessing (and sending) a Content-Encoding for .gz
            mimetype = None if self.gzip_encoding else "application/octet-stream"
            try:
                response = send_from_directory(root, path, environ, mimetype=mimetype, conditional=self.ranges,
                                               etag=True)
            except HTTPException as err:
                response = err.get_response(environ)
            return response(environ, start_response)

        self._server = waitress.create_server(app, host="127.0.0.1", port=0, threads=8)
        self.url = f"http://127.0.0.1:{self._server.effective_port}"
        self._thread = threading.Thread(target=self._server.run, name="local-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        stop_waitress(self._server)
        self._thread.join(timeout=10)


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, LocalHTTP]]:
    """An empty folder served over HTTP (see :class:`LocalHTTP`); put files in it, read them at ``server.url``."""
    root = tmp_path / "www"
    root.mkdir()
    server = LocalHTTP(root)
    yield root, server
    server.stop()


def clear_fsspec_caches() -> None:
    """Forget cached s3fs instances, whose listings (dircache) would hide objects changed by another test."""
    import fsspec
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fsspec.AbstractFileSystem.clear_instance_cache()
    fsspec.get_filesystem_class("http").clear_instance_cache()  # virtnii.retry's wrappers live on these


@contextmanager
def running_s3(separate_process: bool = False) -> Iterator[LocalS3]:
    """Start a :class:`LocalS3` with fake credentials in the environment; stop it and restore the environment."""
    saved = {name: os.environ.get(name) for name in S3_ENVIRONMENT}
    os.environ.update(S3_ENVIRONMENT)
    server = LocalS3(separate_process)
    try:
        yield server
    finally:
        clear_fsspec_caches()
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def s3_server() -> Iterator[LocalS3]:
    """One local S3 server for the whole session (skipped when moto's server extra is not installed)."""
    pytest.importorskip("moto.moto_server.werkzeug_app")
    pytest.importorskip("s3fs")
    with running_s3() as server:
        yield server


@pytest.fixture
def s3(s3_server: LocalS3) -> Iterator[LocalS3]:
    """The session's S3 server, with fsspec instance caches cleared around the test and latency reset."""
    clear_fsspec_caches()
    s3_server.set_latency(0.0)
    yield s3_server
    clear_fsspec_caches()


def _serve_until_stdin_closes() -> None:
    """Child-process mode of :class:`LocalS3`: print the port, serve until the parent closes our stdin."""
    server = S3Server()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.port, flush=True)
    sys.stdin.read()
    server.shutdown()


if __name__ == "__main__":
    _serve_until_stdin_closes()
