"""Benchmark of virtnii's gzip random access against gzip and nibabel (see docs/gzip.md for the design).

Generates MRI-like ``.nii.gz`` files (smooth head-shaped signal plus noise, gzip level 6 like nibabel writes),
reused when present, then measures and prints ratios against the project's targets:

- index build time vs ``gzip -dc FILE > /dev/null`` (target <= 0.8);
- one z-slice read cold through ``gzidx://`` (one seek point per ~4 MiB z-slab) vs nibabel's full load
  (>= 100x faster) and vs nibabel's cold ``dataobj[..., k]`` (>= 5x faster);
- the whole volume through ``gzidx://`` (every chunk, inflated in parallel, each span once) vs nibabel's
  full load (<= 0.6);
- the ``.gzidx.gz`` sidecar size vs the compressed file (<= 2 %).

All files are read warm (page cache), the fastest of ``--repeat`` runs is kept, and results are checked against
nibabel's.  Run: ``python scripts/bench_gzip.py`` (1 GiB volumes, ~4 GB of disk) or ``--small``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import nibabel as nib
import numpy as np
import zarr

from benchkit import best_of, mri_slab
from virtnii import gzindex, gzipfs


DEFAULT_DIR = Path(__file__).parent / "_data"


@dataclass(frozen=True)
class Volume:
    """One synthetic image: a name, its shape (x, y, z) and voxel dtype."""

    name: str
    shape: tuple[int, int, int]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


FULL = [Volume("mri_int16", (1024, 1024, 512), "<i2"), Volume("mri_float32", (1024, 1024, 256), "<f4")]
SMALL = [Volume("mri_int16_small", (256, 256, 128), "<i2"), Volume("mri_float32_small", (256, 256, 64), "<f4")]


def generate(volume: Volume, folder: Path) -> Path:
    """Write ``<folder>/<name>.nii.gz`` slab by slab (never the whole volume in memory); reuse it if present."""
    path = folder / f"{volume.name}.nii.gz"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    header = nib.Nifti1Header()
    header.set_data_shape(volume.shape)
    header.set_data_dtype(np.dtype(volume.dtype))
    header.set_zooms((0.2, 0.2, 0.2))
    header.set_xyzt_units("mm")
    header.set_data_offset(352)
    rng = np.random.default_rng(0)
    partial = path.with_suffix(".partial")
    with gzip.open(partial, "wb", compresslevel=6) as out:
        out.write(header.binaryblock + b"\0" * 4)  # 348-byte header + empty extension flag
        for z0 in range(0, volume.shape[2], 16):
            slab = mri_slab(volume.shape, volume.dtype, z0, min(z0 + 16, volume.shape[2]), rng)
            out.write(slab.tobytes())
    os.replace(partial, path)
    return path


# ------------------------------------------------------------------------------------------------ measuring


@dataclass
class Result:
    label: str
    value: float
    target: str
    ok: bool


def bench_volume(volume: Volume, path: Path, repeat: int) -> list[Result]:
    """Measure one file: index build, sidecar size, slice and whole-volume reads, against gzip and nibabel."""
    nx, ny, nz = volume.shape
    itemsize = np.dtype(volume.dtype).itemsize
    slice_bytes = nx * ny * itemsize
    slab = max(1, (4 << 20) // slice_bytes)  # z-slices per ~4 MiB chunk, one seek point each
    vox_offset = int(nib.load(path).dataobj.offset)
    offsets = [vox_offset + z * slice_bytes for z in range(0, nz, slab)]
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache for all

    gunzip, _ = best_of(lambda: subprocess.run(f"gzip -dc '{path}' > /dev/null", shell=True, check=True), repeat)
    build, index = best_of(lambda: gzindex.build_index(str(path), offsets), repeat)

    manifest = path.parent / f"{volume.name}.manifest"
    local = fsspec.filesystem("file")
    descriptor = gzindex.write_sidecar(index, local, str(manifest / "gzindex"), volume.name)
    sidecar = (manifest / "gzindex" / f"{volume.name}{gzindex.INDEX_SUFFIX}").stat().st_size
    url = f"gzidx://gzindex/{descriptor}"

    k = nz // 2
    start = vox_offset + k * slice_bytes

    def fs_slice() -> np.ndarray:
        gzipfs.clear_caches()
        fs = gzipfs.GzipIndexFileSystem(root=str(manifest), skip_instance_cache=True)
        return np.frombuffer(fs.cat_file(url, start, start + slice_bytes), volume.dtype).reshape(ny, nx).T

    ours_slice, got = best_of(fs_slice, repeat)
    nib_slice, expected = best_of(lambda: np.asanyarray(nib.load(path).dataobj[..., k]), repeat)
    if not np.array_equal(got, expected):
        raise AssertionError(f"{path}: slice {k} read through gzidx:// differs from nibabel's")

    def fs_chunks() -> list[bytes]:
        """Every chunk's bytes through one cat_ranges call (the fs's work; no assembly into an array)."""
        gzipfs.clear_caches()
        fs = gzipfs.GzipIndexFileSystem(root=str(manifest), skip_instance_cache=True)
        chunks = fs.cat_ranges([url] * len(offsets), offsets, [*offsets[1:], vox_offset + volume.nbytes])
        for chunk in chunks:
            if isinstance(chunk, Exception):
                raise chunk
        return chunks

    def zarr_volume() -> np.ndarray:
        gzipfs.clear_caches()
        refs = _refs(url, volume, offsets, slab)
        group = zarr.open_group("reference://", mode="r",
                                storage_options={"fo": refs, "fs": {"gzidx": {"root": str(manifest)}}})
        return group["0"][:].T

    nib_full, expected = best_of(lambda: np.asanyarray(nib.load(path).dataobj), repeat)
    ours_zarr, got = best_of(zarr_volume, repeat)
    if not np.array_equal(got, expected):
        raise AssertionError(f"{path}: the volume read through zarr and gzidx:// differs from nibabel's")
    del got
    ours_chunks, chunks = best_of(fs_chunks, repeat)
    if not np.array_equal(np.frombuffer(b"".join(chunks), volume.dtype).reshape(nz, ny, nx).T, expected):
        raise AssertionError(f"{path}: the chunks read through gzidx:// differ from nibabel's volume")
    del chunks, expected

    compressed = path.stat().st_size
    print(f"\n{path.name}: {volume.shape} {volume.dtype}, {volume.nbytes / 2**30:.2f} GiB uncompressed, "
          f"{compressed / 1e6:.0f} MB gz, {len(offsets)} chunks of {slab} slice(s), {len(index.points)} points")
    for label, seconds in [("gzip -dc > /dev/null", gunzip), ("build_index", build),
                           (f"gzidx:// slice z={k} (cold: index load + stale check + read)", ours_slice),
                           (f"nibabel cold slice dataobj[..., {k}]", nib_slice),
                           ("nibabel full load", nib_full),
                           ("gzidx:// whole volume as an array (zarr reference://)", ours_zarr),
                           ("gzidx:// every chunk as bytes (cat_ranges)", ours_chunks)]:
        print(f"  {label:<58} {seconds:8.3f} s")
    print(f"  {'index sidecar (.gzidx.gz)':<58} {sidecar / 1e6:8.2f} MB")
    return [
        Result("build / gzip -dc", build / gunzip, "<= 0.8", build / gunzip <= 0.8),
        Result("nibabel full load / gzidx slice", nib_full / ours_slice, ">= 100", nib_full / ours_slice >= 100),
        Result("nibabel cold slice / gzidx slice", nib_slice / ours_slice, ">= 5", nib_slice / ours_slice >= 5),
        Result("gzidx whole volume (zarr) / nibabel full", ours_zarr / nib_full, "<= 0.6",
               ours_zarr / nib_full <= 0.6),
        Result("gzidx all chunks (cat_ranges) / nibabel full", ours_chunks / nib_full, "<= 0.6",
               ours_chunks / nib_full <= 0.6),
        Result("index sidecar / compressed size", sidecar / compressed, "<= 0.02", sidecar / compressed <= 0.02),
    ]


def _refs(url: str, volume: Volume, offsets: list[int], slab: int) -> dict[str, Any]:
    """Kerchunk refs of the volume as one zarr v2 array (z, y, x) whose chunks are gzidx:// ranges."""
    nx, ny, nz = volume.shape
    zarray = {"zarr_format": 2, "shape": [nz, ny, nx], "chunks": [slab, ny, nx], "dtype": volume.dtype,
              "compressor": None, "filters": None, "fill_value": 0, "order": "C"}
    chunk_bytes = slab * ny * nx * np.dtype(volume.dtype).itemsize
    refs: dict[str, Any] = {".zgroup": json.dumps({"zarr_format": 2}), "0/.zarray": json.dumps(zarray)}
    for k, offset in enumerate(offsets):
        refs[f"0/{k}.0.0"] = [url, offset, chunk_bytes]
    return {"version": 1, "refs": refs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where test files are generated and kept")
    parser.add_argument("--small", action="store_true", help="16 MiB volumes instead of 1 GiB: a quick check that everything runs (the slice-vs-full-load target "
                        "only makes sense for big volumes)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement; the fastest is kept")
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} cores; build inflater: {gzindex._zlib().name}; load average "
          f"{os.getloadavg()[0]:.2f} (other work on the machine inflates every timing)")
    results = []
    for volume in SMALL if args.small else FULL:
        path = generate(volume, args.dir)
        results += [(volume.name, r) for r in bench_volume(volume, path, args.repeat)]
    print(f"\n{'file':<18} {'ratio':<48} {'value':>9}  target   ok")
    for name, r in results:
        print(f"{name:<18} {r.label:<48} {r.value:9.3f}  {r.target:<8} {'yes' if r.ok else 'NO'}")
    return 0 if all(r.ok for _, r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
