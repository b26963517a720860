"""Benchmark of the first chunk read from a ``.nii.gz`` nobody has read yet, against the chunks read after it.

A first read of a file through ``gzidx://`` loads its seek-point index before it can inflate anything; a warm
read only fetches and inflates.  The target (issue 10): first-chunk latency <= 2x a warm chunk's, for a ~1 GiB
image.  Generates bench_gzip's 1 GiB int16 MRI-like ``.nii.gz`` into ``scripts/_data/`` (reused; ~4 min to make
on a 2-core VM), scans it into a temporary manifest, then reads chunks (4 MiB z-slabs, as ``virtnii scan``
chunks it) in a random order, each checked bit for bit against a plain decompression of the file:

- cold in process: ``gzipfs.clear_caches()`` before each repeat, as a long-running server meets a new file;
- cold in a new process: also pays what a process does once (zlib through ctypes, the inflate threads);
- warm: the chunks read after the first one, in the same process.

Medians of ``--repeat`` runs.  Run: ``python scripts/bench_first_chunk.py [--repeat 9] [--quick]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np
from isal import igzip

import virtnii
from bench_gzip import FULL, Volume, generate
from virtnii import gzindex, gzipfs

DEFAULT_DIR = Path(__file__).parent / "_data"
QUICK = Volume("mri_int16_quick", (512, 512, 64), "<i2")  # 32 MiB: 8 chunks
TARGET = 2.0

Chunk = tuple[str, int, int]  # gzidx:// URL, uncompressed offset, length


def chunks_of(manifest: Path) -> list[Chunk]:
    """The manifest's gzidx:// chunk references, in file order."""
    refs = json.loads((manifest / "refs.json").read_text())["refs"]
    found = [(v[0], v[1], v[2]) for v in refs.values() if isinstance(v, list) and str(v[0]).startswith("gzidx://")
             and len(v) == 3]
    return sorted(found, key=lambda chunk: chunk[1])


def expected_digests(path: Path, chunks: list[Chunk]) -> dict[int, str]:
    """SHA-256 of each chunk's bytes, from one plain streaming decompression of the file (not through virtnii)."""
    hashers = {start: (start + length, hashlib.sha256()) for _, start, length in chunks}
    position = 0
    with igzip.open(path, "rb") as f:
        while piece := f.read(16 << 20):
            end = position + len(piece)
            for start, (stop, hasher) in hashers.items():
                if start < end and stop > position:
                    hasher.update(piece[max(start, position) - position:min(stop, end) - position])
            position = end
    return {start: hasher.hexdigest() for start, (_, hasher) in hashers.items()}


def read_run(root: str, chunks: list[Chunk]) -> tuple[list[float], list[str], str]:
    """Read ``chunks`` in order from a fresh ``gzidx`` filesystem: seconds and SHA-256 of each, and how many of
    the index's windows the first read loaded (all of them before sidecar layout 2)."""
    fs = fsspec.filesystem("gzidx", root=root)
    seconds, digests = [], []
    windows = ""
    for url, start, length in chunks:
        t0 = time.perf_counter()
        data = fs.cat_file(url, start, start + length)
        seconds.append(time.perf_counter() - t0)
        digests.append(hashlib.sha256(data).hexdigest())
        if not windows:
            [(_, index)] = gzipfs._INDEXES.values()
            stored = int(index.points["has_window"].sum())
            read = index.windows.read_count if isinstance(index.windows, gzindex.SidecarWindows) else stored
            windows = f"{read} of {stored}"
    return seconds, digests, windows


def check(digests: list[str], chunks: list[Chunk], expected: dict[int, str]) -> None:
    for digest, (_, start, _) in zip(digests, chunks):
        if digest != expected[start]:
            raise SystemExit(f"the chunk at uncompressed offset {start} differs from a plain decompression")


def bench(root: str, chunks: list[Chunk], expected: dict[int, str], repeat: int, warm: int) -> bool:
    rng = np.random.default_rng(0)
    runs = [[chunks[int(k)] for k in rng.permutation(len(chunks))[:warm + 1]] for _ in range(repeat)]
    cold_in, warm_in, cold_new, warm_new = [], [], [], []
    windows = ""
    for run in runs:
        gzipfs.clear_caches()
        seconds, digests, windows = read_run(root, run)
        check(digests, run, expected)
        cold_in.append(seconds[0])
        warm_in += seconds[1:]
    for run in runs:
        child = subprocess.run([sys.executable, __file__, "--child", json.dumps([root, run])], check=True,
                               capture_output=True, text=True)
        seconds, digests = json.loads(child.stdout)
        check(digests, run, expected)
        cold_new.append(seconds[0])
        warm_new += seconds[1:]
    ms = {name: statistics.median(values) * 1000 for name, values in
          [("cold_in", cold_in), ("warm_in", warm_in), ("cold_new", cold_new), ("warm_new", warm_new)]}
    ratio_in, ratio_new = ms["cold_in"] / ms["warm_in"], ms["cold_new"] / ms["warm_new"]
    print(f"\nmedians of {repeat} runs, each: 1 first chunk then {warm} warm ones, in random order "
          f"(windows read by a first chunk: {windows})")
    print(f"  cold in process (gzipfs.clear_caches()): first {ms['cold_in']:6.1f} ms, warm {ms['warm_in']:6.1f} ms"
          f" -> first/warm {ratio_in:.2f}x")
    print(f"  cold in a new process:                    first {ms['cold_new']:6.1f} ms, warm {ms['warm_new']:6.1f} ms"
          f" -> first/warm {ratio_new:.2f}x")
    verdict = "meets" if ratio_in <= TARGET else "MISSES"
    print(f"  first/warm in process {ratio_in:.2f}x: {verdict} the <= {TARGET:g}x target")
    return ratio_in <= TARGET


def child(spec: str) -> None:
    """A new process's run (``--child``): seconds and SHA-256 of each chunk, as JSON on stdout."""
    root, run = json.loads(spec)
    seconds, digests, _ = read_run(root, [tuple(chunk) for chunk in run])
    print(json.dumps([seconds, digests]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the test file is generated and kept")
    parser.add_argument("--quick", action="store_true", help="a 32 MiB image (8 chunks): checks that it all runs")
    parser.add_argument("--repeat", type=int, default=9, help="runs per measurement; medians are reported")
    parser.add_argument("--warm", type=int, default=5, help="warm chunks read after the first one in each run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    volume = QUICK if args.quick else FULL[0]
    path = generate(volume, args.dir)
    print(f"{os.cpu_count()} cores; inflater: {gzindex.inflater()}; load average {os.getloadavg()[0]:.2f} "
          "(other work on the machine inflates every timing)")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="first-chunk-") as work:
        manifest = Path(work) / "manifest"
        if virtnii.scan(str(path), str(manifest)).failures:
            raise SystemExit(f"scanning {path} failed")
        chunks = chunks_of(manifest)
        sidecar = sum(f.stat().st_size for f in (manifest / "gzindex").glob(f"*{gzindex.INDEX_SUFFIX}"))
        print(f"{path.name}: {volume.shape} {volume.dtype}, {path.stat().st_size / 1e6:.0f} MB gz, "
              f"{len(chunks)} chunks, index sidecar {sidecar / 1e6:.2f} MB")
        expected = expected_digests(path, chunks)
        ok = bench(str(manifest), chunks, expected, args.repeat, min(args.warm, len(chunks) - 1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
