"""Benchmark of ``virtnii index`` on a whole BIDS dataset of small NIfTI files, locally and over S3 with latency.

``virtnii index`` lists a BIDS dataset, reads every NIfTI header, parses the BIDS entities and sidecars, and
writes one manifest of references for all images.  It is compared, in one run, with:

1. the serial loop a user writes today: list, then ``fs.open`` + ``nibabel.Nifti1Header.from_fileobj`` per file
   (:func:`benchkit.serial_headers`; it reads headers only and writes nothing).  Target: >= 10x its files per
   second on S3.
2. bids2table, the BIDS indexer ``virtnii.table`` mirrors: ``bids2table.index_dataset`` (file names only), and
   that plus ``bids2table.load_bids_metadata`` for every image (names and inherited sidecars).  Neither reads a
   NIfTI header, so the ratio shows how close a full index with headers and references comes to a names-only
   one.  It runs in a child process per run (its lru caches would make repeats warm), timed inside the child
   after imports.  On S3 it goes through cloudpathlib (boto3), pointed at the local server by
   ``S3Client(endpoint_url=...)``; cloudpathlib is not a project dependency, so it is installed on first use into
   ``scripts/_data/index/cloudpathlib`` and put on that child's path only.  There its sidecar step makes about a
   dozen serial requests per image (half an hour for 5,000 images at 20 ms), so it is timed on the first
   ``--sidecar-sample`` images (default 200) and scaled to all; the listing step always covers them all.
3. the same job with one worker (``workers=1``) and on a 2-worker ``distributed.LocalCluster`` (``dask=client``;
   the cluster is started once, before any timing).
4. a re-run with nothing changed (resumable: it should cost a listing plus a comparison), as a ratio to the
   first run and to a bare listing of the dataset (``fs.find(root, detail=True)``).

Then a manifest of ``--manifest-count`` tiny images (default 10,000; 1,000 with ``--small``) is queried: ``virtnii.table``, one
``virtnii.find``, ``virtnii.open`` of the root group and listing it, the ``virtnii find`` command as a whole
process, and the manifest's bytes on disk per image.

The dataset (``scripts/_data/index/``, generated once and reused) is a BIDS tree: sub-XXXX/ses-N/{anat,func,
dwi,fmap} with nine images per session, ``.nii.gz`` for even subjects and ``.nii`` for odd ones, sidecar JSON at
the dataset root (``task-rest_bold.json``), the subject level and beside files, ``.bval``/``.bvec``, events,
sessions and scans tables, ``participants.tsv`` and ``dataset_description.json``.  Images are 20-60 KB
uncompressed (``--small``: 8x8x8 voxels, a quick check that everything runs), so per-file latency, not
bandwidth, decides.
S3 is the local moto server of ``tests/conftest.py`` in another process, with a sleep per request standing in
for the round trip to a region, and the request and byte counts of each side.  Everything runs warm (page cache).

Each measurement is the median of ``--repeat`` runs, except the serial sides on S3 (the nibabel loop and
bids2table), which take minutes each at 50 ms and run ``--baseline-repeat`` times (default once); the run
counts are printed.  The closing table gives every ratio and marks the targets met or not: it reports, it does
not assert.

Run: ``python scripts/bench_index.py [--count 5000] [--latency-ms 20 50] [--no-s3] [--repeat 3] [--small]``
(``--help`` for the rest: ``--baseline-repeat``, ``--sidecar-sample``, ``--manifest-count``, ``--dir``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import nibabel as nib
import numpy as np

import virtnii
from benchkit import Row, phantom, print_table, scanner_image, serial_headers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import LocalS3, clear_fsspec_caches, running_s3  # noqa: E402  (the tests' S3 server)

DATA = Path(__file__).parent / "_data" / "index"
CLOUDPATHLIB = DATA / "cloudpathlib"  # pip --target folder, on the bids2table child's path only
RUN = "run"  # folder (inside the data folder) of this run's manifests, deleted at its end; inputs stay
TARGET_S3 = 10.0
LAYOUT = "bids-v1"  # bump when the generated tree changes, so that cached trees are rewritten


# ------------------------------------------------------------------------------------------------- the data

@dataclass(frozen=True)
class Kind:
    """One image of each session: its folder and name after ``sub-X_ses-Y_``, voxels, and what lies beside it."""

    datatype: str
    name: str
    shape: tuple[int, ...]
    dtype: str
    zooms: tuple[float, ...]
    sidecar: dict[str, Any] | None = None  # file-level JSON, if any
    beside: tuple[str, ...] = ()  # other files of the same stem: .bval, .bvec, _events.tsv


KINDS = [
    Kind("anat", "T1w", (32, 32, 24), "<i2", (8.0, 8.0, 8.0), {"RepetitionTime": 2.3, "InversionTime": 0.9}),
    Kind("anat", "T2w", (32, 32, 24), "<i2", (8.0, 8.0, 8.0), {"RepetitionTime": 3.2, "EchoTime": 0.565}),
    Kind("func", "task-rest_run-1_bold", (16, 16, 12, 10), "<i2", (12.0, 12.0, 12.0, 2.0)),
    Kind("func", "task-rest_run-2_bold", (16, 16, 12, 10), "<i2", (12.0, 12.0, 12.0, 2.0)),
    Kind("func", "task-motor_bold", (16, 16, 12, 10), "<i2", (12.0, 12.0, 12.0, 1.5), {"EchoTime": 0.03},
         ("_events.tsv",)),
    Kind("dwi", "dwi", (16, 16, 12, 7), "<i2", (12.0, 12.0, 12.0, 1.0), {"PhaseEncodingDirection": "j-"},
         (".bval", ".bvec")),
    Kind("fmap", "magnitude1", (24, 24, 16), "<i2", (8.0, 8.0, 8.0)),
    Kind("fmap", "magnitude2", (24, 24, 16), "<i2", (8.0, 8.0, 8.0)),
    Kind("fmap", "phasediff", (24, 24, 16), "<i2", (8.0, 8.0, 8.0), {"EchoTime1": 0.00492, "EchoTime2": 0.00738}),
]
SESSIONS = 2
ROOT_SIDECARS = {
    "task-rest_bold.json": {"TaskName": "rest", "RepetitionTime": 2.0, "SliceEncodingDirection": "k"},
    "task-motor_bold.json": {"TaskName": "motor", "RepetitionTime": 1.5},
    "participants.json": {"age": {"Description": "age in years"}, "sex": {"Levels": {"F": "female", "M": "male"}}},
}


def tiny(kind: Kind) -> Kind:
    """``kind`` with 8x8x8 voxels (4 volumes if 4-D): ``--small`` and the manifest of many images."""
    return Kind(kind.datatype, kind.name, (8, 8, 8, 4)[:len(kind.shape)], kind.dtype, kind.zooms, kind.sidecar,
                kind.beside)


def write_json(path: Path, document: Any) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n")


def generate(folder: Path, count: int, small: bool) -> int:
    """Write a BIDS dataset of ``count`` NIfTI images under ``folder`` (reused when already there, checked by a
    marker naming the layout and count); returns the number of files of every kind in it."""
    done = folder / ".complete"
    stamp = f"{LAYOUT} {count} {'small' if small else 'default'}"
    if done.exists() and done.read_text() == stamp:
        return sum(1 for p in folder.rglob("*") if p.is_file() and p != done)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    kinds = [tiny(k) for k in KINDS] if small else KINDS
    rng = np.random.default_rng(0)
    bases = {kind.name: phantom(kind.shape, kind.dtype, rng) for kind in kinds}
    per_subject = SESSIONS * len(kinds)
    subjects = -(-count // per_subject)
    write_json(folder / "dataset_description.json",
               {"Name": "virtnii bench_index", "BIDSVersion": "1.9.0", "DatasetType": "raw"})
    (folder / "README").write_text("Synthetic dataset of scripts/bench_index.py.\n")
    (folder / "participants.tsv").write_text("participant_id\tage\tsex\n" + "".join(
        f"sub-{s:04d}\t{20 + s % 50}\t{'FM'[s % 2]}\n" for s in range(1, subjects + 1)))
    for name, document in ROOT_SIDECARS.items():
        write_json(folder / name, document)
    for i in range(count):
        s, rest = divmod(i, per_subject)
        session, kind = divmod(rest, len(kinds))
        sub, ses = f"sub-{s + 1:04d}", f"ses-{session + 1}"
        subject_dir = folder / sub
        if rest == 0:  # first image of a subject: its subject-level files
            subject_dir.mkdir()
            (subject_dir / f"{sub}_sessions.tsv").write_text(
                "session_id\tacq_time\n" + "".join(f"ses-{n + 1}\t2020-01-0{n + 1}T09:00:00\n"
                                                     for n in range(SESSIONS)))
            write_json(subject_dir / f"{sub}_task-rest_bold.json",  # overrides the root's for this subject
                       {"PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.05})
        k = kinds[kind]
        stem = subject_dir / ses / k.datatype / f"{sub}_{ses}_{k.name}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        data = bases[k.name].copy()
        data.flat[i % data.size] += 1  # files differ, so ETags differ as on a real bucket
        extension = ".nii.gz" if s % 2 == 0 else ".nii"
        nib.save(scanner_image(data, k.zooms, b"virtnii bench_index"), f"{stem}{extension}")
        if k.sidecar is not None:
            write_json(Path(f"{stem}.json"), k.sidecar)
        for beside in k.beside:
            Path(f"{stem}{beside}").write_text(BESIDE[beside])
        if kind == len(kinds) - 1:  # last image of a session: its scans table
            scans = sorted(p.relative_to(subject_dir / ses) for p in (subject_dir / ses).rglob("*.nii*"))
            (subject_dir / ses / f"{sub}_{ses}_scans.tsv").write_text(
                "filename\tacq_time\n" + "".join(f"{p}\t2020-01-01T09:00:00\n" for p in scans))
    done.write_text(stamp)
    return sum(1 for p in folder.rglob("*") if p.is_file() and p != done)


BESIDE = {
    ".bval": "0 1000 1000 1000 1000 1000 1000\n",
    ".bvec": "0 1 0 0 0.7 0.7 0\n0 0 1 0 0.7 0 0.7\n0 0 0 1 0 0.7 0.7\n",
    "_events.tsv": "onset\tduration\ttrial_type\n0\t10\ttap\n20\t10\trest\n",
}


def folder_bytes(path: Path) -> tuple[int, int]:
    """Apparent bytes of every file under ``path``, and the bytes allocated for them on disk (whole blocks)."""
    stats = [f.stat() for f in path.rglob("*") if f.is_file()]
    return sum(s.st_size for s in stats), sum(s.st_blocks * 512 for s in stats)


# ------------------------------------------------------------------------------------------- virtnii's side

def index(root: str, out: Path, storage_options: dict[str, Any] | None = None, **options: Any) -> Any:
    """``virtnii.index`` of ``root`` into ``out`` (skipped files are printed); its result."""
    result = virtnii.index(root, str(out), storage_options=storage_options, **options)
    if result.skipped:
        print(f"    virtnii.index skipped {len(result.skipped)} files, e.g. {result.skipped[0]}")
    return result


def manifest_queries(out: Path, subject: str) -> dict[str, Callable[[], int]]:
    """The queries timed on a built manifest, by label; each returns how many things it found."""
    return {
        "virtnii.table(out)": lambda: len(virtnii.table(str(out))),
        f"virtnii.find(out, sub={subject!r}, suffix='T1w')":
            lambda: len(virtnii.find(str(out), sub=subject, suffix="T1w")),
        "virtnii.open(out) + list the root group (subjects)": lambda: len(list(virtnii.open(str(out)).keys())),
        "virtnii.open(out) + every image group (members)": lambda: every_image(out),
    }


def every_image(out: Path) -> int:
    """Open the manifest and walk its whole group tree as a user listing it would
    (``members(max_depth=None)``); the number of image groups (those holding a ``nifti`` array)."""
    return sum(1 for name, node in virtnii.open(str(out)).members(max_depth=None) if name.endswith("/nifti"))


def find_command(out: Path, subject: str) -> int:
    """``virtnii find OUT sub=… suffix=T1w`` as a user runs it, a whole process; the names it printed."""
    virtnii_cli = Path(sys.executable).parent / "virtnii"
    done = subprocess.run([str(virtnii_cli), "find", str(out), f"sub={subject}", "suffix=T1w"],
                          capture_output=True, text=True, check=True)
    return len(done.stdout.split())


@contextmanager
def local_cluster(workers: int) -> Iterator[Any]:
    """A ``distributed.Client`` on a LocalCluster of ``workers`` processes of one thread (no dashboard: the
    lead's tests may hold its port), closed at the end."""
    from distributed import Client, LocalCluster

    start = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        print(f"  started a {workers}-worker distributed.LocalCluster in {time.perf_counter() - start:.1f} s "
              "(not timed below)")
        yield client


# ---------------------------------------------------------------------------------------------- bids2table

#: The bids2table child: ``python -c BIDS2TABLE_CHILD ROOT SAMPLE [ENDPOINT]`` prints one JSON line of timings.
#: Sidecars are loaded for the first SAMPLE images only (0: all), and that time scaled to all images: over S3
#: bids2table makes about a dozen serial requests per image for them (~0.37 s per image at 20 ms).
BIDS2TABLE_CHILD = r"""
import json, os, pathlib, sys, time
import bids2table
root, sample, endpoint = sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None
if endpoint:
    from cloudpathlib import S3Client  # bids2table set an anonymous S3Client as default on import: replace it
    client = S3Client(endpoint_url=endpoint, aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"])
    client.set_as_default_client()
    root = client.CloudPath(root)
else:
    root = pathlib.Path(root)
import pyarrow  # warm-up, untimed, as in the parent where virtnii has run: schema load, pyarrow's pandas import
pyarrow.Table.from_pylist([], schema=bids2table.get_arrow_schema())
start = time.perf_counter()
table = bids2table.index_dataset(root)
names = time.perf_counter() - start
images = [p for p in table.column("path").to_pylist() if p.endswith((".nii", ".nii.gz"))]
sampled = images[:sample] if sample else images
start = time.perf_counter()
metadata = [bids2table.load_bids_metadata(root / p) for p in sampled]
sidecars = (time.perf_counter() - start) * len(images) / max(len(sampled), 1)
print(json.dumps({"names": names, "total": names + sidecars, "rows": table.num_rows, "images": len(images),
                  "sampled": len(sampled), "with_metadata": sum(1 for m in metadata if m)}))
"""


def cloudpathlib_path() -> tuple[Path | None, str]:
    """The folder holding cloudpathlib for the bids2table child (installed there on first use), or None and why
    not."""
    if (CLOUDPATHLIB / "cloudpathlib").is_dir():
        return CLOUDPATHLIB, ""
    command = [sys.executable, "-m", "pip", "install", "-q", "--target", str(CLOUDPATHLIB), "--no-deps",
               "cloudpathlib>=0.18"]  # its S3 extra is boto3, which moto already brought
    print(f"  installing cloudpathlib for bids2table on S3: pip install --target {rel(CLOUDPATHLIB)} --no-deps "
          "cloudpathlib")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        return None, f"pip install cloudpathlib failed: {(done.stderr or done.stdout).strip().splitlines()[-1]}"
    return CLOUDPATHLIB, ""


@dataclass
class Bids2Table:
    """Median seconds of bids2table's two steps over the runs, or why it could not run."""

    names: float = 0.0
    total: float = 0.0
    runs: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0  # over S3, the last run's (names for all images, sidecars for the sample)
    failure: str = ""


def bids2table_runs(root: str, repeat: int, sample: int = 0, s3: LocalS3 | None = None) -> Bids2Table:
    """``repeat`` runs of :data:`BIDS2TABLE_CHILD` on ``root`` (over ``s3``: through its endpoint, with
    cloudpathlib on the child's path), each in a new process, sidecars loaded for ``sample`` images (0: all)."""
    endpoint = s3.endpoint if s3 is not None else None
    env = dict(os.environ)
    if endpoint:
        folder, why = cloudpathlib_path()
        if folder is None:
            return Bids2Table(failure=why)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")]))
    result = Bids2Table()
    for _ in range(repeat):
        if s3 is not None:
            s3.reset_counters()
        done = subprocess.run([sys.executable, "-c", BIDS2TABLE_CHILD, root, str(sample),
                               *([endpoint] if endpoint else [])], capture_output=True, text=True, env=env)
        if done.returncode:
            lines = done.stderr.strip().splitlines()
            return Bids2Table(failure=f"bids2table failed (exit {done.returncode}): "
                                      + " | ".join(lines[-3:]))
        result.runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        if s3 is not None:
            result.requests = s3.meter().total_requests
    result.names = statistics.median(r["names"] for r in result.runs)
    result.total = statistics.median(r["total"] for r in result.runs)
    return result


# ------------------------------------------------------------------------------------------------ measuring

@dataclass
class Measure:
    """One side: images handled, median wall time of its runs (each run listed), and over S3 the last run's
    requests and response bytes."""

    files: int
    seconds: float
    runs: list[float]
    requests: int = 0
    bytes_out: int = 0

    @property
    def rate(self) -> float:
        return self.files / self.seconds


def measure(label: str, run: Callable[[], int], repeat: int, before: Callable[[], None] = lambda: None,
            s3: LocalS3 | None = None) -> Measure:
    """``run`` ``repeat`` times (``before`` first, untimed, and from cold fsspec caches), printed as one line.

    Over S3 the server's counters are reset before each run, so the counts printed are one run's.
    """
    times: list[float] = []
    files = 0
    for _ in range(repeat):
        before()
        clear_fsspec_caches()
        if s3 is not None:
            s3.reset_counters()
        start = time.perf_counter()
        files = run()
        times.append(time.perf_counter() - start)
    result = Measure(files, statistics.median(times), times)
    if s3 is not None:
        meter = s3.meter()
        result.requests, result.bytes_out = meter.total_requests, meter.bytes_out
    show(label, result)
    return result


def show(label: str, m: Measure) -> None:
    each = f"  (median of {len(m.runs)}: {', '.join(f'{t:.2f}' for t in m.runs)} s)" if len(m.runs) > 1 else \
        "  (1 run)"
    traffic = f"  {m.requests:6d} requests ({m.requests / m.files:4.2f}/file), " \
              f"{m.bytes_out / m.files / 1024:6.1f} KiB/file" if m.requests else ""
    print(f"    {label:<52} {m.seconds:8.2f} s {m.rate:9.1f} files/s{traffic}{each}")


def fetch_plain(fs: fsspec.AbstractFileSystem, root: str) -> int:
    """Fetch what an index must read and nothing more (each ``.nii`` header's 352 bytes, each ``.nii.gz`` whole,
    each JSON sidecar) with one fsspec ``cat_ranges``, 64 at a time, doing nothing with it: what a plain
    concurrent client pays this server for the same requests.  On the local emulator each request costs it
    CPU on the same two cores as the client (a real S3 takes none of the client's), which this shows; it is
    not a strict floor (fsspec runs the requests in rounds of 64, where virtnii keeps more in flight)."""
    listing = fs.find(root, detail=True)
    paths = sorted(p for p in listing if p.endswith((".nii", ".nii.gz", ".json")))
    ends = [352 if p.endswith(".nii") else int(listing[p]["size"]) for p in paths]
    fs.cat_ranges(paths, [0] * len(paths), ends, batch_size=64)
    return sum(1 for p in paths if not p.endswith(".json"))


def list_images(fs: fsspec.AbstractFileSystem, root: str) -> int:
    """List the dataset with sizes and ETags/mtimes, the least a re-run must do to see that nothing changed;
    the number of NIfTI files in it."""
    return sum(1 for path in fs.find(root, detail=True) if path.endswith((".nii", ".nii.gz")))


@dataclass
class Location:
    """What was measured on one side of the network (local disk, or S3 at one latency)."""

    name: str
    serial: Measure
    ours: Measure
    one_worker: Measure
    dask: Measure
    resume: Measure
    listing: Measure
    b2t: Bids2Table
    plain: Measure | None


def compare(name: str, root: str, fs: Callable[[], fsspec.AbstractFileSystem], images: int, work: Path,
            client: Any, repeat: int, baseline_repeat: int, sidecar_sample: int = 0,
            s3: LocalS3 | None = None) -> Location:
    """Every side on one dataset location (``root`` through filesystems made by ``fs``)."""
    print(f"\n{name}: {images} images")
    options = s3.storage_options if s3 is not None else None
    out = work / name.split()[0].lower()

    def fresh() -> None:
        shutil.rmtree(out, ignore_errors=True)

    reports: list[Any] = []  # of every virtnii.index run here, the last one last

    def indexed(**kw: Any) -> int:
        result = index(root, out, options, **kw)
        reports.append(result.report)
        return len(result.images)

    serial = measure("serial fs.open + nibabel header, per file", lambda: serial_headers(fs(), root),
                     baseline_repeat if s3 is not None else repeat, s3=s3)
    b2t = bids2table_runs(root, baseline_repeat if s3 is not None else repeat, sidecar_sample if s3 else 0, s3)
    if b2t.failure:
        print(f"    bids2table: not measured: {b2t.failure}")
    else:
        show("bids2table.index_dataset (names only)", Measure(images, b2t.names, [r["names"] for r in b2t.runs]))
        show("bids2table index + load_bids_metadata (sidecars)",
             Measure(images, b2t.total, [r["total"] for r in b2t.runs]))
        last = b2t.runs[-1]
        sampled = "" if last["sampled"] == last["images"] else \
            f", sidecars of the first {last['sampled']} timed and scaled to all"
        traffic = f", {b2t.requests} requests" if b2t.requests else ""
        print(f"      ({last['rows']} rows, {last['images']} images{sampled}: {last['with_metadata']} of them with "
              f"sidecar metadata{traffic})")
    ours = measure("virtnii.index (default workers)", indexed, repeat, fresh, s3)
    one = measure("virtnii.index(workers=1)", lambda: indexed(workers=1), repeat, fresh, s3)
    dask = measure("virtnii.index(dask=LocalCluster of 2)", lambda: indexed(dask=client), repeat, fresh, s3)
    resume = measure("virtnii.index again, nothing changed (resume)", indexed, repeat, s3=s3)
    print(f"      (the last re-run read {reports[-1].indexed} images, took {reports[-1].reused} unchanged)")
    listing = measure("fs.find(root, detail=True) (a bare listing)", lambda: list_images(fs(), root), repeat,
                      s3=s3)
    plain = None if s3 is None else measure("the same bytes by fs.cat_ranges, 64 at a time, no work",
                                            lambda: fetch_plain(fs(), root), repeat, s3=s3)
    for m in (ours, one, dask, resume):
        if m.files != images:
            print(f"    note: an index found {m.files} images, the dataset has {images}")
    return Location(name, serial, ours, one, dask, resume, listing, b2t, plain)


@dataclass
class Manifest:
    """The queries on a manifest of many images: median seconds by label, and bytes on disk."""

    images: int
    build: float
    seconds: dict[str, float]
    apparent: int
    allocated: int


def median_of(query: Callable[[], int], repeat: int) -> tuple[float, list[float], int]:
    """Median seconds of ``repeat`` runs of ``query``, each from cold fsspec caches (as a new process would open
    the manifest, less its imports), every run's seconds, and what the last run found."""
    times, found = [], 0
    for _ in range(repeat):
        clear_fsspec_caches()
        start = time.perf_counter()
        found = query()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, found


def manifest_benchmark(folder: Path, count: int, work: Path, repeat: int) -> Manifest:
    """Index a tree of ``count`` tiny images once, then time the queries on its manifest."""
    print(f"\nmanifest of {count} images ({rel(folder)}, 8x8x8 voxels)")
    t0 = time.perf_counter()
    files = generate(folder, count, small=True)
    print(f"  {files} files, ready in {time.perf_counter() - t0:.1f} s")
    out = work / "manifest"
    start = time.perf_counter()
    images = len(index(str(folder), out).images)
    build = time.perf_counter() - start
    print(f"  virtnii.index: {images} images in {build:.1f} s (1 run)")
    seconds = {}
    print("  each query once untimed first (imports: pandas for table), then timed from cold fsspec caches")
    for label, query in manifest_queries(out, "0002").items():
        query()
        t, times, found = median_of(query, repeat)
        seconds[label] = t
        print(f"    {label:<52} {t:8.3f} s  ({found} found; median of {len(times)})")
    label = "`virtnii find OUT sub=0002 suffix=T1w` (process)"
    t, times, found = median_of(lambda: find_command(out, "0002"), repeat)
    seconds[label] = t
    print(f"    {label:<52} {t:8.3f} s  ({found} printed; median of {len(times)})")
    apparent, allocated = folder_bytes(out)
    print(f"  on disk: {apparent / 2**20:.1f} MiB ({apparent / images:.0f} B/image), "
          f"{allocated / 2**20:.1f} MiB allocated in blocks ({allocated / images:.0f} B/image)")
    return Manifest(images, build, seconds, apparent, allocated)


# ----------------------------------------------------------------------------------------------- reporting

def speedup(label: str, ours: Measure | float | None, theirs: Measure | float | None,
            at_least: float | None = None) -> Row:
    """How many times faster ``ours`` is than ``theirs`` (seconds or Measures of the same images), against
    ``>= at_least``; None where a side was not measured."""
    a = ours.seconds if isinstance(ours, Measure) else ours
    b = theirs.seconds if isinstance(theirs, Measure) else theirs
    if not a or not b:
        return Row(label, None, None if at_least is None else f">= {at_least:g}")
    value = b / a
    if at_least is None:
        return Row(label, value)
    return Row(label, value, f">= {at_least:g}", value >= at_least)


def location_rows(where: Location, target: float | None) -> list[Row]:
    tag = where.name.split(" (")[0]
    return [
        speedup(f"{tag}: virtnii.index vs serial nibabel, x", where.ours, where.serial, target),
        speedup(f"{tag}: virtnii.index vs bids2table names only, x", where.ours, where.b2t.names),
        speedup(f"{tag}: virtnii.index vs bids2table + sidecars, x", where.ours, where.b2t.total),
        speedup(f"{tag}: virtnii.index vs workers=1, x", where.ours, where.one_worker),
        speedup(f"{tag}: dask LocalCluster(2) vs virtnii.index, x", where.dask, where.ours),
        *([Row(f"{tag}: virtnii.index / cat_ranges of the same bytes (no work)",
                where.ours.seconds / where.plain.seconds),
           speedup(f"{tag}: cat_ranges of the same bytes vs serial nibabel, x", where.plain, where.serial)]
          if where.plain else []),
        Row(f"{tag}: resume / first run", where.resume.seconds / where.ours.seconds),
        Row(f"{tag}: resume / bare listing", where.resume.seconds / where.listing.seconds),
    ]


def rel(path: Path) -> str:
    """``path`` as printed: relative to the current folder (messages name no machine's folders)."""
    return os.path.relpath(path)


def dataset_comparisons(args: argparse.Namespace, dataset: Path, work: Path) -> list[Row]:
    """Every side on the BIDS dataset, locally and over S3 at each latency: the closing table's rows."""
    t0 = time.perf_counter()
    files = generate(dataset, args.count, args.small)
    nifti = sorted(p for p in dataset.rglob("*.nii*"))
    size = sum(p.stat().st_size for p in nifti)
    print(f"dataset {rel(dataset)}: {len(nifti)} images ({size / 2**20:.0f} MiB, "
          f"{sum(p.name.endswith('.gz') for p in nifti)} .nii.gz), {files} files in all, ready in "
          f"{time.perf_counter() - t0:.1f} s")
    with ExitStack() as stack:
        # the server first: the cluster's worker processes inherit its (offline, fake-credential) environment
        s3 = None if args.no_s3 else stack.enter_context(running_s3(separate_process=True))
        client = stack.enter_context(local_cluster(2))
        local = compare("local disk (warm page cache)", str(dataset), lambda: fsspec.filesystem("file"),
                        len(nifti), work, client, args.repeat, args.baseline_repeat)
        rows = location_rows(local, None)
        if s3 is not None:
            bucket = s3.create_bucket("bench")
            start = time.perf_counter()
            s3.filesystem().put(str(dataset) + "/", f"{bucket}/ds/", recursive=True)
            print(f"\nuploaded to the local S3 server in {time.perf_counter() - start:.1f} s")
            for latency in args.latency_ms:
                with s3.latency(latency / 1000):
                    where = compare(f"S3 {latency:g} ms (local moto server in another process)",
                                    f"s3://{bucket}/ds", s3.filesystem, len(nifti), work, client,
                                    args.repeat, args.baseline_repeat, args.sidecar_sample, s3)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="NIfTI images in the dataset (default 5000)")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[20.0, 50.0],
                        help="simulated S3 round trip(s), one S3 comparison each (default 20 50)")
    parser.add_argument("--no-s3", action="store_true", help="local comparison only")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement, median kept (default 3)")
    parser.add_argument("--baseline-repeat", type=int, default=1,
                        help="runs of the serial sides over S3, minutes each (default 1)")
    parser.add_argument("--sidecar-sample", type=int, default=200,
                        help="over S3, bids2table loads sidecars for this many images, timed and scaled to all "
                             "(0: all; default 200)")
    parser.add_argument("--manifest-count", type=int,
                        help="images in the queried manifest (default 10000; 1000 with --small)")
    parser.add_argument("--small", action="store_true", help="8x8x8 images and a manifest of 1000: a quick check")
    parser.add_argument("--only", choices=["manifest"],
                        help="run one part alone: 'manifest', the queries on a manifest of many images")
    parser.add_argument("--dir", type=Path, default=DATA, help=f"where inputs are generated and kept "
                                                               f"(default {rel(DATA)})")
    args = parser.parse_args(argv)
    manifest_count = args.manifest_count or (1000 if args.small else 10_000)
    folder = args.dir.resolve()
    dataset = folder / f"bids-{args.count}{'-small' if args.small else ''}"
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} (other work on the machine inflates "
          "every timing)")
    work = folder / RUN
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows: list[Row] = []
    try:
        if args.only != "manifest":
            rows += dataset_comparisons(args, dataset, work)
        manifest = manifest_benchmark(folder / f"manifest-{manifest_count}", manifest_count, work, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tag = f"manifest of {manifest.images}"
    rows += [Row(f"{tag}: virtnii.index, images/s", manifest.images / manifest.build)]
    rows += [Row(f"{tag}: {label}, s", seconds) for label, seconds in manifest.seconds.items()]
    rows += [Row(f"{tag}: bytes on disk per image", manifest.apparent / manifest.images),
             Row(f"{tag}: bytes allocated per image (blocks)", manifest.allocated / manifest.images)]
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
