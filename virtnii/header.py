"""Parse and validate one NIfTI-1/NIfTI-2 header (with extensions) from its first bytes.

The scanner fetches the first bytes of each source itself (one ranged read, concurrently for many files); this
module only interprets them, with nibabel's header classes, so that datatypes, endianness, slope/inter and the
affine follow nibabel exactly — the reference reader in our tests.  Validation is strict: anything that would
make the references point at the wrong bytes is an error naming the source, never a guess.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError

from .errors import InvalidNifti, UnsupportedNifti

#: Bytes read first from every source; large enough for the header and typical extensions.
HEAD_BYTES = 16 * 1024

_SIZES = {348: (1, nib.Nifti1Header), 540: (2, nib.Nifti2Header)}
_SINGLE_MAGICS = {b"n+1", b"n+2"}
_PAIR_MAGICS = {b"ni1", b"ni2"}
_ZARR_KINDS = "biufc"  # numpy kinds zarr can hold as plain arrays (plus the RGB structured types below)


@dataclass(frozen=True, eq=False)
class NiftiHeader:
    """What the references need from one header.

    ``raw`` is the header exactly as stored (fixed header, extension flag and extensions): it becomes the
    NIfTI-Zarr ``nifti`` array.  ``data_offset`` is where the voxels start in the data file:
    ``vox_offset``, at least 352 (NIfTI-1) or 544 (NIfTI-2) in a single file as the standard says.
    """

    version: int
    header: nib.Nifti1Header
    raw: bytes
    shape: tuple[int, ...]
    dtype: np.dtype
    data_offset: int
    is_pair: bool

    @functools.cached_property
    def fields(self) -> dict[str, Any]:
        """The header's fields as plain Python values (one numpy call: cheap for thousands of headers)."""
        structarr = self.header.structarr
        return dict(zip(structarr.dtype.names, structarr.tolist()))

    @property
    def has_extensions(self) -> bool:
        """Whether the extension flag after the fixed header is set (the ``nifti`` array then holds them)."""
        size = 348 if self.version == 1 else 540
        return len(self.raw) > size and self.raw[size] != 0

    @property
    def nbytes(self) -> int:
        """Bytes of voxel data the header promises."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _sizeof_hdr(url: str, head: bytes) -> tuple[int, str]:
    """Header size and byte order, from the first four bytes; clear errors for the common non-NIfTI cases."""
    if len(head) == 0:
        raise InvalidNifti(url, "empty file")
    if len(head) < 4:
        raise InvalidNifti(url, f"only {len(head)} bytes: too short for a NIfTI header")
    for order in "<>":
        (size,) = struct.unpack(order + "i", head[:4])
        if size in _SIZES:
            return size, order
    start = head[:256].lstrip().lower()
    if start.startswith((b"<!doctype", b"<html", b"<?xml", b"<")):
        raise InvalidNifti(url, "is an HTML/XML document, not NIfTI (wrong URL, or an error/login page?)")
    if head[:2] == b"\x1f\x8b":
        raise InvalidNifti(url, "is gzip-compressed data: give it a .gz name (e.g. .nii.gz)")
    raise InvalidNifti(url, "bad sizeof_hdr (expected 348 for NIfTI-1 or 540 for NIfTI-2): not a NIfTI file")


def header_extent(url: str, head: bytes, is_pair: bool, file_size: int) -> int:
    """How many leading bytes hold the header and its extensions (what :func:`parse` needs).

    Single files: up to ``vox_offset`` (or 352 when it is unset); ``.hdr`` files: the whole file.
    """
    size, order = _sizeof_hdr(url, head)
    if is_pair:
        return file_size
    if len(head) < size:
        raise InvalidNifti(url, f"truncated header: {len(head)} bytes, NIfTI-{_SIZES[size][0]} needs {size}")
    klass = _SIZES[size][1]
    vox_offset = float(np.frombuffer(head[:size], dtype=klass.template_dtype.newbyteorder(order))["vox_offset"][0])
    return max(int(vox_offset), size + 4)


def parse(url: str, raw: bytes, is_pair: bool) -> NiftiHeader:
    """Validate and parse ``raw`` (the bytes named by :func:`header_extent`) with nibabel."""
    size, order = _sizeof_hdr(url, raw)
    version, klass = _SIZES[size]
    if len(raw) < size:
        raise InvalidNifti(url, f"truncated header: {len(raw)} bytes, NIfTI-{version} needs {size}")
    # nibabel guesses byte order from dim[0] (1..7), so an out-of-range dim[0] would read as a byte-swapped header
    ndim = int(np.frombuffer(raw[:size], dtype=klass.template_dtype.newbyteorder(order))["dim"][0][0])
    if not 1 <= ndim <= 7:
        raise InvalidNifti(url, f"invalid dimensions: dim[0] is {ndim}, a NIfTI image has 1 to 7")
    magic = bytes(raw[344:347] if version == 1 else raw[4:7])
    expected = _PAIR_MAGICS if is_pair else _SINGLE_MAGICS
    if magic not in expected:
        kind = "a .hdr/.img pair" if is_pair else "a single-file .nii"
        raise InvalidNifti(url, f"wrong magic {magic!r} for {kind} (expected {' or '.join(map(repr, sorted(expected)))})")
    # nibabel's header class without its check-and-fix pass (3x the cost of parsing): the checks that matter
    # for references (sizes, magic, dims, datatype, offsets) are made here, and the raw bytes are kept as-is.
    try:
        header = klass(raw[:size], check=False)
        shape = header.get_data_shape()
    except (HeaderDataError, ValueError, struct.error) as err:
        raise InvalidNifti(url, f"invalid header: {err}") from err
    dims = [int(d) for d in header["dim"][1:1 + int(header["dim"][0])]]
    if not dims or any(d <= 0 for d in dims):
        raise InvalidNifti(url, f"invalid dimensions {dims}: every dim must be a positive integer")
    if len(shape) > 5 and any(d != 1 for d in shape[5:]):
        raise UnsupportedNifti(url, f"{len(shape)}-D data {tuple(shape)}: NIfTI-Zarr holds at most 5 axes (t, c, z, y, x)")
    dtype = _zarr_dtype(url, header)
    data_offset = int(header.get_data_offset())
    if not is_pair and data_offset == 0:  # unset: the voxels follow the header (nibabel 5.4 reads from byte 0)
        data_offset = size + 4
    elif not is_pair and data_offset < size + 4:
        raise InvalidNifti(url, f"vox offset {data_offset} points inside the header (a .nii needs at least {size + 4})")
    return NiftiHeader(version, header, bytes(raw), tuple(int(n) for n in shape[:5]), dtype, data_offset, is_pair)


def _zarr_dtype(url: str, header: nib.Nifti1Header) -> np.dtype:
    """nibabel's on-disk dtype, with RGB fields renamed to NIfTI-Zarr's lower-case ``r, g, b, a``."""
    code = int(header["datatype"])
    if code not in nib.nifti1.data_type_codes.code:
        raise InvalidNifti(url, f"unknown datatype code {code}: not a NIfTI datatype")
    try:
        dtype = header.get_data_dtype()
    except (HeaderDataError, KeyError) as err:
        raise UnsupportedNifti(url, f"unsupported datatype code {code}") from err
    if dtype.fields:
        return np.dtype([(name.lower(), dtype.fields[name][0]) for name in dtype.names])
    if dtype.kind not in _ZARR_KINDS or dtype.itemsize > 16 or (dtype.kind == "f" and dtype.itemsize > 8):
        raise UnsupportedNifti(url, f"datatype {code} ({nib.nifti1.data_type_codes.label[code]}) has no zarr equivalent")
    return dtype

