"""What the benchmark scripts share: the synthetic MRI volume they write, and best-of-N timing."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

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
