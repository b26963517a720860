"""The reference model: what one NIfTI file becomes as kerchunk keys, checked key by key.

Conformance tests read whole manifests; these pin the pieces a reader depends on — byte order spelled in the
metadata (``>i2``; v3 ``bytes`` codec ``endian: big``), no compression, C order, chunk key encodings, the raw
header inlined as the ``nifti`` chunk, and chunk references that are exactly the layout's byte ranges — so a
regression names its cause.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import fsspec
import nibabel as nib
import numpy as np
import pytest
import zarr
from zarr.storage import FsspecStore

from nifti_samples import RGB24, assert_same_voxels, file_to_zarr_order, nibabel_raw, voxels, write_nifti
from virtnii.header import HEAD_BYTES, header_extent, parse
from virtnii.manifest import build_refs
from virtnii.references import ImageRefs, array_docs, chunk_key, group_docs, hierarchy_docs, image_refs


def _refs_for(path: Path, name: str, zarr_format: int, data_path: Path | None = None) -> ImageRefs:
    blob = path.read_bytes()
    is_pair = path.suffix == ".hdr"
    raw = blob[: header_extent(str(path), blob[:HEAD_BYTES], is_pair, len(blob))]
    return image_refs(name, parse(str(path), raw, is_pair), f"file://{data_path or path}", zarr_format)


def _docs(refs: ImageRefs) -> dict[str, Any]:
    return {key: json.loads(text) for key, text in refs.metadata.items()}


@pytest.mark.parametrize("dtype, v2_dtype, v3_type, v3_endian", [
    (">i2", ">i2", "int16", "big"),
    ("<i2", "<i2", "int16", "little"),
    (">f8", ">f8", "float64", "big"),
    ("<c16", "<c16", "complex128", "little"),
    (">c8", ">c8", "complex64", "big"),
    ("u1", "|u1", "uint8", None),
    (">u8", ">u8", "uint64", "big"),
])
def test_byte_order_is_explicit_in_both_formats(dtype: str, v2_dtype: str, v3_type: str, v3_endian: str | None) -> None:
    v2 = json.loads(array_docs("g/0", (3, 4, 5), (1, 4, 5), np.dtype(dtype), "zyx", {}, 2)["g/0/.zarray"])
    assert v2["dtype"] == v2_dtype
    assert (v2["order"], v2["compressor"], v2["filters"]) == ("C", None, None)
    assert (v2["shape"], v2["chunks"]) == ([3, 4, 5], [1, 4, 5])
    v3 = json.loads(array_docs("g/0", (3, 4, 5), (1, 4, 5), np.dtype(dtype), "zyx", {}, 3)["g/0/zarr.json"])
    assert v3["data_type"] == v3_type
    assert [codec["name"] for codec in v3["codecs"]] == ["bytes"]  # no compressor, no transpose
    assert v3["codecs"][0].get("configuration", {}).get("endian") == v3_endian
    assert v3["chunk_grid"]["configuration"]["chunk_shape"] == [1, 4, 5]
    assert v3["dimension_names"] == ["z", "y", "x"]


def test_rgb_is_a_structured_dtype_with_lower_case_fields() -> None:
    dtype = np.dtype([("r", "u1"), ("g", "u1"), ("b", "u1")])
    v2 = json.loads(array_docs("g/0", (2,), (2,), dtype, "x", {}, 2)["g/0/.zarray"])
    assert v2["dtype"] == [["r", "|u1"], ["g", "|u1"], ["b", "|u1"]]  # as the NIfTI-Zarr spec spells it


def test_rgb_metadata_raises_no_zarr_warning() -> None:
    """zarr warns that Zarr v3 has no spec for structured dtypes: a scan of RGB files printed it to every user."""
    import warnings

    import virtnii.references

    rgb = np.dtype([("r", "u1"), ("g", "u1"), ("b", "u1"), ("a", "u1")])
    virtnii.references._array_template.cache_clear()  # the documents are cached: make them again
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        array_docs("g/0", (2,), (2,), rgb, "x", {}, 3)
    assert not caught, [str(w.message) for w in caught]


@pytest.mark.parametrize("zarr_format, expected", [(3, "img/0/c/1/0/2"), (2, "img/0/1.0.2")])
def test_chunk_keys_use_zarr_default_encoding(zarr_format: int, expected: str) -> None:
    assert chunk_key("img/0", (1, 0, 2), zarr_format) == expected


def test_group_documents() -> None:
    assert json.loads(group_docs("a/b", {"k": 1}, 3)["a/b/zarr.json"]) == \
        {"zarr_format": 3, "node_type": "group", "attributes": {"k": 1}}
    v2 = group_docs("", {"k": 1}, 2)
    assert json.loads(v2[".zgroup"]) == {"zarr_format": 2} and json.loads(v2[".zattrs"]) == {"k": 1}


def test_hierarchy_has_every_intermediate_group_once() -> None:
    docs = hierarchy_docs(["sub-01/anat/T1w", "sub-01/func/bold", "sub-02/anat/T1w", "top"], 3, {})
    assert sorted(docs) == ["sub-01/anat/zarr.json", "sub-01/func/zarr.json", "sub-01/zarr.json",
                            "sub-02/anat/zarr.json", "sub-02/zarr.json", "zarr.json"]


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_image_refs_are_the_layout_byte_ranges(tmp_path: Path, zarr_format: int) -> None:
    path = write_nifti(tmp_path / "a.nii", voxels((6, 5, 4, 3), ">i2"), endian=">",
                       extensions=(("comment", b"kept"),))
    refs = _refs_for(path, "sub/a", zarr_format)
    kerchunk = refs.kerchunk()
    layout = refs.layout
    indices, offsets = layout.chunk_table()
    assert offsets[0] == nib.load(path).dataobj.offset
    for index, offset in zip(indices.tolist(), offsets.tolist()):
        assert kerchunk[chunk_key("sub/a/0", index, zarr_format)] == [f"file://{path}", offset, layout.chunk_nbytes]
    header_key = chunk_key("sub/a/nifti", (0,), zarr_format)
    raw = path.read_bytes()[: nib.load(path).dataobj.offset]
    assert kerchunk[header_key] == "base64:" + base64.b64encode(raw).decode()
    docs = _docs(refs)
    nifti_doc = docs[f"sub/a/nifti/{'zarr.json' if zarr_format == 3 else '.zarray'}"]
    assert nifti_doc["shape"] == [len(raw)]
    level_doc = docs[f"sub/a/0/{'zarr.json' if zarr_format == 3 else '.zarray'}"]
    assert level_doc["shape"] == list(layout.shape) == [3, 4, 5, 6]
    ranges = {key for key, value in kerchunk.items() if isinstance(value, list)}
    assert ranges == {chunk_key("sub/a/0", index, zarr_format) for index in indices.tolist()}


def test_pair_references_point_into_the_img(tmp_path: Path) -> None:
    hdr = write_nifti(tmp_path / "p.hdr", voxels((5, 4, 3), "f4"))
    img = hdr.with_suffix(".img")
    refs = _refs_for(hdr, "p", 3, data_path=img)
    assert refs.url == f"file://{img}"
    assert refs.offsets.min() == 0 and refs.offsets.max() + refs.layout.chunk_nbytes == img.stat().st_size
    assert refs.inline[chunk_key("p/nifti", (0,), 3)] == hdr.read_bytes()


def test_explicit_data_offset_overrides_the_header(tmp_path: Path) -> None:
    """A caller whose voxels do not start at the header's vox_offset can say where they do (no caller in virtnii
    does today: .nii.gz references use the header's offset into the uncompressed stream)."""
    path = write_nifti(tmp_path / "a.nii", voxels((5, 4, 3), "i2"))
    blob = path.read_bytes()
    header = parse(str(path), blob[:352], False)
    refs = image_refs("a", header, "gzidx://x", 3, data_offset=1000)
    assert refs.offsets.min() == 1000 and refs.url == "gzidx://x"


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_references_alone_read_like_nibabel(tmp_path: Path, zarr_format: int) -> None:
    """Straight from build_refs into fsspec's ReferenceFileSystem, with no virtnii reader in between."""
    files = {
        "rgb": write_nifti(tmp_path / "rgb.nii", voxels((5, 4, 3), RGB24)),
        "be": write_nifti(tmp_path / "be.nii", voxels((5, 4, 3, 2, 2), ">f4"), endian=">"),
    }
    refs = build_refs([_refs_for(path, name, zarr_format) for name, path in files.items()], zarr_format)
    fs = fsspec.filesystem("reference", fo=refs, asynchronous=True, remote_protocol="file")
    group = zarr.open_group(FsspecStore(fs, read_only=True, path=""), mode="r")
    for name, path in files.items():
        assert_same_voxels(group[name]["0"][...], file_to_zarr_order(nibabel_raw(path)))
