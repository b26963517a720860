"""Header parsing and the errors for everything that is not an indexable NIfTI.

A batch over thousands of files meets every kind of wrong input: empty and truncated downloads, HTML error pages
saved under a ``.nii`` name, gzip data without ``.gz``, lone ``.hdr`` files, headers other tools wrote wrong.
Each must fail as the right :class:`~virtnii.VirtniiError` subclass naming the file, the rest of the batch must
still be indexed, and no half-written manifest may be left behind.
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
from pathlib import Path
from typing import Callable

import fsspec
import nibabel as nib
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

import virtnii
import virtnii.manifest
from nifti_samples import patch_header, voxels, write_nifti
from virtnii.header import HEAD_BYTES, header_extent, parse, parse_many

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def _good(folder: Path, name: str = "good.nii", **write: object) -> Path:
    return write_nifti(folder / name, voxels((4, 3, 2), "i2"), **write)


def _read_head(path: Path, is_pair: bool = False) -> bytes:
    """What the scanner hands to :func:`parse`: the bytes named by :func:`header_extent`."""
    blob = path.read_bytes()
    return blob[: header_extent(str(path), blob[:HEAD_BYTES], is_pair, len(blob))]


# -------------------------------------------------------------------------------------------- good headers


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("endian", ["<", ">"])
def test_parse_follows_nibabel(tmp_path: Path, version: int, endian: str) -> None:
    path = write_nifti(tmp_path / "a.nii", voxels((5, 4, 3, 2), endian + "f4"), version=version, endian=endian,
                       extensions=(("comment", b"x" * 20),))
    parsed = parse(str(path), _read_head(path), is_pair=False)
    proxy = nib.load(path).dataobj
    assert parsed.version == version
    assert parsed.shape == (5, 4, 3, 2)
    assert parsed.dtype == np.dtype(endian + "f4")
    assert parsed.data_offset == proxy.offset
    assert parsed.raw == path.read_bytes()[: proxy.offset]  # header, extension flag and extensions
    assert parsed.nbytes == 5 * 4 * 3 * 2 * 4
    assert not parsed.is_pair


def test_parse_pair_reads_the_whole_hdr(tmp_path: Path) -> None:
    path = write_nifti(tmp_path / "a.hdr", voxels((5, 4, 3), "i2"), version=2, extensions=(("comment", b"ext"),))
    parsed = parse(str(path), _read_head(path, is_pair=True), is_pair=True)
    assert parsed.is_pair and parsed.version == 2
    assert parsed.raw == path.read_bytes()
    assert parsed.data_offset == 0


@pytest.mark.parametrize("version", [1, 2])
def test_unset_vox_offset_in_a_single_file_means_right_after_the_header(tmp_path: Path, version: int) -> None:
    """The standard: "less than 352 in a .nii file is equivalent to 352" (544 for NIfTI-2).

    nibabel 5 reads such a file from byte 0 (its header bytes become voxels); virtnii must not follow it there.
    """
    path = patch_header(_good(tmp_path, version=version), vox_offset=0)
    assert parse(str(path), _read_head(path), is_pair=False).data_offset == {1: 352, 2: 544}[version]
    virtnii.scan([str(path)], str(tmp_path / "out"))
    voxels_read = virtnii.to_nibabel(virtnii.open(str(tmp_path / "out"))["good"]).dataobj.get_unscaled()
    np.testing.assert_array_equal(voxels_read, voxels((4, 3, 2), "i2"))


def test_header_extent_covers_large_extensions(tmp_path: Path) -> None:
    """Extensions past the first ranged read make the scanner read again, up to vox_offset."""
    path = _good(tmp_path, extensions=(("comment", b"e" * (3 * HEAD_BYTES)),))
    blob = path.read_bytes()
    extent = header_extent(str(path), blob[:HEAD_BYTES], False, len(blob))
    assert extent == nib.load(path).dataobj.offset > HEAD_BYTES
    result = virtnii.scan([str(path)], str(tmp_path / "out"))
    assert not result.failures
    assert np.asarray(virtnii.open(str(tmp_path / "out"))["good"]["nifti"][:]).tobytes() == blob[:extent]


# --------------------------------------------------------------------------------------------- bad inputs

BadMaker = Callable[[Path, Path], Path]


def _bytes(name: str, content: Callable[[bytes], bytes]) -> BadMaker:
    """A bad file ``name`` whose bytes are ``content(good file bytes)``."""
    def make(folder: Path, good: Path) -> Path:
        path = folder / name
        path.write_bytes(content(good.read_bytes()))
        return path
    return make


def _patched(name: str, **fields: object) -> BadMaker:
    """A copy of the good file with header ``fields`` overwritten."""
    def make(folder: Path, good: Path) -> Path:
        return patch_header(Path(shutil.copy(good, folder / name)), **fields)
    return make


def _extended(name: str, esize: int | None = None, **fields: object) -> BadMaker:
    """A good file with one 32-byte extension (vox_offset 384), its esize then overwritten, and header ``fields``:
    the extension chains nibabel's reader refuses."""
    def make(folder: Path, good: Path) -> Path:
        path = _good(folder, name, extensions=(("comment", b"x" * 20),))
        if esize is not None:
            blob = bytearray(path.read_bytes())
            blob[352:356] = esize.to_bytes(4, "little", signed=True)
            path.write_bytes(bytes(blob))
        return patch_header(path, **fields) if fields else path
    return make


def _lone_hdr(folder: Path, good: Path) -> Path:
    return Path(shutil.copy(NIBABEL_DATA / "nifti1.hdr", folder / "lone.hdr"))


def _hdr_with_nii_magic(folder: Path, good: Path) -> Path:
    """A .hdr/.img pair whose header says ``n+1`` (single file): the voxels are not where a pair puts them."""
    blob = good.read_bytes()
    (folder / "nii_magic.img").write_bytes(blob[352:])
    path = folder / "nii_magic.hdr"
    path.write_bytes(blob[:352])
    return path


#: case → (maker, expected error class, words the message must contain)
BAD_CASES: dict[str, tuple[BadMaker, type[virtnii.VirtniiError], str]] = {
    "empty": (_bytes("empty.nii", lambda b: b""), virtnii.InvalidNifti, "empty"),
    "three_bytes": (_bytes("three.nii", lambda b: b[:3]), virtnii.InvalidNifti, "too short"),
    "cut_in_header": (_bytes("cut_header.nii", lambda b: b[:200]), virtnii.InvalidNifti, "truncated header"),
    "header_only": (_bytes("header_only.nii", lambda b: b[:352]), virtnii.InvalidNifti, "data truncated"),
    "one_byte_short": (_bytes("short.nii", lambda b: b[:-1]), virtnii.InvalidNifti, "data truncated"),
    "pair_magic_in_nii": (_bytes("magic.nii", lambda b: b[:344] + b"ni1\0" + b[348:]), virtnii.InvalidNifti,
                          "wrong magic"),
    "no_magic": (_bytes("nomagic.nii", lambda b: b[:344] + b"\0\0\0\0" + b[348:]), virtnii.InvalidNifti,
                 "wrong magic"),
    "bad_sizeof_hdr": (_bytes("sizeof.nii", lambda b: (349).to_bytes(4, "little") + b[4:344] + b"\0" * 4 + b[348:]),
                       virtnii.InvalidNifti, "sizeof_hdr"),
    "zero_dim": (_patched("zero_dim.nii", dim=[3, 4, 0, 2, 1, 1, 1, 1]), virtnii.InvalidNifti, "dimensions"),
    "negative_dim": (_patched("neg_dim.nii", dim=[3, 4, -3, 2, 1, 1, 1, 1]), virtnii.InvalidNifti, "dimensions"),
    "no_dims": (_patched("no_dims.nii", dim=[0, 4, 3, 2, 1, 1, 1, 1]), virtnii.InvalidNifti, "dimensions"),
    "too_many_dims": (_patched("nine_dims.nii", dim=[9, 4, 3, 2, 1, 1, 1, 1]), virtnii.InvalidNifti, "dim[0] is 9"),
    "vox_offset_inside_header": (_patched("vox_low.nii", vox_offset=100), virtnii.InvalidNifti, "vox offset"),
    "vox_offset_past_end": (_patched("vox_high.nii", vox_offset=1e9), virtnii.InvalidNifti, "data truncated"),
    "vox_offset_nan": (_patched("vox_nan.nii", vox_offset=float("nan")), virtnii.InvalidNifti, "invalid vox_offset"),
    "vox_offset_inf": (_patched("vox_inf.nii", vox_offset=float("inf")), virtnii.InvalidNifti, "invalid vox_offset"),
    "float128": (_patched("float128.nii", datatype=1536, bitpix=128), virtnii.UnsupportedNifti, "float128"),
    "complex256": (_patched("complex256.nii", datatype=2048, bitpix=256), virtnii.UnsupportedNifti, "complex256"),
    "binary": (_patched("binary.nii", datatype=1, bitpix=1), virtnii.UnsupportedNifti, "binary"),
    "unknown_datatype": (_patched("dt9999.nii", datatype=9999), virtnii.InvalidNifti, "9999"),
    "html_page": (_bytes("page.nii", lambda b: b"\n<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n"),
                  virtnii.InvalidNifti, "HTML"),
    "s3_xml_error": (_bytes("denied.nii", lambda b: b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>"),
                     virtnii.InvalidNifti, "XML"),
    "git_lfs_pointer": (_bytes("lfs.nii", lambda b: b"version https://git-lfs.github.com/spec/v1\noid sha256:0\n"),
                        virtnii.InvalidNifti, "not a NIfTI"),
    "gzip_named_nii": (_bytes("gz.nii", gzip.compress), virtnii.InvalidNifti, "gzip"),
    "hdr_without_img": (_lone_hdr, virtnii.SourceNotFound, "lone.img"),
    # what nibabel refuses to load: scanning them once made manifests that to_nibabel could not open
    "magic_n+1A": (_bytes("n1a.nii", lambda b: b[:344] + b"n+1A" + b[348:]), virtnii.InvalidNifti, "wrong magic"),
    "nifti2_magic_in_nifti1": (_bytes("n2in1.nii", lambda b: b[:344] + b"n+2\0" + b[348:]), virtnii.InvalidNifti,
                               "wrong magic"),
    "denormal_vox_offset": (_patched("denormal.nii", vox_offset=1e-45), virtnii.InvalidNifti, "inside the header"),
    "nan_intercept": (_patched("nan_inter.nii", scl_slope=2.0, scl_inter=float("nan")), virtnii.InvalidNifti,
                      "cannot be scaled"),
    "inf_intercept": (_patched("inf_inter.nii", scl_slope=2.0, scl_inter=float("inf")), virtnii.InvalidNifti,
                      "cannot be scaled"),
    "qform_not_a_rotation": (_patched("quatern.nii", qform_code=1, sform_code=0, quatern_b=0.9, quatern_c=0.9),
                             virtnii.InvalidNifti, "not a rotation"),
    "extension_esize_0": (_extended("esize0.nii", 0), virtnii.InvalidNifti, "has size 0"),
    "extension_esize_negative": (_extended("esize_neg.nii", -16), virtnii.InvalidNifti, "has size -16"),
    "extension_esize_7": (_extended("esize7.nii", 7), virtnii.InvalidNifti, "has size 7"),
    "extension_past_vox_offset": (_extended("esize_far.nii", 4096), virtnii.InvalidNifti, "past vox_offset"),
    "extension_with_unset_vox_offset": (_extended("ext_vox0.nii", vox_offset=0), virtnii.InvalidNifti,
                                        "vox_offset is 0"),
    "pair_with_single_file_magic": (_hdr_with_nii_magic, virtnii.InvalidNifti, "wrong magic"),
}


@pytest.fixture(scope="module")
def bad_batch(tmp_path_factory: pytest.TempPathFactory) -> tuple[virtnii.ScanResult, dict[str, Path], Path]:
    """One scan of a good file, every bad case and a missing file, as a real batch would meet them."""
    folder = tmp_path_factory.mktemp("bad")
    good = _good(folder)
    files = {case: maker(folder, good) for case, (maker, _, _) in BAD_CASES.items()}
    files["missing"] = folder / "missing.nii"
    out = folder / "manifest"
    result = virtnii.scan([str(good)] + [str(p) for p in files.values()], str(out))
    return result, files, out


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_fails_with_its_error_naming_the_file(bad_batch: tuple, case: str) -> None:
    result, files, _ = bad_batch
    _, error_class, words = BAD_CASES[case]
    errors = [f for f in result.failures if f.source.endswith("/" + files[case].name)]
    assert len(errors) == 1, [str(f) for f in result.failures]
    [error] = errors
    assert type(error) is error_class, str(error)
    assert words.lower() in str(error).lower()
    assert str(error).startswith(error.source) and files[case].name in str(error)


def test_nifti2_eol_check_altered_is_invalid(tmp_path: Path) -> None:
    """A NIfTI-2 header through a text-mode transfer (\r\n -> \n): nibabel refuses it, so must the scan."""
    path = _good(tmp_path, version=2)
    blob = bytearray(path.read_bytes())
    blob[8:12] = b"\n\r\x1a\n"
    path.write_bytes(bytes(blob))
    with pytest.raises(virtnii.InvalidNifti, match="eol_check"):
        parse(str(path), _read_head(path), is_pair=False)


def test_corrupt_sizeof_hdr_with_intact_magic_is_read_like_nibabel(tmp_path: Path) -> None:
    """nibabel recognises a NIfTI-1 by its magic and fixes sizeof_hdr; so does the scan."""
    path = _good(tmp_path, endian=">")
    blob = path.read_bytes()
    path.write_bytes((349).to_bytes(4, "big") + blob[4:])
    result = virtnii.scan([str(path)], str(tmp_path / "out"))
    assert not result.failures, result.failures
    image = virtnii.to_nibabel(virtnii.open(str(tmp_path / "out"))["good"])
    np.testing.assert_array_equal(image.dataobj.get_unscaled(), np.asanyarray(nib.load(path).dataobj))
    assert image.header["sizeof_hdr"] == 348


def test_missing_file_is_source_not_found(bad_batch: tuple) -> None:
    result, files, _ = bad_batch
    [error] = [f for f in result.failures if "missing.nii" in f.source]
    assert isinstance(error, virtnii.SourceNotFound)


def test_good_sources_survive_a_bad_batch(bad_batch: tuple) -> None:
    result, files, out = bad_batch
    assert [e.name for e in result.images] == ["good"]
    assert len(result.failures) == len(files)
    np.testing.assert_array_equal(virtnii.to_nibabel(virtnii.open(str(out))["good"]).dataobj.get_unscaled(),
                                  voxels((4, 3, 2), "i2"))
    assert not list(out.parent.glob("manifest.partial-*"))


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("endian", ["<", ">"])
def test_dim0_out_of_range_is_invalid_not_a_byte_swapped_header(tmp_path: Path, version: int, endian: str) -> None:
    """nibabel infers byte order from dim[0]; dim[0] = 9 once made a 7-D "unsupported" image of swapped bytes."""
    path = patch_header(_good(tmp_path, version=version, endian=endian), dim=[9, 4, 3, 2, 1, 1, 1, 1])
    with pytest.raises(virtnii.InvalidNifti, match=r"dim\[0\] is 9"):
        parse(str(path), path.read_bytes()[:HEAD_BYTES], is_pair=False)


def test_negative_vox_offset_of_a_pair_is_invalid(tmp_path: Path) -> None:
    hdr = patch_header(write_nifti(tmp_path / "pair.hdr", voxels((5, 4, 3), "f4")), vox_offset=-8)
    with pytest.raises(virtnii.InvalidNifti, match="invalid vox_offset -8"):
        parse(str(hdr), hdr.read_bytes(), is_pair=True)


def test_parse_many_equals_parse_on_a_mixed_batch(tmp_path: Path) -> None:
    """Both versions and byte orders, a pair, and bad headers in between: each outcome in its place, as parsed
    alone."""
    paths = [write_nifti(tmp_path / f"v{version}{'be' if endian == '>' else 'le'}.nii",
                         voxels((5, 4, 3, 2), endian + "i2"), version=version, endian=endian)
             for version in (1, 2) for endian in "<>"]
    pair = write_nifti(tmp_path / "pair.hdr", voxels((5, 4, 3), "f4"), version=2)
    urls = [str(p) for p in paths] + [str(pair), "empty.nii", "html.nii"]
    raws = [_read_head(p) for p in paths] + [_read_head(pair, is_pair=True), b"", b"<html></html>"]
    pairs = [False] * len(paths) + [True, False, False]
    order = [6, 0, 5, 3, 4, 1, 2]  # interleave good and bad, versions and byte orders
    batch = parse_many([urls[i] for i in order], [raws[i] for i in order], [pairs[i] for i in order])
    for i, outcome in zip(order, batch):
        if i >= len(paths) + 1:
            assert isinstance(outcome, virtnii.InvalidNifti) and outcome.source == urls[i]
            continue
        alone = parse(urls[i], raws[i], pairs[i])
        assert (outcome.version, outcome.shape, outcome.dtype, outcome.data_offset, outcome.raw) == \
               (alone.version, alone.shape, alone.dtype, alone.data_offset, alone.raw)
        assert repr(outcome.fields) == repr(alone.fields)  # repr: NaN fields compare equal
        header = nib.load(urls[i]).header
        assert outcome.shape == header.get_data_shape() and outcome.dtype == header.get_data_dtype()


def test_truncated_img_of_a_pair_is_named(tmp_path: Path) -> None:
    """The size check is against the .img (where the voxels are), and the error names it, not the .hdr."""
    hdr = write_nifti(tmp_path / "pair.hdr", voxels((5, 4, 3), "f4"))
    img = hdr.with_suffix(".img")
    img.write_bytes(img.read_bytes()[:-1])
    [error] = virtnii.scan([str(hdr)], str(tmp_path / "out")).failures
    assert isinstance(error, virtnii.InvalidNifti) and "data truncated" in str(error)
    assert error.source.endswith("/pair.img")


def test_parse_errors_name_the_url() -> None:
    with pytest.raises(virtnii.InvalidNifti, match="^s3://bucket/x.nii: empty file$"):
        parse("s3://bucket/x.nii", b"", is_pair=False)


def test_all_failed_scan_leaves_no_manifest(tmp_path: Path) -> None:
    bad = tmp_path / "bad.nii"
    bad.write_bytes(b"<html></html>")
    result = virtnii.scan([str(bad), str(tmp_path / "missing.nii")], str(tmp_path / "out"))
    assert result.manifest is None and result.images == []
    assert len(result.failures) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.nii"]


def test_failure_while_writing_leaves_no_partial_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error after sidecars/references started (here: building references) removes the partial folder."""
    good = _good(tmp_path)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(virtnii.manifest.writer, "build_refs", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        virtnii.scan([str(good)], str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.nii"]


# ------------------------------------------------------------------------------------------- access errors


def test_unreadable_file_is_source_access_error(tmp_path: Path) -> None:
    path = _good(tmp_path, "locked.nii")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root (or with CAP_DAC_OVERRIDE): chmod 000 does not stop reads; "
                        "test_permission_error_from_storage_is_source_access_error covers the mapping")
        result = virtnii.scan([str(path)], str(tmp_path / "out"))
        [error] = result.failures
        assert isinstance(error, virtnii.SourceAccessError) and "locked.nii" in str(error)
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


class _DeniedFileSystem(LocalFileSystem):
    """Local files that can be listed but not read, like an object store answering 403 to GET."""

    protocol = ("denied",)

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        path = fsspec.utils.stringify_path(path)
        return super()._strip_protocol(path[len("denied://"):] if path.startswith("denied://") else path)

    def _open(self, path: str, mode: str = "rb", **kwargs: object) -> object:
        if "r" in mode:
            raise PermissionError(13, "Permission denied", path)
        return super()._open(path, mode, **kwargs)


def test_permission_error_from_storage_is_source_access_error(tmp_path: Path) -> None:
    fsspec.register_implementation("denied", _DeniedFileSystem, clobber=True)
    denied, readable = _good(tmp_path, "denied.nii"), _good(tmp_path, "readable.nii")
    result = virtnii.scan([f"denied://{denied}", str(readable)], str(tmp_path / "out"))
    assert [e.name for e in result.images] == ["readable"]
    [error] = result.failures
    assert isinstance(error, virtnii.SourceAccessError)
    assert error.source == f"denied://{denied}" and "permission denied" in str(error)
