"""What the benchmark scripts share: the synthetic MRI volumes and small NIfTI images they write, the serial
nibabel loop they compare against, best-of-N / median-of-N timing, and the closing table of ratios."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import fsspec
import nibabel as nib
import numpy as np

T = TypeVar("T")


def mri_slab(shape: tuple[int, int, int], dtype: str, z0: int, z1: int, rng: np.random.Generator) -> np.ndarray:
    """Voxels of slices [z0, z1) of a ``shape`` (x, y, z) volume, in NIfTI order (x fastest).

    An ellipsoid "head" whose intensity varies smoothly (tissue-like bands times a bias field), a dark
    background, and Gaussian noise of ~2 % everywhere: it compresses about like real structural MRI (roughly
    2:1 for int16), which is what matters for inflate and index timings.  Integer dtypes hold the rounded
    signal, float dtypes the signal / 1000.
    """
    nx, ny, nz = shape
    z = ((np.arange(z0, z1, dtype=np.float32) + 0.5) / nz * 2 - 1)[:, None, None]
    y = ((np.arange(ny, dtype=np.float32) + 0.5) / ny * 2 - 1)[None, :, None]
    x = ((np.arange(nx, dtype=np.float32) + 0.5) / nx * 2 - 1)[None, None, :]
    radius = np.sqrt((x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 0.85) ** 2)
    tissue = 600 + 250 * np.sin(9 * radius + 2 * x * y) + 120 * np.cos(5 * z + 3 * x)
    bias = 1 + 0.2 * (x + 0.5 * y - 0.3 * z)
    signal = np.where(radius < 1, tissue * bias, 0).astype(np.float32)
    data = np.abs(signal + rng.standard_normal(signal.shape, dtype=np.float32) * 20)
    if np.dtype(dtype).kind == "i":
        return np.rint(data).astype(dtype)
    return (data / 1000).astype(dtype)


def phantom(shape: tuple[int, ...], dtype: str, rng: np.random.Generator) -> np.ndarray:
    """A small smooth head-like ellipsoid with a bias field plus noise (4-D: the same volume, slowly drifting
    over time), in the dtype's usual range; ``|u1`` gives the brain mask.  For the thousands of small files of
    the scan and index benchmarks, where per-file cost, not voxel realism, is measured."""
    nx, ny, nz = shape[:3]
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in (nx, ny, nz)), indexing="ij")
    radius = np.sqrt((x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 0.85) ** 2)
    signal = np.where(radius < 1, (600 + 250 * np.sin(9 * radius)) * (1 + 0.2 * x), 0).astype(np.float32)
    if len(shape) == 4:
        signal = signal[..., None] * (1 + 0.01 * np.arange(shape[3], dtype=np.float32))
    data = np.abs(signal + rng.standard_normal(signal.shape, dtype=np.float32) * 20)
    if dtype == "|u1":
        return (radius < 1).astype(np.uint8)
    if dtype == "<f4":
        return (data / 1000).astype(np.float32)
    return np.rint(data).astype(np.dtype(dtype))


#: Slightly oblique, as acquired: a rotation of 7 degrees about x.
_ANGLE = np.deg2rad(7)
_ROTATION = np.array([[1, 0, 0], [0, np.cos(_ANGLE), -np.sin(_ANGLE)], [0, np.sin(_ANGLE), np.cos(_ANGLE)]])


def scanner_image(data: np.ndarray, zooms: tuple[float, ...], descrip: bytes) -> nib.Nifti1Image:
    """``data`` as a NIfTI-1 image with what a scanner export sets: an oblique affine in both qform (code 1)
    and sform (code 2), voxel sizes (with TR for 4-D), mm/s units and a description."""
    affine = np.eye(4)
    affine[:3, :3] = _ROTATION @ np.diag(zooms[:3])
    affine[:3, 3] = [-96.0, -120.0, -70.0]
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms(zooms)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = descrip
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    return img


def serial_headers(fs: fsspec.AbstractFileSystem, root: str) -> int:
    """What a user writes today to read a dataset's headers: list it, then open each NIfTI file and parse its
    header with nibabel, one by one (``.nii.gz`` gunzipped on the fly).  Returns the number of files."""
    paths = [p for p in fs.find(root) if p.endswith((".nii", ".nii.gz"))]
    for path in paths:
        with fs.open(path, compression="infer") as f:
            nib.Nifti1Header.from_fileobj(f)
    return len(paths)


def best_of(func: Callable[[], T], repeat: int) -> tuple[float, T]:
    """Fastest of ``repeat`` runs (the others are noise from the machine, not the code), and the last result.

    Earlier results are dropped before the next run: on a VM, touching never-used memory costs several
    seconds per GB, so keeping every run's gigabyte alive would make each run pay for fresh pages.
    """
    best, result = float("inf"), None
    for _ in range(repeat):
        result = None
        start = time.perf_counter()
        result = func()
        best = min(best, time.perf_counter() - start)
    return best, result  # type: ignore[return-value]  # repeat >= 1


@dataclass(frozen=True)
class Row:
    """One line of a benchmark's closing table: a value, its target (None: reported only) and whether it is met."""

    label: str
    value: float | None
    target: str | None = None
    ok: bool | None = None


def print_table(rows: list[Row], heading: str = "measure") -> None:
    """The closing table: every row's value, target and result (met, NOT met, reported, not measured)."""
    width = max([len(heading), *(len(row.label) for row in rows)])
    print(f"\n{heading:<{width}} {'value':>9}  {'target':<9} result")
    for row in rows:
        value = "n/a" if row.value is None else f"{row.value:9.3f}"
        result = "not measured" if row.value is None else "reported" if row.ok is None else \
            "met" if row.ok else "NOT met"
        print(f"{row.label:<{width}} {value:>9}  {row.target or '-':<9} {result}")
