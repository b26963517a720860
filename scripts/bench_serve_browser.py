"""Benchmark of the viewer page: the first view of a big ``.nii.gz`` in headless Chromium against downloading it.

The browser half of issue 10's ``scripts/bench_serve.py`` (this file until the two are merged).  Generates an
MRI-like int16 ``.nii.gz`` of over 1 GB (``scripts/_data/``, reused when present; ``--quick``: 16 MiB), indexes
it and builds its pyramid, serves the manifest with ``virtnii serve`` and the file itself with a plain static
server, both on loopback, then in Debian's headless Chromium (software WebGL) measures:

- **first view**: from clicking the image in the page to the first picture on the canvas (the coarsest level),
  and the bytes the page fetched for it (Resource Timing transfer sizes: headers and bodies, 304s small), against the time the same browser takes
  to download the whole file from the static server, and its size: targets >= 20x faster, <= 2 % of the bytes;
- **settled view**: the same up to the level that fits the view (``--viewport``, multiplanar), reported;
- **niivue on the file**: niivue itself opening the ``.nii.gz`` URL (download, inflate, upload), what a viewer
  without virtnii does, reported (n/a when the browser cannot hold the file).

The first run of each is cold for the server (nothing read yet, the page cache warm); the median of the others
is reported too.  Run: ``python scripts/bench_serve_browser.py`` (~1.2 GB file, ~2.5 GB of disk) or ``--quick``.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import statistics
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from playwright.sync_api import Browser, sync_playwright

import virtnii
from benchkit import Row, print_table
from bench_gzip import DEFAULT_DIR, Volume, generate
from virtnii.server.app import running

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
#: 2 GiB of int16 voxels: the file is ~1.2 GB once gzipped (the volume compresses about 2:1, as real MRI)
FULL = Volume("mri_int16_2g", (1024, 1024, 1024), "<i2")
QUICK = Volume("mri_int16_small", (256, 256, 128), "<i2")
#: Seconds niivue gets to open the file itself before that baseline is reported as failed.
NIIVUE_LIMIT = 300


def manifest_for(path: Path) -> Path:
    """The file indexed, with its pyramid, in ``<file>.manifest`` beside it (reused when complete)."""
    manifest = path.with_name(path.name.removesuffix(".nii.gz") + ".manifest")
    if not (manifest / "virtnii.json").exists() or "pyramid" not in (manifest / "virtnii.json").read_text():
        virtnii.scan([str(path)], str(manifest))
        virtnii.build_pyramids(str(manifest))
    return manifest


class _CorsFiles(http.server.SimpleHTTPRequestHandler):
    """A plain static file server (with CORS, so that the viewer page may open a file from it)."""

    def end_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the stdlib's name)
        pass


@contextmanager
def static_server(folder: Path) -> Iterator[str]:
    """Serve ``folder``'s files on loopback for the duration of the block, yielding the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_CorsFiles, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        thread.join()


def first_view(browser: Browser, url: str, image: str, viewport: dict[str, int]) -> dict[str, float]:
    """Open the page at ``url`` (a fresh profile), choose ``image``, and wait for the level that fits the view.

    Returns seconds from the click to the first picture and to the settled one, the body bytes fetched by
    then, and the levels shown.  The page times itself (``window.virtniiViewer.timings``, from the click to
    the animation frame after each level's upload).
    """
    context = browser.new_context(viewport=viewport)
    try:
        page = context.new_page()
        page.goto(url)
        page.wait_for_selector("#images button")
        page.evaluate("() => { performance.setResourceTimingBufferSize(1e6); performance.clearResourceTimings() }")
        page.click(f"#images button[data-path='{image}']")
        page.wait_for_selector("#status[data-state=ready], #status[data-state=error]", timeout=600_000)
        result = page.evaluate("""() => {
            const { timings, level, levels } = window.virtniiViewer
            const first = timings.chosenAt + timings.firstRender
            const bytes = (until) => performance.getEntriesByType("resource")
                .filter((entry) => entry.startTime >= timings.chosenAt && entry.responseEnd <= until)
                .reduce((sum, entry) => sum + entry.transferSize, 0)
            return { first_s: timings.firstRender / 1000, ready_s: timings.ready / 1000,
                     first_bytes: bytes(first), ready_bytes: bytes(Infinity), level, levels }
        }""")
        if page.get_attribute("#status", "data-state") == "error":
            raise RuntimeError(page.inner_text("#status"))
        return result
    finally:
        context.close()


def download(browser: Browser, files_url: str, name: str) -> tuple[float, int]:
    """Seconds for the browser to fetch the whole file (reading every byte, keeping none), and its bytes."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(files_url)
        return tuple(page.evaluate("""async (name) => {
            const started = performance.now()
            const reader = (await fetch(name, { cache: "no-store" })).body.getReader()
            let bytes = 0
            for (let chunk = await reader.read(); !chunk.done; chunk = await reader.read()) bytes += chunk.value.length
            return [(performance.now() - started) / 1000, bytes]
        }""", name))
    finally:
        context.close()


def niivue_on_file(browser: Browser, url: str, file_url: str, viewport: dict[str, int]) -> float | None:
    """Seconds for niivue (the page's own instance) to open the ``.nii.gz`` URL itself and draw it, or None when
    it cannot (a file too big for the browser)."""
    context = browser.new_context(viewport=viewport)
    try:
        page = context.new_page()
        page.goto(url)
        page.wait_for_selector("#images button")
        return page.evaluate("""async ([url, limit]) => {
            const nv = window.virtniiViewer.nv
            const started = performance.now()
            const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error(`no picture after ${limit} s`)),
                                                                  limit * 1000))
            await Promise.race([nv.loadVolumes([{ url }]), timeout])
            await new Promise((resolve) => requestAnimationFrame(resolve))
            return (performance.now() - started) / 1000
        }""", [file_url, NIIVUE_LIMIT])
    except Exception as err:  # noqa: BLE001  (reported, not fatal: the baseline that fails is the point)
        print(f"niivue could not open the file itself: {str(err).splitlines()[0]}")
        return None
    finally:
        context.close()


def summary(runs: list[dict[str, float]], key: str) -> tuple[float, float]:
    """The cold (first) run's value and the median of the others (the cold one again when there is one run)."""
    return runs[0][key], statistics.median(run[key] for run in runs[1:]) if len(runs) > 1 else runs[0][key]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 16 MiB volume: a check that everything runs "
                        "(the targets are for big files)")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the file is generated and kept")
    parser.add_argument("--repeat", type=int, default=4, help="page loads (the first is the cold one)")
    parser.add_argument("--viewport", default="1280x800", help="browser window, WIDTHxHEIGHT")
    args = parser.parse_args(argv)
    width, height = map(int, args.viewport.split("x"))
    viewport = {"width": width, "height": height}
    volume = QUICK if args.quick else FULL
    path = generate(volume, args.dir)
    size = path.stat().st_size
    print(f"{path.name}: {volume.shape} {volume.dtype}, {volume.nbytes / 2**30:.2f} GiB of voxels, "
          f"{size / 1e9:.3f} GB gzipped; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} "
          "(other work on the machine inflates every timing)")
    manifest = manifest_for(path)
    image = virtnii.open(str(manifest))
    name = next(iter(image.group_keys()))
    with sync_playwright() as playwright, running([str(manifest)]) as url, static_server(path.parent) as files:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        path.read_bytes()  # the file in the page cache, for the download as for the server
        download_s, downloaded = min(download(browser, files, path.name) for _ in range(2))
        assert downloaded == size, (downloaded, size)
        runs = [first_view(browser, url, name, viewport) for _ in range(max(1, args.repeat))]
        niivue_s = niivue_on_file(browser, url, files + path.name, viewport)
        browser.close()

    first_cold, first_warm = summary(runs, "first_s")
    ready_cold, ready_warm = summary(runs, "ready_s")
    first_bytes, ready_bytes = runs[0]["first_bytes"], runs[0]["ready_bytes"]
    print(f"\ndownload of the whole file in the browser: {download_s:.3f} s ({size / download_s / 1e6:.0f} MB/s)")
    print(f"first view (level {runs[0]['levels'] - 1}): {first_cold * 1e3:.0f} ms cold, {first_warm * 1e3:.0f} ms "
          f"median warm, {first_bytes / 1e6:.2f} MB fetched")
    print(f"settled view (level {runs[0]['level']}, fits a {args.viewport} window): {ready_cold * 1e3:.0f} ms cold, "
          f"{ready_warm * 1e3:.0f} ms median warm, {ready_bytes / 1e6:.2f} MB fetched")
    if niivue_s is not None:
        print(f"niivue opening the .nii.gz itself: {niivue_s:.2f} s")
    rows = [
        Row("first view: download time / time to first view (cold)", download_s / first_cold, ">= 20",
            download_s / first_cold >= 20),
        Row("first view: download time / time to first view (warm)", download_s / first_warm, ">= 20",
            download_s / first_warm >= 20),
        Row("first view: bytes fetched / file size (%)", 100 * first_bytes / size, "<= 2", 100 * first_bytes / size <= 2),
        Row("settled view: download time / time to it (warm)", download_s / ready_warm),
        Row("settled view: bytes fetched / file size (%)", 100 * ready_bytes / size),
        Row("niivue on the file: its time / time to first view (warm)",
            None if niivue_s is None else niivue_s / first_warm),
    ]
    print_table(rows)
    return 0 if all(row.ok is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
