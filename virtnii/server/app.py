"""The HTTP server of ``virtnii serve``: aiohttp over the framework-independent :class:`~.store.Store`.

URL layout (docs/serve.md): ``/`` and ``/static/…`` the viewer page (the files of ``server/static/``, read once
at start), ``/api/images`` the image listing, ``/zarr/…`` the manifests' keys, ``/view/<image>/…`` the
viewer-compatible view of an image (:data:`ViewFunction`, from ``virtnii.server.view`` when installed).

One handler takes every request: the raw path is checked (:func:`~.semantics.request_path`) before any routing,
so a refused path never reaches a lookup, and every answer goes through :func:`_respond` (HEAD, one Range,
conditional requests, CORS).  Source reads run on the reference filesystems' own thread pools (file reads,
inflates) and never block the event loop; at most :data:`MAX_READS` key reads and :data:`MAX_VIEWS` view chunks
are under way, bounding the memory that chunks being read can take.

aiohttp rather than Starlette + uvicorn (measured, docs/serve.md): the same requests/s for small chunk responses
on loopback, no new dependency (s3fs and fsspec's HTTP filesystem already need it), and its client drives the
load generator of ``scripts/bench_serve.py``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import ipaddress
import json
import logging
import signal
import threading
import webbrowser
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Sequence

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..errors import VirtniiError
from . import DEFAULT_HOST, DEFAULT_PORT
from .semantics import HTTPError, byte_range, http_date, not_modified, range_applies, request_path
from .store import Key, ServedImage, Store, content_type

log = logging.getLogger("virtnii.server")

#: The viewer page and its assets (branch ``viewer`` builds them; a placeholder page otherwise).
STATIC = Path(__file__).with_name("static")
#: Source reads under way at once; more requests wait.  Each holds one chunk (~4 MiB) in memory.
MAX_READS = 32
#: Viewer-view chunks assembled at once; more requests wait.  Each reads its block's band of the source (a
#: ``.nii.gz`` slab is decoded behind the view's shared cache), tens to hundreds of MB for a big image.
MAX_VIEWS = 4
METHODS = "GET, HEAD, OPTIONS"
#: Response headers a page's script may read (CORS exposes only a few by default).
EXPOSED = "Content-Length, Content-Range, Accept-Ranges, ETag, Last-Modified"
#: Every answer may be stored but is revalidated (If-None-Match → 304): a manifest re-scanned, or a source
#: changed, between two runs of the server never shows through a cache.
CACHE_CONTROL = "no-cache"

#: ``view(image, key)``: the bytes of ``key`` (``zarr.json``, ``0/c/0/0/0``, …) of the viewer-compatible view
#: of ``image`` (a Zarr v3 + OME 0.5 group, see docs/serve.md), or None if the view has no such key.  A plain
#: function runs in a worker thread; a coroutine function is awaited on the event loop.
ViewFunction = Callable[[ServedImage, str], "Awaitable[bytes | None] | bytes | None"]

_READS = web.AppKey("reads", asyncio.Semaphore)
_VIEWS = web.AppKey("views", asyncio.Semaphore)


@dataclass(frozen=True)
class _Resource:
    """What a GET answers before ranges and conditions: a key's bytes, or a static file or listing."""

    etag: str
    content_type: str
    size: int | None  # None: known once read
    read: Callable[[int | None, int | None], Awaitable[bytes]]
    last_modified: float | None = None


def default_view() -> ViewFunction | None:
    """The viewer view of :mod:`virtnii.server.view` when that module is installed, else None (``/view/``
    answers 404).

    One ``ImageView`` per image, made on its first request (in a thread: it reads the image's header and
    metadata) over the image's group on the server's own references, all sharing one ``SlabCache``, which
    bounds the slabs decoded for every view.
    """
    name = f"{__package__}.view"
    if importlib.util.find_spec(name) is None:
        return None
    module = importlib.import_module(name)
    cache = module.SlabCache()
    views: dict[str, asyncio.Task[Any]] = {}

    async def view_key(image: ServedImage, key: str) -> bytes | None:
        if image.path not in views:  # concurrent first requests share one construction
            made = views[image.path] = asyncio.ensure_future(
                asyncio.to_thread(lambda: module.ImageView(image.group, cache=cache)))
            made.add_done_callback(functools.partial(_forget_failed, views, image.path))
        made = await asyncio.shield(views[image.path])  # a cancelled request leaves it to the others
        return await made.get(key)

    return view_key


def _forget_failed(views: dict[str, asyncio.Task[Any]], path: str, made: asyncio.Task[Any]) -> None:
    """Drop a view whose construction failed (a source unreadable just then): the next request tries again."""
    if made.cancelled() or made.exception() is not None:
        views.pop(path, None)


def create_app(store: Store, *, view: ViewFunction | None = None, static: Path = STATIC) -> web.Application:
    """The aiohttp application serving ``store`` (and ``view``, when given, at ``/view/``)."""
    files = _static_files(static)
    listing = json.dumps(store.listing()).encode()

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            path = request_path(request.rel_url.raw_path)
            if request.method == "OPTIONS":
                return _preflight(request)
            if request.method not in ("GET", "HEAD"):
                raise HTTPError(405, f"{request.method} is not served (read-only)")
            return await _respond(request, await _resource(path))
        except HTTPError as err:
            return _error(err)
        except VirtniiError as err:  # a source changed, vanished or cannot be read: never a 404 (fill values)
            log.error("%s: %s", request.rel_url.raw_path, err)
            return _error(HTTPError(502, f"{type(err).__name__}: the data behind this key cannot be read now "
                                         "(the server's log says why)"))

    async def _resource(path: str) -> _Resource:
        if path == "/":
            path = "/static/index.html"
        if path.startswith("/static/") and path[len("/static/"):] in files:
            return files[path[len("/static/"):]]
        if path == "/api/images":
            return _bytes_resource(listing, "application/json")
        if path.startswith("/zarr/"):
            key = await store.key(path[len("/zarr/"):])
            if key is not None:
                return _key_resource(key)
        if path.startswith("/view/") and view is not None:
            found = await _view(path[len("/view/"):])
            if found is not None:
                return found
        raise HTTPError(404, "no such file or key")

    async def _view(path: str) -> _Resource | None:
        image = store.image(path)
        if image is None or not path.startswith(image.path + "/"):
            return None
        key = path[len(image.path) + 1:]
        async with app[_VIEWS]:
            if inspect.iscoroutinefunction(view):
                data = await view(image, key)  # type: ignore[misc]
            else:
                data = await asyncio.to_thread(view, image, key)  # type: ignore[arg-type]
        if data is None:
            return None
        etag = await asyncio.to_thread(_digest, [data])
        return _bytes_resource(data, content_type(key), etag)

    def _key_resource(key: Key) -> _Resource:
        async def read(start: int | None, end: int | None) -> bytes:
            if key.value is not None:
                return await store.read(key, start, end)
            async with app[_READS]:
                return await store.read(key, start, end)

        return _Resource(key.etag, key.content_type, key.size, read, key.last_modified)

    async def startup(app: web.Application) -> None:
        app[_READS] = asyncio.Semaphore(MAX_READS)
        app[_VIEWS] = asyncio.Semaphore(MAX_VIEWS)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_startup.append(startup)
    return app


async def _respond(request: web.Request, resource: _Resource) -> web.StreamResponse:
    """200, 206 or 304 for a GET or HEAD of ``resource``: one Range, If-None-Match / If-Modified-Since, If-Range."""
    headers = {"ETag": resource.etag, "Cache-Control": CACHE_CONTROL, "Accept-Ranges": "bytes",
               "Content-Type": resource.content_type, **_CORS}
    if resource.last_modified is not None:
        headers["Last-Modified"] = http_date(resource.last_modified)
    if not_modified(request.headers.get("If-None-Match"), request.headers.get("If-Modified-Since"),
                    resource.etag, resource.last_modified):
        del headers["Content-Type"]
        return _response(304, headers)
    data = None
    size = resource.size
    if size is None:
        data = await resource.read(None, None)
        size = len(data)
    wanted = request.headers.get("Range")
    span = byte_range(wanted, size) if range_applies(request.headers.get("If-Range"), resource.etag,
                                                     resource.last_modified) else None
    status = 200
    start, end = span if span is not None else (0, size)
    if span is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    if request.method == "HEAD":
        return _response(status, headers)
    if data is not None:
        body = data[start:end]
    else:
        body = await resource.read(start, end) if span is not None else await resource.read(None, None)
    if len(body) != end - start:  # a source read returned other than asked: never send a wrong length
        raise VirtniiError(request.rel_url.raw_path, f"read {len(body)} bytes where {end - start} were expected")
    return _response(status, headers, body)


_CORS = {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": EXPOSED}


def _preflight(request: web.Request) -> web.Response:
    """A CORS preflight: any origin may GET/HEAD with any request headers (Range, If-None-Match, …); also a
    page of a public site reading a server on loopback (Chrome's Private Network Access)."""
    headers = {**_CORS, "Access-Control-Allow-Methods": METHODS, "Access-Control-Max-Age": "86400",
               "Allow": METHODS, "Content-Length": "0"}
    asked = request.headers.get("Access-Control-Request-Headers")
    if asked:
        headers["Access-Control-Allow-Headers"] = ", ".join(
            name.strip() for name in asked.split(",") if name.strip().replace("-", "").isalnum())
    if request.headers.get("Access-Control-Request-Private-Network") == "true":
        headers["Access-Control-Allow-Private-Network"] = "true"
    return _response(204, headers)


def _response(status: int, headers: dict[str, str], body: bytes | None = None) -> web.Response:
    return web.Response(status=status, headers={"Server": "virtnii", **headers}, body=body)


def _error(err: HTTPError) -> web.Response:
    body = f"{err.status} {err.reason}\n".encode()
    headers = {**_CORS, "Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store",
               "Content-Length": str(len(body))}
    if err.status == 416 and err.size is not None:
        headers["Content-Range"] = f"bytes */{err.size}"
    if err.status == 405:
        headers["Allow"] = METHODS
    return _response(err.status, headers, body)


def _digest(parts: Sequence[bytes]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part)
    return f'"{digest.hexdigest()}"'


def _bytes_resource(data: bytes, content_type: str, etag: str | None = None) -> _Resource:
    async def read(start: int | None, end: int | None) -> bytes:
        return data[start:end]

    return _Resource(etag or _digest([data]), content_type, len(data), read)


def _static_files(folder: Path) -> dict[str, _Resource]:
    """Every file under ``folder`` (hidden ones left out), read now: served from memory by exact name, so no
    request path is ever joined to a folder."""
    files = {}
    for path in sorted(folder.rglob("*")) if folder.is_dir() else ():
        name = path.relative_to(folder).as_posix()
        if path.is_file() and not any(part.startswith(".") for part in name.split("/")):
            files[name] = _bytes_resource(path.read_bytes(), content_type(name))
    return files


# -- running ------------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server to this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _QuietParser(logging.Filter):
    """Drops aiohttp's tracebacks for requests it could not parse (it answers them 400 itself): a malformed
    request is the client's problem, not a server error to log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], HttpProcessingError))


async def _start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
    logging.getLogger("aiohttp.server").addFilter(_QuietParser())
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as err:  # address in use, not this machine's, no permission
        await runner.cleanup()
        raise VirtniiError(f"{host}:{port}", f"cannot listen there: {err.strerror or err}") from err
    bound = runner.addresses[0]
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    if not is_loopback(host):
        log.warning("serving on %s: anyone who can reach this machine on port %s can read every image served "
                    "(there is no authentication); the default, 127.0.0.1, keeps it to this machine", host, bound[1])
    return runner, f"http://{shown}:{bound[1]}/"


def serve(manifests: Sequence[str] | Store, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
          open_browser: bool = False, ready: Callable[[str], None] | None = None,
          view: ViewFunction | None = None, **store_options: Any) -> None:
    """Serve manifests over HTTP until SIGINT or SIGTERM (or Ctrl-C), then close every connection and return.

    ``manifests`` are manifest folders (or a :class:`~.store.Store`); ``store_options`` go to
    :class:`~.store.Store` (``storage_options``, ``manifest_options``, ``allow_local_sources``).  ``port`` 0
    picks a free port; ``ready`` is called with the server's URL once it accepts connections; ``open_browser``
    opens it.  ``view`` defaults to :func:`default_view`.
    """
    store = manifests if isinstance(manifests, Store) else Store(manifests, **store_options)
    app = create_app(store, view=view if view is not None else default_view())

    async def run() -> None:
        runner, url = await _start(app, host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        handled = []
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
                handled.append(signum)
        try:
            if ready is not None:
                ready(url)
            if open_browser:
                await asyncio.to_thread(webbrowser.open, url)
            await stop.wait()
        finally:
            for signum in handled:
                loop.remove_signal_handler(signum)
            await runner.cleanup()

    asyncio.run(run())


@contextlib.contextmanager
def running(manifests: Sequence[str] | Store, host: str = DEFAULT_HOST, port: int = 0, *,
            view: ViewFunction | None = None, **store_options: Any) -> Iterator[str]:
    """Serve in a background thread for the duration of the block, yielding the URL (``http://host:port/``):
    for tests, benchmarks and notebooks.  Arguments as for :func:`serve`."""
    store = manifests if isinstance(manifests, Store) else Store(manifests, **store_options)
    app = create_app(store, view=view if view is not None else default_view())
    loop = asyncio.new_event_loop()
    started: concurrent.futures.Future[tuple[web.AppRunner, str]] = concurrent.futures.Future()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            started.set_result(loop.run_until_complete(_start(app, host, port)))
        except BaseException as err:  # noqa: BLE001  (handed to the caller's thread)
            started.set_exception(err)
            return
        loop.run_forever()

    thread = threading.Thread(target=run, name="virtnii-serve", daemon=True)
    thread.start()
    runner, url = started.result()
    try:
        yield url
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()

