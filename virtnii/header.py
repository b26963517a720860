"""Parse and validate NIfTI-1/NIfTI-2 headers (with extensions) from their first bytes, many at once.

The scanner fetches the first bytes of each source itself (one ranged read, concurrently for many files); this
module only interprets them, through nibabel's header dtypes and datatype mapping, so that fields, datatypes
and endianness follow nibabel exactly — the reference reader in our tests.  Headers of one version and byte
order are decoded by one numpy call per batch.  Validation is strict: anything that would make the references
point at the wrong bytes is an error naming the source, never a guess.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass
from typing import Any, Sequence

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError

from .errors import InvalidNifti, UnsupportedNifti, VirtniiError

#: Bytes read first from every source; large enough for the header and typical extensions.
HEAD_BYTES = 16 * 1024

_SIZES = {348: (1, nib.Nifti1Header), 540: (2, nib.Nifti2Header)}
_SINGLE_MAGICS = {b"n+1", b"n+2"}
_PAIR_MAGICS = {b"ni1", b"ni2"}
_ZARR_KINDS = "biufc"  # numpy kinds zarr can hold as plain arrays (plus the RGB structured types below)
#: First three dims that nibabel's ``get_data_shape`` reinterprets (FreeSurfer's ico7 surface); its other hack,
#: ``-1`` in dim[1] for long vectors, is rejected here with every non-positive dim.
_FREESURFER_SHAPES = {(27307, 1, 6)}
#: Where ``vox_offset`` sits in each header, as (struct format, byte offset): float32 at 108 in NIfTI-1, int64 at
#: 168 in NIfTI-2.  Read for every file before parsing, to know how many bytes the header and extensions take.
_VOX_OFFSET = {348: ("f", 108), 540: ("q", 168)}
#: numpy dtype per (header size, byte order, datatype code), filled as codes are met.
_DTYPES: dict[tuple[int, str, int], np.dtype] = {}


@dataclass(frozen=True, eq=False)
class NiftiHeader:
    """What the references need from one header.

    ``raw`` is the header exactly as stored (fixed header, extension flag and extensions): it becomes the
    NIfTI-Zarr ``nifti`` array.  ``data_offset`` is where the voxels start in the data file:
    ``vox_offset``, at least 352 (NIfTI-1) or 544 (NIfTI-2) in a single file as the standard says.
    ``fields`` are the header's fields as plain Python values, named as in nibabel's header dtypes.
    """

    version: int
    raw: bytes
    fields: dict[str, Any]
    shape: tuple[int, ...]
    dtype: np.dtype
    data_offset: int
    is_pair: bool

    @property
    def has_extensions(self) -> bool:
        """Whether the extension flag after the fixed header is set (the ``nifti`` array then holds them)."""
        size = 348 if self.version == 1 else 540
        return len(self.raw) > size and self.raw[size] != 0

    @property
    def nbytes(self) -> int:
        """Bytes of voxel data the header promises."""
        return math.prod(self.shape) * self.dtype.itemsize


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
    kind, offset = _VOX_OFFSET[size]
    (vox_offset,) = struct.unpack_from(order + kind, head, offset)
    return max(_vox_offset(url, vox_offset), size + 4)


def _vox_offset(url: str, value: float) -> int:
    """``vox_offset`` as a byte offset (truncated, as nibabel's ``get_data_offset`` does); NaN, inf or < 0 is an
    error, not a crash."""
    if not math.isfinite(value) or value < 0:
        raise InvalidNifti(url, f"invalid vox_offset {value}: not a byte offset")
    return int(value)


def parse(url: str, raw: bytes, is_pair: bool) -> NiftiHeader:
    """Validate and parse ``raw`` (the bytes named by :func:`header_extent`); raises the error naming ``url``."""
    [outcome] = parse_many([url], [raw], [is_pair])
    if isinstance(outcome, VirtniiError):
        raise outcome
    return outcome


def parse_many(urls: Sequence[str], raws: Sequence[bytes],
               is_pair: Sequence[bool]) -> list[NiftiHeader | VirtniiError]:
    """Validate and parse many headers at once: a :class:`NiftiHeader` or the error naming the source, each.

    Headers of one version and byte order are decoded together by numpy through nibabel's own header dtype (one
    ``frombuffer`` for thousands of files, where building a nibabel header object per file cost as much as the
    rest of a scan); datatypes map to numpy types through nibabel, once per distinct code.  The checks that
    matter for references (sizes, magic, dims, datatype, offsets) are made explicitly; nibabel's check-and-fix
    pass is not run, and the raw bytes are kept as they are.
    """
    outcomes: list[NiftiHeader | VirtniiError | None] = [None] * len(raws)
    groups: dict[tuple[int, str], list[int]] = {}
    for i, (url, raw, _) in enumerate(zip(urls, raws, is_pair, strict=True)):
        try:
            size, order = _sizeof_hdr(url, raw)
            if len(raw) < size:
                raise InvalidNifti(url, f"truncated header: {len(raw)} bytes, NIfTI-{_SIZES[size][0]} needs {size}")
        except VirtniiError as err:
            outcomes[i] = err
            continue
        groups.setdefault((size, order), []).append(i)
    for (size, order), members in groups.items():
        dtype = _SIZES[size][1].template_dtype.newbyteorder(order)
        table = np.frombuffer(b"".join([raws[i][:size] for i in members]), dtype=dtype)
        # column by column: a structured array's tolist() leaves sub-arrays (dim, pixdim) as numpy arrays
        rows = zip(*[table[name].tolist() for name in dtype.names])
        for i, row in zip(members, rows, strict=True):
            try:
                outcomes[i] = _from_fields(urls[i], bytes(raws[i]), is_pair[i], size, order,
                                           dict(zip(dtype.names, row)))
            except VirtniiError as err:
                outcomes[i] = err
    return outcomes  # type: ignore[return-value]  # every slot is filled above


def _from_fields(url: str, raw: bytes, is_pair: bool, size: int, order: str, fields: dict[str, Any]) -> NiftiHeader:
    """Check one decoded header and build its :class:`NiftiHeader`."""
    version = _SIZES[size][0]
    dim = fields["dim"]
    # nibabel guesses byte order from dim[0] (1..7), so an out-of-range dim[0] would read as a byte-swapped header
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise InvalidNifti(url, f"invalid dimensions: dim[0] is {ndim}, a NIfTI image has 1 to 7")
    magic = raw[344:347] if version == 1 else raw[4:7]
    expected = _PAIR_MAGICS if is_pair else _SINGLE_MAGICS
    if magic not in expected:
        kind = "a .hdr/.img pair" if is_pair else "a single-file .nii"
        raise InvalidNifti(url, f"wrong magic {magic!r} for {kind} (expected {' or '.join(map(repr, sorted(expected)))})")
    shape = tuple(dim[1:1 + ndim])
    if any(d <= 0 for d in shape):
        raise InvalidNifti(url, f"invalid dimensions {list(shape)}: every dim must be a positive integer")
    if shape[:3] in _FREESURFER_SHAPES:  # nibabel reinterprets these shapes; follow it
        shape = tuple(_SIZES[size][1](raw[:size], check=False).get_data_shape())
    if len(shape) > 5 and any(d != 1 for d in shape[5:]):
        raise UnsupportedNifti(url, f"{len(shape)}-D data {shape}: NIfTI-Zarr holds at most 5 axes (t, c, z, y, x)")
    dtype = _zarr_dtype(url, size, order, fields["datatype"], raw)
    data_offset = _vox_offset(url, fields["vox_offset"])
    if not is_pair and data_offset == 0:  # unset: the voxels follow the header (nibabel 5.4 reads from byte 0)
        data_offset = size + 4
    elif not is_pair and data_offset < size + 4:
        raise InvalidNifti(url, f"vox offset {data_offset} points inside the header (a .nii needs at least {size + 4})")
    return NiftiHeader(version, raw, fields, shape[:5], dtype, data_offset, is_pair)


def _zarr_dtype(url: str, size: int, order: str, code: int, raw: bytes) -> np.dtype:
    """nibabel's on-disk dtype for datatype ``code``, RGB fields renamed to NIfTI-Zarr's lower-case ``r, g, b, a``."""
    key = (size, order, code)
    if key not in _DTYPES:
        if code not in nib.nifti1.data_type_codes.code:
            raise InvalidNifti(url, f"unknown datatype code {code}: not a NIfTI datatype")
        try:
            dtype = _SIZES[size][1](raw[:size], check=False).get_data_dtype()
        except (HeaderDataError, KeyError) as err:
            raise UnsupportedNifti(url, f"unsupported datatype code {code}") from err
        if dtype.fields:
            dtype = np.dtype([(name.lower(), dtype.fields[name][0]) for name in dtype.names])
        elif dtype.kind not in _ZARR_KINDS or dtype.itemsize > 16 or (dtype.kind == "f" and dtype.itemsize > 8):
            label = nib.nifti1.data_type_codes.label[code]
            raise UnsupportedNifti(url, f"datatype {code} ({label}) has no zarr equivalent")
        _DTYPES[key] = dtype
    return _DTYPES[key]


def without_extensions(header: NiftiHeader) -> NiftiHeader:
    """``header`` with its extensions dropped and the extension flag cleared (``virtnii scan --no-extensions``).

    Extensions are free-form (DICOM tags, AFNI XML, JSON sidecars) and may carry identifying text such as a
    patient's name; the fixed header, ``vox_offset`` included, stays as stored, and the voxels are where they were.
    """
    size = 348 if header.version == 1 else 540
    return dataclasses.replace(header, raw=header.raw[:size] + bytes(4))
