"""Benchmark of ``virtnii.scan`` on thousands of small NIfTI files, locally and over S3 with simulated latency.

The baseline is what a user writes today to read the headers of a dataset: list it, then for each file
``with fs.open(path) as f: nib.Nifti1Header.from_fileobj(f)`` through fsspec — serial, one or more round trips
per file.  virtnii reads every header with one concurrent ranged GET per file and also builds and writes a
manifest, so it does strictly more work per file; what it saves is waiting.  Locally there is no waiting to
save, so the local comparison also prints a floor: what listing and reading the headers, and JSON-encoding the
metadata the manifest must hold, cost on their own.  ``--gzip`` runs the same comparison on ``.nii.gz`` copies
(OpenNeuro's usual form), where virtnii also inflates every byte to build its seek points while the baseline
inflates only the header.

S3 is the local moto server of ``tests/conftest.py`` on loopback, with a sleep per request in the WSGI
middleware to stand in for the round trip to a region (default 30 ms, like a laptop to us-east-1), and the same
middleware counts requests and response bytes.  Both sides run warm (the files were just written, so the page
cache holds them; there is no portable way to drop it without root).

Run: ``python scripts/bench_scan.py [--count 2000] [--latency-ms 20 30 50] [--gzip] [--no-s3] [--profile]``.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import json
import pstats
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import fsspec
import nibabel as nib
import numpy as np

import virtnii
from benchkit import phantom, scanner_image, serial_headers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import LocalS3, clear_fsspec_caches, running_s3  # noqa: E402  (the tests' S3 server)

DEFAULT_DIR = Path(__file__).parent / "_data" / "scan"
TARGET_S3 = 10.0
TARGET_LOCAL = 2.0


# ------------------------------------------------------------------------------------------------- the data

@dataclass(frozen=True)
class Kind:
    """One kind of file in the synthetic BIDS dataset: where it goes, its shape, dtype and voxel size."""

    suffix: str
    shape: tuple[int, ...]
    dtype: str
    zooms: tuple[float, ...]


#: Low-resolution files of the sizes that fill real datasets (single EPI volumes, masks, stat maps, short 4D
#: runs), 50–400 KB each: small enough that per-file latency, not bandwidth, decides the scan time.
KINDS = [
    Kind("anat/{sub}_acq-lowres_run-{run}_T1w", (64, 64, 48), "<i2", (4.0, 4.0, 4.0)),
    Kind("func/{sub}_task-rest_run-{run}_bold", (32, 32, 20, 8), "<i2", (6.0, 6.0, 6.0, 2.0)),
    Kind("fmap/{sub}_run-{run}_magnitude1", (48, 48, 24), "<i2", (5.0, 5.0, 5.0)),
    Kind("dwi/{sub}_run-{run}_desc-fa_dwimap", (48, 48, 24), "<f4", (5.0, 5.0, 5.0)),
    Kind("anat/{sub}_run-{run}_desc-brain_mask", (64, 64, 48), "|u1", (4.0, 4.0, 4.0)),
]
#: Every this-many files carry a 24 KiB header extension (AFNI/CIFTI-like XML), past the first 16 KiB read.
EXTENSION_EVERY = 25


def generate(folder: Path, count: int, suffix: str = ".nii") -> list[Path]:
    """Write ``count`` files as a BIDS-like tree under ``folder`` (reused when already there), as ``suffix``
    (``.nii`` or ``.nii.gz``)."""
    done = folder / ".complete"
    if done.exists() and int(done.read_text()) == count:
        return sorted(folder.rglob(f"*{suffix}"))
    shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(0)
    bases = {kind: phantom(kind.shape, kind.dtype, rng) for kind in KINDS}
    paths = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        sub = f"sub-{i // (len(KINDS) * 2) + 1:04d}"
        path = folder / sub / f"{kind.suffix.format(sub=sub, run=(i // len(KINDS)) % 2 + 1)}{suffix}"
        data = bases[kind].copy()
        data.flat[i % data.size] += 1  # files differ, so ETags differ as on a real bucket
        img = scanner_image(data, kind.zooms, b"virtnii bench_scan")
        if i % EXTENSION_EVERY == 0:
            xml = b"<AFNI_attributes>" + b"<x>" * (24 * 1024 // 3) + b"</AFNI_attributes>"
            img.header.extensions.append(nib.nifti1.Nifti1Extension(4, xml))
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, path)
        paths.append(path)
    done.write_text(str(count))
    return sorted(paths)


# ------------------------------------------------------------------------------------------ the two sides

def scan(source: str, out: str, storage_options: dict[str, Any] | None = None) -> int:
    result = virtnii.scan(source, out, storage_options=storage_options)
    if result.failures:
        raise SystemExit(f"virtnii.scan failed on {len(result.failures)} files, e.g. {result.failures[0]}")
    return len(result.images)


def floor_parts(root: str, manifest: Path, repeat: int) -> tuple[float, float]:
    """Two costs of a local scan that no implementation of this output avoids (best of ``repeat``).

    1. Listing the folder and reading every header, as virtnii does it (``os.scandir`` + ``os.pread``).
    2. JSON-encoding the metadata documents the manifest must hold (NIfTI-Zarr: OME group, arrays, JNIfTI), then
       the kerchunk mapping around them: ``json.dumps`` of what ``manifest`` holds, decoded first.
    """
    scanning = importlib.import_module("virtnii.scan")  # the module: ``virtnii.scan`` the attribute is the function
    sources = importlib.import_module("virtnii.sources")
    refs = json.loads((manifest / "refs.json").read_text())["refs"]
    documents = {key: json.loads(value) for key, value in refs.items() if key.endswith(METADATA_KEYS)}

    def list_and_read() -> int:
        found, _ = sources.expand([root], {})
        return len(scanning.read_plain_headers(found))

    def encode() -> int:
        json.dumps({key: json.dumps(doc) for key, doc in documents.items()}, separators=(",", ":"))
        return len(documents)

    return timed(list_and_read, repeat).seconds, timed(encode, repeat).seconds


METADATA_KEYS = ("zarr.json", ".zarray", ".zattrs", ".zgroup")


@dataclass
class Measure:
    """One side of a comparison: files handled, wall time, and (over S3) requests and response bytes."""

    files: int
    seconds: float
    requests: int = 0
    bytes_out: int = 0

    @property
    def rate(self) -> float:
        return self.files / self.seconds


def timed(run: Callable[[], int], repeat: int = 1, profile: cProfile.Profile | None = None) -> Measure:
    """Best of ``repeat`` runs (warm: the first run already benefits from the page cache)."""
    best = None
    for _ in range(repeat):
        start = time.perf_counter()
        if profile is not None:
            profile.enable()
        files = run()
        if profile is not None:
            profile.disable()
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    return Measure(files, best)


def metered(s3: LocalS3, run: Callable[[], int], profile: cProfile.Profile | None = None) -> Measure:
    """One run against the S3 server from cold fsspec caches, with the server's request and byte counts."""
    clear_fsspec_caches()
    s3.reset_counters()
    measure = timed(run, profile=profile)
    meter = s3.meter()
    measure.requests, measure.bytes_out = meter.total_requests, meter.bytes_out
    return measure


def report(where: str, ours: Measure, theirs: Measure, target: float | None) -> bool:
    """Print one comparison; whether it meets ``target`` (None: the issue sets none, print the ratio only)."""
    ratio = ours.rate / theirs.rate
    print(f"\n{where}: {ours.files} files")
    print(f"  baseline (serial fs.open + from_fileobj): {theirs.seconds:8.2f} s  {theirs.rate:9.1f} files/s")
    print(f"  virtnii.scan (headers + manifest)       : {ours.seconds:8.2f} s  {ours.rate:9.1f} files/s")
    if theirs.requests:
        for name, m in (("baseline", theirs), ("virtnii ", ours)):
            print(f"  {name}: {m.requests / m.files:6.2f} requests/file, {m.bytes_out / m.files / 1024:8.1f} KiB/file "
                  f"({m.requests} requests, {m.bytes_out / 2**20:.1f} MiB)")
    if target is None:
        print(f"  ratio virtnii/baseline: {ratio:.1f}x")
        return True
    verdict = "meets" if ratio >= target else "MISSES"
    print(f"  ratio virtnii/baseline: {ratio:.1f}x  ({verdict} the {target:.0f}x target)")
    return ratio >= target


def print_profile(profile: cProfile.Profile, title: str) -> None:
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(25)
    print(f"\n--- cProfile of virtnii.scan, {title} (cumulative) ---\n{out.getvalue()}")


def compare_s3(args: argparse.Namespace, work: Path) -> bool:
    """Upload the files to the local S3 server and compare both sides at each simulated latency."""
    ok = True
    with running_s3(separate_process=True) as s3:
        bucket = s3.create_bucket("bench")
        t0 = time.perf_counter()
        s3.filesystem().put(str(args.dir) + "/", f"{bucket}/ds/", recursive=True)
        print(f"\nuploaded to the local S3 server in {time.perf_counter() - t0:.1f} s")
        root = f"s3://{bucket}/ds"
        for latency in args.latency_ms:
            profile = cProfile.Profile() if args.profile else None
            with s3.latency(latency / 1000):
                theirs = metered(s3, lambda: serial_headers(s3.filesystem(), root))
                ours = metered(s3, lambda: scan(root, str(work / "s3"), s3.storage_options), profile)
            ok &= report(f"S3 (local moto server in another process, {latency:g} ms per request)", ours, theirs,
                         None if args.gzip else TARGET_S3)
            if profile is not None:
                print_profile(profile, f"S3 at {latency:g} ms")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help=f"where the synthetic files go (reused; default {DEFAULT_DIR}, "
                                                 "or scan-gz beside it with --gzip)")
    parser.add_argument("--count", type=int, default=2000, help="number of files (default 2000)")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[30.0],
                        help="simulated S3 round trip(s), one S3 comparison each (default 30)")
    parser.add_argument("--repeat", type=int, default=3, help="local runs per side, best kept (default 3)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of virtnii.scan on each side")
    parser.add_argument("--no-s3", action="store_true", help="local comparison only")
    parser.add_argument("--gzip", action="store_true",
                        help="the same files as .nii.gz (virtnii also indexes every byte of each; no targets set)")
    args = parser.parse_args()
    args.dir = args.dir or (DEFAULT_DIR.with_name("scan-gz") if args.gzip else DEFAULT_DIR)

    t0 = time.perf_counter()
    paths = generate(args.dir, args.count, ".nii.gz" if args.gzip else ".nii")
    total = sum(p.stat().st_size for p in paths)
    print(f"{len(paths)} files, {total / 2**20:.0f} MiB, in {args.dir} ({time.perf_counter() - t0:.1f} s to prepare)")
    work = Path(tempfile.mkdtemp(prefix="virtnii-bench-scan-"))
    ok = True
    try:
        local = fsspec.filesystem("file")
        profile = cProfile.Profile() if args.profile else None
        theirs = timed(lambda: serial_headers(local, str(args.dir)), args.repeat)
        ours = timed(lambda: scan(str(args.dir), str(work / "local")), args.repeat, profile)
        ok &= report("local disk (warm page cache)", ours, theirs, None if args.gzip else TARGET_LOCAL)
        if not args.gzip:
            io_seconds, json_seconds = floor_parts(str(args.dir), work / "local", args.repeat)
            most = theirs.seconds / (io_seconds + json_seconds)
            print(f"  floor: listing + reading the headers {io_seconds:.3f} s, JSON-encoding the metadata it must "
                  f"write {json_seconds:.3f} s\n         -> at most {most:.1f}x the baseline even if parsing, "
                  "references and writing cost nothing")
        if profile is not None:
            print_profile(profile, f"local, {args.repeat} runs")

        if not args.no_s3:
            ok &= compare_s3(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\nall targets met" if ok else "\nsome targets missed")


if __name__ == "__main__":
    main()
