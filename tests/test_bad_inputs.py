"""The bad-input corpus: every kind of input the hardening work met, through the real command line.

Each case runs ``virtnii scan`` in its own process, bounded in memory (RLIMIT_AS) and time, as a user would meet
it, and must end with the documented exit code, exactly one ``virtnii: error: <source>: <problem>`` line naming
the file (plus the "nothing indexed" summary), no traceback, and nothing left behind: no manifest, no
``OUT.partial-*``.  Several of these once exhausted memory, hung forever or printed a traceback.
"""

from __future__ import annotations

import gzip
import os
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest

from nifti_samples import patch_header, voxels, write_nifti

#: Address space of each scan: far above what any of these inputs needs, far below what their headers claim.
ADDRESS_SPACE = 3 * 2**30
#: Seconds a scan may take before it counts as hung (they take about one, mostly the interpreter starting).
TIMEOUT = 120
NOTHING_INDEXED = "virtnii: nothing indexed, no manifest written"


@dataclass(frozen=True)
class Case:
    """One kind of bad input: ``make(folder)`` writes it and returns the scan's arguments (sources, then any
    options); the run must exit ``code`` with one error line naming ``names`` and saying ``says``."""

    make: Callable[[Path], list[str]]
    code: int
    names: str
    says: str


def _header_only(path: Path, dims: list[int], datatype: int, version: int = 1) -> Path:
    """A header (no voxels) claiming ``dims`` of ``datatype``, gzipped when ``path`` ends in .gz."""
    header = (nib.Nifti2Header if version == 2 else nib.Nifti1Header)()
    header["dim"] = [len(dims)] + dims + [1] * (7 - len(dims))
    header["datatype"] = datatype
    header["vox_offset"] = 544 if version == 2 else 352
    blob = header.binaryblock + b"\0" * 4
    path.write_bytes(gzip.compress(blob) if path.name.endswith(".gz") else blob)
    return path


def _one(make: Callable[[Path], Path]) -> Callable[[Path], list[str]]:
    return lambda folder: [str(make(folder))]


def _good(folder: Path, name: str, **write: object) -> Path:
    return write_nifti(folder / name, voxels((4, 3, 2), "i2"), **write)


def _patched_bytes(name: str, at: int, data: bytes, **write: object) -> Callable[[Path], list[str]]:
    def make(folder: Path) -> list[str]:
        path = _good(folder, name, **write)
        blob = bytearray(path.read_bytes())
        blob[at:at + len(data)] = data
        path.write_bytes(bytes(blob))
        return [str(path)]
    return make


def _fifo(folder: Path) -> list[str]:
    (folder / "d").mkdir()
    os.mkfifo(folder / "d" / "x.nii")
    return [str(folder / "d")]


def _truncated_gzip(folder: Path) -> list[str]:
    path = folder / "cut.nii.gz"
    path.write_bytes(gzip.compress(_good(folder, "src.nii").read_bytes())[:30])
    (folder / "src.nii").unlink()
    return [str(path)]


def _long_path(folder: Path) -> list[str]:
    return [str(folder / ("a" * 300) / "x.nii")]


def _extensionless_page(folder: Path) -> list[str]:
    """What a wrong or expired blob URL serves, saved without a suffix (a DANDI blob is named by its uuid)."""
    (folder / "d86055f6").write_bytes(b"<!DOCTYPE html><html><body>Access denied</body></html>")
    return [str(folder / "d86055f6")]


def _empty_folder(folder: Path) -> list[str]:
    (folder / "no_images").mkdir()
    return [str(folder / "no_images")]


CASES: dict[str, Case] = {
    # headers claiming far more than their file can hold: memory exhausted, hangs, "negative offset" before
    "gzip_claiming_32767^3_int64": Case(_one(lambda f: _header_only(f / "huge.nii.gz", [32767] * 3, 1024)), 2,
                                        "huge.nii.gz", "inflate to at most"),
    "gzip_claiming_5x32767_float64": Case(_one(lambda f: _header_only(f / "five.nii.gz", [32767] * 5, 64)), 2,
                                          "five.nii.gz", "inflate to at most"),
    "nifti2_gzip_dims_2^62": Case(_one(lambda f: _header_only(f / "n2huge.nii.gz", [2**62] * 3, 2, version=2)), 2,
                                  "n2huge.nii.gz", "inflate to at most"),
    "nifti2_gzip_dims_2^40_2^20_8": Case(_one(lambda f: _header_only(f / "n2neg.nii.gz", [2**40, 2**20, 8], 2,
                                                                     version=2)), 2, "n2neg.nii.gz", "inflate to at most"),
    "nii_claiming_32767^3_int64": Case(_one(lambda f: _header_only(f / "huge.nii", [32767] * 3, 1024)), 2,
                                       "huge.nii", "data truncated"),
    # not regular files, and sources that name nothing
    "fifo_in_a_folder": Case(_fifo, 2, "x.nii", "named pipe (FIFO), not a regular file"),
    "s3_root": Case(lambda f: ["s3://", "--anon"], 2, "s3://:", "names no bucket"),
    "empty_folder": Case(_empty_folder, 2, "no_images", "folder holds no NIfTI files"),
    "glob_matching_nothing": Case(lambda f: [str(f / "*.nii")], 2, "*.nii", "pattern matches no NIfTI files"),
    "empty_out": Case(lambda f: [str(_good(f, "a.nii")), "-o", ""], 2, "''", "not a manifest folder name"),
    "truncated_30_byte_gzip": Case(_truncated_gzip, 2, "cut.nii.gz", "truncated: the gzip stream stops"),
    "path_too_long": Case(_long_path, 2, "a" * 300, "File name too long"),
    # files known by their content, and names given on the command line
    "extensionless_html_page": Case(_extensionless_page, 2, "d86055f6", "not a NIfTI file: an HTML/XML document"),
    "name_climbing_out": Case(lambda f: [f"../up=file://{_good(f, 'a.nii')}"], 2, "a.nii", "'.', '..'"),
    # headers nibabel refuses to load (scanned once, they made manifests to_nibabel could not open)
    "magic_n+1A": Case(_patched_bytes("n1a.nii", 344, b"n+1A"), 2, "n1a.nii", "wrong magic"),
    "magic_n+2_in_348_bytes": Case(_patched_bytes("n2.nii", 344, b"n+2\0"), 2, "n2.nii", "wrong magic"),
    "extension_esize_0": Case(_patched_bytes("e0.nii", 352, (0).to_bytes(4, "little"),
                                             extensions=(("comment", b"x" * 20),)), 2, "e0.nii", "has size 0"),
    "extension_esize_negative": Case(_patched_bytes("eneg.nii", 352, (-16).to_bytes(4, "little", signed=True),
                                                    extensions=(("comment", b"x" * 20),)), 2, "eneg.nii",
                                     "has size -16"),
    "extension_esize_7": Case(_patched_bytes("e7.nii", 352, (7).to_bytes(4, "little"),
                                             extensions=(("comment", b"x" * 20),)), 2, "e7.nii", "has size 7"),
    "extension_past_vox_offset": Case(_patched_bytes("efar.nii", 352, (4096).to_bytes(4, "little"),
                                                     extensions=(("comment", b"x" * 20),)), 2, "efar.nii",
                                      "past vox_offset"),
    "nan_intercept": Case(_one(lambda f: patch_header(_good(f, "nan.nii"), scl_slope=2.0, scl_inter=np.nan)), 2,
                          "nan.nii", "cannot be scaled"),
    "denormal_vox_offset": Case(_one(lambda f: patch_header(_good(f, "denormal.nii"), vox_offset=1e-45)), 2,
                                "denormal.nii", "inside the header"),
}


def _limit_memory() -> None:  # runs in the child, before exec
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


@dataclass
class Run:
    code: int
    err: str
    before: list[str]
    after: list[str]


def _run(folder: Path, case: Case) -> Run:
    args = case.make(folder)
    sources, options = (args[:args.index("-o")], args[args.index("-o"):]) if "-o" in args else (args, [])
    options = options or ["-o", str(folder / "out")]
    before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    env = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    try:
        done = subprocess.run([sys.executable, "-m", "virtnii.cli", "scan", *sources, *options, "-q"], cwd=folder,
                              capture_output=True, text=True, timeout=TIMEOUT, preexec_fn=_limit_memory, env=env)
    except subprocess.TimeoutExpired as err:
        return Run(-1, f"hung: no exit within {TIMEOUT} s\n{err.stderr}", before, [])
    after = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    return Run(done.returncode, done.stderr, before, after)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """Every case, two at a time (each run is mostly an interpreter starting)."""
    folders = {name: tmp_path_factory.mktemp(name.replace("^", "_")) for name in CASES}
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(_run, folders[name], case) for name, case in CASES.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line_and_leaves_nothing(runs: dict[str, Run], name: str) -> None:
    case, run = CASES[name], runs[name]
    assert run.code == case.code, run.err
    assert "Traceback" not in run.err
    lines = [line for line in run.err.splitlines() if line != NOTHING_INDEXED]
    assert len(lines) == 1, run.err
    [line] = lines
    assert line.startswith("virtnii: error: ") and case.says in line, line
    assert line.count(case.names) == 1, line  # named, and once (a long path was printed twice)
    assert run.after == run.before  # no manifest, no OUT.partial-*
