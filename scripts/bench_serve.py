"""Benchmark of ``virtnii serve``: chunk throughput under concurrent load, against a static file server.

An int16 MRI-like volume is written as ``.nii`` and ``.nii.gz``, scanned into one manifest and given a pyramid.
The server runs in its own process (``virtnii serve --port 0``), as it would for a viewer; so does the baseline,
aiohttp's static file handler over a folder holding exactly the same bytes at the same paths (fetched once
through virtnii), i.e. what serving pre-converted chunk files would cost.  A bounded load generator (aiohttp
client, ``--connections`` at once for ``--seconds``) then asks each server for every chunk of one kind in turn:
``.nii`` level-0 chunks (ranged file reads), ``.nii.gz`` level-0 chunks (inflated from seek points on every
request) and written level-1 chunks (compressed files).  Reported: requests/s, MB/s, p50/p99 latency.

The client shares the machine with the servers (2 cores here): the figures are the pair's, and the static
server's row says where the client and the network stack, not virtnii, set the limit.

Run: ``python scripts/bench_serve.py [--quick] [--shape 512 512 256] [--connections 64] [--seconds 10]
[--repeat 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

import virtnii
from benchkit import Row, mri_slab, print_table

DEFAULT_DIR = Path(__file__).parent / "_data" / "serve"


def generate(folder: Path, shape: tuple[int, int, int]) -> list[Path]:
    """``mri.nii`` and ``mri.nii.gz`` of ``shape`` (reused when there), and their manifest with a pyramid."""
    name = "x".join(map(str, shape))
    paths = [folder / f"mri_{name}.nii", folder / f"mri_{name}_gz.nii.gz"]
    if not all(path.exists() for path in paths):
        folder.mkdir(parents=True, exist_ok=True)
        data = mri_slab(shape, "<i2", 0, shape[2], np.random.default_rng(0)).transpose(2, 1, 0)
        for path in paths:
            nib.save(nib.Nifti1Image(data, np.diag([0.5, 0.5, 0.5, 1.0])), path)
    return paths


def build_manifest(folder: Path, sources: list[Path]) -> Path:
    manifest = folder / "manifest"
    if not (manifest / "virtnii.json").exists():
        result = virtnii.scan([str(p) for p in sources], str(manifest), progress=False)
        assert not result.failures, result.failures
        assert not virtnii.build_pyramids(str(manifest), progress=False).failures
    return manifest


def start(command: list[str]) -> tuple[subprocess.Popen[str], str]:
    """A server process and the URL it prints on its first line."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()  # type: ignore[union-attr]
    match = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
    if match is None:
        process.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return process, match[1]


def static_server(folder: str) -> None:
    """``--static-server DIR``: aiohttp's static files over DIR on a free loopback port (the baseline)."""
    from aiohttp import web

    async def run() -> None:
        app = web.Application()
        app.router.add_static("/zarr/", folder)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(f"static at http://127.0.0.1:{runner.addresses[0][1]}/", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


async def load(url: str, keys: list[str], connections: int, seconds: float) -> dict[str, float]:
    """``connections`` clients asking for ``keys`` in turn for ``seconds`` (each key at least once):
    requests/s, MB/s, p50/p99 (ms)."""
    import aiohttp

    latencies: list[float] = []
    received = 0
    stop = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
        async def client(offset: int) -> None:
            nonlocal received
            i = offset
            while time.perf_counter() < stop or i < len(keys):
                began = time.perf_counter()
                async with session.get(url + keys[i % len(keys)]) as response:
                    body = await response.read()
                    if response.status != 200:
                        raise SystemExit(f"{response.url}: HTTP {response.status}")
                latencies.append(time.perf_counter() - began)
                received += len(body)
                i += connections

        began = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(connections)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {"requests/s": len(latencies) / elapsed, "MB/s": received / elapsed / 1e6,
            "p50 ms": 1e3 * statistics.median(latencies), "p99 ms": 1e3 * latencies[int(0.99 * (len(latencies) - 1))]}


def chunk_kinds(manifest: Path) -> dict[str, list[str]]:
    """The chunk keys of each kind measured, from the manifest's references."""
    refs = json.loads(next(manifest.glob("refs*.json")).read_text())["refs"]
    index = virtnii.manifest.read_index(str(manifest))
    plain = next(e.name for e in index.images if not e.gzip_index)
    gz = next(e.name for e in index.images if e.gzip_index)
    return {".nii level 0": [k for k in refs if k.startswith(f"{plain}/0/c/")],
            ".nii.gz level 0": [k for k in refs if k.startswith(f"{gz}/0/c/")],
            "written level 1": [k for k in refs if k.startswith(f"{plain}/1/c/")]}


def copy_chunks(url: str, kinds: dict[str, list[str]], folder: Path) -> None:
    """The bytes of every measured key, fetched through virtnii, as files at the same paths (the baseline)."""
    import urllib.request

    for keys in kinds.values():
        for key in keys:
            target = folder / key
            target.parent.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(f"{url}zarr/{key}") as response:
                target.write_bytes(response.read())


# -- time to first view in a browser: measured by branch `viewer` (headless Chromium), not here ------------------


def time_to_first_view(url: str, image: str) -> Row:
    """Time from opening the viewer page on ``image`` to its first rendered view, against downloading the whole
    file: needs the viewer bundle and a headless browser, which this branch does not have (reported as not
    measured)."""
    return Row(f"time to first view of {image} (browser)", None, ">= 20x")


# ------------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the volumes go (reused)")
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 256], metavar=("X", "Y", "Z"))
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement (default 10)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement, alternating servers; "
                                                               "medians reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="128x128x64, 8 connections, 1 s, 1 run: a smoke test")
    parser.add_argument("--static-server", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.static_server:
        return static_server(args.static_server)
    if args.quick:
        args.shape, args.connections, args.seconds, args.repeat = [128, 128, 64], 8, 1.0, 1
        args.dir = args.dir / "quick"
    shape = tuple(args.shape)
    folder = args.dir / "x".join(map(str, shape))
    manifest = build_manifest(folder, generate(folder, shape))
    kinds = chunk_kinds(manifest)
    served, url = start([sys.executable, "-m", "virtnii.cli", "serve", str(manifest), "--port", "0"])
    static = None
    try:
        copy_chunks(url, kinds, folder / "static")
        static, static_url = start([sys.executable, __file__, "--static-server", str(folder / "static")])
        print(f"{shape} int16; {args.connections} connections, {args.seconds:g} s each, median of {args.repeat}")
        print(f"{'chunks':<18} {'server':<8} {'size':>9} {'requests/s':>11} {'MB/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
        rows = []
        servers = (("virtnii", url), ("static", static_url))
        for kind, keys in kinds.items():
            size = (folder / "static" / keys[0]).stat().st_size
            for _, base in servers:  # warm-up: every key once (first fingerprint checks, page cache, connections)
                asyncio.run(load(f"{base}zarr/", keys, min(len(keys), args.connections), 0.0))
            runs: dict[str, list[dict[str, float]]] = {"virtnii": [], "static": []}
            for _ in range(args.repeat):  # alternated, so that a burst of load elsewhere hits both alike
                for label, base in servers:
                    runs[label].append(asyncio.run(load(f"{base}zarr/", keys, args.connections, args.seconds)))
            results = {}
            for label, _ in servers:
                results[label] = result = {measure: statistics.median(run[measure] for run in runs[label])
                                           for measure in runs[label][0]}
                print(f"{kind:<18} {label:<8} {size / 1024:7.0f} K {result['requests/s']:11.0f} "
                      f"{result['MB/s']:8.0f} {result['p50 ms']:8.1f} {result['p99 ms']:8.1f}")
            rows.append(Row(f"{kind}: requests/s vs static files",
                            results["virtnii"]["requests/s"] / results["static"]["requests/s"]))
        rows.append(time_to_first_view(url, kinds[".nii.gz level 0"][0].split("/")[0]))
        print_table(rows, "ratio (virtnii / static)")
    finally:
        for process in (served, static):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)


if __name__ == "__main__":
    main()
