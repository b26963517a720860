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
#: The 4-byte magic field per (header size, is pair): nibabel refuses any other (``n+1A``, ``n+2`` in a 348-byte
#: header); where it sits: 344 in NIfTI-1, 4 in NIfTI-2.
MAGICS = {(348, False): b"n+1\0", (348, True): b"ni1\0", (540, False): b"n+2\0", (540, True): b"ni2\0"}
_MAGIC_AT = {348: 344, 540: 4}
#: NIfTI-2's eol_check bytes (after the magic): as written, or all zero (unset); nibabel refuses anything else,
#: the sign of a file that went through a text-mode transfer.
_EOL_CHECKS = (b"\r\n\x1a\n", b"\0\0\0\0")
_ZARR_KINDS = "biufc"  # numpy kinds zarr can hold as plain arrays (plus the RGB structured types below)
#: First three dims that nibabel's ``get_data_shape`` reinterprets (FreeSurfer's ico7 surface); its other hack,
#: ``-1`` in dim[1] for long vectors, is rejected here with every non-positive dim.
_FREESURFER_SHAPES = {(27307, 1, 6)}
#: Where ``vox_offset`` sits in each header, as (struct format, byte offset): float32 at 108 in NIfTI-1, int64 at
#: 168 in NIfTI-2.  Read for every file before parsing, to know how many bytes the header and extensions take.
_VOX_OFFSET = {348: ("f", 108), 540: ("q", 168)}
#: Most bytes deflate can inflate one compressed byte to (each 258-byte match costs at least two bits); any gzip
#: stream stays below it, so ``size * MAX_INFLATE_RATIO`` bounds what a ``.nii.gz`` of ``size`` bytes can hold.
MAX_INFLATE_RATIO = 1032
#: Most bytes a header with its extensions may take: a corrupt vox_offset or extension size must not make the scan
#: read (or inflate) gigabytes.
MAX_HEADER_BYTES = 64 * 2**20
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


def header_size(url: str, head: bytes) -> tuple[int, str]:
    """Header size and byte order, from the first four bytes; clear errors for the common non-NIfTI cases.

    A NIfTI-1 header whose ``sizeof_hdr`` is corrupt but whose magic is intact is still one, as for nibabel
    (which fixes the field): its byte order is then the one that makes ``dim[0]`` 1 to 7.
    """
    if len(head) == 0:
        raise InvalidNifti(url, "empty file")
    if len(head) < 4:
        raise InvalidNifti(url, f"only {len(head)} bytes: too short for a NIfTI header")
    for order in "<>":
        (size,) = struct.unpack(order + "i", head[:4])
        if size in _SIZES:
            return size, order
    if head[344:348] in (MAGICS[348, False], MAGICS[348, True]):
        return 348, "<" if 1 <= struct.unpack_from("<h", head, 40)[0] <= 7 else ">"
    if is_markup(head):
        raise InvalidNifti(url, "is an HTML/XML document, not NIfTI (wrong URL, or an error/login page?)")
    if head[:2] == b"\x1f\x8b":
        raise InvalidNifti(url, "is gzip-compressed data: give it a .gz name (e.g. .nii.gz)")
    raise InvalidNifti(url, "bad sizeof_hdr (expected 348 for NIfTI-1 or 540 for NIfTI-2): not a NIfTI file")


def is_markup(head: bytes) -> bool:
    """Whether a file's first bytes are an HTML/XML document: what a wrong URL, an expired link or a login page
    serves in place of the file, worth saying so."""
    return head[:256].lstrip().startswith(b"<")


def single_file_magic(head: bytes) -> bool | None:
    """Whether the first bytes of a file hold the magic of a single-file NIfTI (``n+1``, ``n+2``) — True — or of
    a pair's ``.hdr`` (``ni1``, ``ni2``) — False —, or None for neither."""
    for is_pair in (False, True):
        if any(head[at:at + 4] == MAGICS[size, is_pair] for size, at in _MAGIC_AT.items()):
            return not is_pair
    return None


def header_extent(url: str, head: bytes, is_pair: bool, file_size: int) -> int:
    """How many leading bytes hold the header and its extensions (what :func:`parse` needs).

    Single files: up to ``vox_offset`` (or 352 when it is unset); ``.hdr`` files: the whole file; at most
    :data:`MAX_HEADER_BYTES` either way.
    """
    size, order = header_size(url, head)
    if is_pair:
        if file_size > MAX_HEADER_BYTES:
            raise InvalidNifti(url, f"a .hdr of {file_size} bytes: more than the {MAX_HEADER_BYTES >> 20} MiB virtnii "
                                    "reads for a header and its extensions")
        return file_size
    if len(head) < size:
        raise InvalidNifti(url, f"truncated header: {len(head)} bytes, NIfTI-{_SIZES[size][0]} needs {size}")
    kind, offset = _VOX_OFFSET[size]
    (vox_offset,) = struct.unpack_from(order + kind, head, offset)
    extent = max(_vox_offset(url, vox_offset), size + 4)
    if MAX_HEADER_BYTES < extent <= file_size:  # past the file's end, the data size check says it better
        raise InvalidNifti(url, f"header and extensions of {extent} bytes (vox_offset): more than the "
                                f"{MAX_HEADER_BYTES >> 20} MiB virtnii reads for a header; is vox_offset corrupt?")
    return extent


def _extension_problem(raw: bytes, size: int, order: str, vox_offset: float, is_pair: bool) -> str | None:
    """Why nibabel's reader would refuse the extensions after a header, or None.

    nibabel reads extensions (when the first flag byte is set) while at least 16 bytes remain before
    ``vox_offset``, each ``esize`` bytes long: at least 8 (its esize and ecode), or the read fails.  One that runs
    past ``vox_offset`` (or a ``vox_offset`` of 0) makes it read on into the voxels as if they were extensions, to
    the end of the file, which fails unless they happen to chain to it exactly: refused here in any case.  A
    ``.hdr`` holds extensions up to its end, exactly.
    """
    flag = raw[size:size + 4]
    position = size + 4
    if len(flag) < 4 or flag[0] == 0:
        return None
    remaining = math.inf if is_pair else vox_offset - position
    if remaining < 0:  # vox_offset unset (0): nibabel would read "extensions" to the end of the file
        return "the extension flag is set but vox_offset is 0: where the extensions end is unknown"
    while remaining >= 16 and not (is_pair and position == len(raw)):
        if position + 8 > len(raw):
            return f"truncated extension at byte {position}: the header ends at {len(raw)}"
        (esize,) = struct.unpack_from(order + "i", raw, position)
        if esize < 8:
            return f"extension at byte {position} has size {esize} (an extension takes at least 8 bytes)"
        if position + esize > len(raw) or esize > remaining:
            where = "the end of the .hdr" if is_pair else f"vox_offset {vox_offset:g}, into the voxel data"
            return f"extension at byte {position} of {esize} bytes runs past {where}"
        position += esize
        remaining -= esize
    return None


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
            size, order = header_size(url, raw)
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
    """Check one decoded header and build its :class:`NiftiHeader`.

    Besides what the references need, everything nibabel refuses when it loads a file is refused here, so that
    a scanned image always opens with :func:`virtnii.to_nibabel` (which builds nibabel's header from the same
    bytes): magic, NIfTI-2's eol_check, a vox_offset inside the header, the extension chain, an intercept that
    cannot scale, a qform that is no rotation.
    """
    version = _SIZES[size][0]
    fields["sizeof_hdr"] = size  # nibabel fixes a corrupt one (see header_size)
    dim = fields["dim"]
    # nibabel guesses byte order from dim[0] (1..7), so an out-of-range dim[0] would read as a byte-swapped header
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise InvalidNifti(url, f"invalid dimensions: dim[0] is {ndim}, a NIfTI image has 1 to 7")
    magic, expected = raw[_MAGIC_AT[size]:_MAGIC_AT[size] + 4], MAGICS[size, is_pair]
    if magic != expected:
        kind = "a .hdr/.img pair" if is_pair else "a single-file .nii"
        raise InvalidNifti(url, f"wrong magic {magic!r} for {kind} of NIfTI-{version} (expected {expected!r})")
    if version == 2 and raw[8:12] not in _EOL_CHECKS:
        raise InvalidNifti(url, f"eol_check bytes {raw[8:12]!r} are neither {_EOL_CHECKS[0]!r} nor unset: the file "
                                "was altered (a text-mode transfer?)")
    shape = tuple(dim[1:1 + ndim])
    if any(d <= 0 for d in shape):
        raise InvalidNifti(url, f"invalid dimensions {list(shape)}: every dim must be a positive integer")
    if shape[:3] in _FREESURFER_SHAPES:  # nibabel reinterprets these shapes; follow it
        shape = tuple(_SIZES[size][1](raw[:size], check=False).get_data_shape())
    if len(shape) > 5 and any(d != 1 for d in shape[5:]):
        raise UnsupportedNifti(url, f"{len(shape)}-D data {shape}: NIfTI-Zarr holds at most 5 axes (t, c, z, y, x)")
    dtype = _zarr_dtype(url, size, order, fields["datatype"], raw)
    data_offset = _vox_offset(url, fields["vox_offset"])
    if not is_pair and fields["vox_offset"] == 0:  # unset: the voxels follow the header (nibabel 5.4 reads from 0)
        data_offset = size + 4
    elif not is_pair and data_offset < size + 4:  # a denormal is not 0: nibabel refuses it too
        raise InvalidNifti(url, f"vox offset {fields['vox_offset']!r} points inside the header (a .nii needs at "
                                f"least {size + 4})")
    problem = _extension_problem(raw, size, order, fields["vox_offset"], is_pair)
    if problem:
        raise InvalidNifti(url, problem)
    _check_scaling(url, fields)
    _check_qform(url, fields, version)
    return NiftiHeader(version, raw, fields, shape[:5], dtype, data_offset, is_pair)


def _check_scaling(url: str, fields: dict[str, Any]) -> None:
    """A slope that scales (finite, not 0) with an intercept that cannot (NaN, inf): nibabel refuses to load it."""
    slope, inter = fields["scl_slope"], fields["scl_inter"]
    if slope != 0 and math.isfinite(slope) and not math.isfinite(inter):
        raise InvalidNifti(url, f"scl_slope {slope} with scl_inter {inter}: the voxels cannot be scaled")


#: qform/sform codes nibabel accepts; it sets any other to 0 ("unknown") when it loads a header.
_XFORM_CODES = frozenset(nib.nifti1.xform_codes.value_set())


def _check_qform(url: str, fields: dict[str, Any], version: int) -> None:
    """A qform that is the image's affine (no valid sform) but whose quaternion has no real part: b² + c² + d²
    over 1 beyond rounding.  nibabel cannot build the affine, so it cannot load the image either."""
    if fields["sform_code"] in _XFORM_CODES and fields["sform_code"] != 0:
        return
    if fields["qform_code"] not in _XFORM_CODES or fields["qform_code"] == 0:
        return
    bcd = [fields["quatern_b"], fields["quatern_c"], fields["quatern_d"]]
    if sum(q * q for q in bcd) <= 1:
        return
    try:
        nib.quaternions.fillpositive(np.array(bcd, dtype=np.float64 if version == 2 else np.float32),
                                     _SIZES[540 if version == 2 else 348][1].quaternion_threshold)
    except ValueError as err:
        raise InvalidNifti(url, f"qform quaternion {bcd} is not a rotation ({err})") from err


def check_data_size(url: str, header: NiftiHeader, size: int, *, compressed: bool = False) -> None:
    """Refuse a header promising more voxel bytes than the data file at ``url`` holds: ``size`` bytes, or for
    gzip data (``compressed``) the most ``size`` compressed bytes can inflate to.

    Called before anything is planned or allocated from the header's dims, so that a 63-byte ``.nii.gz`` claiming
    32767³ int64 voxels is one clear error in microseconds, not a chunk table exhausting memory.
    """
    end = header.data_offset + header.nbytes
    if not compressed and end > size:
        raise InvalidNifti(url, f"data truncated: the header promises {header.nbytes} bytes of voxels at offset "
                                f"{header.data_offset} (ending at {end}) but the data holds only {size} bytes")
    if compressed and end > size * MAX_INFLATE_RATIO:
        raise InvalidNifti(url, f"data truncated: the header promises {header.nbytes} bytes of voxels at offset "
                                f"{header.data_offset} (ending at {end}) but {size} bytes of gzip data inflate to at "
                                f"most {size * MAX_INFLATE_RATIO} (deflate's limit is {MAX_INFLATE_RATIO}:1)")


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
