"""Pure arithmetic that maps a NIfTI data block onto zarr chunks: shapes, chunk sizes, byte offsets.

NIfTI stores voxels x fastest, then y, z, t, c (Fortran order over ``dim[1..5]``); NIfTI-Zarr arrays are C order
over ``[t, c, z, y, x]``.  A chunk that is whole along every faster file axis is one contiguous byte range of the
file — a run of rows, of whole slices, of whole volumes — and its bytes are already in zarr's C order as long as
it does not span both t and c (their order is swapped between file and zarr).  Everything below is that
observation, done with numpy so that a 100k-chunk image costs nothing.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .errors import UnsupportedNifti

#: Axis names in NIfTI file order (fastest first).
FILE_AXES = ("x", "y", "z", "t", "c")
#: For each axis of a NIfTI-Zarr array of rank 3, 4 or 5 (``[[t,] [c,] z, y, x]``), its position in FILE_AXES.
ZARR_TO_FILE = {3: (2, 1, 0), 4: (3, 2, 1, 0), 5: (3, 4, 2, 1, 0)}

TARGET_CHUNK_BYTES = 4 * 2**20
MAX_CHUNK_BYTES = 16 * 2**20
#: Most chunks one image may have: 2**20 (1,048,576), i.e. 4 TiB at the 4 MiB target, far past the largest NIfTI
#: files known (DANDI's ex vivo MRIs, ~5 GB: ~1,200 chunks), with references of ~100 MB of JSON.  Without it, dims
#: with no divisor near the target (a large prime) or a header claiming absurd dims would make a chunk table of
#: millions to trillions of entries, exhausting memory before any other check could speak.
MAX_CHUNKS = 2**20
#: Byte offsets are int64 everywhere (numpy, kerchunk, zarr): a data block must end before this.
MAX_OFFSET = 2**63 - 1
#: Trial divisors tested per numpy call in :func:`best_divisor` (bounds its memory, not its result).
_DIVISOR_BLOCK = 2**16


@dataclass(frozen=True)
class Layout:
    """How one NIfTI data block is cut into zarr chunks.

    ``file_shape`` and ``file_chunks`` are in NIfTI order (x, y, z, t, c), always of length 5;
    ``ndim`` is how many trailing zarr axes the array keeps (3: z,y,x; 4: t,z,y,x; 5: t,c,z,y,x).
    """

    file_shape: tuple[int, ...]
    file_chunks: tuple[int, ...]
    itemsize: int
    data_offset: int
    ndim: int

    @property
    def file_axes(self) -> tuple[int, ...]:
        """For each zarr axis, the file axis it is (``(2, 1, 0)`` for z, y, x)."""
        return ZARR_TO_FILE[self.ndim]

    @property
    def axes(self) -> tuple[str, ...]:
        """Zarr axis names, e.g. ``("t", "z", "y", "x")``."""
        return tuple(FILE_AXES[a] for a in self.file_axes)

    @property
    def shape(self) -> tuple[int, ...]:
        """Zarr array shape (C order)."""
        return tuple(self.file_shape[a] for a in self.file_axes)

    @property
    def chunks(self) -> tuple[int, ...]:
        """Zarr chunk shape (C order)."""
        return tuple(self.file_chunks[a] for a in self.file_axes)

    @property
    def chunk_nbytes(self) -> int:
        """Bytes in one chunk (every chunk is full: chunk sizes divide the shape)."""
        return math.prod(self.file_chunks) * self.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes in the whole data block."""
        return math.prod(self.file_shape) * self.itemsize

    def chunk_grid(self) -> tuple[int, ...]:
        """Number of chunks along each zarr axis."""
        return tuple(s // c for s, c in zip(self.shape, self.chunks))

    def chunk_table(self) -> tuple[np.ndarray, np.ndarray]:
        """All chunks as ``(indices, offsets)``.

        ``indices`` is an ``(n, ndim)`` int array of zarr chunk coordinates in C order (row-major over the
        grid: increasing file offset, except in a 5-D image with several times and channels, where the file
        orders t inside c), ``offsets`` the byte offset of each chunk in the data file.  Every chunk has
        length :attr:`chunk_nbytes`.
        """
        indices, relative = _chunk_table(self.file_shape, self.file_chunks, self.itemsize, self.ndim)
        return indices, self.data_offset + relative


@functools.lru_cache(maxsize=256)
def _chunk_table(file_shape: tuple[int, ...], file_chunks: tuple[int, ...], itemsize: int,
                 ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk indices and offsets relative to the data start; cached (and read-only) per shape and chunking."""
    layout = Layout(file_shape, file_chunks, itemsize, 0, ndim)
    grid = layout.chunk_grid()
    indices = np.indices(grid, dtype=np.int64).reshape(len(grid), -1).T
    # byte stride of one chunk step along each zarr axis = chunk extent * element stride of that axis
    file_strides = np.cumprod((itemsize,) + file_shape[:-1], dtype=np.int64)
    chunk_strides = (file_strides * np.array(file_chunks, dtype=np.int64))[list(layout.file_axes)]
    offsets = indices @ chunk_strides
    indices.flags.writeable = offsets.flags.writeable = False
    return indices, offsets


def zarr_ndim(nifti_shape: tuple[int, ...]) -> int:
    """Zarr rank for a NIfTI shape: 3 for up to 3-D, 4 with time, 5 with time and channels (dim[5])."""
    return min(max(len(nifti_shape), 3), 5)


def best_divisor(n: int, unit_bytes: int, target: int, limit: int) -> int:
    """Divisor ``k`` of ``n`` whose slab ``k * unit_bytes`` is closest to ``target`` (log scale), within ``limit``.

    Divisors only, because uncompressed chunks must be full-sized: a partial edge chunk would reference bytes
    beyond the data block.  Falls back to 1 when even one unit exceeds ``limit``.  Only divisors up to ``limit //
    unit_bytes`` can fit, so at most that many (and at most √n) are tried, a numpy block at a time: bounded time and
    memory whatever a header claims (a NIfTI-2 dim of 2**62 meant 2**31 trial divisions in a Python loop).
    """
    most = limit // unit_bytes
    if most < 2 or n == 1:
        return 1
    top = min(math.isqrt(n), most)
    small: list[int] = []
    for start in range(1, top + 1, _DIVISOR_BLOCK):
        trial = np.arange(start, min(start + _DIVISOR_BLOCK, top + 1), dtype=np.int64)
        small.extend(trial[np.int64(n) % trial == 0].tolist())
    fitting = sorted({k for d in small for k in (d, n // d) if k <= most})
    return min(fitting, key=lambda k: abs(math.log2(k * unit_bytes / target)))


def plan(nifti_shape: tuple[int, ...], itemsize: int, data_offset: int,
         target: int = TARGET_CHUNK_BYTES, limit: int = MAX_CHUNK_BYTES, *, source: str = "<NIfTI data>") -> Layout:
    """Layout of a NIfTI data block at ``data_offset``: see :func:`_chunking` for how chunks are chosen.

    Raises :class:`~virtnii.errors.UnsupportedNifti` naming ``source`` when the block cannot be addressed with
    int64 offsets or would need more than :data:`MAX_CHUNKS` chunks, before any chunk table is built.
    """
    file_shape = tuple(int(n) for n in nifti_shape[:5]) + (1,) * (5 - min(len(nifti_shape), 5))
    end = int(data_offset) + math.prod(file_shape) * itemsize
    if end > MAX_OFFSET:
        raise UnsupportedNifti(source, f"{math.prod(file_shape) * itemsize} bytes of voxels at offset {data_offset} "
                                       "cannot be addressed (byte offsets are 64-bit)")
    layout = Layout(file_shape, _chunking(file_shape, itemsize, target, limit), itemsize, int(data_offset),
                    zarr_ndim(nifti_shape))
    count = math.prod(layout.chunk_grid())
    if count > MAX_CHUNKS:
        raise UnsupportedNifti(source, f"dims {list(nifti_shape)} would need {count} chunks of {layout.chunk_nbytes} "
                                       f"bytes (no dim has a divisor giving chunks near {target} bytes); virtnii "
                                       f"indexes at most {MAX_CHUNKS} chunks per image")
    return layout


@functools.lru_cache(maxsize=1024)
def _chunking(file_shape: tuple[int, ...], itemsize: int, target: int, limit: int) -> tuple[int, ...]:
    """Choose contiguous chunks of about ``target`` bytes for a NIfTI of ``nifti_shape`` (x, y, z[, t[, c]]).

    Rows are always whole; then, from the fastest axis up, each axis takes the divisor that brings the slab
    closest to ``target``; once an axis is split, slower axes get chunk 1 so the chunk stays contiguous.  A
    chunk never spans several channels of a multi-volume series (file and zarr order t, c differently).
    Typical results: whole z-slabs for 3-D volumes, several whole volumes per chunk for small fMRI frames,
    bands of rows for single slices larger than ``limit``.  Cached: archives repeat a few shapes many times.
    """
    chunks = [file_shape[0]]
    unit = itemsize * file_shape[0]
    for axis in range(1, 5):
        n = file_shape[axis]
        spans_t_and_c = axis == 4 and file_shape[3] > 1
        k = 1 if spans_t_and_c else best_divisor(n, unit, target, limit)
        chunks.append(k)
        unit *= k
        if k < n:
            chunks.extend([1] * (4 - axis))
            break
    return tuple(chunks)
