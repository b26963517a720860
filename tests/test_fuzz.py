"""Property-based fuzzing of NIfTI headers: whatever the bytes, a scan ends in a VirtniiError or in a manifest
whose every voxel equals nibabel's — never another exception, never a hang, never unbounded memory.

Headers of real files (nibabel's shipped test data: NIfTI-1 and NIfTI-2, big- and little-endian, 3-D and 4-D,
with and without extensions) are mutated field by field and byte by byte by hypothesis, written as ``.nii``,
``.nii.gz`` or a ``.hdr``/``.img`` pair, scanned, and read back through :func:`virtnii.to_nibabel`.  nibabel is
the oracle: a file virtnii accepts must be one nibabel reads, with equal raw and scaled voxels and affine.  A
refusal is always allowed (virtnii is stricter than nibabel in places, e.g. a ``.nii`` with pair magic); it must
be a :class:`~virtnii.VirtniiError` naming the file.

Examples run in one long-lived worker process (``python test_fuzz.py --worker``, JSON lines on stdin/stdout)
under an address-space limit, and each reply is awaited with a timeout: a header that makes virtnii allocate
terabytes or loop forever fails the example instead of the machine, while the run pays for one interpreter
start, not one per example.  The examples are the same on every run (``derandomize``); set
``VIRTNII_FUZZ_EXAMPLES=N`` to run N fresh random ones instead.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import select
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any, Iterator

#: Examples per run: a few hundred keeps the run under a minute on two cores.
EXAMPLES = int(os.environ.get("VIRTNII_FUZZ_EXAMPLES", "300"))
#: Seconds one example may take in the worker (they take ~0.05 s) before it counts as a hang.
EXAMPLE_TIMEOUT = 30.0
#: Address space of the worker: numpy, zarr and nibabel need ~1.5 GiB of it; a header claiming huge arrays
#: fails an allocation (MemoryError: an example failure) instead of swapping the machine.
WORKER_ADDRESS_SPACE = 3 * 2**30

#: Seed files from nibabel's test data: name -> (file, form it is stored in).
SEED_FILES = {
    "anatomical": "anatomical.nii",           # NIfTI-1, big-endian int16, 3-D
    "functional": "functional.nii",           # NIfTI-1, 4-D, scl_slope/inter
    "example4d": "example4d.nii.gz",          # NIfTI-1, 4-D, extensions
    "nifti2": "example_nifti2.nii.gz",        # NIfTI-2, extensions
    "standard": "standard.nii.gz",            # NIfTI-1, tiny uint8
    "reoriented": "reoriented_anat_moved.nii",  # big-endian float32
}
FORMS = ("nii", "nii.gz", "pair")


# ------------------------------------------------------------------------------------------------ mutations
# A case is JSON: {"seed": name, "form": one of FORMS, "mutations": [[kind, ...], ...]}.  Kinds:
#   ["field", name, index or null, value]  set a header field (an element of an array field) as nibabel stores it
#   ["bytes", offset, [b0, b1, ...]]       overwrite raw bytes of the header block (magic, eol_check, padding)
#   ["int32", offset, value]               an int32 in the header's byte order (extension flag, esize, ecode)
#   ["cut", n]                             drop the file's last n bytes (truncated downloads)


def _case_strategy() -> Any:
    from hypothesis import strategies as st

    finite = st.sampled_from([0.0, 1.0, -1.0, 0.5, 2.5, 1e-45, 1e38, -3.0e6])
    odd_float = st.sampled_from([math.nan, math.inf, -math.inf])
    floats = st.one_of(finite, odd_float)
    small_int = st.sampled_from([-1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 100, 255, 32767, -32768])
    dims = st.sampled_from([-1, 0, 1, 2, 3, 5, 7, 8, 13, 255, 32767, 2**20, 2**31 - 1, 2**40, 2**62])
    codes = st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304,
                             3, 9999, -1])
    offsets = st.sampled_from([0.0, 1e-45, -1.0, 100.0, 348.0, 351.0, 352.0, 353.0, 360.0, 368.0, 544.0, 560.0,
                               1000.0, 352.5, 1e9, 2.0**31, math.nan, math.inf])
    magics = st.sampled_from([b"n+1\0", b"n+1A", b"ni1\0", b"n+2\0", b"ni2\0", b"N+1\0", b"\0\0\0\0", b"n+1 "])
    ext_values = st.sampled_from([0, 1, -1, -16, 7, 8, 15, 16, 24, 32, 48, 100, 2**20, 2**31 - 1])
    field = st.one_of(
        st.tuples(st.just("field"), st.just("dim"), st.integers(0, 7), dims),
        st.tuples(st.just("field"), st.just("datatype"), st.none(), codes),
        st.tuples(st.just("field"), st.just("bitpix"), st.none(), st.sampled_from([0, 1, 7, 8, 16, 32, 64, -8])),
        st.tuples(st.just("field"), st.just("vox_offset"), st.none(), offsets),
        st.tuples(st.just("field"), st.sampled_from(["scl_slope", "scl_inter"]), st.none(), floats),
        st.tuples(st.just("field"), st.just("pixdim"), st.integers(0, 7), floats),
        st.tuples(st.just("field"), st.sampled_from(["qform_code", "sform_code", "intent_code", "xyzt_units",
                                                     "slice_code", "dim_info"]), st.none(), small_int),
        st.tuples(st.just("field"), st.sampled_from(["quatern_b", "quatern_c", "quatern_d", "qoffset_x"]),
                  st.none(), floats),
        st.tuples(st.just("field"), st.sampled_from(["srow_x", "srow_y", "srow_z"]), st.integers(0, 3), floats),
        st.tuples(st.just("magic"), magics),
        st.tuples(st.just("eol_check"), st.sampled_from([b"\r\n\x1a\n", b"\0\0\0\0", b"\n\r\x1a\n"])),
        # relative to the end of the fixed header: 0 the extension flag, 4/8 esize/ecode, 20+ a second extension
        st.tuples(st.just("int32"), st.sampled_from([0, 4, 8, 20, 36, 52]), ext_values),
        st.tuples(st.just("byte"), st.integers(0, 600), st.integers(0, 255)),
        st.tuples(st.just("cut"), st.sampled_from([1, 2, 100, 1000, 10**6])),
    )
    return st.fixed_dictionaries({
        "seed": st.sampled_from(sorted(SEED_FILES)),
        "form": st.sampled_from(FORMS),
        "mutations": st.lists(field, min_size=1, max_size=3),
    })


def _json_case(case: dict[str, Any]) -> dict[str, Any]:
    """The case with bytes as lists of ints: JSON all the way to the worker."""
    def plain(m: tuple[Any, ...]) -> list[Any]:
        return [list(v) if isinstance(v, bytes) else v for v in m]
    return {**case, "mutations": [plain(m) for m in case["mutations"]]}


# ---------------------------------------------------------------------------------------------------- worker

def _seed_blob(name: str) -> bytes:
    """A seed as one uncompressed single file."""
    from nifti_samples import DATA

    blob = (DATA / SEED_FILES[name]).read_bytes()
    return gzip.decompress(blob) if SEED_FILES[name].endswith(".gz") else blob


def _apply(blob: bytes, mutations: list[list[Any]]) -> tuple[bytes, int]:
    """``blob`` with ``mutations`` applied to its header; also the fixed header size of the seed."""
    import nibabel as nib
    import numpy as np

    out = bytearray(blob)
    size = 540 if 540 in (int.from_bytes(blob[:4], "little"), int.from_bytes(blob[:4], "big")) else 348
    order = "<" if int.from_bytes(blob[:4], "little") == size else ">"
    header_class = nib.Nifti2Header if size == 540 else nib.Nifti1Header
    cut = 0
    for kind, *args in mutations:
        if kind == "field":
            name, index, value = args
            header = header_class(bytes(out[:size]), check=False)
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                field = header.structarr[name]
                if index is None:
                    header.structarr[name] = np.asarray(value).astype(field.dtype)
                else:
                    field[index] = np.asarray(value).astype(field.dtype)
            out[:size] = header.binaryblock
        elif kind in ("magic", "eol_check"):
            at = (344 if size == 348 else 4) if kind == "magic" else (8 if size == 540 else 340)
            out[at:at + 4] = bytes(args[0])
        elif kind == "int32":
            at = size + args[0]
            value = args[1]
            if at + 4 > len(out):
                out.extend(bytes(at + 4 - len(out)))
            out[at:at + 4] = int(value).to_bytes(4, "little" if order == "<" else "big", signed=True)
        elif kind == "byte":
            if args[0] < len(out):
                out[args[0]] = args[1]
        elif kind == "cut":
            cut += args[0]
    return bytes(out[:max(len(out) - cut, 0)]), size


def _write_case(case: dict[str, Any], folder: Path) -> Path:
    """The case's file(s) in ``folder``; the path to scan (and load with nibabel)."""
    import nibabel as nib

    seed = _seed_blob(case["seed"])
    if case["form"] != "pair":
        blob, _ = _apply(seed, case["mutations"])
        path = folder / f"case.{case['form']}"
        path.write_bytes(gzip.compress(blob, 1) if case["form"] == "nii.gz" else blob)
        return path
    # a pair nibabel itself would write from the seed: header (with its extensions), then the voxels
    size = 540 if 540 in (int.from_bytes(seed[:4], "little"), int.from_bytes(seed[:4], "big")) else 348
    header_class = nib.Nifti2Header if size == 540 else nib.Nifti1Header
    header = header_class.from_fileobj(io.BytesIO(seed), check=False)
    offset = int(header["vox_offset"])
    pair_header = bytearray(seed[:offset])
    pair_header[344 if size == 348 else 4:(344 if size == 348 else 4) + 3] = b"ni1" if size == 348 else b"ni2"
    pair = header_class(bytes(pair_header[:size]), check=False)
    pair["vox_offset"] = 0
    pair_header[:size] = pair.binaryblock
    hdr, _ = _apply(bytes(pair_header), case["mutations"])
    (folder / "case.hdr").write_bytes(hdr)
    (folder / "case.img").write_bytes(seed[offset:])
    return folder / "case.hdr"


def _nibabel_read(path: Path) -> dict[str, Any]:
    """What nibabel makes of ``path``: raw and scaled voxels and affine, or the exception it raised."""
    import numpy as np
    from nifti_samples import nibabel_image

    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = nibabel_image(path)
            return {"raw": np.asanyarray(image.dataobj.get_unscaled()), "scaled": np.asanyarray(image.dataobj),
                    "affine": image.affine, "shape": image.shape}
    except Exception as err:  # nibabel's refusal, whatever it is: the oracle says "do not accept this"
        return {"error": f"{type(err).__name__}: {err}"}


def _virtnii_read(path: Path, out: Path) -> dict[str, Any]:
    """What virtnii makes of ``path``: its refusal at scan, or what ``to_nibabel`` reads back."""
    import numpy as np
    import virtnii

    result = virtnii.scan([str(path)], str(out))
    if result.failures:
        [error] = result.failures
        return {"refused": f"{type(error).__name__}: {error}", "source": error.source,
                "is_virtnii_error": isinstance(error, virtnii.VirtniiError)}
    group = virtnii.open(str(out))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = virtnii.to_nibabel(group[result.images[0].name])
        return {"raw": np.asanyarray(image.dataobj.get_unscaled()), "scaled": np.asanyarray(image.dataobj),
                "affine": image.affine, "shape": image.shape}


def _same(a: Any, b: Any) -> bool:
    """Bit-equal arrays (NaN equal to NaN), whatever their byte order."""
    from nifti_samples import comparable_bytes
    import numpy as np

    a, b = np.asanyarray(a), np.asanyarray(b)
    if a.shape != b.shape or (a.dtype.kind, a.dtype.itemsize) != (b.dtype.kind, b.dtype.itemsize):
        return False
    return comparable_bytes(a) == comparable_bytes(b)


def run_case(case: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The verdict on one case: ``ok`` (refused, or read back equal to nibabel) or ``bug`` with what went wrong.

    virtnii goes first: only a file it accepted has voxels known to fit in the file, so only then does nibabel
    read them (a header claiming 2**40 voxels would make nibabel allocate them); otherwise nibabel only loads the
    header, to tell refusals nibabel shares from stricter ones.
    """
    import nibabel as nib

    path = _write_case(case, folder)
    try:
        ours = _virtnii_read(path, folder / "out")
    except Exception as err:  # a scan reports bad sources in result.failures; reading an accepted one must work
        return {"verdict": "bug", "why": f"virtnii raised {type(err).__name__}: {err}",
                "traceback": traceback.format_exc(limit=-6)}
    if "refused" in ours:
        if not ours["is_virtnii_error"] or not ours["refused"].split(": ", 1)[1].startswith(ours["source"]):
            return {"verdict": "bug", "why": f"refusal is not a VirtniiError naming the file: {ours['refused']}"}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                nib.load(path)
            nibabel = "loads it"
        except Exception:
            nibabel = "refuses"
        return {"verdict": "ok", "outcome": "refused", "nibabel": nibabel, "refused": ours["refused"]}
    theirs = _nibabel_read(path)
    if "error" in theirs:
        return {"verdict": "bug", "why": f"virtnii accepted what nibabel refuses ({theirs['error']})"}
    for key in ("raw", "scaled", "affine"):
        if not _same(ours[key], theirs[key]):
            return {"verdict": "bug", "why": f"{key} differs from nibabel's"}
    return {"verdict": "ok", "outcome": "read", "nibabel": "reads it"}


def _serve() -> None:
    """Worker: run cases read from stdin (one JSON per line), reply one JSON per line, in constant memory."""
    import logging
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (WORKER_ADDRESS_SPACE, WORKER_ADDRESS_SPACE))
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)  # nibabel logs every header problem it fixes
    for line in sys.stdin:
        with tempfile.TemporaryDirectory(prefix="virtnii-fuzz-") as folder:
            try:
                reply = run_case(json.loads(line), Path(folder))
            except MemoryError:
                reply = {"verdict": "bug", "why": "MemoryError: unbounded allocation",
                         "traceback": traceback.format_exc(limit=-6)}
        print(json.dumps(reply), flush=True)


# ------------------------------------------------------------------------------------------------- the test

class Worker:
    """The worker process, restarted after a hang (a timed-out example leaves it in an unknown state)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None

    def run(self, case: dict[str, Any]) -> dict[str, Any]:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(_json_case(case)) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], EXAMPLE_TIMEOUT)
        reply = self.process.stdout.readline() if ready else ""
        if not reply:
            self.close()
            return {"verdict": "bug", "why": "hang or crash: no reply within the time limit"}
        return json.loads(reply)

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _serve()
else:
    import pytest
    from hypothesis import HealthCheck, given, settings

    @pytest.fixture(scope="module")
    def worker() -> Iterator[Worker]:
        running = Worker()
        yield running
        running.close()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize="VIRTNII_FUZZ_EXAMPLES" not in os.environ,
              database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(case=_case_strategy())
    def test_mutated_header_is_refused_or_read_like_nibabel(worker: Worker, case: dict[str, Any]) -> None:
        reply = worker.run(case)
        assert reply["verdict"] == "ok", json.dumps(reply, indent=1)

    def test_unmutated_seeds_are_read_like_nibabel(worker: Worker) -> None:
        """Guards the fuzzing itself: every seed in every form must be read, or the examples prove nothing."""
        for seed in SEED_FILES:
            for form in FORMS:
                reply = worker.run({"seed": seed, "form": form, "mutations": []})
                assert reply == {"verdict": "ok", "outcome": "read", "nibabel": "reads it"}, (seed, form, reply)
