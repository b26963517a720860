"""Shared fixtures: a local S3 server (moto) on loopback, with request/byte counters and simulated latency.

virtnii's main use is indexing public buckets (OpenNeuro, DANDI) in place, so tests and benchmarks must exercise
the real s3fs/aiobotocore path — listings, ranged GETs, ETags — not an in-memory fake filesystem.  moto's WSGI
app is served by werkzeug's threaded server on ``127.0.0.1`` and a free port, fully offline.  It is wrapped in
:class:`MeteredApp`, which counts requests and response bytes (what a cloud bill and a latency budget count) and
can sleep before every request, because the thing virtnii optimises — round trips — costs nothing on loopback.

The benchmark scripts import :class:`LocalS3` from this file, so the server the tests trust is the one that is
measured.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
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
    they overlap round trips to a real region; a serial client pays it once per request.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.latency = 0.0
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.bytes_out = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        if self.latency:
            time.sleep(self.latency)
        with self._lock:
            self.requests[environ.get("REQUEST_METHOD", "?")] += 1
        sent = 0
        try:
            for chunk in self.app(environ, start_response):
                sent += len(chunk)
                yield chunk
        finally:
            with self._lock:
                self.bytes_out += sent

    def reset(self) -> None:
        """Zero the counters (e.g. between the two sides of a benchmark)."""
        with self._lock:
            self.requests.clear()
            self.bytes_out = 0


class LocalS3:
    """A moto S3 server on ``127.0.0.1`` and a free port, running in a daemon thread until :meth:`stop`.

    ``storage_options`` are ready for s3fs (``s3fs.S3FileSystem(**s3.storage_options)``, ``virtnii.scan(…,
    storage_options=…)``, ``virtnii.open(…, **…)``).
    """

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        class QuietHandler(MotoRequestHandler):
            """moto's handler without werkzeug's access log, which would bury test output (and slow benchmarks)."""

            def log(self, *args: Any) -> None:
                pass

        self.app = MeteredApp(DomainDispatcherApplication(create_backend_app))
        self._server = make_server("127.0.0.1", 0, self.app, threaded=True, request_handler=QuietHandler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-s3", daemon=True)
        self._thread.start()

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

    @contextmanager
    def latency(self, seconds: float) -> Iterator[None]:
        """Simulate ``seconds`` of round-trip time on every request inside the block."""
        before, self.app.latency = self.app.latency, seconds
        try:
            yield
        finally:
            self.app.latency = before

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def clear_fsspec_caches() -> None:
    """Forget cached s3fs instances, whose listings (dircache) would hide objects changed by another test."""
    import fsspec
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fsspec.AbstractFileSystem.clear_instance_cache()


@contextmanager
def running_s3() -> Iterator[LocalS3]:
    """Start a :class:`LocalS3` with fake credentials in the environment; stop it and restore the environment."""
    saved = {name: os.environ.get(name) for name in S3_ENVIRONMENT}
    os.environ.update(S3_ENVIRONMENT)
    server = LocalS3()
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
    s3_server.app.latency = 0.0
    yield s3_server
    clear_fsspec_caches()
