"""Reading: :func:`virtnii.to_nibabel` behaves like nibabel's own image, and changed sources are refused.

nibabel users slice ``img.dataobj`` (to read one volume of a 4-D series without loading it all) and call
``get_fdata``; the proxy over zarr must give exactly nibabel's answers for every kind of index, across chunk
boundaries, for scaled, RGB, complex and 5-D data.  A source edited after scanning must never serve bytes.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import fsspec
import numpy as np
import pytest
import zarr

import virtnii
import virtnii.layout
import virtnii.references
from nifti_samples import assert_same_voxels, nibabel_image, patch_header, voxels, write_nifti, write_samples

#: Samples covering rank 2–5, scaling, byte order, structured and complex types, and a pair.
READER_SAMPLES = ("2d", "int16_be", "4d", "5d_t_and_c", "5d_c_only", "slope_inter", "rgb24", "complex64",
                  "prime_nz", "pair_nifti1_be", "nifti2")

#: Index expressions as users write them; each is applied to both nibabel's proxy and virtnii's.
SLICERS: list[Any] = [
    (),
    Ellipsis,
    0,
    -1,
    np.int64(2),
    (slice(None), 1),
    (slice(1, None, 2), slice(None, None, 3)),
    (slice(None, None, -1), 0),
    (slice(-3, -1), Ellipsis, -1),
    (Ellipsis, 1),
    (Ellipsis, slice(None, None, 2)),
    (1, Ellipsis, 0, slice(None)),
    (slice(0, 100),),  # past the end, clipped as numpy does
    (None, 0),
    (slice(None), None, Ellipsis),
    (slice(4, 1, -2), slice(None), slice(None, None, 5)),
]


def _slicer_id(slicer: Any) -> str:
    return repr(slicer).replace(" ", "")


@pytest.fixture(scope="module", params=[3, 2], ids=["zarr3", "zarr2"])
def opened(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[zarr.Group, dict[str, Path]]]:
    """The reader samples scanned with tiny chunks, so that slices cross chunk boundaries."""
    files = write_samples(tmp_path_factory.mktemp("reader"), READER_SAMPLES)
    out = tmp_path_factory.mktemp("manifest") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(virtnii.references, "plan", functools.partial(virtnii.layout.plan, target=256, limit=1024))
        result = virtnii.scan([str(p) for p in files.values()], str(out), zarr_format=request.param)
    assert not result.failures
    yield virtnii.open(str(out)), files


def _outcome(function: Any) -> tuple[str, Any]:
    """A result or the exception type it raised, so that both readers can be compared either way."""
    try:
        return "value", function()
    except Exception as err:  # noqa: BLE001 - the comparison is the point: both must fail alike
        return "error", type(err)


@pytest.mark.parametrize("slicer", SLICERS, ids=_slicer_id)
@pytest.mark.parametrize("name", READER_SAMPLES)
def test_dataobj_slicing_equals_nibabel(opened: tuple[zarr.Group, dict[str, Path]], name: str, slicer: Any) -> None:
    group, files = opened
    expected = _outcome(lambda: nibabel_image(files[name]).dataobj[slicer])
    actual = _outcome(lambda: virtnii.to_nibabel(group[name]).dataobj[slicer])
    assert actual[0] == expected[0], (actual, expected)
    if expected[0] == "value":
        assert_same_voxels(actual[1], expected[1])
    else:
        assert issubclass(actual[1], expected[1]), (actual, expected)


@pytest.mark.parametrize("slicer", [(100, 0, 0), (0, 0, 0, 0, 0, 0, 0), (slice(None), -100)], ids=_slicer_id)
def test_bad_indices_are_refused_like_nibabel(opened: tuple[zarr.Group, dict[str, Path]], slicer: Any) -> None:
    """Out of range or too many indices fail (nibabel says ValueError for some, zarr IndexError)."""
    group, files = opened
    name = "int16_be"
    with pytest.raises((IndexError, ValueError)):
        nibabel_image(files[name]).dataobj[slicer]
    with pytest.raises((IndexError, ValueError)):
        virtnii.to_nibabel(group[name]).dataobj[slicer]


@pytest.mark.filterwarnings("ignore::numpy.exceptions.ComplexWarning")  # nibabel drops imaginary parts; so do we
@pytest.mark.parametrize("name", READER_SAMPLES)
def test_get_fdata_equals_nibabel(opened: tuple[zarr.Group, dict[str, Path]], name: str) -> None:
    group, files = opened
    for dtype in (np.float64, np.float32):
        expected = _outcome(lambda: nibabel_image(files[name]).get_fdata(dtype=dtype))
        actual = _outcome(lambda: virtnii.to_nibabel(group[name]).get_fdata(dtype=dtype))
        assert actual[0] == expected[0]
        if expected[0] == "value":
            assert_same_voxels(actual[1], expected[1])
        else:  # RGB: nibabel refuses to make floats of it, and so must we
            assert actual[1] is expected[1]


def test_image_slicer_keeps_the_affine_in_step(opened: tuple[zarr.Group, dict[str, Path]]) -> None:
    """``img.slicer`` (nibabel's spatial cropping) uses the proxy and adjusts the affine the same way."""
    group, files = opened
    for name in ("4d", "5d_t_and_c", "slope_inter"):
        expected = nibabel_image(files[name]).slicer[1:4, ::2, -2:]
        actual = virtnii.to_nibabel(group[name]).slicer[1:4, ::2, -2:]
        np.testing.assert_array_equal(actual.affine, expected.affine)
        assert_same_voxels(actual.get_fdata(), expected.get_fdata())


def test_to_nibabel_image_class_follows_the_file(opened: tuple[zarr.Group, dict[str, Path]]) -> None:
    group, files = opened
    for name in ("int16_be", "nifti2", "pair_nifti1_be"):
        assert type(virtnii.to_nibabel(group[name])) is type(nibabel_image(files[name]))


def test_to_nibabel_refuses_a_group_that_is_not_an_image(opened: tuple[zarr.Group, dict[str, Path]]) -> None:
    with pytest.raises(virtnii.ManifestError, match="not a NIfTI-Zarr image group"):
        virtnii.to_nibabel(opened[0])


def test_to_nibabel_affine_is_the_header_s_even_when_nibabel_could_not_write_it(tmp_path: Path) -> None:
    """A NaN in the sform: nib.load reads the file, and to_nibabel once raised "Could not decompose affine"
    (it passed the affine in, which nibabel then tried to write back as a qform)."""
    path = write_nifti(tmp_path / "nan_sform.nii", voxels((5, 4, 3), "i2"))
    patch_header(path, srow_x=[np.nan, 0.0, 0.0, 1.0], sform_code=1)
    virtnii.scan([str(path)], str(tmp_path / "out"))
    image = virtnii.to_nibabel(virtnii.open(str(tmp_path / "out"))["nan_sform"])
    np.testing.assert_array_equal(image.affine, nibabel_image(path).affine)
    assert_same_voxels(image.dataobj.get_unscaled(), np.asanyarray(nibabel_image(path).dataobj))


def test_to_nibabel_refusal_is_a_virtnii_error(tmp_path: Path) -> None:
    """A header nibabel refuses, in a manifest not written by this scan (an older virtnii, another tool): an
    InvalidNifti naming the group, not nibabel's HeaderDataError."""
    import base64
    import json

    path = write_nifti(tmp_path / "a.nii", voxels((5, 4, 3), "i2"))
    virtnii.scan([str(path)], str(tmp_path / "out"))
    refs_path = tmp_path / "out" / "refs.json"
    refs = json.loads(refs_path.read_text())
    bad = patch_header(tmp_path / "a.nii", scl_slope=2.0, scl_inter=np.inf).read_bytes()[:352]
    refs["refs"]["a/nifti/c/0"] = "base64:" + base64.b64encode(bad).decode()
    refs_path.write_text(json.dumps(refs))
    with pytest.raises(virtnii.InvalidNifti, match="nibabel refuses the header: Valid slope but invalid intercept"):
        virtnii.to_nibabel(virtnii.open(str(tmp_path / "out"))["a"])


# ---------------------------------------------------------------------------------------------- staleness


def _chain(err: BaseException) -> list[BaseException]:
    """An exception and its causes/contexts (each once: virtnii re-raises causes, which makes cycles)."""
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _assert_refused(read: Any, error_class: type[virtnii.VirtniiError], path: Path) -> BaseException:
    """``read()`` fails, with ``error_class`` naming ``path`` on top of the traceback (not buried in a chain)."""
    with pytest.raises(Exception) as caught:
        read()
    matching = [e for e in _chain(caught.value) if isinstance(e, error_class)]
    assert matching, f"{error_class.__name__} not in {[type(e).__name__ for e in _chain(caught.value)]}"
    assert str(path) in str(matching[0]) and "re-run" in str(matching[0])
    assert isinstance(caught.value, error_class), f"users see {type(caught.value).__name__} first: {caught.value}"
    return caught.value


@pytest.fixture
def indexed(tmp_path: Path) -> tuple[Path, Path]:
    """A freshly scanned 4-D file and its manifest."""
    path = write_nifti(tmp_path / "bold.nii", voxels((6, 5, 4, 3), "i2"))
    virtnii.scan([str(path)], str(tmp_path / "out"))
    return path, tmp_path / "out"


def _reads(manifest: Path) -> list[Any]:
    """The ways a user reads voxels: the zarr array, the proxy's raw read, a slice, get_fdata."""
    def zarr_read() -> Any:
        return virtnii.open(str(manifest))["bold"]["0"][...]

    def proxy_read() -> Any:
        return virtnii.to_nibabel(virtnii.open(str(manifest))["bold"]).dataobj.get_unscaled()

    def slice_read() -> Any:
        return virtnii.to_nibabel(virtnii.open(str(manifest))["bold"]).dataobj[..., 1]

    def fdata_read() -> Any:
        return virtnii.to_nibabel(virtnii.open(str(manifest))["bold"]).get_fdata()

    return [zarr_read, proxy_read, slice_read, fdata_read]


def test_touched_source_same_size_is_stale(indexed: tuple[Path, Path]) -> None:
    path, manifest = indexed
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 2_000_000_000))
    for read in _reads(manifest):
        error = _assert_refused(read, virtnii.StaleSource, path)
        assert "mtime" in str(error)


def test_replaced_source_same_size_is_stale(indexed: tuple[Path, Path]) -> None:
    """Replaced by another file of the same size (new inode and mtime): the old offsets would read new voxels."""
    path, manifest = indexed
    replacement = write_nifti(path.parent / "other.nii", voxels((6, 5, 4, 3), "i2", seed=7))
    assert replacement.stat().st_size == path.stat().st_size
    info = path.stat()
    os.replace(replacement, path)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    for read in _reads(manifest):
        _assert_refused(read, virtnii.StaleSource, path)


def test_source_of_another_size_is_stale(indexed: tuple[Path, Path]) -> None:
    path, manifest = indexed
    write_nifti(path, voxels((6, 5, 4, 2), "i2"))
    for read in _reads(manifest):
        error = _assert_refused(read, virtnii.StaleSource, path)
        assert "size" in str(error)


def test_deleted_source_is_source_not_found(indexed: tuple[Path, Path]) -> None:
    path, manifest = indexed
    path.unlink()
    for read in _reads(manifest):
        _assert_refused(read, virtnii.SourceNotFound, path)


def test_changed_img_of_a_pair_is_stale(tmp_path: Path) -> None:
    hdr = write_nifti(tmp_path / "pair.hdr", voxels((6, 5, 4), "f4"))
    img = hdr.with_suffix(".img")
    virtnii.scan([str(hdr)], str(tmp_path / "out"))
    shutil.copy(img, tmp_path / "backup.img")
    img.write_bytes(img.read_bytes()[:-4])
    group = virtnii.open(str(tmp_path / "out"))
    _assert_refused(lambda: group["pair"]["0"][...], virtnii.StaleSource, img)


def test_unchanged_source_reads_after_an_unrelated_file_changes(indexed: tuple[Path, Path]) -> None:
    """Staleness is per source: a sibling file changing must not refuse this one."""
    path, manifest = indexed
    (path.parent / "sibling.nii").write_bytes(b"x")
    np.testing.assert_array_equal(virtnii.open(str(manifest))["bold"]["0"][...],
                                  voxels((6, 5, 4, 3), "i2").transpose(3, 2, 1, 0))


def test_source_cut_short_between_checks_is_stale(tmp_path: Path) -> None:
    """Remote sources are trusted for a few seconds after a check; cut short within them, the missing bytes are
    refused (not reshaped into an error that names nothing).  memory:// stands in for a remote store."""
    fs = fsspec.filesystem("memory")
    blob = write_nifti(tmp_path / "bold.nii", voxels((6, 5, 4, 3), "i2")).read_bytes()
    fs.pipe_file("/reader-test/bold.nii", blob)
    try:
        virtnii.scan(["memory://reader-test/bold.nii"], str(tmp_path / "out"))
        array = virtnii.open(str(tmp_path / "out"))["bold"]["0"]
        array[0]  # checks the fingerprint, trusted for RECHECK_AFTER seconds
        fs.pipe_file("/reader-test/bold.nii", blob[:-2])
        with pytest.raises(virtnii.StaleSource, match="got only"):
            array[-1]
    finally:
        fs.rm("/reader-test", recursive=True)


def test_source_replaced_after_the_first_read_is_stale(indexed: tuple[Path, Path]) -> None:
    """A manifest left open (a notebook, a viewer's server) keeps checking: local files before every read."""
    path, manifest = indexed
    array = virtnii.open(str(manifest))["bold"]["0"]
    array[0]
    info = path.stat()
    write_nifti(path, voxels((6, 5, 4, 3), "i2", seed=9))  # same size, other voxels
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    _assert_refused(lambda: array[0], virtnii.StaleSource, path)


def test_parquet_level_with_unwritten_chunks_reads_as_fill_value(tmp_path: Path) -> None:
    """A pyramid level's all-zero chunks are never written: their Parquet rows hold no path, read as absent."""
    data = np.zeros((200, 200, 100), np.int16)
    data[:50, :50, :20] = 7
    source = write_nifti(tmp_path / "sparse.nii.gz", data)
    for ref_format in ("json", "parquet"):
        virtnii.scan([str(source)], str(tmp_path / ref_format), zarr_format=2, ref_format=ref_format)
        virtnii.build_pyramids(str(tmp_path / ref_format))
    by_json, by_parquet = (virtnii.open(str(tmp_path / name))["sparse"] for name in ("json", "parquet"))
    assert sorted(by_parquet.array_keys()) == sorted(by_json.array_keys())
    for level in by_json.array_keys():
        np.testing.assert_array_equal(by_parquet[level][...], by_json[level][...])
    combined = tmp_path / "combined"
    virtnii.combine([str(tmp_path / "parquet")], str(combined))  # the references are copied without the holes
    np.testing.assert_array_equal(virtnii.open(str(combined))["sparse"]["1"][...], by_json["1"][...])
def test_listings_bisecting_the_keys_equal_fsspecs_folder_tree() -> None:
    """The reader lists folders by bisecting the sorted keys (fsspec builds a tree of every key first): the
    same entries for every folder, names that sort around "/" ("a.b", "a-b", "a0") included."""
    from fsspec.implementations.reference import ReferenceFileSystem
    from virtnii.reader import _ReferenceFileSystem

    refs = {"zarr.json": "{}", "a/zarr.json": "{}", "a/b/zarr.json": "{}", "a/b/0/c/0": ["file:///x", 0, 8],
            "a/b/nifti/c/0": "base64:AAAA", "a.b/zarr.json": "{}", "a-b/x/zarr.json": "{}", "a0/y": ["file:///y"],
            "ab/zarr.json": "{}", "a/b0/zarr.json": "{}"}
    ours = _ReferenceFileSystem(fo={"version": 1, "refs": refs}, skip_instance_cache=True)
    theirs = ReferenceFileSystem(fo={"version": 1, "refs": refs}, skip_instance_cache=True)
    folders = {""} | {key.rsplit("/", n)[0] for key in refs for n in range(1, key.count("/") + 1)}
    for folder in sorted(folders):
        assert sorted(ours.ls(folder), key=str) == sorted(theirs.ls(folder), key=str), folder
        assert sorted(ours.ls(folder, detail=False)) == sorted(theirs.ls(folder, detail=False))
        assert ours.isdir(folder) or not folder
    assert ours.ls("a/b/0/c/0") == theirs.ls("a/b/0/c/0")  # a file lists as itself
    assert not ours.isdir("a/zarr.json") and not ours.isdir("a/b/0/c/0") and not ours.isdir("a/c")
    with pytest.raises(FileNotFoundError):
        ours.ls("a/c")
