"""What a source looked like when it was indexed, and the check that it still looks the same.

References are byte offsets into a file that virtnii does not own: if the file is replaced, the offsets point at
other bytes and a reader would get wrong voxels silently. Every manifest therefore records each source's size
plus its ETag (object stores, HTTP) or mtime (POSIX-like filesystems), and readers compare before trusting it.

Size and mtime miss a file rewritten in place with its mtime restored (``cp -p``, ``rsync -t``, ``os.utime``).
Where it is cheap the fingerprint says more: a gzip file's last 8 bytes (its last member's CRC-32 and length,
:data:`GZIP_TRAILER`) change with its content and cost one 8-byte read to compare.  Content hashes
(:data:`CONTENT_HASH`, recorded by ``virtnii scan --content-hash``) are compared only by ``virtnii verify
--content``: they cost reading the whole file.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as _dt
import hashlib
import json
import threading
import time
from typing import Any

import fsspec

from . import versions
from .errors import SourceNotFound, StaleSource, from_os_error, storage_errors

Fingerprint = dict[str, Any]

#: Fingerprint key of a gzip file's last 8 bytes, as 16 hex digits: the CRC-32 and length (mod 2**32) of its last
#: member's content, which zlib checked when the file was indexed.
GZIP_TRAILER = "gzip_trailer"
#: Fingerprint key of the SHA-256 of the file's bytes (hex), when the scan was asked for content hashes.
CONTENT_HASH = "sha256"


def _mtime(info: dict[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "modified", "updated"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, _dt.datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
    return None


def from_info(info: dict[str, Any], *, version: bool = False) -> Fingerprint:
    """Fingerprint from an fsspec ``info()``/``find(detail=True)`` entry: size, and ETag or mtime; with ``version``
    also the object version the entry reports, if any (:mod:`virtnii.versions`: reads then ask for it)."""
    fp: Fingerprint = {"size": int(info["size"])}
    etag = info.get("ETag") or info.get("etag")
    if etag:
        fp["etag"] = str(etag).strip('"')
    else:
        mtime = _mtime(info)
        if mtime is not None:
            fp["mtime"] = mtime
    pinned = versions.reported(info) if version else None
    if pinned is not None:
        fp[versions.VERSION] = pinned
    return fp


def _info(fs: fsspec.AbstractFileSystem, path: str, url: str, *, fresh: bool = False,
          missing: str = "no such file or object") -> dict[str, Any]:
    """``fs.info(path)``, its errors as VirtniiErrors naming ``url`` (``missing`` says a missing file's problem).

    ``fresh``: drop cached listings first (s3fs would answer from a listing made before a change).
    """
    try:
        if fresh:
            fs.invalidate_cache(path)
        return fs.info(path)
    except storage_errors() as err:
        error = from_os_error(url, err, "stat")
        if isinstance(error, SourceNotFound):
            error = SourceNotFound(url, missing)
        raise error from err


def stat(fs: fsspec.AbstractFileSystem, path: str, url: str) -> Fingerprint:
    """Fingerprint of ``path`` on ``fs`` now; errors name ``url``."""
    info = _info(fs, path, url)
    if info.get("type") == "directory":
        raise SourceNotFound(url, "is a directory, not a file")
    return from_info(info)


def ensure_unchanged(url: str, recorded: Fingerprint, current: Fingerprint) -> None:
    """Raise :class:`StaleSource` when ``current`` differs from what was ``recorded`` at indexing time."""
    for key in ("size", "etag", "mtime", versions.VERSION, GZIP_TRAILER):
        if key in recorded and key in current and recorded[key] != current[key]:
            raise StaleSource(
                url,
                f"changed since it was indexed ({key} was {recorded[key]!r}, now {current[key]!r}); "
                "re-run `virtnii scan` on it",
            )


#: Seconds a remote source stays trusted after a passing check: it is checked again on the first read after that,
#: one request per source per interval.  Local sources are checked on every read (a stat costs microseconds).
RECHECK_AFTER = 10.0


class Checker:
    """Fingerprint checks before reads, remembered so that they cost almost nothing, but never for long.

    Checking only before a source's first read (as before) let a reader that stays open — a notebook, a web
    viewer's server — serve bytes of a file replaced hours later at offsets that no longer mean anything.
    """

    def __init__(self) -> None:
        self._passed: dict[tuple[str, str], float] = {}
        self._running: dict[tuple[str, str], concurrent.futures.Future[None]] = {}
        self._lock = threading.Lock()

    def forget(self) -> None:
        """Check every source again before its next read."""
        self._passed.clear()

    async def ensure(self, fs: fsspec.AbstractFileSystem, path: str, url: str, recorded: Fingerprint) -> None:
        """Raise like :func:`check` unless ``url`` passed a check recently enough; from any thread or event loop.

        A remote check runs in a worker thread (``fs.info`` of an async filesystem blocks on that filesystem's
        own loop, which may be the caller's), and concurrent reads of one source (zarr fetches chunks
        together) share it; a reader that is cancelled while waiting leaves it running for the others.
        """
        key = (url, json.dumps(recorded, sort_keys=True))
        if getattr(fs, "local_file", False):
            check(fs, path, url, recorded)
            return
        last = self._passed.get(key)
        if last is not None and time.monotonic() - last < RECHECK_AFTER:
            return
        with self._lock:
            running = self._running.get(key)
            if running is None or running.done():
                running = self._running[key] = _checks().submit(self._check, key, fs, path, url, recorded)
        await asyncio.wrap_future(running)  # raises what the check raised

    def _check(self, key: tuple[str, str], fs: fsspec.AbstractFileSystem, path: str, url: str,
               recorded: Fingerprint) -> None:
        check(fs, path, url, recorded)
        self._passed[key] = time.monotonic()


_CHECKS: concurrent.futures.ThreadPoolExecutor | None = None
_CHECKS_LOCK = threading.Lock()


def _checks() -> concurrent.futures.ThreadPoolExecutor:
    """The threads remote fingerprint checks run in (one request each: a few suffice)."""
    global _CHECKS
    with _CHECKS_LOCK:
        if _CHECKS is None:
            _CHECKS = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="virtnii-check")
        return _CHECKS


def check(fs: fsspec.AbstractFileSystem, path: str, url: str, recorded: Fingerprint, *,
          trailer: bool | None = None) -> None:
    """Stat ``path`` now and raise unless it still matches what was ``recorded`` at indexing time.

    A recorded gzip trailer is compared too when ``trailer`` is true, or (``None``) when the file is local,
    where reading it costs microseconds; remote ones are compared by ``virtnii verify``, not before every
    read, which would double the requests of each re-check (and S3's ETag already changes with the content).
    A source that is gone is :class:`SourceNotFound`, one that changed :class:`StaleSource`, one that cannot be
    stat'ed :class:`SourceAccessError`; errors name ``url``.  Safe from any thread (fsspec runs async
    filesystems on their own loop).  A source pinned to a version is stat'ed at that version: overwriting the
    object leaves it readable, deleting that version makes it :class:`SourceNotFound`.
    """
    version = recorded.get(versions.VERSION)
    fs, path = versions.pinned(fs, path, recorded)  # a pinned source: the version indexed, not the latest
    missing = "was indexed but no longer exists" if version is None else \
        f"was indexed at version {version}, which no longer exists (deleted from the bucket)"
    info = _info(fs, path, url, fresh=True, missing=f"{missing}; re-run `virtnii scan`")
    current = from_info(info, version=version is not None)
    ensure_unchanged(url, recorded, current)
    if GZIP_TRAILER in recorded and (trailer if trailer is not None else getattr(fs, "local_file", False)):
        ensure_unchanged(url, recorded, {GZIP_TRAILER: read_trailer(fs, path, url, current["size"])})


#: Bytes hashed per read: a few pieces in flight per worker bound the memory of hashing many files at once.
_HASH_PIECE = 4 << 20


def content_hash(fs: fsspec.AbstractFileSystem, path: str, url: str, size: int) -> str:
    """The :data:`CONTENT_HASH` of a file of ``size`` bytes, streamed in pieces; errors name ``url``.

    SHA-256, because OpenSSL's measured 1.8 GB/s here against blake2b's 0.9 (CPU SHA extensions), and it is
    the digest DataLad/git-annex (SHA256E keys) and DANDI (``dandi:sha2-256``) already record.
    """
    hasher = hashlib.sha256()
    read = 0
    try:
        with fs.open(path, "rb", cache_type="none", size=size) as f:
            while piece := f.read(_HASH_PIECE):
                hasher.update(piece)
                read += len(piece)
    except storage_errors() as err:
        raise from_os_error(url, err, "read") from err
    if read != size:
        raise StaleSource(url, f"changed while being hashed (size was {size}, {read} bytes read)")
    return hasher.hexdigest()


def read_trailer(fs: fsspec.AbstractFileSystem, path: str, url: str, size: int) -> str:
    """The last 8 bytes of a file of ``size`` bytes, as :data:`GZIP_TRAILER` records them."""
    try:
        tail = fs.cat_file(path, start=max(size - 8, 0), end=size)
    except storage_errors() as err:
        raise from_os_error(url, err, "read") from err
    return bytes(tail[-8:]).hex()
