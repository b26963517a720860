"""Benchmarks of remote sources as archives serve them, one part each (``--only PART``).

``dandi``: scanning a dandiset-shaped listing (``--count`` assets, default 2,000: per subject a ``_T1w.nii.gz``, a
4-D ``_bold.nii`` and their two JSON sidecars) behind the fake DANDI API of ``tests/fake_dandi.py``, its blobs on
the tests' moto S3 server (in another process), both with a simulated round trip per request (``--latency-ms``,
default 20 and 50).  virtnii lists the dandiset through the API in pages of 1,000 and reads each blob's header
with one concurrent ranged GET (a ``.nii.gz`` is read whole, to index it).  The baseline is what a user writes
with dandifs: ``fs.glob`` the dandiset, then for each NIfTI file ``fs.open`` it and parse its header with nibabel,
one after the other; it is timed on the first ``--baseline-files`` files (its rate does not depend on how many
follow) and reported as files per second.  Both sides' requests per file are counted at the servers.

Run: ``python scripts/bench_remote.py [--only dandi] [--count 2000] [--latency-ms 20 50] [--quick]``.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import nibabel as nib

import virtnii
import virtnii.dandi
from benchkit import Row, phantom, print_table, scanner_image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import LocalS3, running_s3  # noqa: E402  (the tests' S3 server)
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
PARTS: dict[str, Callable[[argparse.Namespace], list[Row]]] = {"dandi": bench_dandi}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(PARTS), action="append", help="run only this part (repeatable)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 200 assets, 10 baseline files, 20 ms")
    parser.add_argument("--count", type=int, default=2000, help="dandi: assets in the dandiset (default 2000)")
    parser.add_argument("--baseline-files", type=int, default=100,
                        help="dandi: files the serial dandifs loop reads (default 100)")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[20.0, 50.0],
                        help="simulated round trip(s) per request (default 20 50)")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.baseline_files, args.latency_ms = 200, 10, [20.0]
    rows: list[Row] = []
    for name in args.only or sorted(PARTS):
        rows += PARTS[name](args)
    print_table(rows)


if __name__ == "__main__":
    main()
