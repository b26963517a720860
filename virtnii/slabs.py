"""Reading a NIfTI-Zarr array ``[t, [c,]] z, y, x`` as runs of whole z-planes, one volume at a time, in file order.

The pyramid builder and the exporter both stream an image this way: reads are whole chunks (a chunk is read
once), about :data:`SLAB_BYTES` each, and the next read runs while the caller works on this one.  Volumes come
in NIfTI file order (c outer, then t), which is what an exported file needs and costs the builder nothing.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

#: Bytes read at once (rounded to whole chunks).
SLAB_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Piece:
    """Planes ``z0 …`` of one volume (``volume`` indexes the leading t/c axes) inside one read."""

    volume: tuple[int, ...]
    z0: int
    within: tuple[Any, ...]  # index of these planes inside the read block


@dataclass(frozen=True)
class Read:
    """One read of the array (``index``) and the pieces of volumes it holds, in file order."""

    index: tuple[Any, ...]
    pieces: tuple[Piece, ...]


def file_order(lead: Sequence[int]) -> list[tuple[int, ...]]:
    """Every (t[, c]) volume index in NIfTI file order: the last zarr axis before z (c) varies slowest."""
    return [tuple(reversed(index)) for index in np.ndindex(*reversed(tuple(lead)))] if lead else [()]


def plan(shape: Sequence[int], chunks: Sequence[int], itemsize: int, target: int | None = None) -> list[Read]:
    """The reads covering an array of ``shape`` chunked by ``chunks``.

    Where chunks hold whole volumes and more than one (small 4-D frames), a read is one chunk of volumes;
    otherwise a read is a run of whole chunks along z of one volume, about ``target`` bytes (default
    :data:`SLAB_BYTES`).
    """
    target = SLAB_BYTES if target is None else target
    lead, lead_chunks = tuple(shape[:-3]), tuple(chunks[:-3])
    nz, ny, nx = shape[-3:]
    kz = chunks[-3]
    reads = []
    if kz >= nz and any(c > 1 for c in lead_chunks):
        grid = [-(-n // c) for n, c in zip(lead, lead_chunks)]
        for block in file_order(grid):
            starts = [b * c for b, c in zip(block, lead_chunks)]
            ends = [min(s + c, n) for s, c, n in zip(starts, lead_chunks, lead)]
            inside = file_order([e - s for s, e in zip(starts, ends)])
            pieces = tuple(Piece(tuple(s + i for s, i in zip(starts, offset)), 0, offset) for offset in inside)
            reads.append(Read(tuple(slice(s, e) for s, e in zip(starts, ends)), pieces))
        return reads
    step = max(kz, target // max(ny * nx * itemsize * kz, 1) * kz)
    for volume in file_order(lead):
        for z0 in range(0, nz, step):
            reads.append(Read(volume + (slice(z0, min(z0 + step, nz)),), (Piece(volume, z0, ()),)))
    return reads


def stream(array: Any, reads: Sequence[Read], dtype: np.dtype | None = None) -> Iterator[tuple[Piece, np.ndarray]]:
    """``(piece, planes)`` for every piece of ``reads``, planes shaped ``(k, ny, nx)`` (``dtype`` if given), with
    the next read running in a worker while the caller handles this one."""
    if not reads:
        return
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="virtnii-read") as reader:
        def load(read: Read) -> np.ndarray:
            block = np.asarray(array[read.index])
            return block if dtype is None or block.dtype == dtype else block.astype(dtype)

        ahead = reader.submit(load, reads[0])
        for n, read in enumerate(reads):
            block = ahead.result()
            if n + 1 < len(reads):
                ahead = reader.submit(load, reads[n + 1])
            for piece in read.pieces:
                yield piece, block[piece.within]
