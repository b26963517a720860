"""Seek-point indexes of gzip files: found in one streaming pass, stored as GZIDX v1, decoded with plain inflate.

A kerchunk reference is ``(url, offset, length)``; inflating a ``.nii.gz`` from the middle needs more: where a
deflate block starts (byte *and bit*), how many uncompressed bytes precede it, and the 32 KiB of output before
it (the dictionary back-references may reach into).  :func:`build_index` finds, for each uncompressed offset the
scanner will read from (chunk starts), the last deflate block boundary at or before it, in one streaming pass
over the compressed bytes and keeping only those few windows in memory.  :class:`GzipIndex` then decodes any
uncompressed range from the nearest point with a stock inflater, reading only the compressed span it needs.

Why our own pass rather than indexed_gzip or rapidgzip: Python's ``zlib`` cannot stop at block boundaries, but
zlib's C ``inflate(Z_BLOCK)`` can, and calling it through ``ctypes`` (zlib-ng's copy when the ``zlib-ng``
package provides one, else the system zlib) lets us keep exactly the boundary before each offset.  Measured on
a 1 GiB int16 MRI-like file (577 MB gz, 2 cores): ``gzip -dc`` 6.97 s; this pass 2.89 s with zlib-ng
(4.17 s with system zlib); indexed_gzip 4.17 s but it keeps a window for every 1 MiB of output (33 MB) and its
points sit up to 1 MiB before the offsets; rapidgzip 1.86 s but its points are its ~2 MB-compressed chunk
boundaries, so each 4 MiB read would inflate up to twice the bytes.  See docs/gzip.md.

Decoding from a point uses the same C inflate: ``inflatePrime`` feeds the bits of the block's first byte and the
window becomes the dictionary.  (Python's inflaters cannot start mid-byte, and shifting the compressed bytes
into alignment breaks on stored blocks, which pad to the file's byte grid: see :class:`_RawInflater`.)

Where no zlib loads through ctypes (Windows, minimal images), or ``VIRTNII_INFLATER=portable`` forces it, the
*portable* path is taken instead: seek points from indexed_gzip (as many as its spacing allows, the last one at
or before each offset kept), every check from a pass of Python's own zlib, and decoding by ISA-L after a few
bits of empty deflate blocks that put the point back on its byte grid (:class:`_PortableInflater`).  Slower
(two passes to index), same index, same bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gzip
import hashlib
import io
import json
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import fsspec
import numpy as np
from isal import igzip, isal_zlib

from . import fingerprint, versions
from .errors import InvalidGzip, ManifestError, StaleSource, from_os_error, storage_errors
from .manifest.entry import is_url, relative_source
from .retry import open_fs

#: Bytes of output kept with each seek point: the largest distance a deflate back-reference can reach.
WINDOW_SIZE = 32768
#: Version of the JSON descriptor written beside each index (``virtnii_gzip_index`` field).
DESCRIPTOR_VERSION = 1
#: Version written instead when the descriptor names its source relative to the manifest folder (``scan
#: relative_sources``): a version-1 reader would resolve that path against its working directory.
RELATIVE_DESCRIPTOR_VERSION = 2
DESCRIPTOR_SUFFIX = ".gzidx.json"
INDEX_SUFFIX = ".gzidx.gz"
#: Layout of the GZIDX file written (descriptor field ``index_layout``): 1 (before; field absent), the GZIDX bytes
#: gzipped as one member; 2, the point table and each window gzipped as members of their own, so that a reader
#: fetches only the windows it decodes from.  Either way the file gunzips to the same GZIDX v1 bytes.
SIDECAR_LAYOUT = 2

POINT_DTYPE = np.dtype([("cmp_offset", "<u8"), ("uncmp_offset", "<u8"), ("bits", "u1"), ("has_window", "?")])
#: ``(uncmp_offset, cmp_end)``: producing the uncompressed bytes before ``uncmp_offset`` needs no compressed
#: byte at or after ``cmp_end``.  Lets a reader fetch exactly the span a range needs, in one request.
STOP_DTYPE = np.dtype([("uncmp_offset", "<u8"), ("cmp_end", "<u8")])
#: ``(uncmp_offset, cmp_offset)`` of each gzip member's first output byte and first deflate byte (after the
#: member header): a range crossing a member boundary restarts a plain inflate there.
MEMBER_DTYPE = np.dtype([("uncmp_offset", "<u8"), ("cmp_offset", "<u8")])

_GZIDX_MAGIC = b"GZIDX"
_GZIDX_VERSION = 1
_GZIDX_HEADER = struct.Struct("<5sBBQQIII")  # magic, version, flags, cmp size, uncmp size, spacing, window, n
_GZIDX_POINT = struct.Struct("<QQBB")  # cmp offset, uncmp offset, bits, has window
#: GZIDX stores a nominal point spacing; indexed_gzip uses it only to add points past the last one, and
#: refuses values below the window size.
_GZIDX_SPACING = 1 << 20
_READ_PIECE = 8 << 20  # compressed bytes per read while indexing: one ranged request on object stores


# ---------------------------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Span:
    """What reading one uncompressed range costs: start from ``point``, fetch compressed ``[cmp_start, cmp_end)``."""

    point: int
    cmp_start: int
    cmp_end: int


@dataclass(eq=False)
class GzipIndex:
    """The seek points of one gzip file, enough to decode any uncompressed byte range from the nearest one.

    Parameters
    ----------
    source, fingerprint
        Absolute URL of the gzip file and its size + ETag/mtime when indexed (see :mod:`virtnii.fingerprint`).
    compressed_size, uncompressed_size
        Sizes of the file and of its decompressed content (all members).
    points
        :data:`POINT_DTYPE` rows sorted by ``uncmp_offset``; always one at offset 0.
    windows
        ``(len(points), WINDOW_SIZE)`` uint8: the output preceding each point (zeros where ``has_window`` is
        false, i.e. at a member start, where nothing can be referenced); or, for an index read from a sidecar
        in layout 2, :class:`SidecarWindows`, which reads and inflates each window on first use.  Either way,
        ``windows[point]`` is the window of a point that has one (see :meth:`window`).
    stops, members
        :data:`STOP_DTYPE` and :data:`MEMBER_DTYPE` rows (see there).  Neither fits in GZIDX, so they travel in
        the JSON descriptor; an index read from a bare GZIDX file has no stops (whole-file fetch bounds are
        then used) and is assumed to be a single member.
    """

    source: str
    fingerprint: fingerprint.Fingerprint
    compressed_size: int
    uncompressed_size: int
    points: np.ndarray
    windows: np.ndarray | SidecarWindows
    stops: np.ndarray = field(default_factory=lambda: np.zeros(0, STOP_DTYPE))
    members: np.ndarray = field(default_factory=lambda: np.zeros(1, MEMBER_DTYPE))

    def __post_init__(self) -> None:
        if len(self.points) == 0 or self.points["uncmp_offset"][0] != 0:
            raise ValueError(f"gzip index of {self.source} has no seek point at offset 0")
        # Every point, member start and the file end is also a stop: merge them once for span().
        ends = np.concatenate([
            self.stops,
            _rows(STOP_DTYPE, self.points["uncmp_offset"], self.points["cmp_offset"]),
            _rows(STOP_DTYPE, self.members["uncmp_offset"], self.members["cmp_offset"]),
            _rows(STOP_DTYPE, [self.uncompressed_size], [self.compressed_size]),
        ])
        ends = np.sort(ends, order=["uncmp_offset", "cmp_end"])
        self._stop_offsets = ends["uncmp_offset"]
        # the tightest bound for "everything before offset u" is the smallest cmp_end among stops at or after u
        self._stop_bounds = np.minimum.accumulate(ends["cmp_end"][::-1])[::-1]

    # -- reading ------------------------------------------------------------------------------------------

    def span(self, start: int, end: int) -> Span:
        """The seek point and compressed byte span needed to decode uncompressed ``[start, end)``."""
        start, end = self._clamp(start, end)
        point = int(np.searchsorted(self.points["uncmp_offset"], start, side="right")) - 1
        row = self.points[point]
        cmp_start = int(row["cmp_offset"]) - (1 if row["bits"] else 0)
        first_stop = int(np.searchsorted(self._stop_offsets, end, side="left"))  # exists: the file end is one
        return Span(point, cmp_start, max(int(self._stop_bounds[first_stop]), cmp_start))

    def decode(self, span: Span, data: bytes | memoryview, start: int, end: int) -> bytes:
        """Uncompressed ``[start, end)`` from ``data``, the compressed bytes ``[span.cmp_start, span.cmp_end)``."""
        start, end = self._clamp(start, end)
        if start >= end:
            return b""
        row = self.points[span.point]
        position = int(row["uncmp_offset"])
        member = int(np.searchsorted(self.members["uncmp_offset"], position, side="right")) - 1
        window = self.window(span.point)
        stream, bits = memoryview(data), int(row["bits"])
        parts = []
        while True:
            member_end = (int(self.members["uncmp_offset"][member + 1]) if member + 1 < len(self.members)
                          else self.uncompressed_size)
            stop = min(end, member_end)
            if start < member_end:  # else the range starts in a later member: nothing to inflate in this one
                parts.append(self._inflate(stream, bits, window, max(start - position, 0),
                                           stop - max(start, position)))
            position = stop
            if position >= end:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            member += 1  # the next member's deflate data starts on a byte, with nothing to refer back to
            stream = memoryview(data)[int(self.members["cmp_offset"][member]) - span.cmp_start:]
            bits, window = 0, None

    def window(self, point: int) -> np.ndarray | None:
        """The 32 KiB of output before seek point ``point``, or None at a member start (nothing to refer to)."""
        return self.windows[point] if self.points["has_window"][point] else None

    def windows_loaded(self, points: Iterable[int]) -> bool:
        """Whether decoding from ``points`` needs no window read first (:meth:`load_windows` would do nothing)."""
        return not isinstance(self.windows, SidecarWindows) or self.windows.loaded(points)

    def load_windows(self, points: Iterable[int]) -> None:
        """Read the windows of ``points`` now, with one ranged read of the sidecar per run of neighbours.

        :meth:`decode` reads a missing window itself; a reader that fetches the compressed span anyway calls
        this alongside, so that both round trips overlap (:mod:`virtnii.gzipfs` does).
        """
        if isinstance(self.windows, SidecarWindows):
            self.windows.load(points)

    def read_range(self, fetch: Callable[[int, int], bytes], start: int, end: int) -> bytes:
        """Uncompressed ``[start, end)``, fetching compressed bytes with ``fetch(cmp_start, cmp_end)`` once."""
        span = self.span(start, end)
        return self.decode(span, fetch(span.cmp_start, span.cmp_end), start, end)

    def _clamp(self, start: int, end: int) -> tuple[int, int]:
        start = max(0, min(start, self.uncompressed_size))
        return start, max(start, min(end, self.uncompressed_size))

    def _inflate(self, stream: memoryview, bits: int, window: np.ndarray | None, skip: int, length: int) -> bytes:
        """``length`` bytes after the first ``skip`` of the raw deflate ``stream`` that starts ``bits`` bits
        before the end of its first byte, with ``window`` as the dictionary."""
        try:
            if _zlib() is None:
                return _PortableInflater(stream, bits, window).read(skip, length)
            return _RawInflater(stream, bits, window).read(skip, length)
        except _InflateError as err:
            raise InvalidGzip(self.source, f"{err}; the file or its index is damaged: re-run `virtnii scan`"
                              ) from err

    # -- GZIDX v1 -----------------------------------------------------------------------------------------

    def to_gzidx(self) -> bytes:
        """The index in the GZIDX v1 format of indexed_gzip and rapidgzip (windows uncompressed)."""
        return b"".join(self._gzidx_parts())

    def _gzidx_parts(self) -> list[bytes]:
        """GZIDX v1 in pieces: the header with the point table, then each stored window (what layout 2 of the
        sidecar compresses one by one)."""
        table = [_GZIDX_HEADER.pack(_GZIDX_MAGIC, _GZIDX_VERSION, 0, self.compressed_size, self.uncompressed_size,
                                    _GZIDX_SPACING, WINDOW_SIZE, len(self.points))]
        table += [_GZIDX_POINT.pack(int(p["cmp_offset"]), int(p["uncmp_offset"]), int(p["bits"]),
                                    int(p["has_window"])) for p in self.points]
        stored = np.flatnonzero(self.points["has_window"])
        self.load_windows(stored)
        return [b"".join(table), *(self.windows[int(p)].tobytes() for p in stored)]

    @classmethod
    def from_gzidx(cls, data: bytes, source: str, fp: fingerprint.Fingerprint, *,
                   stops: np.ndarray | None = None, members: np.ndarray | None = None) -> GzipIndex:
        """Parse GZIDX v1 bytes (ours, indexed_gzip's or rapidgzip's); ``ValueError`` if they are not."""
        table = _GzidxTable.parse(data)
        stored_size = int(table.points["has_window"].sum()) * table.window_size
        if len(data) < table.end + stored_size:
            raise ValueError("truncated GZIDX gzip index")
        stored = np.frombuffer(data, np.uint8, stored_size, table.end)
        windows = np.zeros((len(table.points), WINDOW_SIZE), np.uint8)
        windows[table.points["has_window"]] = stored.reshape(-1, table.window_size)[:, table.window_size - WINDOW_SIZE:]
        return table.index(source, fp, windows, stops, members)


@dataclass(frozen=True)
class _GzidxTable:
    """The header and point table of GZIDX v1 bytes: everything but the windows, which follow at ``end``."""

    compressed_size: int
    uncompressed_size: int
    window_size: int
    points: np.ndarray
    end: int

    @classmethod
    def parse(cls, data: bytes) -> _GzidxTable:
        """``ValueError`` unless ``data`` starts with a GZIDX v1 header and its whole point table."""
        if len(data) < _GZIDX_HEADER.size or data[:5] != _GZIDX_MAGIC:
            raise ValueError("not a GZIDX gzip index (bad magic)")
        _, version, _, cmp_size, uncmp_size, _, window_size, n = _GZIDX_HEADER.unpack_from(data)
        if version > _GZIDX_VERSION or window_size < WINDOW_SIZE:
            raise ValueError(f"unsupported GZIDX gzip index (version {version}, window {window_size})")
        end = _GZIDX_HEADER.size + n * _GZIDX_POINT.size
        if len(data) < end:
            raise ValueError("truncated GZIDX gzip index")
        raw = np.frombuffer(data, np.dtype([("cmp_offset", "<u8"), ("uncmp_offset", "<u8"), ("bits", "u1"),
                                            ("has_window", "u1")]), n, _GZIDX_HEADER.size)
        points = np.zeros(n, POINT_DTYPE)
        for name in ("cmp_offset", "uncmp_offset", "bits"):
            points[name] = raw[name]
        points["has_window"] = raw["has_window"] != 0
        return cls(cmp_size, uncmp_size, window_size, points, end)

    def index(self, source: str, fp: fingerprint.Fingerprint, windows: np.ndarray | SidecarWindows,
              stops: np.ndarray | None, members: np.ndarray | None) -> GzipIndex:
        extra = {"stops": stops, "members": members}
        return GzipIndex(source, fp, self.compressed_size, self.uncompressed_size, self.points, windows,
                         **{name: value for name, value in extra.items() if value is not None})


def _rows(dtype: np.dtype, *columns: Any) -> np.ndarray:
    """Rows of a structured ``dtype`` (:data:`STOP_DTYPE`, :data:`MEMBER_DTYPE`) from its columns, in order."""
    rows = np.zeros(len(columns[0]), dtype)
    for name, column in zip(dtype.names, columns):
        rows[name] = column
    return rows


class SidecarWindows:
    """The windows of an index read from a sidecar in layout 2, where each window is a gzip member of its own.

    A window is read (one ranged read of the sidecar for each run of neighbouring windows wanted at once) and
    inflated when a decode first needs it, then kept as long as the index: the first chunk of a file nobody
    has read yet costs its own window, not the whole sidecar (1,200 windows for a 5 GB image).  Safe from any
    thread; concurrent first reads of one window read it once.

    Parameters
    ----------
    fs, path, url
        The sidecar's filesystem, its path there, and its URL (which errors name).
    bounds
        Byte offsets in the sidecar of the window members, then the sidecar's size: window ``k`` (of the points
        that have one, in point order) is the gzip member ``[bounds[k], bounds[k + 1])``.
    has_window, window_size
        The point table's ``has_window`` column and the GZIDX window size (each member inflates to that many
        bytes, of which the last :data:`WINDOW_SIZE` are kept).
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, url: str, bounds: np.ndarray,
                 has_window: np.ndarray, window_size: int) -> None:
        if len(bounds) != int(has_window.sum()) + 1:
            raise ValueError(f"lists {len(bounds) - 1} window members for {int(has_window.sum())} windows")
        self.fs, self.path, self.url = fs, path, url
        self.bounds = bounds
        self.window_size = window_size
        self._member = np.where(has_window, np.cumsum(has_window) - 1, -1)  # point -> its window, or -1
        self._windows: dict[int, np.ndarray] = {}
        self._pending: dict[int, Future[None]] = {}
        self._lock = threading.Lock()

    def __getitem__(self, point: int) -> np.ndarray:
        member = int(self._member[point])
        window = self._windows.get(member)
        if window is None:
            self.load([point])
            window = self._windows[member]
        return window

    def loaded(self, points: Iterable[int]) -> bool:
        """Whether the windows of ``points`` (those that have one) are in memory already."""
        return all(self._member[p] < 0 or int(self._member[p]) in self._windows for p in points)

    @property
    def read_count(self) -> int:
        """Windows read so far (the rest cost nothing yet)."""
        return len(self._windows)

    def load(self, points: Iterable[int]) -> None:
        """Read and inflate the windows of ``points`` not in memory yet; waits for those others are reading."""
        wanted = sorted({int(self._member[p]) for p in points} - {-1})
        with self._lock:
            missing = [k for k in wanted if k not in self._windows]
            if not missing:
                return
            waits = {id(f): f for k in missing if (f := self._pending.get(k)) is not None}
            mine = [k for k in missing if k not in self._pending]
            future: Future[None] = Future()
            self._pending.update(dict.fromkeys(mine, future))
        try:
            runs = np.split(np.asarray(mine), np.flatnonzero(np.diff(mine) > 1) + 1) if mine else []
            got = {k: w for run in runs for k, w in self._read(int(run[0]), int(run[-1]) + 1).items()}
        except BaseException as err:
            with self._lock:
                for k in mine:
                    del self._pending[k]
            future.set_exception(err)
            raise
        with self._lock:
            self._windows.update(got)
            for k in mine:
                del self._pending[k]
        future.set_result(None)
        for other in waits.values():
            other.result()  # raises what the reader of those windows raised

    def _read(self, first: int, stop: int) -> dict[int, np.ndarray]:
        """Windows ``first`` to ``stop - 1``: one ranged read, one inflate per member."""
        start, end = int(self.bounds[first]), int(self.bounds[stop])
        try:
            data = self.fs.cat_file(self.path, start=start, end=end)
        except FileNotFoundError as err:
            raise ManifestError(self.url, f"gzip index missing: {err}") from err
        except storage_errors() as err:
            raise ManifestError(self.url, f"unreadable gzip index: {err}") from err
        if len(data) > end - start:
            raise ManifestError(self.url, f"asked for bytes {start}-{end} and got {len(data)}: the server ignores "
                                          "byte ranges (HTTP Range); serve the manifest with one that supports them")
        if len(data) < end - start:
            raise ManifestError(self.url, f"gzip index has {len(data)} bytes at {start}-{end} where its descriptor "
                                          f"lists {end - start}: it was replaced or damaged; re-run `virtnii scan`")
        windows = {}
        for k in range(first, stop):
            member = memoryview(data)[int(self.bounds[k]) - start:int(self.bounds[k + 1]) - start]
            try:
                window = igzip.decompress(member)
            except (OSError, EOFError, ValueError, isal_zlib.error) as err:
                window, problem = b"", str(err)
            else:
                problem = f"inflates to {len(window)} bytes"
            if len(window) != self.window_size:
                raise ManifestError(self.url, f"gzip index window {k} at bytes {self.bounds[k]}-{self.bounds[k + 1]} "
                                              f"is damaged ({problem}, not a {self.window_size}-byte window); "
                                              "re-run `virtnii scan`")
            windows[k] = np.frombuffer(window, np.uint8)[self.window_size - WINDOW_SIZE:]
        return windows


# ------------------------------------------------------------------------------------------ zlib via ctypes


def _stream_fields(avail: type, total: type, adler: type) -> list[tuple[str, type]]:
    """The fields of zlib's ``z_stream``, with one implementation's integer types (zlib-ng's native
    ``zng_stream`` has ``uint32_t``/``size_t`` where zlib has ``uInt``/``uLong``)."""
    return [("next_in", ctypes.c_void_p), ("avail_in", avail), ("total_in", total),
            ("next_out", ctypes.c_void_p), ("avail_out", avail), ("total_out", total),
            ("msg", ctypes.c_char_p), ("state", ctypes.c_void_p), ("zalloc", ctypes.c_void_p),
            ("zfree", ctypes.c_void_p), ("opaque", ctypes.c_void_p), ("data_type", ctypes.c_int),
            ("adler", adler), ("reserved", ctypes.c_ulong)]


class _ZStream(ctypes.Structure):
    """zlib's ``z_stream``."""

    _fields_ = _stream_fields(ctypes.c_uint, ctypes.c_ulong, ctypes.c_ulong)


class _ZngStream(ctypes.Structure):
    """zlib-ng's native ``zng_stream``."""

    _fields_ = _stream_fields(ctypes.c_uint32, ctypes.c_size_t, ctypes.c_uint32)


_Z_OK, _Z_STREAM_END, _Z_NEED_DICT, _Z_BUF_ERROR, _Z_NO_FLUSH, _Z_BLOCK = 0, 1, 2, -5, 0, 5
_GZIP_WBITS = 15 + 16  # gzip wrapper only: zlib then checks each member's CRC-32 and length itself
_RAW_WBITS = -15  # raw deflate, for decoding from a seek point
_MAX_AVAIL = 1 << 30  # avail_in/avail_out are 32-bit: feed huge spans in pieces


@dataclass(frozen=True)
class _Zlib:
    """The inflate entry points of one zlib build, bound through ctypes (``init(stream_ref, wbits)``)."""

    name: str
    stream: type[ctypes.Structure]
    init: Callable[[Any, int], int]
    inflate: Callable[[Any, int], int]
    reset: Callable[[Any], int]
    end: Callable[[Any], int]
    prime: Callable[[Any, int, int], int]
    set_dictionary: Callable[[Any, Any, int], int]


def _bind(lib: ctypes.CDLL, prefix: str, stream: type[ctypes.Structure]) -> dict[str, Any]:
    """Declare argument types (pointers must not be squeezed into C ints) of the functions we call."""
    ptr = ctypes.POINTER(stream)
    signatures = {"inflate": [ptr, ctypes.c_int], "inflateReset": [ptr], "inflateEnd": [ptr],
                  "inflatePrime": [ptr, ctypes.c_int, ctypes.c_int],
                  "inflateSetDictionary": [ptr, ctypes.c_void_p, ctypes.c_uint]}
    bound = {}
    for name, argtypes in signatures.items():
        func = getattr(lib, prefix + name)
        func.argtypes, func.restype = argtypes, ctypes.c_int
        bound[name] = func
    return bound


def _zlib_ng() -> _Zlib | None:
    """zlib-ng's inflate, exported by the ``zlib-ng`` package's extension module (~1.45x zlib here)."""
    try:
        from zlib_ng import zlib_ng

        lib = ctypes.CDLL(zlib_ng.__file__)
        f = _bind(lib, "zng_", _ZngStream)
        init2 = lib.zng_inflateInit2
    except (ImportError, OSError, AttributeError):
        return None
    init2.argtypes, init2.restype = [ctypes.POINTER(_ZngStream), ctypes.c_int], ctypes.c_int
    return _Zlib("zlib-ng", _ZngStream, init2, f["inflate"], f["inflateReset"], f["inflateEnd"],
                 f["inflatePrime"], f["inflateSetDictionary"])


def _system_zlib() -> _Zlib | None:
    """The system's shared libz, if one loads (Windows has none to find)."""
    for name in (ctypes.util.find_library("z"), "libz.so.1", "libz.dylib"):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            f = _bind(lib, "", _ZStream)
        except (OSError, AttributeError):
            continue
        lib.zlibVersion.restype = ctypes.c_char_p
        version = lib.zlibVersion()
        init2 = lib.inflateInit2_
        init2.argtypes = [ctypes.POINTER(_ZStream), ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        init2.restype = ctypes.c_int
        return _Zlib("zlib", _ZStream, lambda s, wbits: init2(s, wbits, version, ctypes.sizeof(_ZStream)),
                     f["inflate"], f["inflateReset"], f["inflateEnd"], f["inflatePrime"],
                     f["inflateSetDictionary"])
    return None


#: Environment variable choosing the inflater: ``auto`` (default: zlib through ctypes when it loads, else the
#: portable path) or ``portable`` (always the portable path: how its tests force it).
INFLATER_VARIABLE = "VIRTNII_INFLATER"
_CTYPES_ZLIB: _Zlib | None = None
_CTYPES_TRIED = False


def _zlib() -> _Zlib | None:
    """zlib's C inflate through ctypes (zlib-ng's, else the system libz), or None for the portable path."""
    global _CTYPES_ZLIB, _CTYPES_TRIED
    choice = os.environ.get(INFLATER_VARIABLE, "auto")
    if choice == "portable":
        return None
    if choice != "auto":
        raise ValueError(f"{INFLATER_VARIABLE}={choice!r}: expected 'auto' or 'portable'")
    if not _CTYPES_TRIED:
        _CTYPES_ZLIB, _CTYPES_TRIED = _zlib_ng() or _system_zlib(), True
    return _CTYPES_ZLIB


def inflater() -> str:
    """Which inflater indexes and decodes gzip files in this process (``virtnii --version`` says it)."""
    found = _zlib()
    if found is not None:
        return f"{found.name} inflate(Z_BLOCK) via ctypes"
    return "portable (seek points by indexed_gzip, checks by Python's zlib, decoding by ISA-L)"


class _InflateError(Exception):
    """Raw inflate failed; :class:`GzipIndex` turns it into an :class:`InvalidGzip` naming the source."""


class _RawInflater:
    """Raw inflate from a seek point: ``inflatePrime`` feeds the block's first bits, the window is the dictionary.

    Python's inflaters cannot start mid-byte.  Shifting the whole stream by the point's bits looks like a
    workaround but is wrong: a stored (uncompressed) block pads to a byte boundary of the *original* stream,
    so any stored block after the point (common in noisy float data) is misread.  zlib's own
    ``inflatePrime`` keeps the original byte grid.  ctypes releases the GIL during ``inflate``, so several
    ranges decode in parallel.
    """

    def __init__(self, stream: memoryview, bits: int, window: np.ndarray | None) -> None:
        self.zlib = _zlib()
        self.strm = self.zlib.stream()
        self.ref = ctypes.byref(self.strm)
        self.input = np.frombuffer(stream, np.uint8)
        if self.zlib.init(self.ref, _RAW_WBITS) != _Z_OK:
            raise MemoryError("inflateInit2 failed")
        self.used = 0
        if bits and len(self.input):
            self.zlib.prime(self.ref, bits, int(self.input[0]) >> (8 - bits))
            self.used = 1
        if window is not None:
            self.zlib.set_dictionary(self.ref, window.ctypes.data, len(window))

    def read(self, skip: int, length: int) -> bytes:
        try:
            if skip:
                scratch = _scratch()
                while skip:
                    produced = self._inflate_into(scratch.ctypes.data, min(skip, len(scratch)))
                    if not produced:
                        raise _InflateError(f"compressed data ended {skip + length} bytes short of the range")
                    skip -= produced
            out, address = _new_bytes(length)
            done = 0
            while done < length:
                produced = self._inflate_into(address + done, length - done)
                if not produced:
                    raise _InflateError(f"compressed data ended {length - done} bytes short of the range")
                done += produced
            return out
        finally:
            self.zlib.end(self.ref)

    def _inflate_into(self, address: int, size: int) -> int:
        """Inflate into ``size`` bytes at ``address`` until full, or the input or stream ends; returns bytes made."""
        strm = self.strm
        strm.next_out, strm.avail_out = address, min(size, _MAX_AVAIL)
        produced = 0
        while strm.avail_out:
            available = min(len(self.input) - self.used, _MAX_AVAIL)
            strm.next_in, strm.avail_in = self.input.ctypes.data + self.used, available
            before = strm.avail_out
            ret = self.zlib.inflate(self.ref, _Z_NO_FLUSH)
            self.used += available - strm.avail_in
            produced += before - strm.avail_out
            if ret == _Z_STREAM_END or (ret == _Z_BUF_ERROR and available == 0):
                break
            if ret not in (_Z_OK, _Z_BUF_ERROR):
                message = (strm.msg or b"").decode(errors="replace") or f"zlib error {ret}"
                raise _InflateError(f"corrupt deflate data from the seek point ({message})")
        return produced


class _BitWriter:
    """Deflate bits, packed from the low end of each byte as deflate does; Huffman codes go most significant bit
    first."""

    def __init__(self) -> None:
        self.value = self.count = 0

    def put(self, value: int, count: int) -> None:
        self.value |= value << self.count
        self.count += count

    def code(self, code: int, length: int) -> None:
        self.put(int(f"{code:0{length}b}"[::-1], 2), length)


def _empty_fixed_block(out: _BitWriter) -> None:
    """A non-final fixed-Huffman block holding only its end-of-block code: 10 bits, no output."""
    out.put(0, 1)
    out.put(1, 2)
    out.code(0, 7)


def _empty_dynamic_block(out: _BitWriter, code_length_codes: int) -> None:
    """A non-final dynamic-Huffman block holding only its end-of-block code: 92 bits with 18 code-length codes,
    95 with 19 (so its length mod 8 can be chosen).  Its literal/length code has one symbol (256, one bit), which
    zlib and ISA-L accept as the one incomplete code deflate allows."""
    out.put(0, 1)
    out.put(2, 2)
    out.put(0, 5)  # HLIT: 257 literal/length codes
    out.put(0, 5)  # HDIST: 1 distance code
    out.put(code_length_codes - 4, 4)
    lengths = {18: 1, 0: 2, 1: 2}  # code-length alphabet: 18 (runs of zeros) "0", 0 "10", 1 "11"
    for symbol in (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15)[:code_length_codes]:
        out.put(lengths.get(symbol, 0), 3)
    out.code(0, 1)
    out.put(138 - 11, 7)  # 138 zeros
    out.code(0, 1)
    out.put(118 - 11, 7)  # 118 zeros: symbols 0-255 unused
    out.code(3, 2)  # symbol 256 (end of block) has length 1
    out.code(2, 2)  # the distance code has length 0
    out.code(0, 1)  # end of block


def _aligning_prefixes() -> dict[int, _BitWriter]:
    """For each point bit count ``b`` in 1..7, empty deflate blocks of ``8k + 8 - b`` bits.

    Written before the top ``b`` bits of a seek point's first byte, they make the stream from the point start on
    a byte, with every later byte where it was: Python's inflaters (which start only on a byte) then decode from
    the point, stored blocks included, since they pad to the same byte grid as in the file.
    """
    prefixes: dict[int, _BitWriter] = {}
    for dynamic in (None, 18, 19):
        for fixed in range(4):
            out = _BitWriter()
            if dynamic:
                _empty_dynamic_block(out, dynamic)
            for _ in range(fixed):
                _empty_fixed_block(out)
            prefixes.setdefault((8 - out.count) % 8, out)
    return {bits: prefixes[bits] for bits in range(1, 8)}


_ALIGNING = _aligning_prefixes()


class _PortableInflater:
    """Raw inflate from a seek point with Python's ISA-L binding: the portable path's :class:`_RawInflater`.

    A point ``b`` bits before the end of its first byte is moved onto a byte boundary by the empty blocks of
    :func:`_aligning_prefixes` instead of ``inflatePrime``; the window is the ``zdict``.
    """

    def __init__(self, stream: memoryview, bits: int, window: np.ndarray | None) -> None:
        self.inflate = (isal_zlib.decompressobj(wbits=_RAW_WBITS) if window is None else
                        isal_zlib.decompressobj(wbits=_RAW_WBITS, zdict=window.tobytes()))
        self.inputs: list[bytes | memoryview] = [stream]
        if bits and len(stream):
            prefix = _ALIGNING[bits]
            head = prefix.value | (stream[0] >> (8 - bits)) << prefix.count
            self.inputs = [head.to_bytes((prefix.count + bits) // 8, "little"), stream[1:]]

    def read(self, skip: int, length: int) -> bytes:
        need = skip + length
        out = bytearray()
        try:
            for data in self.inputs:
                while len(out) < need and not self.inflate.eof:
                    piece = self.inflate.decompress(data, need - len(out))
                    data = self.inflate.unconsumed_tail
                    out += piece
                    if not piece and not data:
                        break
        except isal_zlib.error as err:
            raise _InflateError(f"corrupt deflate data from the seek point ({err})") from err
        if len(out) < need:
            raise _InflateError(f"compressed data ended {need - len(out)} bytes short of the range")
        return bytes(memoryview(out)[skip:])


_THREAD_LOCAL = threading.local()


def _scratch() -> np.ndarray:
    """A per-thread buffer for output that is inflated only to be skipped (reused: fresh pages cost faults)."""
    buf = getattr(_THREAD_LOCAL, "scratch", None)
    if buf is None:
        buf = _THREAD_LOCAL.scratch = np.empty(256 * 1024, np.uint8)
    return buf


_PyBytes_FromStringAndSize = ctypes.pythonapi.PyBytes_FromStringAndSize
_PyBytes_FromStringAndSize.argtypes, _PyBytes_FromStringAndSize.restype = [ctypes.c_void_p, ctypes.c_ssize_t], \
    ctypes.py_object


def _new_bytes(length: int) -> tuple[bytes, int]:
    """A new, not yet shared ``bytes`` of ``length`` uninitialised bytes, and the address of its content.

    Inflating straight into the ``bytes`` that ``cat_file`` returns saves a buffer and a copy per chunk; on
    a VM, first touches of fresh memory cost as much as the copy.  This is how C code builds bytes objects
    (``PyBytes_FromStringAndSize(NULL, n)``, then fill); the object is never seen half-filled by anyone.
    """
    if length == 0:
        return b"", 0
    out = _PyBytes_FromStringAndSize(None, length)
    return out, ctypes.cast(ctypes.c_char_p(out), ctypes.c_void_p).value


# ----------------------------------------------------------------------------------------- the index pass


class _Indexer:
    """One streaming inflate of a gzip file, keeping the last block boundary at or before each target offset.

    Output goes to a buffer whose first ``WINDOW_SIZE`` bytes repeat the end of the previous round, so the
    window of a boundary is always the 32 KiB just before it in the buffer; the window of the pending
    candidate is copied out only when the buffer wraps.  Output is capped at the next target so the
    compressed position there (a :data:`STOP_DTYPE` row) is known exactly.
    """

    _OUT = 1 << 20

    def __init__(self, url: str, targets: np.ndarray) -> None:
        self.url = url
        self.targets = targets  # sorted, unique, starting with 0
        self.zlib = _zlib()
        self.strm = self.zlib.stream()
        self.ref = ctypes.byref(self.strm)
        if self.zlib.init(self.ref, _GZIP_WBITS) != _Z_OK:
            raise MemoryError("inflateInit2 failed")
        self.buf = np.zeros(WINDOW_SIZE + self._OUT, np.uint8)
        self.fill = WINDOW_SIZE
        self.cmp = self.uncmp = 0
        self.in_member = True  # the file must start with a member; False between members
        self.in_header = True  # inflate has not yet returned at the end of the current member's header
        self.padding = False  # zero bytes seen after the last member (tolerated, like gzip does)
        self.next_target = 0  # first target whose point is not decided yet
        self.next_stop = 1  # first target whose stop is not recorded yet (target 0 needs none)
        self.candidate: tuple[int, int, int, bool, int] | None = None  # cmp, uncmp, bits, window?, buf pos
        self.candidate_window: bytes | None = None  # copied out when the buffer wrapped under it
        self.points: list[tuple[int, int, int, bool]] = []
        self.windows: list[bytes] = []
        self.stops: list[tuple[int, int]] = []
        self.members: list[tuple[int, int]] = []

    def close(self) -> None:
        self.zlib.end(self.ref)

    def feed(self, data: bytes) -> None:
        """Inflate one piece of compressed input, keeping points as boundaries pass."""
        arr = np.frombuffer(data, np.uint8)
        used = 0
        while used < len(arr):
            if not self.in_member:
                used += self._between_members(arr[used:])
                continue
            used += self._inflate_step(arr[used:])

    def _between_members(self, rest: np.ndarray) -> int:
        """Bytes after a member: another member (restart inflate) or zero padding up to the end."""
        if self.padding or rest[0] == 0:
            nonzero = np.flatnonzero(rest)
            if len(nonzero):
                raise InvalidGzip(self.url, f"unexpected data at byte {self.cmp + int(nonzero[0])}, after the "
                                            "zero padding that follows the last gzip member")
            self.padding = True
            self.cmp += len(rest)
            return len(rest)
        self.zlib.reset(self.ref)
        self.in_member = self.in_header = True
        return 0

    def _inflate_step(self, rest: np.ndarray) -> int:
        """One ``inflate(Z_BLOCK)`` call: runs to the next block boundary, output cap or end of input."""
        if self.fill == len(self.buf):
            self._wrap()
        room = len(self.buf) - self.fill
        if self.next_stop < len(self.targets):
            room = min(room, int(self.targets[self.next_stop]) - self.uncmp)
        strm = self.strm
        strm.next_in, strm.avail_in = rest.ctypes.data, len(rest)
        strm.next_out, strm.avail_out = self.buf.ctypes.data + self.fill, room
        ret = self.zlib.inflate(self.ref, _Z_BLOCK)
        consumed, produced = len(rest) - strm.avail_in, room - strm.avail_out
        start = self.cmp
        self.cmp += consumed
        self.uncmp += produced
        self.fill += produced
        if ret == _Z_STREAM_END:
            self.in_member = False
        elif ret not in (_Z_OK, _Z_BUF_ERROR):
            raise self._error(ret, start)
        elif strm.data_type & 128 and not strm.data_type & 64:
            self._boundary(strm.data_type & 7)
        self._record_stops()
        if ret == _Z_BUF_ERROR and consumed == 0 and produced == 0 and strm.avail_in:
            raise InvalidGzip(self.url, f"inflate made no progress at compressed byte {self.cmp}")
        return consumed

    def _error(self, ret: int, start: int) -> InvalidGzip:
        """The error for zlib's failure ``ret`` on input that began at compressed byte ``start``."""
        message = (self.strm.msg or b"").decode(errors="replace")
        where = f"at compressed byte ~{self.cmp}"
        if message == "incorrect header check":  # a member's first bytes (the file's are checked by build_index)
            return InvalidGzip(self.url, f"unexpected data at byte {start} after the gzip member that ends "
                                         "there: neither another gzip member nor zero padding")
        if message == "incorrect data check":
            return InvalidGzip(self.url, f"CRC-32 mismatch at the end of the gzip member ending near byte "
                                         f"{self.cmp}: the decompressed data is corrupt")
        if message == "incorrect length check":
            return InvalidGzip(self.url, f"length mismatch at the end of the gzip member ending near byte "
                                         f"{self.cmp}: the decompressed data is corrupt")
        return InvalidGzip(self.url, f"corrupt deflate data {where} ({message or f'zlib error {ret}'})")

    def _boundary(self, bits: int) -> None:
        """A deflate block boundary (or the end of a member header) at the current position."""
        member_start = self.in_header
        if member_start:  # the first boundary of a member is the end of its header: no window needed
            self.in_header = False
            self.members.append((self.uncmp, self.cmp))
        targets = self.targets
        while self.next_target < len(targets) and targets[self.next_target] < self.uncmp:
            self._keep_candidate()
            self.next_target += 1
        if self.next_target < len(targets):
            self.candidate = (self.cmp, self.uncmp, bits, not member_start, self.fill)
            self.candidate_window = None

    def _keep_candidate(self) -> None:
        """The candidate is the last boundary before a target: store it (once)."""
        cmp, uncmp, bits, has_window, pos = self.candidate
        if self.points and self.points[-1][1] == uncmp:
            return
        self.points.append((cmp, uncmp, bits, has_window))
        if not has_window:
            self.windows.append(bytes(WINDOW_SIZE))
        elif self.candidate_window is not None:
            self.windows.append(self.candidate_window)
        else:
            self.windows.append(self.buf[pos - WINDOW_SIZE:pos].tobytes())

    def _wrap(self) -> None:
        if self.candidate is not None and self.candidate_window is None and self.candidate[3]:
            pos = self.candidate[4]
            self.candidate_window = self.buf[pos - WINDOW_SIZE:pos].tobytes()
        self.buf[:WINDOW_SIZE] = self.buf[-WINDOW_SIZE:]
        self.fill = WINDOW_SIZE

    def _record_stops(self) -> None:
        while self.next_stop < len(self.targets) and self.targets[self.next_stop] <= self.uncmp:
            self.stops.append((int(self.targets[self.next_stop]), self.cmp))
            self.next_stop += 1

    def finish(self) -> None:
        """End of input: the last member must be complete; remaining targets take the last boundary."""
        if self.in_member:
            raise InvalidGzip(self.url, f"truncated: the gzip stream stops at byte {self.cmp} before its end "
                                        f"(after {self.uncmp} decompressed bytes); the file is incomplete")
        while self.next_target < len(self.targets):
            self._keep_candidate()
            self.next_target += 1


def _pieces(f: BinaryIO, url: str) -> Iterator[bytes]:
    """The file's bytes in pieces, the next one read in a thread while the current one is inflated."""
    def read() -> bytes:
        try:
            return f.read(_READ_PIECE)
        except storage_errors() as err:
            raise from_os_error(url, err, "read") from err

    with ThreadPoolExecutor(1, thread_name_prefix="virtnii-gzread") as pool:
        pending = pool.submit(read)
        while piece := pending.result():
            pending = pool.submit(read)
            yield piece


def build_index(url: str, offsets: Sequence[int], storage_options: dict[str, Any] | None = None, *,
                progress: Callable[[int], None] | None = None, fs: fsspec.AbstractFileSystem | None = None,
                prefix: bytes = b"", known: fingerprint.Fingerprint | None = None,
                content_hash: bool = False) -> GzipIndex:
    """Index a gzip file at any fsspec URL so each of ``offsets`` (uncompressed) can be read from nearby.

    One streaming pass over the compressed bytes (never the whole file in memory) keeps, per offset, the last
    deflate block boundary or member start at or before it, with its 32 KiB window; offsets sharing a
    boundary share one point.  The whole stream is inflated, so CRC-32s and lengths are checked.  The file's
    last 8 bytes (its last member's CRC-32 and length) join the fingerprint, and with ``content_hash`` the
    SHA-256 of its bytes too (:mod:`virtnii.fingerprint`), both taken from the bytes the pass reads anyway.

    Parameters
    ----------
    url
        The ``.gz`` file (local path or fsspec URL).
    offsets
        Uncompressed byte offsets reads will start at (chunk starts).  Offset 0 is always indexed.
    storage_options
        fsspec options for ``url`` (e.g. ``{"anon": True}``).
    progress
        Called with the number of compressed bytes consumed so far, after each piece read.
    fs
        The filesystem ``url`` is on, when the caller has one (its connection pool is reused); then
        ``storage_options`` are not used.
    prefix
        The file's first compressed bytes, already read by the caller: the pass starts after them.
    known
        The file's fingerprint from a listing the caller made; else it is stat'ed here.  Either way it is the
        one recorded, and a size that differs from the bytes read raises :class:`StaleSource`.
    content_hash
        Also record the SHA-256 of the compressed bytes (for ``virtnii verify --content``).

    Raises
    ------
    SourceNotFound, SourceAccessError
        The file is missing or unreadable.
    InvalidGzip
        Not gzip, truncated, corrupt deflate data, or a CRC/length mismatch; the message says which.
    StaleSource
        The file changed size while it was being read.
    """
    if fs is None:
        fs, path = open_fs(url, storage_options or {})
    else:
        path = fs._strip_protocol(url)
    source = fs.unstrip_protocol(path)
    fp = dict(known if known is not None else fingerprint.stat(fs, path, url))
    fs, path = versions.pinned(fs, path, fp)  # a source pinned to a version is read at that version
    if fp["size"] == 0:
        raise InvalidGzip(url, "empty file")
    targets = np.unique(np.asarray([0, *offsets], dtype=np.int64))
    if targets[0] < 0:
        raise ValueError(f"negative offset {int(targets[0])} requested for {url}")
    hasher = hashlib.sha256() if content_hash else None
    indexer: _Indexer | _Checker = _Indexer(url, targets) if _zlib() is not None else _Checker(url)
    tail = b""
    try:
        for piece in _stream(fs, path, url, fp["size"], prefix):
            if not tail and piece[:2] != b"\x1f\x8b":
                raise InvalidGzip(url, "not gzip data (no gzip magic bytes)")
            tail = (tail + piece[-8:])[-8:]
            if hasher is not None:
                hasher.update(piece)
            indexer.feed(piece)
            if progress is not None:
                progress(indexer.cmp)
        indexer.finish()
    finally:
        indexer.close()
    if indexer.cmp != fp["size"]:
        raise StaleSource(url, f"changed while being indexed (size was {fp['size']}, {indexer.cmp} bytes read)")
    fp[fingerprint.GZIP_TRAILER] = tail.hex()
    if hasher is not None:
        fp[fingerprint.CONTENT_HASH] = hasher.hexdigest()
    if isinstance(indexer, _Checker):
        return _portable_index(fs, path, url, source, fp, targets, indexer,
                               lambda: progress(indexer.cmp) if progress is not None else None)
    return GzipIndex(
        source=source, fingerprint=fp, compressed_size=indexer.cmp, uncompressed_size=indexer.uncmp,
        points=np.array(indexer.points, POINT_DTYPE),
        windows=np.frombuffer(b"".join(indexer.windows), np.uint8).reshape(-1, WINDOW_SIZE),
        stops=np.array(indexer.stops, STOP_DTYPE), members=np.array(indexer.members, MEMBER_DTYPE))


class _Checker:
    """The portable path's first pass: Python's zlib inflates every member (checking its CRC-32 and length) and
    finds where each starts in the output; the same errors as :class:`_Indexer`, no seek points.

    indexed_gzip, which finds the points, reads a truncated file or one with trailing garbage without a word.
    """

    _OUT = 1 << 20  # output inflated per call (and dropped): bounds memory whatever the compression ratio

    def __init__(self, url: str) -> None:
        self.url = url
        self.cmp = self.uncmp = 0
        self.member: Any = zlib.decompressobj(wbits=_GZIP_WBITS)
        self.member_starts = [0]
        self.padding = False

    def close(self) -> None:
        pass

    def feed(self, data: bytes) -> None:
        rest = memoryview(data)
        while True:
            if self.member is None:
                if not len(rest):
                    return
                rest = self._between_members(rest)
                continue
            before = len(rest)
            try:
                produced = len(self.member.decompress(rest, self._OUT))
            except zlib.error as err:
                raise self._error(err) from err
            self.uncmp += produced
            if self.member.eof:
                rest = memoryview(self.member.unused_data)
                self.member = None
            else:
                rest = memoryview(self.member.unconsumed_tail)
                if not len(rest) and produced < self._OUT:  # all consumed, no output pending
                    self.cmp += before
                    return
            self.cmp += before - len(rest)

    def _between_members(self, rest: memoryview) -> memoryview:
        """Bytes after a member: zero padding to the end, or another member (rejects anything else)."""
        if self.padding or rest[0] == 0:
            nonzero = np.flatnonzero(np.frombuffer(rest, np.uint8))
            if len(nonzero):
                raise InvalidGzip(self.url, f"unexpected data at byte {self.cmp + int(nonzero[0])}, after the "
                                            "zero padding that follows the last gzip member")
            self.padding = True
            self.cmp += len(rest)
            return rest[len(rest):]
        self.member = zlib.decompressobj(wbits=_GZIP_WBITS)
        self.member_starts.append(self.uncmp)
        return rest

    def _error(self, err: zlib.error) -> InvalidGzip:
        message = str(err)
        if "incorrect header check" in message and len(self.member_starts) > 1:
            return InvalidGzip(self.url, f"unexpected data at byte {self.cmp} after the gzip member that ends "
                                         "there: neither another gzip member nor zero padding")
        if "incorrect data check" in message:
            return InvalidGzip(self.url, "CRC-32 mismatch at the end of a gzip member: the decompressed data is "
                                         "corrupt")
        if "incorrect length check" in message:
            return InvalidGzip(self.url, "length mismatch at the end of a gzip member: the decompressed data is "
                                         "corrupt")
        return InvalidGzip(self.url, f"corrupt deflate data at compressed byte ~{self.cmp} ({message})")

    def finish(self) -> None:
        if self.member is not None:
            raise InvalidGzip(self.url, f"truncated: the gzip stream stops at byte {self.cmp} before its end "
                                        f"(after {self.uncmp} decompressed bytes); the file is incomplete")


def _portable_index(fs: fsspec.AbstractFileSystem, path: str, url: str, source: str, fp: fingerprint.Fingerprint,
                    targets: np.ndarray, checked: _Checker, progress: Callable[[], Any]) -> GzipIndex:
    """The second pass of the portable path: indexed_gzip's seek points, the last one at or before each target.

    Its spacing (uncompressed bytes between points, at least 64 KiB) is a quarter of the smallest gap between
    targets, at most 1 MiB, so a chunk read inflates at most ~1.25x its bytes while indexed_gzip's windows (all
    in memory until the pass ends) stay at 1/32 of the output or less.
    """
    try:
        import indexed_gzip
    except ImportError as err:
        raise ImportError("no zlib loads through ctypes here, so indexing .nii.gz needs indexed_gzip: "
                          "pip install indexed_gzip") from err
    gaps = np.diff(targets)
    spacing = int(np.clip(gaps.min() // 4 if len(gaps) else 1 << 20, 1 << 16, 1 << 20))
    exported = io.BytesIO()
    try:
        with contextlib.ExitStack() as stack:
            if getattr(fs, "local_file", False):
                gz = indexed_gzip.IndexedGzipFile(path, spacing=spacing, readbuf_size=_READ_PIECE)
            else:
                fileobj = stack.enter_context(fs.open(path, "rb", cache_type="none", size=fp["size"]))
                gz = indexed_gzip.IndexedGzipFile(fileobj=fileobj, spacing=spacing, readbuf_size=_READ_PIECE)
            stack.enter_context(gz)
            # seeking builds its index (reading does not, for files read in one call); in steps, so that an
            # abandoned scan stops here (progress has nothing new to count: the first pass did)
            for position in [*range(0, checked.uncmp, _READ_PIECE), checked.uncmp]:
                gz.seek(position)
                progress()
            gz.export_index(fileobj=exported)
    except storage_errors() as err:
        raise from_os_error(url, err, "read") from err
    found = GzipIndex.from_gzidx(exported.getvalue(), source, fp)
    starts = found.points[~found.points["has_window"]]
    if found.uncompressed_size != checked.uncmp or starts["uncmp_offset"].tolist() != checked.member_starts:
        raise StaleSource(url, "changed while being indexed (its two passes read different gzip streams)")
    offsets = found.points["uncmp_offset"]
    keep = np.unique(np.searchsorted(offsets, targets, side="right") - 1)
    # the first of indexed_gzip's points at or after a target bounds what reading up to the target fetches
    after = np.searchsorted(offsets, targets[1:], side="left")
    inside = after < len(offsets)
    stops = np.array(list(zip(targets[1:][inside], found.points["cmp_offset"][after[inside]])), STOP_DTYPE)
    return GzipIndex(source=source, fingerprint=fp, compressed_size=checked.cmp, uncompressed_size=checked.uncmp,
                     points=found.points[keep], windows=found.windows[keep], stops=stops,
                     members=np.array(list(zip(starts["uncmp_offset"], starts["cmp_offset"])), MEMBER_DTYPE))


def _stream(fs: fsspec.AbstractFileSystem, path: str, url: str, size: int, prefix: bytes) -> Iterator[bytes]:
    """The file's compressed bytes in pieces: ``prefix`` (already read), then the rest from where it ends."""
    if prefix:
        yield prefix
    if len(prefix) >= size:
        return
    try:
        # the size is known: fsspec then skips the info() request it makes to open a file
        f = fs.open(path, "rb", cache_type="none", size=size)
        f.seek(len(prefix))
    except storage_errors() as err:
        raise from_os_error(url, err, "open") from err
    with f:
        yield from _pieces(f, url)


# ---------------------------------------------------------------------------------------------- sidecars


def descriptor(index: GzipIndex, index_file: str, source: str | None = None, *, index_members: Sequence[int]
               ) -> dict[str, Any]:
    """The JSON descriptor of an index whose GZIDX file is ``index_file`` (relative to the descriptor), written
    in layout 2 with its gzip members starting at ``index_members`` (then its size).

    ``source`` is how the descriptor names the gzip file: ``index.source`` by default, or its path relative to
    the manifest folder for a manifest that moves with its sources.
    """
    source = index.source if source is None else source
    return {
        "virtnii_gzip_index": DESCRIPTOR_VERSION if is_url(source) else RELATIVE_DESCRIPTOR_VERSION,
        "source": source,
        "index": index_file,
        "fingerprint": index.fingerprint,
        "compressed_size": index.compressed_size,
        "uncompressed_size": index.uncompressed_size,
        "stops": {"uncompressed": index.stops["uncmp_offset"].tolist(),
                  "compressed": index.stops["cmp_end"].tolist()},
        "members": {"uncompressed": index.members["uncmp_offset"].tolist(),
                    "compressed": index.members["cmp_offset"].tolist()},
        "index_layout": SIDECAR_LAYOUT,
        "index_members": list(index_members),
    }


def write_sidecar(index: GzipIndex, fs: fsspec.AbstractFileSystem, folder_path: str, name: str,
                  source: str | None = None) -> str:
    """Write ``<name>.gzidx.gz`` (GZIDX v1, gzipped in layout 2) and ``<name>.gzidx.json`` into ``folder_path``.

    Returns the descriptor's file name.  ``source``: the descriptor's name for the gzip file (see
    :func:`descriptor`).  The windows are most of the GZIDX bytes and compress like the data, so they are
    gzipped; each on its own, as one gzip member after the member holding the header and point table, so a
    reader fetches the table and then only the windows it decodes from (whose offsets the descriptor lists).
    Concatenated members are one gzip file: it decompresses to the GZIDX v1 bytes as a whole, as indexed_gzip's
    ``import_index`` takes them (``io.BytesIO(gzip.decompress(...))``, not a ``gzip.open`` object: it would
    read the raw file through ``fileno()``).
    """
    fs.makedirs(folder_path, exist_ok=True)
    index_file = f"{name}{INDEX_SUFFIX}"
    members = [gzip.compress(part, compresslevel=6, mtime=0) for part in index._gzidx_parts()]
    fs.pipe_file(f"{folder_path}/{index_file}", b"".join(members))
    offsets = np.concatenate([[0], np.cumsum([len(m) for m in members])]).tolist()
    descriptor_file = f"{name}{DESCRIPTOR_SUFFIX}"
    fs.pipe_file(f"{folder_path}/{descriptor_file}",
                 json.dumps(descriptor(index, index_file, source, index_members=offsets)).encode())
    return descriptor_file


def read_sidecar(fs: fsspec.AbstractFileSystem, descriptor_path: str) -> GzipIndex:
    """Load the index a descriptor written by :func:`write_sidecar` points to; problems are ManifestErrors.

    Layout 2 reads the GZIDX point table only (its first gzip member); windows are read as decodes need them
    (:class:`SidecarWindows`).  Layout 1 (sidecars written before) gunzips the whole file.  The index's
    ``source`` is the descriptor's: a path relative to the manifest folder (version 2) is resolved by whoever
    knows where the manifest is (:class:`virtnii.gzipfs.GzipIndexFileSystem`).
    """
    url = fs.unstrip_protocol(descriptor_path)
    try:
        meta = json.loads(fs.cat_file(descriptor_path))
        version = meta.get("virtnii_gzip_index")
        if version not in (DESCRIPTOR_VERSION, RELATIVE_DESCRIPTOR_VERSION):
            raise ManifestError(url, f"unsupported gzip index descriptor version {version!r}")
        if version == RELATIVE_DESCRIPTOR_VERSION:
            relative_source(meta["source"])
        folder = descriptor_path.rsplit("/", 1)[0] if "/" in descriptor_path else ""
        if not isinstance(meta["index"], str) or "/" in meta["index"] or meta["index"] in ("", ".", ".."):
            raise ManifestError(url, f"names its index file {meta['index']!r} outside its own folder: refused")
        index_path = f"{folder}/{meta['index']}" if folder else meta["index"]
        stops = _rows(STOP_DTYPE, meta["stops"]["uncompressed"], meta["stops"]["compressed"])
        members = _rows(MEMBER_DTYPE, meta["members"]["uncompressed"], meta["members"]["compressed"])
        layout = meta.get("index_layout", 1)
        if layout not in (1, SIDECAR_LAYOUT):
            raise ManifestError(url, f"unsupported gzip index layout {layout!r}: written by a newer virtnii?")
        bounds = _member_offsets(meta["index_members"]) if layout == SIDECAR_LAYOUT else None
        data = fs.cat_file(index_path) if bounds is None else fs.cat_file(index_path, start=0, end=int(bounds[1]))
        if bounds is None or len(data) == bounds[-1] > bounds[1]:  # layout 1, or a server ignoring byte ranges
            # ISA-L inflates in half zlib's time: the largest part of a cold first read in layout 1
            return GzipIndex.from_gzidx(igzip.decompress(data), meta["source"], meta["fingerprint"], stops=stops,
                                        members=members)
        table_data = igzip.decompress(data)
        table = _GzidxTable.parse(table_data)
        if table.end != len(table_data):
            raise ValueError(f"its first gzip member holds {len(table_data) - table.end} bytes after the point "
                             "table, where layout 2 has none")
        windows = SidecarWindows(fs, index_path, fs.unstrip_protocol(index_path), bounds[1:],
                                 table.points["has_window"], table.window_size)
        return table.index(meta["source"], meta["fingerprint"], windows, stops, members)
    except FileNotFoundError as err:
        raise ManifestError(url, f"gzip index missing: {err}") from err
    except (*storage_errors(), ValueError, KeyError, TypeError, EOFError, isal_zlib.error) as err:
        raise ManifestError(url, f"unreadable gzip index: {err}") from err


def _member_offsets(value: Any) -> np.ndarray:
    """The descriptor's ``index_members``: increasing byte offsets from 0, at least the table's member and the
    file's end; ``ValueError`` otherwise."""
    if not isinstance(value, list) or len(value) < 2 or not all(type(v) is int for v in value):
        raise ValueError(f"index_members is not a list of at least two byte offsets: {value!r:.80}")
    bounds = np.asarray(value, np.int64)
    if bounds[0] != 0 or (np.diff(bounds) <= 0).any():
        raise ValueError("index_members are not increasing byte offsets from 0")
    return bounds
