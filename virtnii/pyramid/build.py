"""Build the downsampled levels of one image in one streaming pass over its virtual level 0.

Level 0 is read through the manifest (so through the same fingerprint checks as any reader) in z-slabs of one
(t, c) volume at a time; each level k+1 is made from level k's planes as they are produced
(:func:`~virtnii.pyramid.downsample.plane_stream`), and each level's planes are written as soon as a whole
chunk (or shard) height of them is there.  Memory is a level-0 slab plus a chunk height of planes per level,
whatever the number of slices.  Three things overlap: the next slab is read (``.nii.gz`` spans inflate in
parallel in the ``gzidx`` workers) while this one is downsampled, and writes (zarr compresses chunks in its
own threads) run behind both.

The levels are real zarr arrays ``1``, ``2``, … in a *level store* folder named after the image and a tag of
everything they were made from; its marker file ``virtnii-pyramid.json`` is written last, so a store without
one is an interrupted build, never mistaken for a finished one.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import fsspec
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec

from .. import fingerprint, slabs
from ..manifest import ImageEntry, Level, Pyramid
from ..errors import storage_errors
from ..retry import open_fs
from .downsample import LABEL_INTENTS, METHODS, factors, halved, plane_stream

#: Marker written last into a finished level store.
MARKER = "virtnii-pyramid.json"
#: Bumped when the same inputs would produce other level bytes (a new rule, a fixed bug): old stores are rebuilt.
BUILDER_VERSION = 1
#: Writes waiting or running per image: bounds the planes held behind the writer.
MAX_PENDING_WRITES = 4
#: Compressors, by name; the default measured best for MRI volumes (scripts/bench_pyramid.py --codecs).
CODECS = {
    "blosc-zstd": {"name": "blosc", "cname": "zstd", "clevel": 3, "shuffle": "shuffle"},
    "blosc-lz4": {"name": "blosc", "cname": "lz4", "clevel": 5, "shuffle": "shuffle"},
    "zstd": {"name": "zstd", "level": 3},
}
DEFAULT_CODEC = "blosc-zstd"


@dataclass(frozen=True)
class Settings:
    """How to build a pyramid: ``levels`` None means until the coarsest level fits one chunk."""

    method: str | None = None
    levels: int | None = None
    chunks: int = 64
    shards: int | None = None
    codec: str = DEFAULT_CODEC

    def __post_init__(self) -> None:
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: one of {', '.join(METHODS)}")
        if self.codec not in CODECS:
            raise ValueError(f"unknown codec {self.codec!r}: one of {', '.join(CODECS)}")
        if self.chunks < 1 or (self.shards is not None and self.shards < 1) or \
                (self.levels is not None and self.levels < 0):
            raise ValueError("chunks, shards and levels must be positive")


def method_for(intent: str, settings: Settings) -> str:
    """The method for an image: as asked, else ``mode`` for label images (by JNIfTI ``Intent``), else ``mean``."""
    if settings.method is not None:
        return settings.method
    return "mode" if intent in LABEL_INTENTS else "mean"


def plan_levels(shape: Sequence[int], axes: str, settings: Settings) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``(shape, factors)`` of levels 1..N along every zarr axis (t and c untouched; factors relative to level 0).

    Without ``settings.levels``: until every spatial axis fits one chunk (none for an image that already does).
    """
    spatial = [i for i, a in enumerate(axes) if a in "zyx"]
    current = list(shape)
    total = [1] * len(shape)
    out = []
    while settings.levels is None or len(out) < settings.levels:
        zyx = [current[i] for i in spatial]
        if settings.levels is None and all(n <= settings.chunks for n in zyx):
            break
        if all(n == 1 for n in zyx):
            break
        for i, n, f in zip(spatial, halved(zyx), factors(zyx)):
            current[i] = n
            total[i] *= f
        out.append((tuple(current), tuple(total)))
    return out


def level_chunks(shape: Sequence[int], axes: str, size: int) -> tuple[int, ...]:
    """Isotropic ``size``-cubed chunks (clipped to the shape), one volume deep in t and c."""
    return tuple(min(size, n) if a in "zyx" else 1 for n, a in zip(shape, axes))


def level_shards(shape: Sequence[int], axes: str, chunks: Sequence[int], per_axis: int | None) -> tuple[int, ...] | None:
    """Shards of ``per_axis`` chunks along each spatial axis (clipped to whole chunks covering the shape)."""
    if not per_axis:
        return None
    return tuple(min(c * per_axis, math.ceil(n / c) * c) if a in "zyx" else c for n, c, a in zip(shape, chunks, axes))


def tag(entry: ImageEntry, method: str, settings: Settings, zarr_format: int) -> str:
    """8 hex digits naming everything a level store is made from: its folder name carries it."""
    identity = {"files": entry.checked_files, "gzip": entry.gzip_index, "shape": entry.shape, "dtype": entry.dtype,
                "method": method, "levels": settings.levels, "chunks": settings.chunks, "shards": settings.shards,
                "codec": settings.codec, "zarr_format": zarr_format, "builder": BUILDER_VERSION}
    return hashlib.blake2b(json.dumps(identity, sort_keys=True, default=list).encode(), digest_size=4).hexdigest()


def _compressor(codec: str, zarr_format: int) -> Any:
    spec = dict(CODECS[codec])
    name = spec.pop("name")
    if zarr_format == 3:
        return BloscCodec(**spec) if name == "blosc" else zarr.codecs.ZstdCodec(**spec)
    if name == "blosc":
        spec["shuffle"] = numcodecs.Blosc.SHUFFLE
        return numcodecs.Blosc(**spec)
    return numcodecs.Zstd(**spec)


def _store(url: str, storage_options: dict[str, Any]) -> tuple[zarr.abc.store.Store, fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    if getattr(fs, "local_file", False):
        return zarr.storage.LocalStore(path), fs, path
    return zarr.storage.FsspecStore.from_url(url, storage_options=storage_options), fs, path


def read_marker(fs: fsspec.AbstractFileSystem, path: str) -> Pyramid | None:
    """The finished store's description, or None where there is none (or it cannot be read: rebuild it)."""
    try:
        return Pyramid.from_json(json.loads(fs.cat_file(f"{path}/{MARKER}")))
    except (*storage_errors(), ValueError, KeyError, TypeError):
        return None


def build_image(entry: ImageEntry, level0: zarr.Array, store_url: str, store_ref: str, store_tag: str,
                method: str, settings: Settings, zarr_format: int, store_options: dict[str, Any],
                sources: list[tuple[str, fingerprint.Fingerprint, dict[str, Any]]],
                progress: Callable[[int], Any] = lambda n: None) -> tuple[Pyramid, bool]:
    """Write the levels of one image into ``store_url`` (``store_ref``: how the manifest names it), or reuse them.

    ``sources`` are the image's files as :meth:`~virtnii.manifest.ImageEntry.files_to_check` gives them,
    checked again once the levels are written.
    Returns the store's :class:`Pyramid` and whether it was built (False: a finished store was reused).
    ``progress(n)`` hears of every ``n`` level-0 bytes consumed.
    """
    plans = plan_levels(entry.shape, entry.axes, settings)
    store, fs, path = _store(store_url, store_options)
    finished = read_marker(fs, path)
    if finished is not None and finished.tag == store_tag:
        progress(entry.nbytes)
        return Pyramid(store_ref, finished.tag, finished.method, finished.codec, finished.levels), False
    if fs.exists(path):
        fs.rm(path, recursive=True)  # an interrupted build: its chunks never become visible, and go now
    dtype = np.dtype(entry.numpy_dtype)
    out_dtype = dtype if dtype.names else dtype.newbyteorder("<")
    arrays = []
    for k, (shape, _) in enumerate(plans, start=1):
        chunks = level_chunks(shape, entry.axes, settings.chunks)
        shards = level_shards(shape, entry.axes, chunks, settings.shards)
        kwargs: dict[str, Any] = {"dimension_names": list(entry.axes)} if zarr_format == 3 else \
            {"attributes": {"_ARRAY_DIMENSIONS": list(entry.axes)}}
        fill = np.zeros((), dtype=out_dtype)[()]
        arrays.append(zarr.create_array(store, name=str(k), shape=shape, chunks=chunks, shards=shards,
                                        dtype=out_dtype, compressors=_compressor(settings.codec, zarr_format),
                                        fill_value=fill, zarr_format=zarr_format, **kwargs))
    _stream_levels(entry, level0, arrays, method, out_dtype, progress)
    for url, recorded, source_options in sources:  # a source changed mid-build: these levels may mix versions
        source_fs, source_path = open_fs(url, source_options)
        fingerprint.check(source_fs, source_path, url, recorded)
    levels = tuple(Level(str(k), shape, tuple(a.chunks), None if a.shards is None else tuple(a.shards), total,
                         _stored_bytes(fs, f"{path}/{k}"))
                   for k, ((shape, total), a) in enumerate(zip(plans, arrays), start=1))
    pyramid = Pyramid(store_ref, store_tag, method, CODECS[settings.codec], levels)
    fs.pipe_file(f"{path}/{MARKER}", json.dumps(pyramid.to_json()).encode())
    return pyramid, True


def _stored_bytes(fs: fsspec.AbstractFileSystem, path: str) -> int:
    return sum(info["size"] for info in fs.find(path, detail=True).values())


def _stream_levels(entry: ImageEntry, level0: zarr.Array, arrays: list[zarr.Array], method: str,
                   out_dtype: np.dtype, progress: Callable[[int], Any]) -> None:
    """The one pass: read slabs ahead, cascade planes through the levels, write chunk-high blocks behind."""
    native = np.dtype(entry.numpy_dtype)
    native = native if native.names else native.newbyteorder("=")
    reads = slabs.plan(entry.shape, entry.chunks, native.itemsize)
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="virtnii-write") as writer:
        pending: list[concurrent.futures.Future[None]] = []

        def write(array: zarr.Array, index: tuple[Any, ...], block: np.ndarray) -> None:
            while len(pending) >= MAX_PENDING_WRITES:
                pending.pop(0).result()
            pending.append(writer.submit(array.__setitem__, index, block))

        cascade: Callable[[int, np.ndarray], None] = lambda i, plane: None
        flush: list[Callable[[], None]] = []
        current: tuple[int, ...] | None = None
        for piece, planes in slabs.stream(level0, reads, native):
            if piece.volume != current:
                for finish in flush:
                    finish()
                cascade, flush = _cascade(piece.volume, entry.shape[-3], arrays, method, out_dtype, write)
                current = piece.volume
            for i, plane in enumerate(planes):
                cascade(piece.z0 + i, plane)
            progress(planes.nbytes)
        for finish in flush:
            finish()
        for future in pending:
            future.result()


def _cascade(volume: tuple[int, ...], nz: int, arrays: list[zarr.Array], method: str, out_dtype: np.dtype,
             write: Callable[..., None]) -> tuple[Callable[[int, np.ndarray], None], list[Callable[[], None]]]:
    """Feeders for one volume: level 0's planes in, every level's planes out to chunk-high write buffers.

    Returns the level-1 feeder and each level's final flush (a partial last block).
    """
    flushes: list[Callable[[], None]] = []
    feed_next: Callable[[int, np.ndarray], None] | None = None
    n_in = nz
    feeders = []
    for array in arrays:
        feeders.append((array, n_in))
        n_in = array.shape[-3]
    for array, n_in in reversed(feeders):
        emit, flush = _buffered_writer(volume, array, out_dtype, write, feed_next)
        flushes.append(flush)
        feed_next = plane_stream(method, out_dtype.newbyteorder("=") if not out_dtype.names else out_dtype, n_in,
                                 emit)
    assert feed_next is not None
    return feed_next, list(reversed(flushes))


def _buffered_writer(volume: tuple[int, ...], array: zarr.Array, dtype: np.dtype, write: Callable[..., None],
                     downstream: Callable[[int, np.ndarray], None] | None
                     ) -> tuple[Callable[[int, np.ndarray], None], Callable[[], None]]:
    """An ``emit(j, plane)`` that passes each plane on to the next level and writes them a block at a time."""
    depth = (array.shards or array.chunks)[-3]
    ny, nx = array.shape[-2:]
    state = {"buffer": np.empty((depth, ny, nx), dtype), "start": 0, "count": 0}

    def emit(j: int, plane: np.ndarray) -> None:
        buffer = state["buffer"]
        buffer[j - state["start"]] = plane
        state["count"] += 1
        if downstream is not None:
            downstream(j, plane)
        if state["count"] == depth:
            flush()

    def flush() -> None:
        if state["count"]:
            start, count = state["start"], state["count"]
            write(array, volume + (slice(start, start + count),), state["buffer"][:count])
            state.update(buffer=np.empty((depth, ny, nx), dtype), start=start + count, count=0)

    return emit, flush
