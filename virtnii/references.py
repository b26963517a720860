"""The reference model: one NIfTI file → the keys of a virtual NIfTI-Zarr group.

An :class:`ImageRefs` holds everything a manifest needs for one image: zarr metadata documents (JSON text), the
raw header inlined as the ``nifti`` array's only chunk, and the level-0 chunks as columns (one data URL, a
numpy array of offsets, one chunk length) so that a 100k-chunk image stays compact until it is written out as
kerchunk JSON or Parquet.  Metadata documents come from zarr itself (one template per data type and format,
then shapes filled in), so the dtype/endianness encoding is zarr's, not ours.
"""

from __future__ import annotations

import base64
import functools
import json
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import zarr
from zarr.codecs import BytesCodec
from zarr.errors import UnstableSpecificationWarning
from zarr.storage import MemoryStore

from . import jnifti, ome
from .header import NiftiHeader
from .layout import Layout, plan

ZARR_FORMATS = (2, 3)


@dataclass
class ImageRefs:
    """References of one image group ``name`` (a path inside the manifest, e.g. ``sub-01/anat/sub-01_T1w``)."""

    name: str
    metadata: dict[str, str]
    inline: dict[str, bytes]
    layout: Layout
    url: str
    chunk_keys: list[str]
    offsets: np.ndarray

    def kerchunk(self) -> dict[str, Any]:
        """This image's entries of a kerchunk v1 ``refs`` mapping."""
        refs: dict[str, Any] = dict(self.metadata)
        refs.update({key: _inline(value) for key, value in self.inline.items()})
        length = self.layout.chunk_nbytes
        refs.update({key: [self.url, int(off), length] for key, off in zip(self.chunk_keys, self.offsets.tolist())})
        return refs


def _inline(value: bytes) -> str:
    """kerchunk's inline encoding for binary values."""
    return "base64:" + base64.b64encode(value).decode()


@functools.lru_cache(maxsize=None)
def _array_template(dtype: np.dtype, zarr_format: int) -> tuple[tuple[str, str], ...]:
    """zarr's own metadata documents for a 1-element array of this dtype."""
    store = MemoryStore()
    kwargs: dict[str, Any] = {}
    if zarr_format == 3 and not dtype.fields:
        kwargs["serializer"] = BytesCodec(endian="big" if dtype.byteorder == ">" else "little")
    fill = np.zeros((), dtype=dtype)[()]
    with warnings.catch_warnings():
        # RGB voxels are structured dtypes, as NIfTI-Zarr specifies; zarr warns (once per process, on every scan
        # of an RGB file) that Zarr v3 itself has no spec for those yet, which no user of a scan can act on
        warnings.simplefilter("ignore", UnstableSpecificationWarning)
        zarr.create_array(store=store, shape=(1,), chunks=(1,), dtype=dtype, compressors=None, fill_value=fill,
                          zarr_format=zarr_format, **kwargs)
    return tuple((key, store._store_dict[key].to_bytes().decode()) for key in store._store_dict)


def array_docs(path: str, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: np.dtype,
               dimension_names: Iterable[str], attributes: dict[str, Any], zarr_format: int) -> dict[str, str]:
    """Metadata documents (key → JSON text) of an uncompressed C-order array at ``path``."""
    names = tuple(dimension_names)
    key, text = _array_doc(tuple(shape), tuple(chunks), dtype, names, zarr_format)
    if zarr_format == 2:
        return {f"{path}/{key}": text, f"{path}/.zattrs": json.dumps({"_ARRAY_DIMENSIONS": names, **attributes})}
    # splice the attributes into the cached document: a JSON object text plus one more member
    return {f"{path}/{key}": f'{text[:-1]}, "attributes": {json.dumps(attributes) if attributes else "{}"}}}'}


@functools.lru_cache(maxsize=1024)
def _array_doc(shape: tuple[int, ...], chunks: tuple[int, ...], dtype: np.dtype, names: tuple[str, ...],
               zarr_format: int) -> tuple[str, str]:
    """``(key, JSON text)`` of the array document without attributes; cached, as archives repeat shapes."""
    for key, text in _array_template(dtype, zarr_format):
        doc = json.loads(text)
        if key == "zarr.json":
            doc.update(shape=list(shape), dimension_names=list(names))
            doc.pop("attributes", None)
            doc["chunk_grid"]["configuration"]["chunk_shape"] = list(chunks)
            return key, json.dumps(doc)
        if key == ".zarray":
            doc.update(shape=list(shape), chunks=list(chunks))
            return key, json.dumps(doc)
    raise AssertionError(f"zarr wrote no array metadata for {dtype}")


def group_docs(path: str, attributes: dict[str, Any], zarr_format: int) -> dict[str, str]:
    """Metadata documents of a group at ``path`` (``""`` for the root)."""
    prefix = f"{path}/" if path else ""
    if zarr_format == 3:
        return {f"{prefix}zarr.json": json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes})}
    return {f"{prefix}.zgroup": json.dumps({"zarr_format": 2}), f"{prefix}.zattrs": json.dumps(attributes)}


def edit_group_attributes(refs: dict[str, Any], group: str, zarr_format: int,
                          edit: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Replace the attributes of the group at ``group`` in kerchunk ``refs`` by ``edit(attributes)``
    (zarr.json's ``attributes`` for v3, the ``.zattrs`` document for v2)."""
    key = f"{group}/zarr.json" if zarr_format == 3 else f"{group}/.zattrs"
    doc = json.loads(refs[key])
    if zarr_format == 3:
        refs[key] = json.dumps({**doc, "attributes": edit(doc.get("attributes", {}))})
    else:
        refs[key] = json.dumps(edit(doc))


def chunk_key(path: str, index: Iterable[int], zarr_format: int) -> str:
    """Store key of a chunk with zarr's default key encoding for the format."""
    if zarr_format == 3:
        return f"{path}/c/" + "/".join(map(str, index))
    return f"{path}/" + ".".join(map(str, index))


def image_refs(name: str, header: NiftiHeader, url: str, zarr_format: int, data_offset: int | None = None) -> ImageRefs:
    """References for one image whose voxels are at ``url`` (starting at ``data_offset``, default the header's).

    ``url`` is the file holding the voxels: the ``.nii`` itself, the ``.img`` of a pair, or a ``gzidx://`` URL
    serving a gzip file's uncompressed bytes.
    """
    layout = plan(header.shape, header.dtype.itemsize, header.data_offset if data_offset is None else data_offset,
                  source=url)
    names = layout.axes
    fields = header.fields
    docs = group_docs(name, ome.multiscales(name.rsplit("/", 1)[-1], names, fields, [[1] * len(names)],
                                            zarr_format), zarr_format)
    level = f"{name}/0"
    docs.update(array_docs(level, layout.shape, layout.chunks, header.dtype, names, {}, zarr_format))
    raw = header.raw
    docs.update(array_docs(f"{name}/nifti", (len(raw),), (len(raw),), np.dtype("u1"), ["bytes"],
                           jnifti.to_jnifti(fields, header.has_extensions), zarr_format))
    indices, offsets = layout.chunk_table()
    keys = [chunk_key(level, index, zarr_format) for index in indices.tolist()]
    return ImageRefs(name, docs, {chunk_key(f"{name}/nifti", (0,), zarr_format): raw}, layout, url, keys, offsets)


def hierarchy_docs(names: Iterable[str], zarr_format: int, attributes: dict[str, Any]) -> dict[str, str]:
    """Root and intermediate group documents for image groups at ``names`` (e.g. BIDS ``sub-01/anat``)."""
    docs = group_docs("", attributes, zarr_format)
    folders = {name[:end] for name in names for end in _slashes(name)}
    for folder in sorted(folders):
        docs.update(group_docs(folder, {}, zarr_format))
    return docs


def _slashes(name: str) -> list[int]:
    """Positions of the ``/`` in ``name``: where its parent groups' paths end."""
    return [i for i, char in enumerate(name) if char == "/"]
