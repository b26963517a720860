"""Write one level of a virtual image back out as a NIfTI file (``.nii`` or ``.nii.gz``), streaming.

Level 0 of a single-file source comes out as the source's own bytes: the ``nifti`` array holds the header and
extensions exactly as stored (up to ``vox_offset``) and the voxels follow in file order, so a ``.nii`` source is
reproduced byte for byte and a ``.nii.gz`` source decompresses to the same bytes.  A ``.hdr/.img`` pair, or a
pyramid level, gets a single-file header made by nibabel from the stored one: for level k, dims and voxel
sizes of the level, and qform/sform moved so that each voxel centre lands where its block's centre was at
level 0 (index ``f*i + (f-1)/2``).  Memory is one read slab, whatever the image size.
"""

from __future__ import annotations

import io
import uuid
from typing import Any, BinaryIO, Callable

import fsspec
import nibabel as nib
import numpy as np
from isal import igzip

from . import slabs
from .manifest.entry import ImageEntry
from .errors import ManifestError, storage_errors
from .manifest import manifest_options_for, read_index
from .reader import header_classes, open as open_manifest

#: gzip level for ``.nii.gz`` output: ISA-L's level 2 writes ~10x faster than zlib's default and ends within
#: a few percent of its size on MRI data.
GZIP_LEVEL = 2
_NIFTI_FIRST = {1: 352, 2: 544}


def export(manifest: str, out: str, image: str | None = None, *, level: int = 0,
           manifest_options: dict[str, Any] | None = None, out_options: dict[str, Any] | None = None,
           progress: Callable[[int], Any] = lambda n: None, allow_local_sources: bool = False,
           **storage_options: Any) -> str:
    """Stream level ``level`` of ``image`` (default: the manifest's only image) into ``out``; returns ``out``.

    ``out`` ending in ``.gz`` is gzip-compressed.  The file appears only once complete (local files are written
    under a temporary name and renamed; object stores publish an upload only when it completes).
    ``progress(n)`` hears of every ``n`` voxel bytes written.
    """
    options = manifest_options_for(manifest, manifest_options, storage_options)
    index = read_index(manifest, options)
    if image is None:
        if len(index.images) != 1:
            names = ", ".join(entry.name for entry in index.images[:5])
            raise ManifestError(manifest, f"holds {len(index.images)} images: name the one to export ({names}"
                                          f"{', …' if len(index.images) > 5 else ''})")
        image = index.images[0].name
    try:
        entry = index.image(image)
    except KeyError:
        raise ManifestError(manifest, f"no image named {image} (see `virtnii info {manifest}`)") from None
    paths = ["0"] + [lvl.path for lvl in entry.levels]
    if str(level) not in paths:
        raise ManifestError(manifest, f"{image} has levels {', '.join(paths)}, not {level} (build them with "
                                      "`virtnii pyramid`)")
    group = open_manifest(manifest, manifest_options, allow_local_sources=allow_local_sources,
                          **storage_options)[image]
    array = group[str(level)]
    raw = np.asarray(group["nifti"][:]).tobytes()
    header_bytes, dtype = _header(f"{manifest}/{image}", raw, level, array.shape, entry)
    fs, path = fsspec.core.url_to_fs(out, **(out_options or {}))
    staged = f"{path}.partial-{uuid.uuid4().hex[:8]}" if getattr(fs, "local_file", False) else path
    try:
        with fs.open(staged, "wb") as target:
            stream: BinaryIO = igzip.IGzipFile(fileobj=target, mode="wb", compresslevel=GZIP_LEVEL, mtime=0) \
                if out.lower().endswith(".gz") else target
            try:
                stream.write(header_bytes)
                for _, planes in slabs.stream(array, slabs.plan(array.shape, array.chunks, dtype.itemsize)):
                    # RGB: the same bytes under nibabel's field names; the rest in the file's byte order
                    data = planes if dtype.names or planes.dtype == dtype else planes.astype(dtype)
                    stream.write(np.ascontiguousarray(data).view(np.uint8).data)
                    progress(data.nbytes)
            finally:
                if stream is not target:
                    stream.close()
        if staged != path:
            fs.mv(staged, path)
    except storage_errors() as err:
        raise ManifestError(out, f"cannot write the exported image here: {err}") from err
    finally:
        if staged != path and fs.exists(staged):
            fs.rm(staged)
    return out


def _header(manifest_image: str, raw: bytes, level: int, zarr_shape: tuple[int, ...],
            entry: ImageEntry) -> tuple[bytes, np.dtype]:
    """The bytes before the voxels, and the voxels' dtype in the file (the header's byte order)."""
    header_class, _ = header_classes(manifest_image, raw)
    stored = header_class.from_fileobj(io.BytesIO(raw), check=False)
    dtype = stored.get_data_dtype()
    if level == 0 and entry.data is None:
        return raw, dtype  # the source's own header and extensions, byte for byte
    version = entry.nifti_version
    single = (nib.Nifti2Header if version == 2 else nib.Nifti1Header).from_header(stored)
    single.extensions[:] = stored.extensions[:]
    if level:
        factors = [f for f, a in zip(next(lvl.factors for lvl in entry.levels if lvl.path == str(level)),
                                      entry.axes) if a in "zyx"][::-1]  # x, y, z
        _downsampled(single, stored, zarr_shape, factors)
    extensions = sum(ext.get_sizeondisk() for ext in single.extensions)
    single.set_data_offset(_NIFTI_FIRST[version] + extensions)
    buffer = io.BytesIO()
    single.write_to(buffer)
    head = buffer.getvalue()
    return head + b"\0" * (single.get_data_offset() - len(head)), single.get_data_dtype()


def _downsampled(header: nib.Nifti1Header, stored: nib.Nifti1Header, zarr_shape: tuple[int, ...],
                 factors: list[int]) -> None:
    """Dims, voxel sizes and orientation of a level downsampled by ``factors`` (x, y, z)."""
    shape = list(stored.get_data_shape())
    spatial = list(reversed(zarr_shape[-3:]))
    shape[:min(3, len(shape))] = spatial[:min(3, len(shape))]
    header.set_data_shape(shape)
    zooms = list(stored.get_zooms())
    for axis, factor in enumerate(factors[:len(zooms)]):
        zooms[axis] *= factor
    header.set_zooms(zooms)
    step = np.diag([*map(float, factors), 1.0])
    step[:3, 3] = [(f - 1) / 2 for f in factors]
    qform, qcode = stored.get_qform(coded=True)
    sform, scode = stored.get_sform(coded=True)
    if qcode:
        header.set_qform(qform @ step, int(qcode))
    if scode:
        header.set_sform(sform @ step, int(scode))
