"""The viewer view of one image: a Zarr v3 + OME-Zarr 0.5 multiscale group a WebGL viewer can read chunk by chunk.

Why a second view of the same voxels: level 0 of a manifest is referenced in place, and the only contiguous
shape in a NIfTI file is a run of whole z-slices, so a sagittal (or coronal) view of level 0 touches every
chunk — the whole file.  This view re-chunks level 0 isotropically (:data:`DEFAULT_CHUNK`\\ ³ spatial, 1 along
t and c), assembling each chunk on the server from the source:

- ``.nii`` (and ``.img``): ranged reads of only the rows a chunk needs (per z-plane, columns ``x0..x1`` of rows
  ``y0..y1``), runs coalesced when the gap between them is at most ``merge_gap`` bytes (default 64 KiB: MRI
  rows are shorter, so a plane's rows are one run), all in one ``cat_ranges`` per chunk;
- ``.nii.gz``: a gzip stream can only be inflated from a seek point, and the seek points sit at the in-place
  chunk starts, so whole in-place chunks (z-slabs) are decoded through ``gzidx://`` and kept in a
  :class:`SlabCache` — an LRU bounded in bytes, where concurrent requests for one slab decode it once.  The
  chunks of one z-band of the view then share their slabs.

Sources are checked against their fingerprints whenever they are read (as :func:`virtnii.open` does); a slab
already in the cache is served without a new check, like any HTTP cache, until evicted.  The cache bounds the
slabs it keeps, not those being decoded for requests in flight (a view chunk needs the slabs of its z-band:
128 planes of the image).

Levels ≥ 1 are the written pyramid levels: their chunk objects are passed through unchanged when they are Zarr v3
and the dtype needs no adaptation, otherwise read and re-encoded.  Chunks made here are compressed with blosc
(lz4, level 5, byte shuffle): zarrita — the Zarr reader inside niivue — decodes blosc, gzip, zlib, lz4 and zstd
(its codec registry), and lz4 encodes a 4 MiB chunk in ~3 ms against ~10 ms for zstd level 1, at a ratio within
10% (measured on MRI-like int16).

Dtypes: WebGL viewers take int8, uint8, int16, uint16, int32, uint32 and float32.  Anything else is adapted, and
the group attributes say how (``virtnii_view.adaptation``); the exact store (``/zarr/``) is never touched:

=====================  ==============================================================================
source                  view
=====================  ==============================================================================
float64, float128      float32 (nearest; magnitudes beyond float32's range become ±inf)
int64, uint64          int32 when every value of level 0 fits (one pass over level 0 at first request),
                       else float32 (nearest)
RGB24, RGBA32          uint8 with a channel axis ``c`` of 3 or 4 (R, G, B[, A]) before ``z``
complex64/128/256      float32 with a channel axis ``c`` of 2 (real, imaginary)
big-endian             the same type, little-endian (values unchanged)
=====================  ==============================================================================

With a ``c`` axis already (5-D images), components are folded into it: ``c' = c * k + component``.  Nothing
else is applied: voxels are raw, as in the exact store; ``scl_slope``/``scl_inter`` are in the attributes for the
page to apply.  Orientation: OME ``scale`` comes from nibabel's ``get_best_affine`` (column norms: voxel sizes
along i, j, k) and ``translation`` from its offset (so the placement is exact for diagonal affines with positive
entries, e.g. MNI templates); ``virtnii_view.affine`` holds the whole 4×4 voxel-to-world affine of level 0 in
NIfTI index order (i, j, k = x, y, z), and ``virtnii_view.levels[k].affine`` that of each level, for the page to
place the volume in world space (niivue ignores the NIfTI header of an OME-Zarr otherwise).

Entry point (used by the HTTP app for ``/view/<image>/<key>``)::

    group = virtnii.open(manifest)
    cache = SlabCache(1 << 30)                        # one per server: it bounds all views' decoded slabs
    view = ImageView(group["sub-01/anat/sub-01_T1w"], cache=cache)
    await view.get("zarr.json")                       # group document (OME multiscales, virtnii_view)
    await view.get("0/zarr.json")                     # array document of level 0
    await view.get("0/c/0/1/2")                       # a compressed chunk, or None: absent (a fill-value chunk)

``get`` returns ``None`` for every key that is not one of the view's (unknown levels, chunk indices outside the
grid, ``..``, v2 keys): the app answers 404.  Errors reading a source are :class:`~virtnii.errors.VirtniiError`
subclasses naming it (``StaleSource`` when it changed since indexing).  ``get`` may be called concurrently from
one event loop; all blocking work (inflating, copying, compressing) runs in worker threads.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Hashable, Sequence

import numcodecs
import numpy as np
import zarr
import zarr.api.asynchronous
from fsspec.core import split_protocol
from zarr.codecs import BloscCodec
from zarr.storage import MemoryStore

from ..errors import ManifestError
from ..pyramid.build import CODECS
from ..reader import to_nibabel
from ..references import chunk_key

#: Spatial chunk edge of the view (clipped to the image); 128³ int16 is 4 MiB, what viewers upload as one texture.
DEFAULT_CHUNK = 128
#: Decoded ``.nii.gz`` slabs kept by default: a 128-plane band of a 1600×1400 int16 image is 573 MB.
DEFAULT_CACHE_BYTES = 1 << 30
#: Largest gap (bytes) between two row runs of a ``.nii`` that are still fetched as one range: small next to a
#: request's cost on object stores, and a local disk reads whole pages anyway.
MERGE_GAP = 64 << 10
#: The view's chunk codec (see the module docstring for why).
CODEC = {key: value for key, value in CODECS["blosc-lz4"].items() if key != "name"}
#: What WebGL viewers (niivue, neuroglancer) take as they are.
VIEWER_DTYPES = frozenset(np.dtype(t) for t in ("i1", "u1", "<i2", "<u2", "<i4", "<u4", "<f4"))
#: In-place chunks of level 0 read at once when scanning int64 values (bounds memory to a few slabs).
_SCAN_CONCURRENCY = 4
_INDEX = re.compile(r"0|[1-9][0-9]{0,17}")
_INT32 = np.iinfo(np.int32)
_VIEWS = itertools.count()


class SlabCache:
    """Decoded slabs (bytes) by key, least recently used first out, never holding more than ``limit`` bytes.

    A slab larger than ``limit`` is decoded and returned but not kept.  Concurrent :meth:`get` calls for a slab
    being decoded wait for that decode instead of starting another.  One event loop uses it at a time.
    """

    def __init__(self, limit: int = DEFAULT_CACHE_BYTES) -> None:
        if limit < 0:
            raise ValueError(f"a cache limit must be >= 0 bytes, not {limit}")
        self.limit = limit
        #: bytes held now, and the most ever held (what tests and operators check against ``limit``)
        self.nbytes = 0
        self.peak = 0
        self.hits = self.misses = 0
        self._slabs: OrderedDict[Hashable, bytes] = OrderedDict()
        self._loading: dict[Hashable, asyncio.Future[bytes]] = {}

    async def get(self, key: Hashable, load: Callable[[], Awaitable[bytes]]) -> bytes:
        """The slab ``key``, from the cache, from a decode in flight, or from ``await load()``."""
        while True:
            if key in self._slabs:
                self.hits += 1
                self._slabs.move_to_end(key)
                return self._slabs[key]
            pending = self._loading.get(key)
            if pending is None:
                break
            await asyncio.wait([pending])
            if not pending.cancelled():  # a cancelled decode (its client left): try again, maybe decode it here
                self.hits += 1
                return pending.result()
        self.misses += 1
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            data = await load()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as err:
            future.set_exception(err)
            future.exception()  # retrieved: nobody may be waiting for it
            raise
        finally:
            del self._loading[key]
        future.set_result(data)
        self._keep(key, data)
        return data

    def _keep(self, key: Hashable, data: bytes) -> None:
        if len(data) > self.limit:
            return
        while self._slabs and self.nbytes + len(data) > self.limit:
            _, evicted = self._slabs.popitem(last=False)
            self.nbytes -= len(evicted)
        self._slabs[key] = data
        self.nbytes += len(data)
        self.peak = max(self.peak, self.nbytes)


@dataclass(frozen=True)
class Adaptation:
    """How source voxels become view voxels: ``dtype`` (little-endian), ``components`` (0, or how many fields
    of a structured or complex voxel become a channel axis) and what was done, or None when the view is exact."""

    dtype: np.dtype
    components: int = 0
    description: str | None = None

    @property
    def exact(self) -> bool:
        return self.description is None


def adaptation(source: np.dtype, value_range: tuple[int, int] | None = None) -> Adaptation:
    """The view dtype for source dtype ``source``; int64/uint64 need ``value_range`` (min, max of the voxels)."""
    if source.names:
        bases = {source.fields[name][0] for name in source.names}
        if bases != {np.dtype("u1")}:
            raise ValueError(f"no viewer dtype for structured voxels {source.descr}")
        names = ", ".join(source.names)
        return Adaptation(np.dtype("u1"), len(source.names),
                          f"{len(source.names)} uint8 components ({names}) as channel axis c")
    if source.kind == "c":
        rounded = "" if source.itemsize == 8 else f", rounded from float{source.itemsize * 4} to nearest"
        return Adaptation(np.dtype("<f4"), 2, f"complex{source.itemsize * 8} as channel axis c of 2 float32 "
                                              f"components (real, imaginary){rounded}")
    if source.kind == "f" and source.itemsize > 4:
        return Adaptation(np.dtype("<f4"), 0, f"float{source.itemsize * 8} cast to float32 (nearest; beyond "
                                              "float32's range: ±inf)")
    if source.kind in "iu" and source.itemsize == 8:
        if value_range is None:
            raise ValueError("int64/uint64 voxels need their value range to choose a viewer dtype")
        low, high = value_range
        kind = "int64" if source.kind == "i" else "uint64"
        if _INT32.min <= low and high <= _INT32.max:
            return Adaptation(np.dtype("<i4"), 0, f"{kind} as int32: every value fits (level 0 spans "
                                                  f"{low}..{high})")
        return Adaptation(np.dtype("<f4"), 0, f"{kind} cast to float32 (nearest): level 0 spans {low}..{high}, "
                                              "beyond int32")
    view = source.newbyteorder("<")
    if view not in VIEWER_DTYPES:
        raise ValueError(f"no viewer dtype for voxels of type {source}")
    return Adaptation(view)


def needs_value_range(source: np.dtype) -> bool:
    """Whether :func:`adaptation` needs the voxels' range for ``source`` (64-bit integers)."""
    return not source.names and source.kind in "iu" and source.itemsize == 8


def convert(block: np.ndarray, how: Adaptation, z_axis: int, has_c: bool) -> np.ndarray:
    """Source voxels ``block`` (axes ``[t, c,] z, y, x``, z at ``z_axis``) as view voxels, C-contiguous."""
    if how.components:
        parts = [block[name] for name in block.dtype.names] if block.dtype.names else [block.real, block.imag]
        block = np.stack(parts, axis=z_axis)
        if has_c:  # fold the components into the existing channel axis: c' = c * k + component
            shape = block.shape
            block = block.reshape(shape[:z_axis - 1] + (shape[z_axis - 1] * shape[z_axis],) + shape[z_axis + 1:])
    return np.ascontiguousarray(block, dtype=how.dtype)


@dataclass(frozen=True)
class _Level:
    """One level of the view: its path, view and source geometry, and how its chunks are made."""

    path: str
    factors: tuple[int, ...]  # downsampling along each source axis relative to level 0
    source_shape: tuple[int, ...]
    source_chunks: tuple[int, ...]  # the source box one view chunk covers
    passthrough: bool  # chunk objects served as written (v3 level, exact dtype)


class ImageView:
    """The viewer view of one image group of an opened manifest (``virtnii.open(m)[name]``).

    ``chunk`` is the spatial chunk edge of level 0, ``cache`` the decoded-slab cache (share one between views to
    bound the server's memory), ``merge_gap`` the gap up to which row reads of a ``.nii`` are coalesced.
    ``source_bytes`` and ``decoded_bytes`` count what level-0 chunks read from ``.nii`` sources and inflated
    from ``.nii.gz`` sources (cache misses), for measurements and logs.
    """

    def __init__(self, group: zarr.Group, *, chunk: int = DEFAULT_CHUNK, cache: SlabCache | None = None,
                 merge_gap: int = MERGE_GAP) -> None:
        if chunk < 1 or merge_gap < 0:
            raise ValueError("chunk must be >= 1 and merge_gap >= 0")
        self._group = group
        self._fs = group.store.fs  # the manifest's ReferenceFileSystem
        self._prefix = "/".join(part for part in (group.store.path, group.path) if part)
        self._zarr_format = group.metadata.zarr_format
        self.cache = cache if cache is not None else SlabCache()
        self.merge_gap = merge_gap
        self.source_bytes = self.decoded_bytes = 0
        image = to_nibabel(group)
        self.source_dtype: np.dtype = image.header.get_data_dtype()
        self._affine = np.asarray(image.header.get_best_affine(), dtype=float)
        # nibabel's reading of the header's scaling (unset or 0 slope: 1, 0), which a loaded header no longer holds
        self._scaling = {"scl_slope": float(image.dataobj.slope), "scl_inter": float(image.dataobj.inter)}
        attributes = group.attrs.asdict()
        self._multiscales = (attributes["ome"] if "ome" in attributes else attributes)["multiscales"][0]
        self._axes_doc = self._multiscales["axes"]
        self.axes = tuple(axis["name"] for axis in self._axes_doc)
        level0 = group["0"]
        self._level0_chunks = tuple(level0.chunks)
        base = _scale(self._multiscales["datasets"][0])
        self._levels: dict[str, _Level] = {}
        for dataset in self._multiscales["datasets"]:
            path = dataset["path"]
            array = group[path]
            factors = tuple(max(1, round(s / b)) for s, b in zip(_scale(dataset), base))
            if path == "0":
                box = tuple(1 if name in "tc" else min(chunk, n) for name, n in zip(self.axes, array.shape))
                passthrough = False
            else:
                box = tuple(array.shards or array.chunks)
                passthrough = array.metadata.zarr_format == 3
            self._levels[path] = _Level(path, factors, tuple(array.shape), box, passthrough)
        reference = self._reference(chunk_key(f"{self._prefix}/0", (0,) * len(self.axes), self._zarr_format))
        self.gzipped = split_protocol(reference[0])[0] == "gzidx"
        self._adaptation: Adaptation | None = None if needs_value_range(self.source_dtype) \
            else adaptation(self.source_dtype)
        self._documents: dict[str, bytes] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._level_arrays: dict[str, zarr.AsyncArray] = {}
        self._token = next(_VIEWS)  # names this view's slabs in a shared cache (an id() could be reused)

    # -- the entry point ---------------------------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        """The bytes of store key ``key`` of the view (relative to the view's root), or None if it has none."""
        parsed = self._parse(key)
        if parsed is None:
            return None
        path, coords = parsed
        await self._prepare()
        if coords is None:
            return self._documents.get(key)
        level = self._levels[path]
        if level.passthrough and self.adaptation.exact:
            try:
                return await self._fs._cat_file(chunk_key(f"{self._prefix}/{path}", coords, 3))
            except FileNotFoundError:
                return None  # not written: all fill values
        source_coords = self._source_coords(coords)
        lo = tuple(c * b for c, b in zip(source_coords, level.source_chunks))
        hi = tuple(min(start + b, n) for start, b, n in zip(lo, level.source_chunks, level.source_shape))
        if path == "0":
            fill = await self._level0_filler(lo, hi)
        else:
            fill = await self._level_filler(path, lo, hi)
        return await asyncio.to_thread(self._encode, fill, level, np.subtract(hi, lo))

    async def attributes(self) -> dict[str, Any]:
        """The view group's attributes (OME multiscales and ``virtnii_view``), e.g. for an image listing."""
        await self._prepare()
        assert self._documents is not None
        return json.loads(self._documents["zarr.json"])["attributes"]

    @property
    def adaptation(self) -> Adaptation:
        """The dtype adaptation (known after the first :meth:`get` for int64/uint64 images)."""
        if self._adaptation is None:
            raise RuntimeError("the adaptation of a 64-bit integer image is known once the view is prepared")
        return self._adaptation

    # -- keys --------------------------------------------------------------------------------------------------

    def _parse(self, key: str) -> tuple[str, tuple[int, ...] | None] | None:
        """``(level path, chunk coordinates)`` of a chunk key, ``(path, None)`` of a document key, or None."""
        if key == "zarr.json":
            return "", None
        parts = key.split("/")
        if len(parts) < 2 or parts[0] not in self._levels:
            return None
        if len(parts) == 2:
            return (parts[0], None) if parts[1] == "zarr.json" else None
        indices = parts[2:]
        if parts[1] != "c" or len(indices) != len(self._view_grid(parts[0])) or \
                not all(_INDEX.fullmatch(index) for index in indices):
            return None
        coords = tuple(int(index) for index in indices)
        if any(c >= n for c, n in zip(coords, self._view_grid(parts[0]))):
            return None
        return parts[0], coords

    def _view_grid(self, path: str) -> tuple[int, ...]:
        """Chunks along each view axis of level ``path`` (the component axis, if any, is one chunk)."""
        level = self._levels[path]
        grid = [-(-n // b) for n, b in zip(level.source_shape, level.source_chunks)]
        if self._components and "c" not in self.axes:
            grid.insert(self.axes.index("z"), 1)
        return tuple(grid)

    @property
    def _components(self) -> int:
        if self.source_dtype.names:
            return len(self.source_dtype.names)
        return 2 if self.source_dtype.kind == "c" else 0

    def _source_coords(self, coords: tuple[int, ...]) -> tuple[int, ...]:
        if self._components and "c" not in self.axes:
            z = self.axes.index("z")
            return coords[:z] + coords[z + 1:]
        return coords

    @property
    def view_axes(self) -> tuple[str, ...]:
        if self._components and "c" not in self.axes:
            z = self.axes.index("z")
            return self.axes[:z] + ("c",) + self.axes[z:]
        return self.axes

    def _view_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The view shape of a source shape (a level's, or a chunk's)."""
        k = self._components
        if not k:
            return tuple(shape)
        if "c" in self.axes:
            c = self.axes.index("c")
            return tuple(n * k if axis == c else n for axis, n in enumerate(shape))
        z = self.axes.index("z")
        return tuple(shape[:z]) + (k,) + tuple(shape[z:])

    # -- metadata ----------------------------------------------------------------------------------------------

    async def _prepare(self) -> None:
        """Choose the dtype (reading level 0's range for 64-bit integers) and build the metadata, once; callers
        arriving meanwhile wait for it (and retry if it was cancelled: its client left)."""
        while self._documents is None:
            pending = self._ready
            if pending is not None:
                await asyncio.wait([pending])
                if not pending.cancelled():
                    pending.result()  # the failure, if it failed
                continue
            pending = self._ready = asyncio.get_running_loop().create_future()
            try:
                if self._adaptation is None:
                    self._adaptation = adaptation(self.source_dtype, await self._level0_range())
                self._documents = self._build_documents()
            except asyncio.CancelledError:
                pending.cancel()
                raise
            except BaseException as err:
                pending.set_exception(err)
                pending.exception()  # retrieved: nobody may be waiting for it
                raise
            else:
                pending.set_result(None)
            finally:
                self._ready = None

    def _build_documents(self) -> dict[str, bytes]:
        how = self.adaptation
        docs: dict[str, bytes] = {}
        datasets, levels = [], []
        axes_doc = list(self._axes_doc)
        if self._components and "c" not in self.axes:
            axes_doc.insert(self.axes.index("z"), {"name": "c", "type": "channel"})
        level0_scale = _scale(self._multiscales["datasets"][0])
        voxel = {"x": np.linalg.norm(self._affine[:3, 0]), "y": np.linalg.norm(self._affine[:3, 1]),
                 "z": np.linalg.norm(self._affine[:3, 2])}
        origin = {"x": self._affine[0, 3], "y": self._affine[1, 3], "z": self._affine[2, 3]}
        for level in self._levels.values():
            factor = dict(zip(self.axes, level.factors))
            base = dict(zip(self.axes, level0_scale))
            scale, shift = [], []
            for name in self.view_axes:
                size = float(voxel[name]) if name in "zyx" and voxel[name] > 0 else base.get(name, 1.0)
                f = factor.get(name, 1)
                scale.append(size * f)
                shift.append(float(origin[name]) + (f - 1) / 2 * size if name in "zyx" else 0.0)
            datasets.append({"path": level.path, "coordinateTransformations": [
                {"type": "scale", "scale": scale}, {"type": "translation", "translation": shift}]})
            steps = np.eye(4)
            for i, name in enumerate("xyz"):
                steps[i, i] = factor[name]
                steps[i, 3] = (factor[name] - 1) / 2
            levels.append({"path": level.path, "affine": _finite(self._affine @ steps)})
            docs[f"{level.path}/zarr.json"] = self._array_document(level, how)
        image = {key: value for key, value in self._multiscales.items() if key not in ("version", "axes", "datasets")}
        image.update(axes=axes_doc, datasets=datasets)
        view = {"version": 1, "source_dtype": _dtype_name(self.source_dtype), "dtype": str(how.dtype),
                "exact": how.exact, "adaptation": how.description,
                "channels": list(self.source_dtype.names) if self.source_dtype.names
                else ["real", "imaginary"] if self._components else None,
                **self._scaling, "affine": _finite(self._affine), "levels": levels,
                "chunks": list(self._view_shape(self._levels["0"].source_chunks))}
        attributes = {"ome": {"version": "0.5", "multiscales": [image]}, "virtnii_view": view}
        docs["zarr.json"] = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes},
                                       allow_nan=False).encode()
        return docs

    def _array_document(self, level: _Level, how: Adaptation) -> bytes:
        if level.passthrough and how.exact:
            doc = json.loads(self._fs.cat_file(f"{self._prefix}/{level.path}/zarr.json"))
            doc["attributes"] = {}
            return json.dumps(doc).encode()
        store = MemoryStore()
        zarr.create_array(store=store, shape=self._view_shape(level.source_shape),
                          chunks=self._view_shape(level.source_chunks), dtype=how.dtype,
                          compressors=BloscCodec(**CODEC), fill_value=0, dimension_names=self.view_axes)
        return store._store_dict["zarr.json"].to_bytes()

    # -- level 0 from the source ---------------------------------------------------------------------------------

    def _reference(self, key: str) -> tuple[str, int, int]:
        """``(url, offset, length)`` of an in-place chunk of level 0."""
        try:
            url, offset, length = self._fs.references[key]
        except (KeyError, ValueError, TypeError) as err:
            raise ManifestError(key, "level 0 of this image has no byte-range reference here; re-run "
                                     "`virtnii scan`") from err
        return url, int(offset), int(length)

    def _target(self, url: str) -> Any:
        return self._fs.fss[split_protocol(url)[0]]

    def _pieces(self, lo: tuple[int, ...], hi: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple, tuple]]:
        """The in-place chunks box ``[lo, hi)`` of level 0 overlaps: ``(chunk coords, slice in chunk, slice in
        box)`` each."""
        chunks = self._level0_chunks
        ranges = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(lo, hi, chunks)]
        pieces = []
        for q in itertools.product(*ranges):
            start = [max(a, i * c) for a, i, c in zip(lo, q, chunks)]
            stop = [min(b, (i + 1) * c) for b, i, c in zip(hi, q, chunks)]
            inside = tuple(slice(s - i * c, e - i * c) for s, e, i, c in zip(start, stop, q, chunks))
            within = tuple(slice(s - a, e - a) for s, e, a in zip(start, stop, lo))
            pieces.append((q, inside, within))
        return pieces

    async def _level0_filler(self, lo: tuple[int, ...], hi: tuple[int, ...]) -> Callable[[np.ndarray], None]:
        """Fetch what box ``[lo, hi)`` of level 0 needs; return the function that copies it into a block."""
        pieces = self._pieces(lo, hi)
        level0 = f"{self._prefix}/0"
        keys = [chunk_key(level0, q, self._zarr_format) for q, _, _ in pieces]
        if self.gzipped:
            slabs = await asyncio.gather(*(self.cache.get((self._token, key), self._loader(key)) for key in keys))

            def fill(block: np.ndarray) -> None:
                for data, (_, inside, within) in zip(slabs, pieces):
                    block[within] = np.frombuffer(data, self.source_dtype).reshape(self._level0_chunks)[inside]
            return fill
        return await self._rows_filler(pieces, keys)

    def _loader(self, key: str) -> Callable[[], Awaitable[bytes]]:
        async def load() -> bytes:
            url, offset, length = self._reference(key)
            data = await self._target(url)._cat_file(url, offset, offset + length)
            self.decoded_bytes += len(data)
            return data
        return load

    async def _rows_filler(self, pieces: list, keys: list[str]) -> Callable[[np.ndarray], None]:
        """Read the bytes the pieces need from a ``.nii`` or ``.img``: per z-plane, the ``x0..x1`` part of rows
        ``y0..y1`` — one run from the first row's ``x0`` to the last row's ``x1`` when the gap between rows is
        at most ``merge_gap``, else one run per row — runs then coalesced across planes and chunks."""
        itemsize = self.source_dtype.itemsize
        chunks = self._level0_chunks
        row = chunks[-1] * itemsize  # in-place chunks hold whole rows
        runs = []  # (url, start, end, rows in the run, piece, lead index in the piece)
        for key, piece in zip(keys, pieces):
            url, offset, _ = self._reference(key)
            _, inside, _ = piece
            ys, xs = inside[-2], inside[-1]
            width = (xs.stop - xs.start) * itemsize
            whole = row - width <= self.merge_gap
            for lead in itertools.product(*(range(s.start, s.stop) for s in inside[:-2])):
                first = offset + int(np.ravel_multi_index(lead + (ys.start,), chunks[:-1])) * row + xs.start * itemsize
                if whole:
                    count = ys.stop - ys.start
                    runs.append((url, first, first + (count - 1) * row + width, (0, count), piece, lead))
                else:
                    runs.extend((url, first + y * row, first + y * row + width, (y, y + 1), piece, lead)
                                for y in range(ys.stop - ys.start))
        runs.sort(key=lambda run: (run[0], run[1]))
        merged: list[list[Any]] = []  # [url, start, end]
        for url, start, end, *_ in runs:
            if merged and merged[-1][0] == url and start - merged[-1][2] <= self.merge_gap:
                merged[-1][2] = max(merged[-1][2], end)
            else:
                merged.append([url, start, end])
        by_target: dict[int, list[int]] = {}
        for i, (url, _, _) in enumerate(merged):
            by_target.setdefault(id(self._target(url)), []).append(i)
        buffers: list[bytes] = [b""] * len(merged)
        for indices in by_target.values():
            target = self._target(merged[indices[0]][0])
            got = await target._cat_ranges([merged[i][0] for i in indices], [merged[i][1] for i in indices],
                                           [merged[i][2] for i in indices])
            for i, data in zip(indices, got):
                if isinstance(data, BaseException):
                    raise data
                buffers[i] = data
        self.source_bytes += sum(end - start for _, start, end in merged)

        def fill(block: np.ndarray) -> None:
            m = 0
            for url, start, end, (y0, y1), (_, inside, within), lead in runs:
                while not (merged[m][0] == url and merged[m][1] <= start and end <= merged[m][2]):
                    m += 1
                nx = inside[-1].stop - inside[-1].start
                flat = np.frombuffer(buffers[m], self.source_dtype, (end - start) // itemsize,
                                     start - merged[m][1])
                rows = np.lib.stride_tricks.as_strided(flat, (y1 - y0, nx), (row, itemsize), writeable=False)
                at = tuple(w.start + i - s.start for w, i, s in zip(within, lead, inside))
                block[at + (slice(within[-2].start + y0, within[-2].start + y1), within[-1])] = rows
        return fill

    async def _level0_range(self) -> tuple[int, int]:
        """Smallest and largest voxel of level 0, reading each in-place chunk once (for 64-bit integers)."""
        grid = [-(-n // c) for n, c in zip(self._levels["0"].source_shape, self._level0_chunks)]
        level0 = f"{self._prefix}/0"
        keys = [chunk_key(level0, q, self._zarr_format) for q in itertools.product(*map(range, grid))]
        low, high = None, None
        for start in range(0, len(keys), _SCAN_CONCURRENCY):
            slabs = await asyncio.gather(*(self._read_whole(key) for key in keys[start:start + _SCAN_CONCURRENCY]))
            for data in slabs:
                values = np.frombuffer(data, self.source_dtype)
                low = int(values.min()) if low is None else min(low, int(values.min()))
                high = int(values.max()) if high is None else max(high, int(values.max()))
        return low, high

    async def _read_whole(self, key: str) -> bytes:
        url, offset, length = self._reference(key)
        return await self._target(url)._cat_file(url, offset, offset + length)

    # -- levels >= 1, re-encoded -----------------------------------------------------------------------------------

    async def _level_filler(self, path: str, lo: tuple[int, ...], hi: tuple[int, ...]
                            ) -> Callable[[np.ndarray], None]:
        array = self._level_arrays.get(path)
        if array is None:
            array = self._level_arrays[path] = await zarr.api.asynchronous.open_array(
                store=self._group.store, path=f"{self._group.path}/{path}", mode="r")
        data = await array.getitem(tuple(slice(a, b) for a, b in zip(lo, hi)))

        def fill(block: np.ndarray) -> None:
            block[...] = data
        return fill

    # -- chunks ------------------------------------------------------------------------------------------------

    def _encode(self, fill: Callable[[np.ndarray], None], level: _Level, extent: np.ndarray) -> bytes:
        """Assemble one view chunk (source box of size ``extent``), adapt, pad edge chunks with 0, compress."""
        block = np.empty(tuple(int(n) for n in extent), dtype=self.source_dtype)
        fill(block)
        has_c = "c" in self.axes
        converted = convert(block, self.adaptation, self.axes.index("z"), has_c)
        full = self._view_shape(level.source_chunks)
        if converted.shape != full:
            padded = np.zeros(full, dtype=converted.dtype)
            padded[tuple(slice(0, n) for n in converted.shape)] = converted
            converted = padded
        return numcodecs.Blosc(cname=CODEC["cname"], clevel=CODEC["clevel"],
                               shuffle=numcodecs.Blosc.SHUFFLE).encode(converted)


def _scale(dataset: dict[str, Any]) -> list[float]:
    return next(t["scale"] for t in dataset["coordinateTransformations"] if t["type"] == "scale")


def _finite(matrix: np.ndarray) -> list[list[float | None]]:
    """A matrix as JSON lists, non-finite entries as null (JSON has no NaN)."""
    return [[float(v) if math.isfinite(v) else None for v in row] for row in np.asarray(matrix, dtype=float)]


def _dtype_name(dtype: np.dtype) -> str:
    return str(dtype) if not dtype.names else "+".join(f"{name}:{dtype.fields[name][0]}" for name in dtype.names)
