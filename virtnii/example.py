"""The built-in example: the whole job on NIfTI files shipped inside nibabel, each step checked as it goes.

Scan in place, read every voxel back against nibabel, build the pyramids and check level 1 against a plain numpy
block mean of nibabel's voxels, export every image back out and compare the bytes with the source.  Offline,
a few seconds; ``virtnii example`` runs it, and its exit status says whether every check held.
"""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

from .export import export
from .pyramid import build_pyramids
from .reader import open as open_manifest, to_nibabel
from .scan import ScanResult, scan

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
FILES = ["anatomical.nii", "functional.nii", "example4d.nii.gz", "example_nifti2.nii.gz"]
#: Chunk edge for the example's levels: its files are small, so small chunks give them a few levels each.
CHUNKS = 16


def run(out: str, say: Callable[[str], None] = print) -> tuple[ScanResult, bool]:
    """Run every step into manifest folder ``out``; returns the scan result and whether every check held."""
    sources = [NIBABEL_DATA / name for name in FILES]
    say(f"indexing {len(sources)} NIfTI files shipped with nibabel, in place ({NIBABEL_DATA})")
    result = scan([str(p) for p in sources], out)
    if result.manifest is None:
        return result, False
    by_name = {image.name: NIBABEL_DATA / Path(image.source).name for image in result.images}
    ok = True
    group = open_manifest(out)
    for name, path in by_name.items():
        ours, theirs = to_nibabel(group[name]), nib.load(path)
        same = np.array_equal(np.asarray(ours.dataobj.get_unscaled()), np.asanyarray(theirs.dataobj.get_unscaled()))
        say(f"read back {name}: {ours.shape} {ours.get_data_dtype()} voxels equal nibabel's: {same}; "
            f"affine equal: {np.allclose(ours.affine, theirs.affine)}")
        ok &= same
    pyramids = build_pyramids(out, chunks=CHUNKS)
    ok &= not pyramids.failures
    group = open_manifest(out)
    for entry in pyramids.images:
        level = entry.levels[0]
        expected = _block_mean(_zarr_order(np.asanyarray(nib.load(by_name[entry.name]).dataobj.get_unscaled())))
        same = np.array_equal(group[entry.name][level.path][...], expected)
        say(f"pyramid {entry.name}: {len(entry.levels)} level(s), level 1 {level.shape} equals a numpy block "
            f"mean of nibabel's voxels: {same}")
        ok &= same
    with tempfile.TemporaryDirectory() as folder:
        for name, path in by_name.items():
            target = Path(folder) / f"{name}.nii"
            export(out, str(target), name)
            original = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            same = target.read_bytes() == original
            say(f"exported {name} level 0: {'byte for byte the (decompressed) source' if same else 'DIFFERENT'}")
            ok &= same
    return result, ok


def _zarr_order(data: np.ndarray) -> np.ndarray:
    """NIfTI order (x, y, z[, t]) as the zarr arrays hold it ([t,] z, y, x)."""
    return data.transpose(tuple(reversed(range(data.ndim))))


def _block_mean(volume: np.ndarray) -> np.ndarray:
    """Mean of each 2x2x2 block of the last three axes (rounded half to even), the obvious numpy way: a partial
    block at an odd edge averages the voxels it has."""
    present = np.ones(volume.shape[-3:])
    for axis in range(-3, 0):
        if volume.shape[axis] > 1 and volume.shape[axis] % 2:
            pad = [(0, 0)] * volume.ndim
            pad[axis] = (0, 1)
            volume = np.pad(volume, pad)
            present = np.pad(present, pad[-3:])
    sums, counts = volume.astype(np.float64), present
    for axis in range(-3, 0):
        if sums.shape[axis] > 1:
            sums = np.add.reduceat(sums, np.arange(0, sums.shape[axis], 2), axis=axis)
            counts = np.add.reduceat(counts, np.arange(0, counts.shape[axis], 2), axis=axis)
    mean = sums / counts
    return np.rint(mean).astype(volume.dtype.newbyteorder("<")) if volume.dtype.kind in "iu" else \
        mean.astype(volume.dtype.newbyteorder("<"))
