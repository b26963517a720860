"""What a sagittal view of level 0 costs through the exact store's in-place chunks and through the viewer view.

In-place level-0 chunks are runs of whole z-slices (the only contiguous shape of a NIfTI file), so a viewer
showing the central sagittal slice (x = X/2) must fetch every chunk — the whole volume — and, for a ``.nii.gz``,
the server must inflate all of it.  The viewer view (``virtnii.server.view``) serves level 0 in isotropic
128³ chunks assembled on the server: the same slice needs only the chunks of one x-column.  For a zoomed view
(a 128 x 128 region of that slice around the centre) the difference is larger still.

For each source (``.nii``, ``.nii.gz``) and each view (whole slice, zoomed region) the script reports

- **transferred**: bytes a viewer receives — whole uncompressed in-place chunks from ``/zarr/`` (counted from the
  chunk grid: zarr fetches whole chunks), against the compressed view chunks ``ImageView.get`` returns;
- **read/decoded on the server**: ``.nii`` bytes read from the source (``ImageView.source_bytes``), ``.nii.gz``
  bytes inflated (``ImageView.decoded_bytes``, a fresh 1 GiB slab cache per view) — against the in-place
  chunks' bytes, each read or inflated once;
- the time each took (one pass, this process, warm page cache, metadata read before timing: a design figure
  only on a loaded machine).

Inputs are the MRI-like int16 volumes of ``bench_pyramid.py`` (same generator and cache folder,
``scripts/_data/pyramid/``): 800x700x640 (717 MB of voxels) by default, ``--quick`` 400x350x320.

Run: ``python scripts/bench_view.py [--quick] [--concurrency 8] [--merge-gap 65536]``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import virtnii
from bench_pyramid import DEFAULT_DIR, SHAPES, generate
from benchkit import Row, print_table
from virtnii.server.view import DEFAULT_CHUNK, MERGE_GAP, ImageView, SlabCache

RUN = Path(__file__).parent / "_data" / "view"
ZOOM = 128  # voxels: the zoomed region's edge


def region(shape_zyx: tuple[int, int, int], zoomed: bool) -> tuple[slice, slice, int]:
    """``(z range, y range, x)`` of the central sagittal slice, whole or its central ZOOM x ZOOM region."""
    nz, ny, nx = shape_zyx
    if not zoomed:
        return slice(0, nz), slice(0, ny), nx // 2
    return (slice(nz // 2 - ZOOM // 2, nz // 2 + ZOOM // 2), slice(ny // 2 - ZOOM // 2, ny // 2 + ZOOM // 2),
            nx // 2)


def touched(zs: slice, ys: slice, x: int, chunks: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Chunk coordinates (z, y, x) a box of one x-plane overlaps, for a chunk shape."""
    cz, cy, cx = chunks
    return list(itertools.product(range(zs.start // cz, (zs.stop - 1) // cz + 1),
                                  range(ys.start // cy, (ys.stop - 1) // cy + 1), [x // cx]))


def in_place(group, zs: slice, ys: slice, x: int) -> tuple[int, float]:
    """Bytes of the in-place chunks the region touches, and the time zarr takes to read the region."""
    level0 = group["0"]
    chunk_bytes = math.prod(level0.chunks) * level0.dtype.itemsize
    count = len(touched(zs, ys, x, level0.chunks))
    start = time.perf_counter()
    level0[zs, ys, x]
    return count * chunk_bytes, time.perf_counter() - start


def isotropic(group, zs: slice, ys: slice, x: int, concurrency: int, merge_gap: int) -> tuple[int, int, float, int]:
    """Compressed bytes of the view chunks the region needs, bytes read/inflated on the server, seconds, and
    how many chunks."""
    view = ImageView(group, cache=SlabCache(), merge_gap=merge_gap)
    keys = ["0/c/" + "/".join(map(str, q))
            for q in touched(zs, ys, x, (DEFAULT_CHUNK,) * 3)]

    async def fetch() -> tuple[list[bytes | None], float]:
        gate = asyncio.Semaphore(concurrency)  # a browser keeps a few requests in flight, not hundreds

        async def one(key: str) -> bytes | None:
            async with gate:
                return await view.get(key)
        await view.get("zarr.json")  # metadata first, as a viewer reads it; not timed
        start = time.perf_counter()
        return await asyncio.gather(*map(one, keys)), time.perf_counter() - start
    chunks, seconds = asyncio.run(fetch())
    assert all(chunk is not None for chunk in chunks)
    return sum(map(len, chunks)), view.source_bytes + view.decoded_bytes, seconds, len(keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"a {'x'.join(map(str, SHAPES['small']))} volume")
    parser.add_argument("--concurrency", type=int, default=8, help="view chunk requests in flight (default 8)")
    parser.add_argument("--merge-gap", type=int, default=MERGE_GAP,
                        help=f"gap (bytes) up to which .nii row reads are merged (default {MERGE_GAP}; 0: each "
                             "row's columns alone)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DIR, help="where the inputs are cached")
    args = parser.parse_args(argv)
    shape = SHAPES["small" if args.quick else "default"]
    gz, nii = generate(args.data, shape, plain=True)
    manifest = RUN / "manifest"
    shutil.rmtree(RUN, ignore_errors=True)
    result = virtnii.scan([str(nii), str(gz)], str(manifest))
    if result.failures:
        print(*result.failures, sep="\n", file=sys.stderr)
        return 1
    opened = virtnii.open(str(manifest))
    nbytes = int(np.prod(shape)) * 2
    print(f"volume {'x'.join(map(str, shape))} int16 ({nbytes / 1e6:.0f} MB of voxels); view chunks "
          f"{DEFAULT_CHUNK}^3 blosc-lz4, {args.concurrency} requests in flight, .nii rows merged across gaps "
          f"<= {args.merge_gap} bytes\n")
    print(f"{'source':<8} {'view':<8} {'chunks':>13} {'transferred MB':>22} {'read/inflated MB':>22} "
          f"{'seconds':>13}")
    print(f"{'':<8} {'':<8} {'z-slab':>6} {'iso':>6} {'z-slab':>10} {'iso':>11} {'z-slab':>10} {'iso':>11} "
          f"{'z-slab':>6} {'iso':>6}")
    rows = []
    for entry in result.images:
        group = opened[entry.name]
        kind = ".nii.gz" if entry.gzip_index else ".nii"
        for zoomed in (False, True):
            zs, ys, x = region(tuple(group["0"].shape), zoomed)
            slab_bytes, slab_seconds = in_place(group, zs, ys, x)
            slab_chunks = len(touched(zs, ys, x, group["0"].chunks))
            sent, work, seconds, count = isotropic(group, zs, ys, x, args.concurrency, args.merge_gap)
            label = "zoomed" if zoomed else "sagittal"
            print(f"{kind:<8} {label:<8} {slab_chunks:>6} {count:>6} {slab_bytes / 1e6:>10.1f} {sent / 1e6:>11.1f} "
                  f"{slab_bytes / 1e6:>10.1f} {work / 1e6:>11.1f} {slab_seconds:>6.2f} {seconds:>6.2f}")
            rows.append(Row(f"{kind} {label}: transferred, z-slab / isotropic", slab_bytes / sent))
            rows.append(Row(f"{kind} {label}: read or inflated, z-slab / isotropic", slab_bytes / work))
    print_table(rows, "ratio")
    shutil.rmtree(RUN, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
