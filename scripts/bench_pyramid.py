"""Benchmark of ``virtnii pyramid`` against a plain inflate, nifti-zarr's ``nii2zarr`` and ngff-zarr.

The question is whether the pyramid builder is cheap enough to run on every large scan: it reads level 0 once
(inflating the ``.nii.gz`` through its seek-point index), downsamples it plane by plane and writes levels 1..N,
so its time should sit near one ``gzip -dc`` pass, its memory should not grow with the volume, and it should
write far fewer bytes than a converter that copies level 0.  The inputs are MRI-like int16 volumes shaped like
ex vivo scans (generated slab by slab, cached in ``scripts/_data/pyramid/`` by shape): default 800x700x640
(717 MB of voxels), ``--full`` 1600x1400x640, ``--small`` 400x350x320 for a quick check that everything runs.

Every tool runs as its own process, timed whole from outside by GNU time (wall seconds and peak RSS), each
measurement repeated ``--repeat`` times and the median reported, all in one run so that the ratios compare
like with like.  The alternatives (nii2zarr: tens of seconds and gigabytes; ngff-zarr, in its own venv
``scripts/_data/ngff-venv`` made on first use) run ``--alternatives-repeat`` times, once by default.  Then, in
this process, level 1 is written with each candidate codec (bytes and times, to choose the default by
measurement), and the pipeline's stages are timed apart (read level 0, downsample, write) to show which one
bounds the total.  The closing table gives the project's targets, each marked met or not: it reports, it
does not assert.

Run: ``python scripts/bench_pyramid.py [--small | --full] [--repeat 3] [--skip-niizarr] [--skip-ngff]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import zarr
from isal import igzip
from zarr.codecs import BloscCodec, ZstdCodec

import virtnii
from benchkit import Row, best_of, mri_slab, print_table
from virtnii.pyramid import CODECS, DEFAULT_CODEC, build_pyramids
from virtnii.pyramid.downsample import halved, plane_stream
from virtnii.slabs import SLAB_BYTES as READ_AHEAD

DATA = Path(__file__).parent / "_data"
DEFAULT_DIR = DATA / "pyramid"
NGFF_VENV = DATA / "ngff-venv"
NGFF_REQUIREMENTS = ["ngff-zarr>=0.50", "nibabel"]
SHAPES = {"small": (400, 350, 320), "default": (800, 700, 640), "full": (1600, 1400, 640)}
ZOOM = 0.1  # mm: ex vivo resolution
SLAB = 16  # z-slices generated at a time: the volume is never in memory whole while it is written
#: How the .nii.gz inputs are compressed.  Scanner files are usually zlib level 6; inflate cost hardly depends
#: on the level, and ISA-L level 3 writes a volume several times faster.
GZIP_WRITER = "ISA-L igzip level 3"
CHUNK = 64  # level chunk edge, as `virtnii pyramid` and nii2zarr default to
RUN = "run"  # folder (inside the data folder) of this run's outputs, deleted at its end; inputs stay
TIME = ["/usr/bin/time", "-f", "%M"]  # GNU time: peak RSS in KiB (its wall time has only 10 ms steps)


# ------------------------------------------------------------------------------------------------- the data

def generate(folder: Path, shape: tuple[int, int, int], plain: bool) -> tuple[Path, Path | None]:
    """Write ``mri_<x>x<y>x<z>.nii.gz`` (and, if ``plain``, the same voxels as ``.nii``) in one pass, slab by
    slab; files already there are reused (each is written under another name and renamed when complete)."""
    stem = folder / f"mri_{'x'.join(map(str, shape))}"
    gz, nii = stem.with_suffix(".nii.gz"), stem.with_suffix(".nii")
    todo = [p for p in ([gz, nii] if plain else [gz]) if not p.exists()]
    if todo:
        folder.mkdir(parents=True, exist_ok=True)
        header = nib.Nifti1Header()
        header.set_data_shape(shape)
        header.set_data_dtype(np.int16)
        header.set_zooms((ZOOM,) * 3)
        header.set_xyzt_units("mm")
        affine = np.diag([ZOOM, ZOOM, ZOOM, 1.0])
        affine[:3, 3] = [-ZOOM * n / 2 for n in shape]
        header.set_qform(affine, code=1)
        header.set_sform(affine, code=2)
        header["vox_offset"] = 352
        partial = {p: p.with_name(p.name + ".partial") for p in todo}
        outputs = [igzip.open(partial[p], "wb", compresslevel=3) if p == gz else open(partial[p], "wb")
                   for p in todo]
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        try:
            for out in outputs:
                out.write(header.binaryblock + b"\0" * 4)  # 348-byte header + "no extensions" flag
            for z0 in range(0, shape[2], SLAB):
                data = mri_slab(shape, "<i2", z0, min(z0 + SLAB, shape[2]), rng).tobytes()
                for out in outputs:
                    out.write(data)
        finally:
            for out in outputs:
                out.close()
        for p in todo:
            os.replace(partial[p], p)
        print(f"  wrote {', '.join(p.name for p in todo)} in {time.perf_counter() - start:.1f} s")
    return gz, nii if plain else None


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ------------------------------------------------------------------------------------------------ measuring

@dataclass(frozen=True)
class Command:
    """A command as it is run (``argv``) and as it is printed for others to rerun (``shown``)."""

    argv: list[str]
    shown: str


def tool(name: str, *args: str) -> Command:
    """A console script of this venv (virtnii), printed by its name alone."""
    return Command([str(Path(sys.executable).parent / name), *args], shlex.join([name, *args]))


def python(code: str, interpreter: str | None = None, shown: str = "python") -> Command:
    return Command([interpreter or sys.executable, "-c", code], f"{shown} -c {shlex.quote(code)}")


def to_null(*argv: str) -> Command:
    return Command(list(argv), shlex.join(argv) + " > /dev/null")


@dataclass(frozen=True)
class Run:
    """Median wall time and peak RSS of repeated runs of one command (each run in the list)."""

    wall: float
    rss: int
    runs: list[tuple[float, int]]


def measure(label: str, command: Command, cwd: Path, repeat: int, before: Callable[[], None] = lambda: None,
            optional: bool = False) -> Run | None:
    """Run ``command`` ``repeat`` times under GNU time (``before`` first, untimed) and print the medians.

    Wall time is this script's clock around the whole process (a ``cat`` of a cached file takes milliseconds).

    A failing run ends the benchmark, or, if ``optional`` (the alternatives), is printed and gives None.
    """
    print(f"  $ {command.shown}")
    runs = []
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        for _ in range(repeat):
            before()
            start = time.perf_counter()
            done = subprocess.run([*TIME, "-o", report.name, *command.argv], cwd=cwd, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
            wall = time.perf_counter() - start
            if done.returncode:
                why = "\n      ".join(done.stderr.strip().splitlines()[-6:])
                print(f"    {label}: FAILED (exit {done.returncode})\n      {why}")
                if optional:
                    return None
                raise SystemExit(1)
            report.seek(0)
            runs.append((wall, int(report.read().split()[-1]) * 1024))
    run = Run(statistics.median(w for w, _ in runs), int(statistics.median(r for _, r in runs)), runs)
    each = ", ".join(f"{w:.3f}" for w, _ in runs)
    print(f"    {label:<44} {run.wall:8.3f} s  {run.rss / 1e6:8.0f} MB peak RSS"
          + (f"  (median of {len(runs)}: {each} s)" if len(runs) > 1 else ""))
    return run


@dataclass(frozen=True)
class Pyramid:
    """What ``virtnii pyramid`` made: its timing (and the scan's before it), bytes in the level stores, number
    of levels, image name."""

    scan: Run
    run: Run
    written: int
    levels: int
    name: str


def scan_and_pyramid(label: str, source: Path, cwd: Path, runs: Path, repeat: int) -> Pyramid:
    """``virtnii scan`` once (timed, reported apart), then ``virtnii pyramid`` ``repeat`` times, each on a fresh
    copy of the scanned manifest so that every run builds its levels from scratch."""
    scanned, manifest = runs / f"{label}.scanned", runs / label
    scan = measure(f"virtnii scan {source.name}", tool("virtnii", "scan", source.name, "-o", rel(scanned, cwd), "-q"),
            cwd, 1)

    def fresh() -> None:
        shutil.rmtree(manifest, ignore_errors=True)
        shutil.copytree(scanned, manifest)

    run = measure(f"virtnii pyramid ({source.name})", tool("virtnii", "pyramid", rel(manifest, cwd), "-q"), cwd,
                  repeat, fresh)
    assert scan is not None and run is not None
    image = json.loads((manifest / "virtnii.json").read_text())["images"][0]
    pyramid = Pyramid(scan, run, folder_bytes(manifest / "levels"), len(image["pyramid"]["levels"]), image["name"])
    print(f"    {'':<44} {pyramid.written / 1e6:8.1f} MB written in {pyramid.levels} levels")
    return pyramid


def alternative(label: str, command: Command, out: Path, cwd: Path, repeat: int) -> tuple[Run, int] | None:
    """A converter run ``repeat`` times into a fresh ``out``: its timing and the bytes it wrote (None: failed)."""
    run = measure(label, command, cwd, repeat, lambda: shutil.rmtree(out, ignore_errors=True), optional=True)
    if run is None:
        return None
    written = folder_bytes(out)
    print(f"    {'':<44} {written / 1e6:8.1f} MB written")
    return run, written


def ngff_python(cwd: Path) -> Path | None:
    """The ngff-zarr venv's interpreter, made on first use (ngff-zarr brings its own zarr/dask stack, which must
    not change the project's venv), after one untimed run on a small array: itkwasm compiles its wasm modules on
    first use (~10 s) and caches them, a cost no later conversion pays.  None, with the reason printed, where
    ngff-zarr cannot be installed or run."""
    interpreter = NGFF_VENV / "bin" / "python"
    warm_up = [str(interpreter), "-c",
               f'import numpy as np, ngff_zarr as nz; nz.to_ngff_zarr("{RUN}/ngff-warm.zarr", '
               'nz.to_multiscales(nz.to_ngff_image(np.zeros((130, 120, 100), np.int16), dims=["x", "y", "z"]), '
               'scale_factors=64, chunks=64))']
    steps = [warm_up]
    if not interpreter.exists():
        shown = rel(NGFF_VENV, Path.cwd())
        print(f"  making the ngff-zarr venv: python3 -m venv {shown} && "
              f"{shown}/bin/pip install {shlex.join(NGFF_REQUIREMENTS)}")
        steps = [[sys.executable, "-m", "venv", str(NGFF_VENV)],
                 [str(NGFF_VENV / "bin" / "pip"), "install", "-q", *NGFF_REQUIREMENTS], warm_up]
    for step in steps:
        done = subprocess.run(step, cwd=cwd, capture_output=True, text=True)
        if done.returncode:
            why = "\n      ".join((done.stderr or done.stdout).strip().splitlines()[-6:])
            print(f"    ngff-zarr cannot be installed or run (exit {done.returncode}), skipped:\n      {why}")
            return None
    shutil.rmtree(cwd / RUN / "ngff-warm.zarr", ignore_errors=True)
    return interpreter


def rel(path: Path, start: Path) -> str:
    """``path`` as printed: relative to ``start`` (so that commands and messages name no machine's folders)."""
    return os.path.relpath(path, start)


# ----------------------------------------------------------------------------------------- in this process

def codec_spec(name: str, cname: str | None = None, clevel: int | None = None, shuffle: str | None = None,
               level: int | None = None) -> dict[str, Any]:
    """A compressor in the form of :data:`virtnii.pyramid.CODECS`."""
    if name == "zstd":
        return {"name": "zstd", "level": level}
    return {"name": "blosc", "cname": cname, "clevel": clevel, "shuffle": shuffle}


CANDIDATES = [codec_spec("blosc", "zstd", c, "shuffle") for c in (1, 3, 5)] + [
    codec_spec("blosc", "zstd", 3, "bitshuffle"), codec_spec("blosc", "lz4", 5, "shuffle"),
    codec_spec("blosc", "lz4", 5, "bitshuffle"), codec_spec("zstd", level=1), codec_spec("zstd", level=3)]


def describe(spec: dict[str, Any]) -> str:
    if spec["name"] == "zstd":
        return f"zstd level {spec['level']}"
    return f"blosc {spec['cname']} clevel {spec['clevel']} {spec['shuffle']}"


def zarr_codec(spec: dict[str, Any]) -> Any:
    options = {k: v for k, v in spec.items() if k != "name"}
    return BloscCodec(**options) if spec["name"] == "blosc" else ZstdCodec(**options)


def write_array(path: Path, data: np.ndarray, spec: dict[str, Any]) -> zarr.Array:
    """``data`` as a fresh zarr 3 array of 64-cubed chunks at ``path``, compressed by ``spec``."""
    shutil.rmtree(path, ignore_errors=True)
    array = zarr.create_array(zarr.storage.LocalStore(path), shape=data.shape, dtype=data.dtype,
                              chunks=tuple(min(CHUNK, n) for n in data.shape), compressors=zarr_codec(spec),
                              fill_value=0, zarr_format=3)
    array[...] = data
    return array


def codecs(manifest: Path, name: str, runs: Path, repeat: int) -> None:
    """Level 1 (read back from the built pyramid) written with each codec of CODECS and the candidates."""
    level1 = virtnii.open(str(manifest))[name]["1"][...]
    print(f"\ncodecs on level 1 ({'x'.join(map(str, level1.shape))} {level1.dtype}, {level1.nbytes / 1e6:.1f} MB), "
          f"zarr 3, {CHUNK}-cubed chunks, best of {repeat}")
    named = {json.dumps(spec, sort_keys=True): key for key, spec in CODECS.items()}
    specs = list(CODECS.values()) + [s for s in CANDIDATES if json.dumps(s, sort_keys=True) not in named]
    print(f"  {'codec':<36} {'CODECS name':<22} {'MB':>8} {'ratio':>6} {'write s':>8} {'read s':>7}")
    for spec in specs:
        path = runs / "codec.zarr"
        t_write, array = best_of(lambda: write_array(path, level1, spec), repeat)
        t_read, back = best_of(lambda: array[...], repeat)
        if not np.array_equal(back, level1):
            raise SystemExit(f"{describe(spec)} did not give level 1 back")
        stored = folder_bytes(path)
        key = named.get(json.dumps(spec, sort_keys=True), "")
        key += " (default)" if key == DEFAULT_CODEC else ""
        print(f"  {describe(spec):<36} {key:<22} {stored / 1e6:8.2f} {level1.nbytes / stored:6.2f} "
              f"{t_write:8.3f} {t_read:7.3f}")
    shutil.rmtree(runs / "codec.zarr", ignore_errors=True)
    real_codecs(specs, runs, repeat)


def real_volumes() -> list[tuple[str, np.ndarray]]:
    """The 3-D volumes of at least 100k voxels shipped with nilearn and dipy (real scans and templates)."""
    import dipy
    import nilearn

    found = sorted(Path(nilearn.__file__).parent.glob("datasets/data/**/*.nii.gz")) + \
        sorted(Path(dipy.__file__).parent.glob("data/files/*.nii.gz"))
    volumes = [(path.name, np.ascontiguousarray(np.asanyarray(nib.load(path).dataobj))) for path in found]
    return [(name, data) for name, data in volumes if data.ndim == 3 and data.size >= 100_000]


def real_codecs(specs: list[dict[str, Any]], runs: Path, repeat: int) -> None:
    """The same codecs on real volumes nobody here made: the synthetic volume's noise is not an MRI's."""
    volumes = real_volumes()
    total = sum(data.nbytes for _, data in volumes)
    print(f"\ncodecs on {len(volumes)} real volumes from nilearn and dipy ({total / 1e6:.1f} MB: "
          f"{', '.join(name for name, _ in volumes)}), same arrays, best of {repeat}")
    print(f"  {'codec':<36} {'MB':>8} {'ratio':>6} {'write s':>8}")
    for spec in specs:
        stored, seconds = 0, 0.0
        for _, data in volumes:
            path = runs / "codec.zarr"
            t_write, _ = best_of(lambda: write_array(path, data, spec), repeat)
            stored, seconds = stored + folder_bytes(path), seconds + t_write
        print(f"  {describe(spec):<36} {stored / 1e6:8.2f} {total / stored:6.2f} {seconds:8.3f}")
    shutil.rmtree(runs / "codec.zarr", ignore_errors=True)


def downsample_all(volume: np.ndarray, count: int) -> list[np.ndarray]:
    """Levels 1..``count`` of a (z, y, x) volume by ``mean``, through the builder's own per-plane cascade
    (:func:`plane_stream` feeding each level's planes to the next), in this one thread, with no I/O."""
    dtype = volume.dtype.newbyteorder("=")
    depths = [volume.shape[0]]
    for _ in range(count - 1):
        depths.append(halved(depths[-1:])[0])
    planes: list[list[np.ndarray]] = [[] for _ in range(count)]
    feed: Callable[[int, np.ndarray], None] | None = None
    for k in reversed(range(count)):
        def emit(j: int, plane: np.ndarray, k: int = k, downstream: Any = feed) -> None:
            planes[k].append(plane)
            if downstream is not None:
                downstream(j, plane)
        feed = plane_stream("mean", dtype, depths[k], emit)
    assert feed is not None
    for z in range(volume.shape[0]):
        feed(z, volume[z])
    return [np.stack(level) for level in planes]


def stages(scanned: Path, manifest: Path, pyramid: Pyramid, runs: Path, repeat: int) -> dict[str, float]:
    """The pipeline's three stages timed apart, beside the pipelined build in this same process."""
    group = virtnii.open(str(manifest))[pyramid.name]
    t_read, level0 = best_of(lambda: virtnii.open(str(manifest))[pyramid.name]["0"][...], repeat)
    t_down, levels = best_of(lambda: downsample_all(level0, pyramid.levels), repeat)
    for k, level in enumerate(levels, start=1):
        if not np.array_equal(level, group[str(k)][...]):
            raise SystemExit(f"level {k} downsampled here differs from the one virtnii pyramid wrote")

    def write() -> None:
        for k, level in enumerate(levels, start=1):
            write_array(runs / "stage-write.zarr" / str(k), level, CODECS[DEFAULT_CODEC])

    t_write, _ = best_of(write, repeat)
    shutil.rmtree(runs / "stage-write.zarr", ignore_errors=True)
    del level0, levels
    t_pipe = float("inf")
    for _ in range(repeat):
        shutil.rmtree(runs / "in-process", ignore_errors=True)
        shutil.copytree(scanned, runs / "in-process")
        start = time.perf_counter()
        build_pyramids(str(runs / "in-process"))
        t_pipe = min(t_pipe, time.perf_counter() - start)
    shutil.rmtree(runs / "in-process")
    return {"read": t_read, "downsample": t_down, "write": t_write, "pipelined": t_pipe}


# ----------------------------------------------------------------------------------------------- reporting

def ratio(label: str, a: float | None, b: float | None, limit: float | None = None, strict: bool = False,
          shown: str | None = None) -> Row:
    """``a / b`` against ``<= limit`` (``< limit`` if ``strict``); None where a side was not measured."""
    if a is None or not b:
        return Row(label, None, shown or (None if limit is None else f"{'<' if strict else '<='} {limit:g}"))
    value = a / b
    if limit is None:
        return Row(label, value)
    return Row(label, value, shown or f"{'<' if strict else '<='} {limit:g}",
                 value < limit if strict else value <= limit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="400x350x320 (90 MB): a quick check that all runs")
    size.add_argument("--full", action="store_true", help="1600x1400x640 (2.9 GB) instead of 800x700x640 (717 MB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement, median kept (default 3)")
    parser.add_argument("--alternatives-repeat", type=int, default=1,
                        help="runs of nii2zarr and ngff-zarr, which take long and gigabytes (default 1)")
    parser.add_argument("--skip-niizarr", action="store_true", help="do not run nifti-zarr's nii2zarr")
    parser.add_argument("--skip-ngff", action="store_true", help="do not run (nor install) ngff-zarr")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where inputs are generated and kept")
    args = parser.parse_args(argv)
    shape = SHAPES["small" if args.small else "full" if args.full else "default"]
    nx, ny, nz = shape
    half = (nx, ny, nz // 2)
    level0_bytes = nx * ny * nz * 2
    folder = args.dir.resolve()
    runs = folder / RUN
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (other work on the machine inflates "
          f"every timing); volume {nx}x{ny}x{nz} int16 ({level0_bytes / 1e6:.0f} MB), half-depth {nx}x{ny}x{nz // 2}; "
          f".nii.gz written by {GZIP_WRITER}")
    print(f"\ninputs ({rel(folder, Path.cwd())})")
    gz, nii = generate(folder, shape, plain=True)
    half_gz, _ = generate(folder, half, plain=False)
    assert nii is not None
    print(f"  {gz.name}: {gz.stat().st_size / 1e6:.0f} MB ({level0_bytes / gz.stat().st_size:.2f}:1), "
          f"{nii.name}: {nii.stat().st_size / 1e6:.0f} MB, {half_gz.name}: {half_gz.stat().st_size / 1e6:.0f} MB")
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir()
    try:
        for path in (gz, nii, half_gz):  # every measurement reads from the page cache
            subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
        print(f"\nmeasurements: each command run in {rel(folder, Path.cwd())} as {shlex.join(TIME)} COMMAND "
              f"(peak RSS), wall time by this script's clock around it; median of {args.repeat} unless said; "
              "warm page cache")
        print(f"\n.nii.gz source ({gz.name})")
        gunzip = measure("gzip -dc", to_null("gzip", "-dc", gz.name), folder, args.repeat)
        ours = scan_and_pyramid("gz", gz, folder, runs, args.repeat)

        niizarr = None
        if not args.skip_niizarr:
            print(f"\nnifti-zarr nii2zarr ({gz.name}; gaussian levels, blosc, zarr 3, {CHUNK}-cubed chunks, "
                  f"level 0 copied), {args.alternatives_repeat} run(s)")
            code = f'import niizarr; niizarr.nii2zarr("{gz.name}", "{RUN}/niizarr.zarr")'
            niizarr = alternative("nii2zarr", python(code), runs / "niizarr.zarr", folder, args.alternatives_repeat)
        ngff = None
        if not args.skip_ngff:
            print(f"\nngff-zarr to_multiscales + to_ngff_zarr ({gz.name} loaded by nibabel; default method, "
                  f"{CHUNK}-cubed chunks, level 0 copied), {args.alternatives_repeat} run(s)")
            interpreter = ngff_python(folder)
            if interpreter is not None:
                code = ("import nibabel as nib, numpy as np, ngff_zarr as nz; "
                        f'img = nib.load("{gz.name}"); '
                        'image = nz.to_ngff_image(np.asanyarray(img.dataobj), dims=["x", "y", "z"], '
                        'scale=dict(zip("xyz", map(float, img.header.get_zooms()[:3])))); '
                        f'nz.to_ngff_zarr("{RUN}/ngff.zarr", nz.to_multiscales(image, scale_factors={CHUNK}, '
                        f"chunks={CHUNK}))")
                ngff = alternative("ngff-zarr", python(code, str(interpreter), rel(interpreter, folder)),
                                   runs / "ngff.zarr", folder, args.alternatives_repeat)

        print(f"\n.nii source ({nii.name})")
        cat = measure("cat (read the file once)", to_null("cat", nii.name), folder, args.repeat)
        # mmap=False: nibabel's default memory map would make np.asanyarray return before reading anything
        code = f'import nibabel as nib, numpy as np; np.asanyarray(nib.load("{nii.name}", mmap=False).dataobj)'
        nib_load = measure("nibabel full load", python(code), folder, args.repeat)
        ours_nii = scan_and_pyramid("nii", nii, folder, runs, args.repeat)

        print(f"\nmemory flatness: half the depth ({half_gz.name})")
        ours_half = scan_and_pyramid("half", half_gz, folder, runs, args.repeat)
        if level0_bytes < 2 * READ_AHEAD:
            print(f"    (level 0 fits the builder's read-ahead, {READ_AHEAD >> 20} MiB read while as much is "
                  "downsampled, so memory still grows with the volume here: the ratio means something from the "
                  "default size on)")

        codecs(runs / "gz", ours.name, runs, args.repeat)
        print("\nwhat bounds the time (.nii.gz source)")
        startup = measure("start Python, import virtnii.cli", python("import virtnii.cli"), folder, args.repeat)
        assert startup is not None
        times = stages(runs / "gz.scanned", runs / "gz", ours, runs, args.repeat)
        print(f"  in this process, best of {args.repeat}:")
        for label, key in [("(a) read level 0 via virtnii.open (parallel inflate)", "read"),
                           (f"(b) downsample {ours.levels} levels from memory (plane_stream, 1 thread)",
                            "downsample"),
                           (f"(c) write {ours.levels} levels from memory (zarr, {DEFAULT_CODEC})", "write")]:
            print(f"  {label:<70} {times[key]:7.2f} s  {times[key] / times['pipelined']:5.0%} of pipelined")
        print(f"  {'(a) + (b) + (c)':<70} {times['read'] + times['downsample'] + times['write']:7.2f} s")
        print(f"  {'pipelined: build_pyramids(manifest) in this process':<70} {times['pipelined']:7.2f} s")
        print(f"  {'virtnii pyramid, whole process (median above)':<70} {ours.run.wall:7.2f} s  "
              f"{startup.wall / ours.run.wall:5.0%} of it start + imports")
    finally:
        shutil.rmtree(runs, ignore_errors=True)

    nz_wall, nz_rss, nz_bytes = (None, None, None) if niizarr is None else (niizarr[0].wall, niizarr[0].rss,
                                                                           niizarr[1])
    rows = [
        ratio("bytes written / nii2zarr's", ours.written, nz_bytes, 1 / 5, shown="<= 1/5"),
        ratio("bytes written / level 0 uncompressed", ours.written, level0_bytes, 1 / 7, shown="<= 1/7"),
        ratio("pyramid wall / gzip -dc", ours.run.wall, gunzip.wall if gunzip else None, 1.5),
        ratio("scan + pyramid wall / gzip -dc (a new file, all in)", ours.scan.wall + ours.run.wall,
              gunzip.wall if gunzip else None),
        ratio("pyramid wall / nii2zarr's", ours.run.wall, nz_wall, 0.3),
        ratio("pyramid peak RSS / nii2zarr's", ours.run.rss, nz_rss, 0.1),
        ratio("pyramid peak RSS: 2x nz / half depth", ours.run.rss, ours_half.run.rss, 1.2, strict=True),
        ratio(".nii source: pyramid wall / cat FILE.nii", ours_nii.run.wall, cat.wall if cat else None),
        ratio(".nii source: pyramid wall / nibabel full load", ours_nii.run.wall,
              nib_load.wall if nib_load else None),
    ]
    if ngff is not None:
        rows += [ratio("pyramid wall / ngff-zarr's", ours.run.wall, ngff[0].wall),
                 ratio("pyramid peak RSS / ngff-zarr's", ours.run.rss, ngff[0].rss),
                 ratio("bytes written / ngff-zarr's", ours.written, ngff[1])]
    print_table(rows, "ratio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
