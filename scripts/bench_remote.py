"""Benchmarks of remote sources as archives serve them and networks treat them, one part each (``--only PART``).

``dandi``: scanning a dandiset-shaped listing (``--count`` assets, default 2,000: per subject a ``_T1w.nii.gz``, a
4-D ``_bold.nii`` and their two JSON sidecars) behind the fake DANDI API of ``tests/fake_dandi.py``, its blobs on
the tests' moto S3 server (in another process), both with a simulated round trip per request (``--latency-ms``,
default 20 and 50).  virtnii lists the dandiset through the API in pages of 1,000 and reads each blob's header
with one concurrent ranged GET (a ``.nii.gz`` is read whole, to index it).  The baseline is what a user writes
with dandifs: ``fs.glob`` the dandiset, then for each NIfTI file ``fs.open`` it and parse its header with nibabel,
one after the other; it is timed on the first ``--baseline-files`` files (its rate does not depend on how many
follow) and reported as files per second.  Both sides' requests per file are counted at the servers.

``faults``: whole-volume reads of a ``.nii`` and a ``.nii.gz`` through a manifest over loopback HTTP and over the
local S3 server (moto), each behind the tests' fault-injecting proxy (``tests/faults.py``) — once fault-free and
once with ``--rate`` (default 5 %) of requests reset or answered 503/SlowDown.  Reported: throughput of each, and
the ratio faulty/fault-free (target >= 0.8x); every read is compared with nibabel's voxels.  The proxies and the
servers run in other processes, so the client's timings are its own; both runs go through a proxy, so its cost
is in both.  Each figure is the mean of ``--repeat`` runs.

Run: ``python scripts/bench_remote.py [--only dandi|faults] [--count 2000] [--latency-ms 20 50] [--rate 0.05]
[--repeat 10] [--quick]``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np

import virtnii
import virtnii.dandi
from benchkit import Row, mri_slab, phantom, print_table, scanner_image

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))
from conftest import LocalS3, clear_fsspec_caches, running_s3  # noqa: E402  (the tests' S3 server)
from fake_dandi import FakeDandi  # noqa: E402  (the tests' DANDI API)

DANDISET = "000026"


def _images(variants: int) -> list[tuple[bytes, bytes]]:
    """``variants`` pairs of (T1w ``.nii.gz``, 4-D bold ``.nii``) bytes: small phantoms with scanner headers."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for k in range(variants):
        t1 = scanner_image(phantom((48, 56, 40), "<i2", rng), (1.0, 1.0, 1.2), b"T1w %d" % k)
        bold = scanner_image(phantom((24, 24, 16, 6), "<i2", rng), (3.0, 3.0, 3.0, 2.0), b"bold %d" % k)
        out.append((gzip.compress(t1.to_bytes(), 6), bold.to_bytes()))
    return out


def dandiset_files(count: int) -> dict[str, bytes]:
    """``count`` assets (4 per subject), half of them NIfTI, laid out as in a BIDS dandiset."""
    images = _images(8)
    files: dict[str, bytes] = {}
    for i in range(max(1, count // 4)):
        t1, bold = images[i % len(images)]
        subject = f"sub-{i:04d}"
        anat, func = f"rawdata/{subject}/ses-MRI/anat/{subject}_ses-MRI", f"rawdata/{subject}/ses-MRI/func/{subject}"
        files[f"{anat}_T1w.nii.gz"] = t1
        files[f"{anat}_T1w.json"] = b'{"EchoTime": 0.0031, "RepetitionTime": 2.3}'
        files[f"{func}_ses-MRI_task-rest_bold.nii"] = bold
        files[f"{func}_ses-MRI_task-rest_bold.json"] = b'{"RepetitionTime": 2.0, "TaskName": "rest"}'
    return files


def serial_dandifs(fake: FakeDandi, limit: int) -> int:
    """The baseline: glob the dandiset with dandifs, then open each NIfTI file and read its header with nibabel,
    one by one, for the first ``limit`` files.  Returns the number of files read."""
    from dandifs import DandiFileSystem

    fs = DandiFileSystem(DANDISET, "draft", instance=fake.url, skip_instance_cache=True)
    # its names carry the instance's host:port, which its own parser does not read back: keep the paths
    paths = [name.split("@draft/", 1)[1] for name in fs.glob("*")]
    paths = [p for p in paths if p.endswith((".nii", ".nii.gz"))][:limit]
    for path in paths:
        with fs.open(path) as raw:
            f = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
            nib.Nifti1Header.from_fileobj(f)
    return len(paths)


def metered(fake: FakeDandi, s3: LocalS3, run: Callable[[], int]) -> dict[str, float]:
    """Seconds, files, and API and S3 requests of one run."""
    fake.reset_requests()
    s3.reset_counters()
    start = time.perf_counter()
    files = run()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "files": files, "api": len(fake.requests), "s3": s3.meter().total_requests}


def bench_dandi(args: argparse.Namespace) -> list[Row]:
    files = dandiset_files(args.count)
    nifti = sum(p.endswith((".nii", ".nii.gz")) for p in files)
    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="virtnii-bench-remote-"))
    with running_s3(separate_process=True) as s3:
        fake = FakeDandi(s3, threads=64)
        try:
            start = time.perf_counter()
            fake.add(DANDISET, files)
            print(f"dandi: {len(files)} assets ({nifti} NIfTI, {sum(map(len, files.values())) / 2**20:.0f} MiB) "
                  f"uploaded in {time.perf_counter() - start:.1f} s")
            os.environ[virtnii.dandi.INSTANCES_VARIABLE] = f"fake={fake.url}"

            def ours() -> int:
                result = virtnii.scan([f"dandi://fake/{DANDISET}@draft/"], str(work / "out"))
                assert not result.failures, [str(f) for f in result.failures[:3]]
                return len(result.images)

            for latency in args.latency_ms:
                fake.latency = latency / 1000
                with s3.latency(latency / 1000):
                    theirs = metered(fake, s3, lambda: serial_dandifs(fake, args.baseline_files))
                    mine = metered(fake, s3, ours)
                rates = [m["files"] / m["seconds"] for m in (mine, theirs)]
                print(f"\n{latency:g} ms per request (API and S3)")
                for label, m, rate in (("virtnii scan", mine, rates[0]), ("dandifs serial", theirs, rates[1])):
                    print(f"  {label:<15} {m['files']:5d} files in {m['seconds']:7.2f} s = {rate:7.1f} files/s; "
                          f"per file: {m['api'] / m['files']:.3f} API + {m['s3'] / m['files']:.2f} S3 requests")
                rows += [Row(f"dandi {latency:g} ms: virtnii files/s", rates[0]),
                         Row(f"dandi {latency:g} ms: dandifs serial files/s", rates[1]),
                         Row(f"dandi {latency:g} ms: ratio", rates[0] / rates[1]),
                         Row(f"dandi {latency:g} ms: virtnii API requests/file", mine["api"] / mine["files"]),
                         Row(f"dandi {latency:g} ms: dandifs API requests/file", theirs["api"] / theirs["files"])]
        finally:
            fake.stop()
            shutil.rmtree(work, ignore_errors=True)
    return rows


#: The parts, by name (``--only``).


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
PARTS: dict[str, Callable[[argparse.Namespace], list[Row]]] = {"dandi": bench_dandi, "faults": faults}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(PARTS), action="append",
                        help="run this part (repeatable; default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: dandi 200 assets, 10 baseline files, 20 ms; faults small volumes, 3 runs")
    parser.add_argument("--count", type=int, default=2000, help="dandi: assets in the dandiset (default 2000)")
    parser.add_argument("--baseline-files", type=int, default=100,
                        help="dandi: files the serial dandifs loop reads (default 100)")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[20.0, 50.0],
                        help="dandi: simulated round trip(s) per request (default 20 50)")
    parser.add_argument("--rate", type=float, default=0.05, help="faults: fraction of requests failed (default 0.05)")
    parser.add_argument("--repeat", type=int, default=10, help="faults: runs per measurement, mean kept (default 10)")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.baseline_files, args.latency_ms = 200, 10, [20.0]
    rows = [row for name in (args.only or sorted(PARTS)) for row in PARTS[name](args)]
    print_table(rows)
    sys.exit(0 if all(row.ok is not False for row in rows) else 1)


if __name__ == "__main__":
    main()
