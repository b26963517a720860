"""An fsspec wrapper that refuses to serve bytes of a source that changed since it was indexed.

References into a ``.nii`` are bare ``(url, offset, length)`` triples: if the file is replaced they silently
point at other bytes.  :func:`virtnii.open` therefore reads sources through :class:`VerifiedFileSystem`, which
compares each source's size and ETag/mtime with the manifest's record before reading it (every read of a local
file; remote ones again after :data:`~virtnii.fingerprint.RECHECK_AFTER` seconds) and raises
:class:`~virtnii.errors.StaleSource` on mismatch.  A source is also refused if it returns other than the exact
bytes asked for.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

import fsspec
from fsspec.asyn import AsyncFileSystem

from . import fingerprint, versions
from .manifest import integrity
from .errors import ManifestError, SourceAccessError, StaleSource, VirtniiError, from_os_error, storage_errors
from .manifest import manifest_options_for, manifest_url, read_index
from .manifest.entry import is_url, resolve
from .retry import open_fs


async def call(fs: fsspec.AbstractFileSystem, method: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``fs.<method>`` from any event loop, e.g. zarr's.

    An async filesystem (s3fs, http) made the ordinary way is bound to fsspec's I/O loop — its session lives
    there, and is closed there at exit — so its coroutines run on that loop; a sync one (local, memory) runs
    in a worker thread.  ``method`` is the sync name (``"cat_file"``); the async one is ``"_" + method``.
    """
    if not fs.async_impl:
        return await asyncio.to_thread(getattr(fs, method), *args, **kwargs)
    coroutine = getattr(fs, "_" + method)(*args, **kwargs)
    if asyncio.get_running_loop() is fs.loop:
        return await coroutine
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, fs.loop))


def ranges_ignored(url: str, start: int, end: int, got: int) -> SourceAccessError:
    """The error for a server that answered a read of bytes ``[start, end)`` with ``got`` > end - start bytes."""
    return SourceAccessError(url, f"asked for bytes {start}-{end} and got {got}: the server ignores byte ranges "
                                  "(HTTP Range), which reading files in place needs; serve them with one that "
                                  "supports ranges (most do; `python -m http.server` does not)")


def exact_range(url: str, start: int, end: int, data: bytes) -> bytes:
    """``data`` if it holds exactly the bytes ``[start, end)`` asked for, else the error that says why not.

    A web server that ignores HTTP ``Range`` (``python -m http.server`` does) answers every ranged read with the
    whole file; a file cut short after its fingerprint was checked gives fewer bytes.  Taken as a chunk, either
    is a reshape error or wrong voxels, never a useful message.
    """
    if len(data) > end - start:
        raise ranges_ignored(url, start, end, len(data))
    if len(data) < end - start:
        raise StaleSource(url, f"asked for bytes {start}-{end} and got only {len(data)}: the file is shorter than "
                               "when it was indexed; re-run `virtnii scan`")
    return data



class VerifiedFileSystem(AsyncFileSystem):
    """Reads through ``fs`` (any fsspec filesystem) only what a manifest's index file lists.

    Sources (``expected``: URL → fingerprint) are checked against their fingerprints before reads, and read at
    the object version a fingerprint pins (:mod:`virtnii.versions`); files inside
    the ``trusted`` folders (pyramid level stores, which virtnii wrote) are read as they are.  With ``root``,
    references are paths relative to that folder of ``fs`` (the manifest folder), and must stay inside it —
    but for the sources ``expected`` names relative to it (a manifest that moves with its dataset), which may
    climb out of it with ``..`` on ``fs`` itself (never above its root or bucket: see
    :func:`~virtnii.manifest.entry.resolve`), and only to the files the index file lists.
    Anything else a reference names is refused: a manifest is data, never a key to other files.
    """

    cachable = False

    def __init__(self, fs: fsspec.AbstractFileSystem, expected: dict[str, fingerprint.Fingerprint],
                 trusted: Iterable[str] = (), root: str | None = None, **kwargs: Any) -> None:
        super().__init__(asynchronous=True, **kwargs)
        # sources pinned to a version are read at it, which needs a version-aware instance (virtnii.versions)
        self.fs = versions.aware(fs) if any(versions.VERSION in fp for fp in expected.values()) else fs
        self.protocol = fs.protocol
        self.root = None if root is None else root.rstrip("/")
        #: relative source name -> its path on fs
        self.sources = {} if self.root is None else {
            name: fs._strip_protocol(resolve(fs.unstrip_protocol(self.root), name))
            for name in expected if not is_url(name)}
        self.expected = {self._path(url): fp for url, fp in expected.items()}
        self.trusted = tuple(self._path(folder).rstrip("/") + "/" for folder in trusted)
        self._checker = fingerprint.Checker()

    def _path(self, url: str) -> str:
        """The path on ``fs`` a reference names (joined to ``root`` for relative references)."""
        if self.root is None:
            return self.fs._strip_protocol(url)
        if url in self.sources:
            return self.sources[url]
        if "://" in url or url.startswith("/") or posixpath.normpath(url) != url or url.startswith(".."):
            raise ManifestError(f"{self.fs.unstrip_protocol(self.root)}/{url}", "a reference relative to the "
                                "manifest folder must name a file inside it (no '..', no absolute path)")
        return f"{self.root}/{url}"

    async def _verify(self, url: str) -> str:
        path = self._path(url)
        if path in self.expected:
            await self._checker.ensure(self.fs, path, self.fs.unstrip_protocol(path), self.expected[path])
            return versions.path(self.fs, path, self.expected[path])
        if path.startswith(self.trusted) and posixpath.normpath(path) == path:
            return path
        # nothing to check it against: the references are not the index's
        raise ManifestError(self.fs.unstrip_protocol(path), "is referenced but not listed in the manifest's "
                            "index file (was replacing the manifest interrupted?); re-run `virtnii scan`")

    async def _cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        verified = await self._verify(path)
        try:
            data = await call(self.fs, "cat_file", verified, start=start, end=end, **kwargs)
        except storage_errors() as err:  # never FileNotFoundError: zarr would read a missing chunk as fill values
            raise from_os_error(self.fs.unstrip_protocol(verified), err, "read") from err
        if start is None or end is None:
            return data
        return exact_range(self.fs.unstrip_protocol(verified), start, end, data)

    async def _cat_ranges(self, paths: list[str], starts: list[int], ends: list[int], **kwargs: Any) -> list[Any]:
        checked = dict(zip(paths, await asyncio.gather(*map(self._verify, dict.fromkeys(paths)))))  # once each
        verified = [checked[p] for p in paths]
        results = await call(self.fs, "cat_ranges", verified, starts, ends, **kwargs)
        for i, (path, start, end, data) in enumerate(zip(verified, starts, ends, results)):
            url = self.fs.unstrip_protocol(path)
            if isinstance(data, storage_errors()):
                results[i] = from_os_error(url, data, "read")
            elif isinstance(data, bytes) and start is not None and end is not None:
                exact_range(url, start, end, data)
        return results

    async def _info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return await call(self.fs, "info", path, **kwargs)


def verify(manifest: str, manifest_options: dict[str, Any] | None = None, *, content: bool = False,
           **storage_options: Any) -> tuple[int, list[VirtniiError]]:
    """Check a manifest's own files and every source against its scan-time fingerprint now, not at first read.

    Returns ``(number of source files checked, problems)``: a :class:`~virtnii.errors.ManifestError` per
    damaged or missing references file, image or gzip sidecar (:func:`virtnii.integrity.check_manifest`), then
    one :class:`~virtnii.errors.StaleSource`, ``SourceNotFound`` or ``SourceAccessError`` per source that would
    fail to read.  Gzip trailers are compared for remote sources too (one 8-byte read each).  ``content``:
    also compare each source's bytes (:func:`virtnii.integrity.check_content`: reads every file whole).
    Stats run concurrently (object stores answer each in one round trip); content checks one per core
    locally, 16 at a time remotely, each streamed.
    """
    options = manifest_options_for(manifest, manifest_options, storage_options)
    index = read_index(manifest, options)
    problems = integrity.check_manifest(manifest, index, options)
    base = manifest_url(manifest, options)
    checks = [item for image in index.images for item in image.files_to_check(base, options, storage_options)]

    def check(item: tuple[str, fingerprint.Fingerprint, dict[str, Any]]) -> VirtniiError | None:
        url, recorded, source_options = item
        try:
            fs, path = open_fs(url, source_options)
            fingerprint.check(fs, path, url, recorded, trailer=True)
            if content:
                integrity.check_content(fs, path, url, recorded)
        except VirtniiError as err:
            return err
        return None

    local = all((fsspec.core.split_protocol(url)[0] or "file") in ("file", "local") for url, _, _ in checks)
    workers = (os.cpu_count() or 2) if content and local else 16
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems += [problem for problem in pool.map(check, checks) if problem is not None]
    return len(checks), problems
