"""Benchmarks of remote sources as users have them: one function per part, run with ``--only PART``.

``faults``: whole-volume reads of a ``.nii`` and a ``.nii.gz`` through a manifest over loopback HTTP and over the
local S3 server (moto), each behind the tests' fault-injecting proxy (``tests/faults.py``) — once fault-free and
once with ``--rate`` (default 5 %) of requests reset or answered 503/SlowDown.  Reported: throughput of each, and
the ratio faulty/fault-free (target >= 0.8x); every read is compared with nibabel's voxels.  The proxies and the
servers run in other processes, so the client's timings are its own; both runs go through a proxy, so its cost
is in both.  Each figure is the mean of ``--repeat`` runs.

Run: ``python scripts/bench_remote.py [--only faults] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

import virtnii
from benchkit import Row, mri_slab, print_table

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))
from conftest import clear_fsspec_caches, running_s3  # noqa: E402  (the tests' S3 server)

TARGET_FAULTS = 0.8
#: Retries for the loopback runs: the defaults, but a timeout that ends a lost request quickly.
RETRY = {"timeout": 5.0}


class Proxy:
    """A ``tests/faults.py`` proxy in its own process, in front of ``upstream`` or of an HTTP server for a folder."""

    def __init__(self, *, upstream: str | None = None, serve: Path | None = None, s3: bool = False,
                 rate: float = 0.0) -> None:
        where = ["--upstream", upstream] if upstream else ["--serve", str(serve)]
        command = [sys.executable, str(TESTS / "faults.py"), *where, "--rate", str(rate), "--kinds", "reset,503",
                   *(["--s3"] if s3 else [])]
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                         cwd=TESTS)
        assert self._process.stdout is not None
        self.url = f"http://127.0.0.1:{int(self._process.stdout.readline())}"

    def stop(self) -> dict[str, Any]:
        """Stop it; its counters (requests, faults injected by kind)."""
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.close()
        counters = json.loads(self._process.stdout.readline())
        self._process.wait(timeout=30)
        return counters


def write_sources(folder: Path, shape: tuple[int, int, int]) -> dict[str, Path]:
    """``mri.nii`` and ``mri_gz.nii.gz``: MRI-like int16 volumes (compressing about like real ones)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = np.concatenate([mri_slab(shape, "<i2", z, min(z + 16, shape[2]), np.random.default_rng(z)).T
                           for z in range(0, shape[2], 16)], axis=2)
    img = nib.Nifti1Image(data, np.diag([0.5, 0.5, 0.5, 1.0]))
    paths = {"mri": folder / "mri.nii", "mri_gz": folder / "mri_gz.nii.gz"}
    for path in paths.values():
        nib.save(img, path)
    return paths


def read_all(manifest: str, names: list[str], options: dict[str, Any]) -> dict[str, np.ndarray]:
    group = virtnii.open(manifest, **options)
    return {name: group[name]["0"][...] for name in names}


def timed_reads(manifest: str, names: list[str], options: dict[str, Any], repeat: int,
                expected: dict[str, np.ndarray]) -> float:
    """Mean seconds of reading every image whole (a fresh reader each time), checked against nibabel: the mean,
    not the median, so that every fault injected counts (a median could pick a run that met none)."""
    times = []
    for _ in range(repeat):
        clear_fsspec_caches()
        start = time.perf_counter()
        got = read_all(manifest, names, options)
        times.append(time.perf_counter() - start)
        for name in names:
            if not np.array_equal(got[name], expected[name]):
                raise SystemExit(f"{name}: other voxels than nibabel's")
    return statistics.mean(times)


def compare(label: str, scan_url: Callable[[str], list[str]], options_for: Callable[[str], dict[str, Any]],
            clean: str, faulty: str, work: Path, expected: dict[str, np.ndarray], repeat: int,
            nbytes: int) -> Row:
    """Scan and read through each proxy (references name the proxy a manifest was scanned through); the
    throughput ratio as a Row."""
    names = list(expected)
    seconds = {}
    for which, proxy in (("fault-free", clean), ("faulty", faulty)):
        manifest = str(work / f"manifest-{label}-{which}")
        result = virtnii.scan(list(zip(names, scan_url(proxy))), manifest, storage_options=options_for(proxy))
        if result.failures:
            raise SystemExit(f"scan failed: {[str(f) for f in result.failures]}")
        read_all(manifest, names, options_for(proxy))  # warm: connections, imports, fingerprints
        seconds[which] = timed_reads(manifest, names, options_for(proxy), repeat, expected)
        print(f"  {label:<6} {which:<10}: {seconds[which]:6.2f} s for {nbytes / 2**20:.0f} MiB "
              f"= {nbytes / seconds[which] / 2**20:7.1f} MiB/s (mean of {repeat})")
    ratio = seconds["fault-free"] / seconds["faulty"]
    return Row(f"{label} reads, faulty/fault-free throughput", ratio, f">= {TARGET_FAULTS}", ratio >= TARGET_FAULTS)


def faults(args: argparse.Namespace) -> list[Row]:
    """Reads under injected faults (resets + 503/SlowDown) vs fault-free, over HTTP and S3."""
    shape = (128, 128, 64) if args.quick else (512, 512, 128)
    repeat = 3 if args.quick else args.repeat
    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    rows = []
    try:
        www = work / "www"
        paths = write_sources(www, shape)
        expected = {name: np.asanyarray(nib.load(path).dataobj.get_unscaled()).T for name, path in paths.items()}
        nbytes = sum(a.nbytes for a in expected.values())
        files = [path.name for path in paths.values()]
        print(f"\nfaults: {len(files)} sources ({', '.join(files)}), {shape} int16, {args.rate:.0%} of requests reset "
              f"or answered 503 (SlowDown on S3), retry settings {virtnii.RetryPolicy(**RETRY)}")

        clean, faulty = Proxy(serve=www), Proxy(serve=www, rate=args.rate)
        try:
            rows.append(compare("HTTP", lambda proxy: [f"{proxy}/{f}" for f in files],
                                lambda proxy: {"retry": RETRY}, clean.url, faulty.url, work, expected, repeat,
                                nbytes))
        finally:
            clean.stop()
            print(f"  HTTP faulty proxy: {faulty.stop()}")

        with running_s3(separate_process=True) as s3:
            bucket = s3.create_bucket("bench-remote")
            for f in files:
                s3.filesystem().put_file(str(www / f), f"{bucket}/{f}")
            clean, faulty = Proxy(upstream=s3.endpoint, s3=True), Proxy(upstream=s3.endpoint, s3=True, rate=args.rate)
            try:
                rows.append(compare("S3", lambda proxy: [f"s3://{bucket}/{f}" for f in files],
                                    lambda proxy: {**s3.storage_options, "endpoint_url": proxy, "retry": RETRY},
                                    clean.url, faulty.url, work, expected, repeat, nbytes))
            finally:
                clean.stop()
                print(f"  S3 faulty proxy: {faulty.stop()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


#: The parts, by name: each takes the parsed arguments and returns its closing-table rows.
PARTS: dict[str, Callable[[argparse.Namespace], list[Row]]] = {"faults": faults}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(PARTS), action="append",
                        help="run this part (repeatable; default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--rate", type=float, default=0.05, help="faults: fraction of requests failed (default 0.05)")
    parser.add_argument("--repeat", type=int, default=10, help="runs per measurement, mean kept (default 10)")
    args = parser.parse_args()
    rows = [row for name in (args.only or list(PARTS)) for row in PARTS[name](args)]
    print_table(rows)
    sys.exit(0 if all(row.ok is not False for row in rows) else 1)


if __name__ == "__main__":
    main()
