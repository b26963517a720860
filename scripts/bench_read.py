"""Benchmark of reading voxels through a virtnii manifest against nibabel, on a >= 1 GiB uncompressed MRI.

Two questions: (1) is a whole-volume read through zarr + references about as fast as nibabel reading the file
(target >= 0.8x)?  (2) does reading one z-slice fetch little more than the slice — locally and over S3, where
bytes are what cost time and money?  Bytes are counted by the local S3 server's middleware (``tests/conftest.py``,
run in a separate process), for virtnii and for what a user writes today (nibabel over an s3fs file object).

All local timings are warm: the file was just written or read, so the page cache holds it, and dropping the cache
needs root.  Each local measurement is the best of ``--repeat`` runs.

Run: ``python scripts/bench_read.py [--shape 1024 1024 512] [--latency-ms 30]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

import virtnii
from benchkit import best_of, mri_slab

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import LocalS3, clear_fsspec_caches, running_s3  # noqa: E402  (the tests' S3 server)

DEFAULT_DIR = Path(__file__).parent / "_data" / "read"
TARGET_WHOLE = 0.8
SLAB = 16  # z-slices generated at a time: a 1 GiB volume never sits in memory twice


def generate(folder: Path, shape: tuple[int, int, int]) -> Path:
    """Write ``mri_<x>x<y>x<z>.nii`` (int16, 0.2 mm, oblique-free) slab by slab; reuse it when complete."""
    path = folder / f"mri_{'x'.join(map(str, shape))}.nii"
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_zooms((0.2, 0.2, 0.2))
    header.set_xyzt_units("mm")
    affine = np.diag([0.2, 0.2, 0.2, 1.0])
    affine[:3, 3] = [-0.1 * n for n in shape]
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=2)
    header["vox_offset"] = 352
    size = 352 + int(np.prod(shape)) * 2
    if path.exists() and path.stat().st_size == size:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    rng = np.random.default_rng(0)
    with open(partial, "wb") as out:
        out.write(header.binaryblock + b"\0" * 4)  # 348-byte header + "no extensions" flag
        for z0 in range(0, shape[2], SLAB):
            out.write(mri_slab(shape, "<i2", z0, min(z0 + SLAB, shape[2]), rng).tobytes())
    os.replace(partial, path)
    return path


def whole_volume(path: Path, manifest: str, name: str, repeat: int) -> bool:
    """Whole-volume read: virtnii through zarr vs nibabel into memory; checks both give the same voxels."""
    size = path.stat().st_size
    # mmap=False: with nibabel's default memory map np.asanyarray returns without reading anything
    t_nib, expected = best_of(lambda: np.asanyarray(nib.load(path, mmap=False).dataobj), repeat)
    del expected
    t_ours, ours = best_of(lambda: virtnii.open(manifest)[name]["0"][:], repeat)
    reference = np.asanyarray(nib.load(path).dataobj)  # memory-mapped: compared without a second copy in memory
    if not np.array_equal(ours, reference.T):
        raise SystemExit("virtnii returned other voxels than nibabel")
    del ours, reference
    ratio = t_nib / t_ours
    print(f"\nwhole volume ({size / 2**30:.2f} GiB, warm page cache, best of {repeat})")
    print(f"  nibabel  np.asanyarray(nib.load(f, mmap=False).dataobj): {t_nib:6.2f} s  {size / t_nib / 2**20:7.0f} MiB/s")
    print(f"  virtnii  virtnii.open(m)[name]['0'][:] (open included):  {t_ours:6.2f} s  {size / t_ours / 2**20:7.0f} MiB/s")
    verdict = "meets" if ratio >= TARGET_WHOLE else "MISSES"
    print(f"  throughput ratio virtnii/nibabel: {ratio:.2f}x  ({verdict} the {TARGET_WHOLE}x target)")
    return ratio >= TARGET_WHOLE


def local_slice(path: Path, manifest: str, name: str, z: int, repeat: int) -> None:
    """One z-slice from the local file: time only (bytes are counted over S3 below)."""
    t_nib, expected = best_of(lambda: np.asanyarray(nib.load(path).dataobj[:, :, z]), repeat)
    t_ours, ours = best_of(lambda: virtnii.open(manifest)[name]["0"][z], repeat)
    array = virtnii.open(manifest)[name]["0"]
    t_open, _ = best_of(lambda: array[z], repeat)
    if not np.array_equal(ours, expected.T):
        raise SystemExit("virtnii returned another slice than nibabel")
    print(f"\none z-slice (z={z}, {expected.nbytes / 2**20:.1f} MiB), local, warm, best of {repeat}")
    print(f"  nibabel  nib.load(f).dataobj[:, :, z]:          {t_nib * 1000:7.1f} ms")
    print(f"  virtnii  virtnii.open(m)[name]['0'][z] (+open): {t_ours * 1000:7.1f} ms")
    print(f"  virtnii  array[z] (manifest already open):      {t_open * 1000:7.1f} ms")


def s3_slice(s3: LocalS3, path: Path, z: int, latency: float, work: Path) -> None:
    """One z-slice over S3: time, requests and bytes for virtnii and for nibabel over an s3fs file object."""
    bucket = s3.create_bucket("bench-read")
    url = f"s3://{bucket}/ds/sub-01/anat/sub-01_T1w.nii"
    start = time.perf_counter()
    s3.filesystem().put_file(str(path), url)
    print(f"\nuploaded to the local S3 server in {time.perf_counter() - start:.1f} s")
    manifest = str(work / "s3-manifest")
    if virtnii.scan(url, manifest, storage_options=s3.storage_options).failures:
        raise SystemExit("scan over S3 failed")
    slice_bytes = int(np.prod(nib.load(path).shape[:2])) * 2

    def nibabel_over_s3fs() -> np.ndarray:
        """What a user writes today for one slice of a remote file: nibabel on an s3fs file object."""
        with s3.filesystem().open(url) as f:
            return np.asanyarray(nib.Nifti1Image.from_stream(f).dataobj[:, :, z])

    def virtnii_over_s3() -> np.ndarray:
        return virtnii.open(manifest, **s3.storage_options)["sub-01_T1w"]["0"][z]

    print(f"one z-slice over S3 (local moto server in another process, {latency * 1000:g} ms per request), "
          f"slice = {slice_bytes / 2**20:.1f} MiB")
    results = {}
    with s3.latency(latency):
        for label, run in (("nibabel over s3fs.open(url)  ", nibabel_over_s3fs),
                           ("virtnii.open(m, **s3)[..][z] ", virtnii_over_s3)):
            clear_fsspec_caches()
            s3.reset_counters()
            start = time.perf_counter()
            results[label] = run()
            elapsed = time.perf_counter() - start
            meter = s3.meter()
            print(f"  {label}: {elapsed * 1000:7.0f} ms, {meter.total_requests:3d} requests "
                  f"({', '.join(f'{k} {v}' for k, v in sorted(meter.requests.items()))}), "
                  f"{meter.bytes_out / 2**20:7.1f} MiB fetched = {meter.bytes_out / slice_bytes:5.1f}x the slice")
    print("  (moto reads the whole object on every ranged GET, so over S3 compare requests and bytes, not ms)")
    first, second = results.values()
    if not np.array_equal(first, second.T):
        raise SystemExit("virtnii over S3 returned another slice than nibabel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the volume goes (reused)")
    parser.add_argument("--shape", type=int, nargs=3, default=[1024, 1024, 512], metavar=("X", "Y", "Z"),
                        help="volume shape (default 1024 1024 512: 1 GiB of int16)")
    parser.add_argument("--repeat", type=int, default=3, help="local runs per measurement, best kept (default 3)")
    parser.add_argument("--latency-ms", type=float, default=30.0, help="simulated S3 round trip (default 30)")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 slice measurement")
    args = parser.parse_args()

    start = time.perf_counter()
    path = generate(args.dir, tuple(args.shape))
    print(f"{path} ({path.stat().st_size / 2**30:.2f} GiB) ready in {time.perf_counter() - start:.1f} s")
    work = Path(tempfile.mkdtemp(prefix="virtnii-bench-read-"))
    try:
        manifest = str(work / "manifest")
        start = time.perf_counter()
        result = virtnii.scan(str(path), manifest)
        print(f"scanned in {time.perf_counter() - start:.2f} s: chunks {result.images[0]['chunks']} "
              f"of {result.images[0]['shape']}")
        name = result.images[0]["name"]
        ok = whole_volume(path, manifest, name, args.repeat)
        z = args.shape[2] // 2
        local_slice(path, manifest, name, z, args.repeat)
        if not args.no_s3:
            with running_s3(separate_process=True) as s3:
                s3_slice(s3, path, z, args.latency_ms / 1000, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\nall targets met" if ok else "\nsome targets missed")


if __name__ == "__main__":
    main()
