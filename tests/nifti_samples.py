"""Synthetic NIfTI files written by nibabel, and the comparisons tests make against nibabel's own reading.

nibabel is the reference reader virtnii promises to agree with, so every sample is written by nibabel and the
expected voxels, affine and slope/inter are whatever nibabel reads back from the file.  Header quirks nibabel
will not write on its own (slope/inter on integer data, ``vox_offset`` 0, padding before the data) are patched
into the written header afterwards, as other writers (SPM, dcm2niix, old Analyze tools) produce them.

:data:`SAMPLES` names one maker per case (datatype, byte order, rank, NIfTI version, pair, extensions, odd
sizes); each maker writes into a folder and returns the path to scan (the ``.nii``, or the ``.hdr`` of a pair).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy

#: nibabel's own test files: real NIfTI written by other tools.
DATA = Path(nib.__file__).parent / "tests" / "data"

RGB24 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
RGBA32 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1"), ("A", "u1")])

#: An affine with rotation, anisotropic voxels and a shift, so that any affine mix-up shows.
AFFINE = np.array([[0.0, -1.5, 0.0, 90.0],
                   [2.0, 0.0, 0.0, -126.0],
                   [0.0, 0.0, 2.5, -72.0],
                   [0.0, 0.0, 0.0, 1.0]])

_IMAGE_CLASSES = {(1, False): nib.Nifti1Image, (1, True): nib.Nifti1Pair,
                  (2, False): nib.Nifti2Image, (2, True): nib.Nifti2Pair}


def voxels(shape: tuple[int, ...], dtype: Any, seed: int = 0) -> np.ndarray:
    """Random voxels spanning the whole range of ``dtype``, floats with NaN, ±inf, -0.0 and a subnormal.

    Full-range values catch sign and byte-order mistakes that small positive test values hide; the special
    floats catch comparisons (and copies) that are not bit-exact.
    """
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.fields:
        return rng.integers(0, 256, size=shape + (dtype.itemsize,), dtype=np.uint8).view(dtype).reshape(shape)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype.newbyteorder("="), endpoint=True
                            ).astype(dtype)
    real = np.dtype(dtype.char.lower() if dtype.kind == "f" else {"F": "f", "D": "d"}[dtype.char])
    values = (rng.standard_normal(shape) * 1e3).astype(real)
    flat = values.reshape(-1)
    specials = np.array([np.nan, np.inf, -np.inf, -0.0, np.finfo(real).smallest_subnormal], dtype=real)
    flat[: min(flat.size, specials.size)] = specials[: flat.size]
    if dtype.kind == "c":
        values = values + 1j * (rng.standard_normal(shape) * 1e3).astype(real)
    return values.astype(dtype)


def write_nifti(path: Path, data: np.ndarray, *, version: int = 1, endian: str = "<",
                affine: np.ndarray = AFFINE, extensions: tuple[tuple[str, bytes], ...] = ()) -> Path:
    """Write ``data`` with nibabel as a ``.nii`` or (for a ``.hdr`` path) a ``.hdr``/``.img`` pair.

    The header's datatype is ``data``'s and its byte order ``endian``, which nibabel then uses for the voxels.
    """
    image_class = _IMAGE_CLASSES[version, path.suffix == ".hdr"]
    header = image_class.header_class(endianness=endian)
    header.set_data_dtype(data.dtype)
    for code, content in extensions:
        header.extensions.append(nib.nifti1.Nifti1Extension(code, content))
    image_class(data, affine, header).to_filename(path)
    return path


def patch_header(path: Path, **fields: Any) -> Path:
    """Overwrite fixed header fields in place (keeping extensions and voxels), for quirks nibabel will not write."""
    blob = bytearray(path.read_bytes())
    size = 540 if int.from_bytes(blob[:4], "little") == 540 or int.from_bytes(blob[:4], "big") == 540 else 348
    header_class = nib.Nifti2Header if size == 540 else nib.Nifti1Header
    header = header_class.from_fileobj(io.BytesIO(bytes(blob[:size])), check=False)
    for name, value in fields.items():
        header[name] = value
    blob[:size] = header.binaryblock
    path.write_bytes(bytes(blob))
    return path


def with_slope_inter(path: Path, slope: float, inter: float) -> Path:
    """``path`` with ``scl_slope``/``scl_inter`` set, as scanners write them on integer data."""
    return patch_header(path, scl_slope=slope, scl_inter=inter)


def with_data_gap(path: Path, gap: int) -> Path:
    """Move the voxels ``gap`` bytes further into a ``.nii`` and raise ``vox_offset`` to match (padding)."""
    blob = path.read_bytes()
    offset = int(nib.load(path).dataobj.offset)  # a loaded image's header has vox_offset reset to 0
    path.write_bytes(blob[:offset] + b"\xa5" * gap + blob[offset:])
    return patch_header(path, vox_offset=offset + gap)


def _maker(shape: tuple[int, ...], dtype: Any, *, suffix: str = ".nii", seed: int = 1,
           after: Callable[[Path], Path] | None = None, **write: Any) -> Callable[[Path], Path]:
    def make(folder: Path, name: str) -> Path:
        path = write_nifti(folder / f"{name}{suffix}", voxels(shape, dtype, seed), **write)
        return after(path) if after else path
    return make


#: Name → ``maker(folder, name) -> path to scan``.  Shapes are in NIfTI order (x, y, z, t, c); small and
#: mostly not powers of two, so that transposed axes cannot line up by accident.
SAMPLES: dict[str, Callable[[Path, str], Path]] = {
    "uint8": _maker((7, 6, 5), "u1"),
    "int8": _maker((7, 6, 5), "i1"),
    "int16_le": _maker((9, 7, 5), "<i2"),
    "int16_be": _maker((9, 7, 5), ">i2", endian=">"),
    "uint16": _maker((5, 9, 7), "u2"),
    "int32_be": _maker((5, 4, 3), ">i4", endian=">"),
    "uint32": _maker((5, 4, 3), "u4"),
    "int64": _maker((5, 4, 3), "i8"),
    "uint64_be": _maker((5, 4, 3), ">u8", endian=">"),
    "uint64": _maker((5, 4, 3), "u8"),
    "float32_nan": _maker((8, 7, 6), "f4"),
    "float64": _maker((6, 5, 4), "f8"),
    "float64_be": _maker((6, 5, 4), ">f8", endian=">"),
    "complex64": _maker((6, 5, 4), "c8"),
    "complex128": _maker((6, 5, 4), "c16"),
    "complex64_be": _maker((6, 5, 4), ">c8", endian=">"),
    "rgb24": _maker((6, 5, 4), RGB24),
    "rgba32": _maker((6, 5, 4), RGBA32),
    "rgb24_be": _maker((6, 5, 4), RGB24, endian=">"),
    "2d": _maker((11, 7), "i2"),
    "4d": _maker((6, 5, 4, 3), "<f4"),
    "5d_t_and_c": _maker((5, 4, 3, 3, 2), "i2"),
    "5d_c_only": _maker((5, 4, 3, 1, 3), "u2"),
    "5d_singleton_c": _maker((5, 4, 3, 2, 1), ">f4", endian=">"),
    "prime_nz": _maker((3, 2, 127), "i2"),
    "slope_inter": _maker((6, 5, 4, 2), "i2", after=lambda p: with_slope_inter(p, 0.5, -20.0)),
    "slope_only": _maker((6, 5, 4), "u1", after=lambda p: with_slope_inter(p, 3.0, 0.0)),
    "vox_offset_zero": _maker((6, 5, 4), "i2", after=lambda p: patch_header(p, vox_offset=0)),
    "vox_offset_zero_nifti2": _maker((6, 5, 4), "f4", version=2, after=lambda p: patch_header(p, vox_offset=0)),
    "data_gap": _maker((6, 5, 4), "f4", after=lambda p: with_data_gap(p, 1008)),
    "extensions": _maker((6, 5, 4), "i2", extensions=(("comment", b"virtnii keeps extensions"),
                                                       ("afni", b"<?xml version='1.0' ?>\n<AFNI/>\n"))),
    "nifti2": _maker((7, 6, 5, 2), "f8", version=2),
    "nifti2_be": _maker((7, 6, 5), ">i4", version=2, endian=">"),
    "nifti2_extensions": _maker((5, 4, 3), "i2", version=2, extensions=(("comment", b"n2 extension"),)),
    "pair_nifti1": _maker((7, 6, 5), "i2", suffix=".hdr"),
    "pair_nifti1_be": _maker((7, 6, 5, 2), ">f4", suffix=".hdr", endian=">"),
    "pair_nifti2": _maker((7, 6, 5), "u2", suffix=".hdr", version=2),
    "pair_extensions": _maker((5, 4, 3), "i2", suffix=".hdr", extensions=(("comment", b"pair extension"),)),
}


def write_samples(folder: Path, names: Any = None) -> dict[str, Path]:
    """Write the named samples (default: all) into ``folder``; returns name → path to scan."""
    folder.mkdir(parents=True, exist_ok=True)
    return {name: SAMPLES[name](folder, name) for name in (names or SAMPLES)}


def nibabel_image(path: Path) -> nib.spatialimages.SpatialImage:
    """``path`` loaded by nibabel: the reference every virtnii read is compared with.

    One correction: nibabel 5 reads a ``.nii`` whose ``vox_offset`` is unset (0) from byte 0 — its own header
    — where the NIfTI standard says "less than 352 is equivalent to 352" (544 for NIfTI-2); virtnii follows
    the standard, so the reference does too.
    """
    image = nib.load(path)
    minimum = image.header.sizeof_hdr + 4
    proxy = image.dataobj
    if path.name.lower().endswith((".nii", ".nii.gz")) and proxy.offset < minimum:
        # from the proxy's own spec: a loaded image's header has scl_slope/inter reset, the proxy keeps them
        spec = (proxy.shape, proxy.dtype, minimum, proxy.slope, proxy.inter)
        image = type(image)(ArrayProxy(str(path), spec), image.affine, image.header)
    return image


def nibabel_raw(path: Path) -> np.ndarray:
    """nibabel's raw (unscaled) voxels of ``path``, as corrected by :func:`nibabel_image`."""
    return np.asanyarray(nibabel_image(path).dataobj.get_unscaled())


def file_to_zarr_order(data: np.ndarray) -> np.ndarray:
    """A NIfTI-ordered array (x, y[, z[, t[, c]]]) as the NIfTI-Zarr array ([t, [c,]] z, y, x) must hold it."""
    padded = data.reshape(data.shape + (1,) * (3 - data.ndim)) if data.ndim < 3 else data
    if padded.ndim <= 4:
        return padded.transpose(tuple(reversed(range(padded.ndim))))
    return padded.reshape(padded.shape[:5]).transpose(3, 4, 2, 1, 0)


def comparable_bytes(data: np.ndarray) -> bytes:
    """C-order bytes of ``data`` in little-endian order, so equal values compare equal bit for bit (NaN too)."""
    data = np.asarray(data)
    if data.dtype.fields:  # RGB: single bytes per field, byte order does not apply; names may differ in case
        return np.ascontiguousarray(data).tobytes()
    return np.ascontiguousarray(data.astype(data.dtype.newbyteorder("<"))).tobytes()


def assert_same_voxels(actual: Any, expected: np.ndarray) -> None:
    """``actual`` holds exactly ``expected``'s values: same shape, same kind and size, same bits."""
    actual = np.asarray(actual)
    assert actual.shape == expected.shape
    assert (actual.dtype.kind, actual.dtype.itemsize) == (expected.dtype.kind, expected.dtype.itemsize)
    if actual.dtype.fields or expected.dtype.fields:
        assert [n.lower() for n in actual.dtype.names] == [n.lower() for n in expected.dtype.names]
    assert comparable_bytes(actual) == comparable_bytes(expected)


def bids_tree(root: Path) -> dict[str, Path]:
    """A small BIDS-like tree of real nibabel files: two subjects, anat + func."""
    files = {
        "sub-01/anat/sub-01_T1w": DATA / "anatomical.nii",
        "sub-01/func/sub-01_task-rest_bold": DATA / "functional.nii",
        "sub-02/anat/sub-02_T1w": DATA / "reoriented_anat_moved.nii",
    }
    out = {}
    for name, src in files.items():
        dest = root / f"{name}.nii"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
        out[name] = dest
    (root / "dataset_description.json").write_text("{}")
    return out
