"""``gzidx://``: an fsspec filesystem serving the *uncompressed* bytes of gzip files through seek-point indexes.

A zarr codec never learns which chunk it decodes, so it cannot start inflating mid-stream; a filesystem can.
References into a ``.nii.gz`` therefore point at ``gzidx://<descriptor>`` with *uncompressed* offsets, exactly
like references into a ``.nii``, and this filesystem turns each range into one ranged read of the compressed
span it needs (from the seek point before the range to the compressed position that covers its end) and an
inflate in a worker thread, so concurrent chunk reads use every core.

``gzidx://gzindex/sub-01_T1w.gzidx.json`` names a descriptor written by :func:`virtnii.gzindex.write_sidecar`,
relative to ``root`` (the manifest folder).  The descriptor names the source: by URL, or by a path relative to
``root``, read with ``root_options`` (a source that moves with its manifest is on the manifest's filesystem).
Before its bytes are read, its size and ETag/mtime are compared with those recorded at indexing time
(:class:`~virtnii.errors.StaleSource` if they differ; see :class:`virtnii.fingerprint.Checker` for how often),
and a source pinned to an object version is read at that version (:mod:`virtnii.versions`).
See docs/gzip.md.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.spec import AbstractBufferedFile

from . import fingerprint, gzindex, retry, versions
from .manifest.entry import GZIP_INDEX_FOLDER, inside, is_url, resolve
from .errors import ManifestError, SourceNotFound, from_os_error, storage_errors
from .verified import call, exact_range


@dataclass(frozen=True)
class _Source:
    """A descriptor's index, checked against its source, and where to fetch the compressed bytes."""

    index: gzindex.GzipIndex
    fs: fsspec.AbstractFileSystem  # fsspec's ordinary cached instance for the source
    path: str
    url: str  # the source's URL (a relative source resolved against root), which errors name


# Per process: parsed indexes by descriptor URL (with the descriptor's own fingerprint, so a manifest re-written
# in place is re-read), passing source checks, one lock per descriptor so that a burst of concurrent first reads
# loads it once, and the inflate workers.
_INDEXES: collections.OrderedDict[str, tuple[fingerprint.Fingerprint, gzindex.GzipIndex]] = collections.OrderedDict()
#: Parsed indexes kept (least recently used dropped first): each holds 32 KiB per seek point read from (all of
#: them for a layout-1 sidecar), up to ~8 MB for 1 GiB.
_MAX_INDEXES = 64
_INDEXES_LOCK = threading.Lock()
_CHECKER = fingerprint.Checker()
_LOCKS: dict[str, threading.Lock] = {}
_MAX_LOCKS = 4096
_LOCKS_GUARD = threading.Lock()
_POOL: ThreadPoolExecutor | None = None
#: Uncompressed bytes after which a run of touching ranges is split into another fetch: one huge request
#: would delay every inflate until all of it arrived, while runs of a few chunks overlap fetching and inflating.
_MAX_RUN = 64 << 20


def clear_caches() -> None:
    """Forget this process's parsed indexes, passed source checks and cached ``gzidx`` filesystem instances, and
    free their memory: the next read through a manifest opened *after* this is a first read again (as
    benchmarks of cold reads need).  Groups opened before keep their own reader, and what it has loaded."""
    with _INDEXES_LOCK:
        _INDEXES.clear()
    _CHECKER.forget()
    GzipIndexFileSystem.clear_instance_cache()


def _decode_pool() -> ThreadPoolExecutor:
    """Inflate workers, one per core: ctypes releases the GIL during inflate, so chunks decode in parallel."""
    global _POOL
    with _LOCKS_GUARD:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="virtnii-inflate")
        return _POOL


def _lock(url: str) -> threading.Lock:
    """The lock under which the descriptor at ``url`` is loaded.  Locks not held are dropped once there are
    :data:`_MAX_LOCKS` (a long-running server meets many descriptors): at worst two first reads then load one
    descriptor twice, which is only work."""
    with _LOCKS_GUARD:
        if url not in _LOCKS and len(_LOCKS) >= _MAX_LOCKS:
            for key in [key for key, lock in _LOCKS.items() if not lock.locked()]:
                del _LOCKS[key]
        return _LOCKS.setdefault(url, threading.Lock())


class GzipIndexFileSystem(AsyncFileSystem):
    """Read-only filesystem of the uncompressed content of indexed gzip files.

    Parameters
    ----------
    root
        URL of the manifest folder that descriptor paths are relative to (required).
    root_options
        fsspec storage options for reading ``root``.
    target_options
        fsspec storage options for the sources, e.g. ``{"anon": True}`` or an ``endpoint_url``.
    """

    protocol = "gzidx"
    root_marker = ""

    def __init__(self, root: str | None = None, root_options: dict[str, Any] | None = None,
                 target_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not root:
            raise ValueError("gzidx:// needs root=<manifest folder URL>: descriptor paths such as "
                             "gzidx://gzindex/x.gzidx.json are relative to it")
        super().__init__(**kwargs)
        self.root = root.rstrip("/")
        self.root_options = dict(root_options or {})
        self.target_options = dict(target_options or {})
        self._root_fs, self._root_path = fsspec.core.url_to_fs(self.root, **self.root_options)
        # this instance's descriptors, most recently read last; bounded like _INDEXES, as each holds an index
        self._sources: collections.OrderedDict[str, _Source] = collections.OrderedDict()

    # -- sources ------------------------------------------------------------------------------------------

    async def _source(self, path: str) -> _Source:
        path = self._strip_protocol(path)
        source = self._sources.get(path)
        if source is None:
            source = await asyncio.to_thread(self._load, path)
            self._sources[path] = source
            while len(self._sources) > _MAX_INDEXES:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(path)
        return source

    def _load(self, path: str) -> _Source:
        """Read (or reuse) the descriptor's index; runs in a thread."""
        try:
            inside(path, f"{GZIP_INDEX_FOLDER}/")
        except ValueError as err:
            raise ManifestError(f"{self.root}/{path}", f"refused: {err} (a reference may not lead outside the "
                                                       "manifest)") from None
        descriptor_path = f"{self._root_path}/{path}"
        url = self._root_fs.unstrip_protocol(descriptor_path)
        with _lock(url):
            try:
                descriptor_fp = fingerprint.stat(self._root_fs, descriptor_path, url)
            except SourceNotFound as err:
                raise ManifestError(url, f"no gzip index descriptor here: is root={self.root!r} the manifest "
                                         "folder, or was it rescanned since it was opened? (open it again)") from err
            with _INDEXES_LOCK:
                cached = _INDEXES.get(url)
                index = cached[1] if cached is not None and cached[0] == descriptor_fp else None
                if index is not None:
                    _INDEXES.move_to_end(url)
            if index is None:
                index = gzindex.read_sidecar(self._root_fs, descriptor_path)
                with _INDEXES_LOCK:
                    _INDEXES[url] = (descriptor_fp, index)
                    while len(_INDEXES) > _MAX_INDEXES:
                        _INDEXES.popitem(last=False)
        if is_url(index.source):
            fs, source_path = retry.open_fs(index.source, self.target_options)
            return _Source(index, fs, source_path, index.source)
        source_url = resolve(self._root_fs.unstrip_protocol(self._root_path), index.source)
        # the manifest folder's storage options, the sources' retry settings
        fs, source_path = retry.open_fs(source_url, {**self.root_options,
                                                     retry.OPTION: retry.policy_of(self.target_options)})
        return _Source(index, fs, source_path, source_url)

    async def _fetch(self, source: _Source, start: int, end: int) -> bytes:
        """Compressed bytes ``[start, end)`` of the source, in one ranged read (from any loop: see ``call``), once
        the source is known to be the one indexed."""
        await _CHECKER.ensure(source.fs, source.path, source.url, source.index.fingerprint)
        fs, path = versions.pinned(source.fs, source.path, source.index.fingerprint)  # the version indexed
        try:
            data = await call(fs, "cat_file", path, start=start, end=end)
        except storage_errors() as err:
            raise from_os_error(source.url, err, f"read bytes {start}-{end}") from err
        return exact_range(source.url, start, end, data)

    # -- reading ------------------------------------------------------------------------------------------

    async def _cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
                        ) -> bytes:
        source = await self._source(path)
        start, end = _bounds(start, end, source.index.uncompressed_size)
        if start >= end:
            return b""
        span = source.index.span(start, end)
        data = await _with_windows(source.index, [span.point], self._fetch(source, span.cmp_start, span.cmp_end))
        return await _in_pool(source.index.decode, span, data, start, end)

    async def _cat_ranges(self, paths: list[str], starts: list[int | None] | int | None,
                          ends: list[int | None] | int | None, max_gap: int | None = None,
                          batch_size: int | None = None, on_error: str = "return", **kwargs: Any) -> list[Any]:
        """Read many ranges: adjacent or overlapping ranges of one file share one compressed fetch.

        Within such a run each seek point is inflated once, in parallel with the run's other points.
        """
        count = len(paths)
        starts = starts if isinstance(starts, list) else [starts] * count
        ends = ends if isinstance(ends, list) else [ends] * count
        if len(starts) != count or len(ends) != count:
            raise ValueError("paths, starts and ends must have the same length")
        by_path: dict[str, list[tuple[int, int | None, int | None]]] = {}
        for i, (p, s, e) in enumerate(zip(paths, starts, ends)):
            by_path.setdefault(self._strip_protocol(p), []).append((i, s, e))
        results: list[Any] = [None] * count
        outcomes = await asyncio.gather(*(self._read_file_ranges(p, r, results) for p, r in by_path.items()),
                                        return_exceptions=True)
        for (p, ranges), outcome in zip(by_path.items(), outcomes):
            if isinstance(outcome, BaseException):
                for i, _, _ in ranges:
                    results[i] = outcome
        if on_error != "return":
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        return results

    async def _read_file_ranges(self, path: str, ranges: list[tuple[int, int | None, int | None]],
                                results: list[Any]) -> None:
        source = await self._source(path)
        size = source.index.uncompressed_size
        bounded = sorted((*_bounds(s, e, size), i) for i, s, e in ranges)
        runs: list[list[tuple[int, int, int]]] = []
        run_end = -1
        for start, end, i in bounded:
            if runs and start <= run_end and end - runs[-1][0][0] <= _MAX_RUN:
                runs[-1].append((start, end, i))
                run_end = max(run_end, end)
            else:
                runs.append([(start, end, i)])
                run_end = end
        in_flight = asyncio.Semaphore(2 * _decode_pool()._max_workers)

        async def read(run: list[tuple[int, int, int]]) -> None:
            async with in_flight:  # bounded, so fetched-but-not-inflated bytes do not pile up in memory
                await self._read_run(source, run, results)

        await asyncio.gather(*(read(run) for run in runs))

    async def _read_run(self, source: _Source, run: list[tuple[int, int, int]], results: list[Any]) -> None:
        """One fetch for a run of touching ranges; one inflate per seek point the run starts from."""
        index = source.index
        groups: dict[int, list[tuple[int, int, int]]] = {}
        for start, end, i in run:
            groups.setdefault(index.span(start, end).point, []).append((start, end, i))
        pieces = []
        for members in groups.values():
            start, end = min(m[0] for m in members), max(m[1] for m in members)
            pieces.append((index.span(start, end), start, end, members))
        fetch_start = min(p[0].cmp_start for p in pieces)
        data = memoryview(await _with_windows(index, [p[0].point for p in pieces],
                                              self._fetch(source, fetch_start, max(p[0].cmp_end for p in pieces))))

        async def decode(span: gzindex.Span, start: int, end: int) -> bytes:
            view = data[span.cmp_start - fetch_start:span.cmp_end - fetch_start]
            return await _in_pool(index.decode, span, view, start, end) if start < end else b""

        decoded = await asyncio.gather(*(decode(*piece[:3]) for piece in pieces))
        for (_, start, _, members), out in zip(pieces, decoded):
            for s, e, i in members:
                results[i] = out if len(members) == 1 else out[s - start:e - start]

    async def _info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        source = await self._source(path)
        return {"name": self._strip_protocol(path), "size": source.index.uncompressed_size, "type": "file",
                "source": source.url}

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None, autocommit: bool = True,
              cache_options: dict[str, Any] | None = None, **kwargs: Any) -> _GzipIndexFile:
        if mode != "rb":
            raise NotImplementedError(f"gzidx:// is read-only (mode {mode!r})")
        return _GzipIndexFile(self, path, mode, block_size=block_size or "default", cache_options=cache_options,
                              **kwargs)


class _GzipIndexFile(AbstractBufferedFile):
    """File-like read access (``fs.open``) over :meth:`GzipIndexFileSystem.cat_file`."""

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self.fs.cat_file(self.path, start=start, end=end)


def _bounds(start: int | None, end: int | None, size: int) -> tuple[int, int]:
    """fsspec range semantics: None means the file's start/end, negatives count from the end."""
    start = 0 if start is None else (size + start if start < 0 else start)
    end = size if end is None else (size + end if end < 0 else end)
    start = min(max(start, 0), size)
    return start, min(max(end, start), size)


async def _with_windows(index: gzindex.GzipIndex, points: list[int], fetch: Awaitable[bytes]) -> bytes:
    """Await ``fetch`` while the windows of ``points`` are read, if they are not in memory yet: the first read
    of a file then pays one round trip, not the window's and then the data's."""
    if index.windows_loaded(points):
        return await fetch
    data, _ = await asyncio.gather(fetch, asyncio.to_thread(index.load_windows, points))
    return data


async def _in_pool(func: Any, *args: Any) -> Any:
    return await asyncio.wrap_future(_decode_pool().submit(func, *args))

