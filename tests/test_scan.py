"""Scanner: mixed good/bad batches, .nii.gz in place, interrupts, and any fsspec URL (memory://) end to end.

Finding sources and naming them is :mod:`virtnii.sources`, tested in ``test_sources.py``.
"""

from __future__ import annotations

import gzip
import importlib
import shutil
from pathlib import Path
from typing import Any

import fsspec
import nibabel as nib
import numpy as np
import pytest

import virtnii
from nifti_samples import (assert_same_voxels, bids_tree, file_to_zarr_order, nibabel_raw, patch_header, voxels,
                           write_nifti)

DATA = Path(nib.__file__).parent / "tests" / "data"


def test_folder_scan_names_groups_after_bids_paths(tmp_path: Path) -> None:
    files = bids_tree(tmp_path / "ds")
    result = virtnii.scan([str(tmp_path / "ds")], str(tmp_path / "out"))
    assert not result.failures
    assert sorted(e.name for e in result.images) == sorted(files)
    group = virtnii.open(str(tmp_path / "out"))
    # listing walks the hierarchy (a known zarr/fsspec pitfall is empty listings of subgroups)
    assert sorted(group.group_keys()) == ["sub-01", "sub-02"]
    assert sorted(group["sub-01"].group_keys()) == ["anat", "func"]
    for name, path in files.items():
        np.testing.assert_array_equal(virtnii.to_nibabel(group[name]).dataobj.get_unscaled(), nibabel_raw(path))


def test_good_sources_are_kept_when_others_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.nii"
    bad.write_bytes(b"<!DOCTYPE html><html>not found</html>")
    result = virtnii.scan([str(DATA / "anatomical.nii"), str(bad), str(tmp_path / "missing.nii")],
                          str(tmp_path / "out"))
    assert [e.name for e in result.images] == ["anatomical"]
    messages = sorted(str(f) for f in result.failures)
    assert any("bad.nii" in m and "HTML" in m for m in messages)
    assert any("missing.nii" in m and "no such" in m for m in messages)
    assert all(isinstance(f, virtnii.VirtniiError) for f in result.failures)


def test_every_source_failing_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty.nii").write_bytes(b"")
    result = virtnii.scan([str(tmp_path / "empty.nii")], str(tmp_path / "out"))
    assert result.manifest is None
    assert isinstance(result.failures[0], virtnii.InvalidNifti)
    assert "empty.nii: empty file" in str(result.failures[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.nii"]


def test_memory_filesystem_sources_and_manifest() -> None:
    """The same code path for any fsspec URL: sources and manifest both in memory://."""
    fs = fsspec.filesystem("memory")
    fs.pipe("/vn-src/anat.nii", (DATA / "anatomical.nii").read_bytes())
    fs.pipe("/vn-src/func.nii", (DATA / "functional.nii").read_bytes())
    try:
        result = virtnii.scan(["memory://vn-src"], "memory://vn-out")
        assert sorted(e.name for e in result.images) == ["anat", "func"]
        assert not fs.exists("/vn-out.partial")
        group = virtnii.open("memory://vn-out")
        np.testing.assert_array_equal(virtnii.to_nibabel(group["func"]).dataobj.get_unscaled(),
                                      nibabel_raw(DATA / "functional.nii"))
    finally:
        fs.rm("/vn-src", recursive=True)
        fs.rm("/vn-out", recursive=True)


# ------------------------------------------------------------------------------------------------ .nii.gz

SITE = Path(nib.__file__).parent.parent
REAL_GZ = sorted(
    list(DATA.glob("*.nii.gz"))
    + list((SITE / "nilearn" / "datasets" / "data").glob("*.nii.gz"))
    + list((SITE / "dipy" / "data" / "files").glob("*.nii.gz"))
    + list((SITE / "nitransforms" / "tests" / "data").glob("*warp_fsl.nii.gz"))
)


@pytest.fixture(scope="module")
def gz_manifest(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """One manifest over every real .nii.gz found in installed packages, scanned in place."""
    out = tmp_path_factory.mktemp("gz") / "out"
    result = virtnii.scan([str(p) for p in REAL_GZ], str(out))
    assert not result.failures, result.failures
    return out, {e.name: Path(e.source.removeprefix("file://")) for e in result.images}


def test_real_gzip_files_found() -> None:
    assert len(REAL_GZ) >= 10  # nibabel, nilearn and dipy wheels ship these; fewer means a broken environment


def test_every_voxel_of_real_gzip_files_equals_nibabel(gz_manifest) -> None:
    out, sources = gz_manifest
    group = virtnii.open(str(out))
    assert len(sources) == len(REAL_GZ)
    for name, path in sources.items():
        ours = virtnii.to_nibabel(group[name])
        theirs = nib.load(path)
        np.testing.assert_array_equal(np.asarray(ours.dataobj.get_unscaled()), nibabel_raw(path), err_msg=name)
        np.testing.assert_array_equal(ours.affine, theirs.affine)
        assert ours.dataobj.slope == theirs.dataobj.slope and ours.dataobj.inter == theirs.dataobj.inter


def test_gzip_manifest_survives_being_moved(gz_manifest, tmp_path: Path) -> None:
    out, sources = gz_manifest
    moved = tmp_path / "elsewhere" / "manifest"
    shutil.copytree(out, moved)
    name, path = next(iter(sources.items()))
    for file in moved.rglob("*.json"):
        assert str(out) not in file.read_text(), f"{file} holds the manifest's old absolute path"
    group = virtnii.open(str(moved))
    np.testing.assert_array_equal(np.asarray(virtnii.to_nibabel(group[name]).dataobj.get_unscaled()), nibabel_raw(path))


def test_niizarr_reads_gzip_backed_groups(gz_manifest) -> None:
    niizarr = pytest.importorskip("niizarr")
    out, sources = gz_manifest
    group = virtnii.open(str(out))
    for name in ["example4d", "mni_icbm152_t1_tal_nlin_sym_09a_converted"]:
        img = niizarr.zarr2nii(group[name])
        np.testing.assert_array_equal(np.asarray(img.dataobj), nibabel_raw(sources[name]))
        np.testing.assert_allclose(img.header.get_best_affine(), nib.load(sources[name]).affine)


def test_gzipped_pair_and_multimember_gzip(tmp_path: Path) -> None:
    import gzip

    src = nib.load(DATA / "functional.nii")
    pair = nib.Nifti1Pair(np.asanyarray(src.dataobj), src.affine)
    nib.save(pair, tmp_path / "pair.img.gz")
    assert (tmp_path / "pair.hdr.gz").exists()
    raw = (DATA / "anatomical.nii").read_bytes()
    cut = len(raw) // 3
    (tmp_path / "multi.nii.gz").write_bytes(gzip.compress(raw[:cut]) + gzip.compress(raw[cut:]))
    result = virtnii.scan([str(tmp_path)], str(tmp_path / "out"))
    assert not result.failures, result.failures
    group = virtnii.open(str(tmp_path / "out"))
    np.testing.assert_array_equal(virtnii.to_nibabel(group["pair"]).dataobj.get_unscaled(),
                                  np.asanyarray(src.dataobj))
    np.testing.assert_array_equal(virtnii.to_nibabel(group["multi"]).dataobj.get_unscaled(),
                                  nibabel_raw(DATA / "anatomical.nii"))


def test_bad_gzip_sources_are_reported_by_name(tmp_path: Path) -> None:
    import gzip

    raw = gzip.compress((DATA / "anatomical.nii").read_bytes())
    (tmp_path / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "plain.nii.gz").write_bytes((DATA / "anatomical.nii").read_bytes())
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    corrupt = bytearray(raw)
    corrupt[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)
    (tmp_path / "corrupt.nii.gz").write_bytes(bytes(corrupt))
    result = virtnii.scan([str(tmp_path)], str(tmp_path / "out"))
    assert result.manifest is None and not (tmp_path / "out").exists()
    assert not list(tmp_path.glob("out.partial-*"))
    by_file = {Path(f.source.removeprefix("file://")).name: f for f in result.failures}
    assert sorted(by_file) == ["corrupt.nii.gz", "empty.nii.gz", "plain.nii.gz", "truncated.nii.gz"]
    assert all(isinstance(f, virtnii.InvalidGzip) for f in by_file.values()), by_file


def test_gzip_header_claiming_a_huge_vox_offset_is_refused_without_inflating_it(tmp_path: Path) -> None:
    """vox_offset 1e9 in a small .nii.gz: the scanner must not inflate a gigabyte to find the header's end."""
    plain = patch_header(write_nifti(tmp_path / "src.nii", voxels((9, 8, 7), "i2")), vox_offset=1e9)
    (tmp_path / "huge.nii.gz").write_bytes(gzip.compress(plain.read_bytes() + bytes(2**21)))
    [error] = virtnii.scan([str(tmp_path / "huge.nii.gz")], str(tmp_path / "out")).failures
    assert isinstance(error, virtnii.InvalidNifti) and "vox_offset corrupt" in str(error)


# -------------------------------------------------------------------------------- files known by content

def test_extensionless_files_are_told_by_their_first_bytes(tmp_path: Path) -> None:
    """NIfTI-1 and NIfTI-2, plain and gzipped, without a suffix: each indexed as what it is, read bit-exact."""
    originals = {"blob-n1": DATA / "anatomical.nii", "blob-n1-gz": DATA / "example4d.nii.gz",
                 "blob-n2-gz": DATA / "example_nifti2.nii.gz",
                 "blob-n2": write_nifti(tmp_path / "n2.nii", voxels((7, 6, 5), ">f4"), version=2, endian=">")}
    (tmp_path / "blobs").mkdir()
    for name, original in originals.items():
        shutil.copy(original, tmp_path / "blobs" / name)
    result = virtnii.scan([str(tmp_path / "blobs" / name) for name in originals], str(tmp_path / "out"))
    assert not result.failures, [str(f) for f in result.failures]
    assert {e.name: bool(e.gzip_index) for e in result.images} == {name: name.endswith("-gz") for name in originals}
    assert {e.name: e.nifti_version for e in result.images} == {name: int(name[6]) for name in originals}
    group = virtnii.open(str(tmp_path / "out"))
    for name, original in originals.items():
        assert_same_voxels(group[name]["0"][...], file_to_zarr_order(nibabel_raw(original)))


@pytest.mark.parametrize("kind, content, error, words", [
    ("empty", b"", virtnii.InvalidNifti, "not a NIfTI file: an empty file"),
    ("text", b"subject,age\n" * 40, virtnii.InvalidNifti, "not a NIfTI file: no NIfTI-1/NIfTI-2 magic"),
    ("analyze-header", (DATA / "analyze.hdr").read_bytes(), virtnii.InvalidNifti, "no NIfTI-1/NIfTI-2 magic"),
    ("pair-header", (DATA / "nifti2.hdr").read_bytes(), virtnii.InvalidNifti, "the header of a .hdr/.img pair"),
    # a gzip header, then a deflate block of the reserved type 3
    ("corrupt-gzip", b"\x1f\x8b\x08" + bytes(6) + b"\xff" * 64, virtnii.InvalidGzip, "corrupt gzip data"),
    ("gzipped-html", gzip.compress(b"<html>" + b" " * 400), virtnii.InvalidNifti,
     "gzip-compressed, and inside it an HTML"),
])
def test_extensionless_files_that_are_not_nifti_are_reported(tmp_path: Path, kind: str, content: bytes,
                                                             error: type, words: str) -> None:
    (tmp_path / kind).write_bytes(content)
    result = virtnii.scan([str(DATA / "anatomical.nii"), str(tmp_path / kind)], str(tmp_path / "out"))
    assert [e.name for e in result.images] == ["anatomical"]
    [failure] = result.failures
    assert type(failure) is error and words in str(failure) and failure.source.endswith(f"/{kind}")


def test_the_data_file_of_a_pair_given_alone_is_refused_by_name(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Pair(np.zeros((3, 2, 2), "i2"), np.eye(4)), tmp_path / "p.img")
    [failure] = virtnii.scan([str(tmp_path / "p.img")], str(tmp_path / "out")).failures
    assert isinstance(failure, virtnii.InvalidNifti) and "give its .hdr" in str(failure)


# ------------------------------------------------------------------------------------------- naming edges

def test_gzip_sidecars_of_lookalike_names_do_not_collide(tmp_path: Path) -> None:
    """``a/b`` and ``a__b`` once shared one sidecar name, so one image served the other's voxels."""
    import gzip

    (tmp_path / "ds" / "a").mkdir(parents=True)
    anat, func = (DATA / "anatomical.nii").read_bytes(), (DATA / "functional.nii").read_bytes()
    (tmp_path / "ds" / "a" / "b.nii.gz").write_bytes(gzip.compress(anat))
    (tmp_path / "ds" / "a__b.nii.gz").write_bytes(gzip.compress(func))
    virtnii.scan([str(tmp_path / "ds")], str(tmp_path / "out"))
    group = virtnii.open(str(tmp_path / "out"))
    np.testing.assert_array_equal(virtnii.to_nibabel(group["a/b"]).dataobj.get_unscaled(), nibabel_raw(DATA / "anatomical.nii"))
    np.testing.assert_array_equal(virtnii.to_nibabel(group["a__b"]).dataobj.get_unscaled(), nibabel_raw(DATA / "functional.nii"))


def test_an_existing_folder_that_is_not_a_manifest_is_never_replaced(tmp_path: Path) -> None:
    dataset = tmp_path / "ds"
    bids_tree(dataset)
    before = sorted(p.relative_to(dataset) for p in dataset.rglob("*"))
    with pytest.raises(virtnii.ManifestError, match="not a virtnii manifest"):
        virtnii.scan([str(dataset / "sub-01")], str(dataset))
    assert sorted(p.relative_to(dataset) for p in dataset.rglob("*")) == before


def test_header_split_across_tiny_gzip_members(tmp_path: Path) -> None:
    raw = (DATA / "functional.nii").read_bytes()
    members = [raw[:100], raw[100:200], raw[200:5000], raw[5000:]]  # the 352-byte header spans three members
    (tmp_path / "split.nii.gz").write_bytes(b"".join(gzip.compress(m) for m in members))
    result = virtnii.scan([str(tmp_path / "split.nii.gz")], str(tmp_path / "out"))
    assert not result.failures, result.failures
    group = virtnii.open(str(tmp_path / "out"))
    np.testing.assert_array_equal(virtnii.to_nibabel(group["split"]).dataobj.get_unscaled(),
                                  nibabel_raw(DATA / "functional.nii"))


@pytest.mark.parametrize("first_read", [2**20, 1024])
def test_gzip_header_with_large_extensions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first_read: int) -> None:
    """A .nii.gz whose extensions outgrow the first inflated 16 KiB (and, with a 1 KiB first read, the first
    compressed bytes): the header is read whole, and the index pass resumes exactly after the bytes read."""
    monkeypatch.setattr(importlib.import_module("virtnii.scan"), "GZIP_FIRST_READ", first_read)
    rng = np.random.default_rng(3)
    extension = rng.integers(0, 256, 40_000, dtype=np.uint8).tobytes()  # incompressible: > 1 KiB compressed
    path = write_nifti(tmp_path / "ext.nii.gz", voxels((9, 8, 7), "i2"), extensions=(("comment", extension),))
    result = virtnii.scan([str(path)], str(tmp_path / "out"))
    assert not result.failures, result.failures
    group = virtnii.open(str(tmp_path / "out"))
    offset = nib.load(path).dataobj.offset
    assert np.asarray(group["ext"]["nifti"][:]).tobytes() == gzip.decompress(path.read_bytes())[:offset]
    np.testing.assert_array_equal(virtnii.to_nibabel(group["ext"]).dataobj.get_unscaled(), nibabel_raw(path))


def test_reader_left_open_across_a_rescan_never_reads_the_new_file(tmp_path: Path) -> None:
    """A manifest opened (say, in a notebook) stays open while its .nii.gz source is replaced and rescanned:
    the old references' offsets mean nothing in the new file, so reads must fail, never return its bytes."""
    path = write_nifti(tmp_path / "a.nii.gz", voxels((40, 30, 20), "i2"))
    virtnii.scan([str(path)], str(tmp_path / "out"))
    early = virtnii.open(str(tmp_path / "out"))["a"]["0"]  # its first read loads the index and checks the source
    late = virtnii.open(str(tmp_path / "out"))["a"]["0"]  # never read before the rescan
    np.testing.assert_array_equal(early[0], voxels((40, 30, 20), "i2")[:, :, 0].T)
    write_nifti(path, voxels((40, 30, 20), "i2", seed=5), extensions=(("comment", b"x" * 1000),))
    virtnii.scan([str(path)], str(tmp_path / "out"))
    with pytest.raises(virtnii.StaleSource):
        early[...]
    with pytest.raises(virtnii.ManifestError, match="gzip index"):
        late[...]


def test_interrupted_scan_stops_indexing_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during the gzip phase: queued files are not indexed, running passes end early, no manifest."""
    scanning, indexing = importlib.import_module("virtnii.scan"), importlib.import_module("virtnii.gzindex")
    blob = (DATA / "example4d.nii.gz").read_bytes()
    for i in range(20):
        (tmp_path / "ds" / f"sub-{i:02d}").mkdir(parents=True)
        (tmp_path / "ds" / f"sub-{i:02d}" / "bold.nii.gz").write_bytes(blob)
    monkeypatch.setattr(scanning, "_gzip_workers", lambda sources: 4)
    monkeypatch.setattr(scanning, "GZIP_FIRST_READ", 4096)  # many small pieces per pass, so passes are long
    monkeypatch.setattr(indexing, "_READ_PIECE", 4096)
    pieces: dict[int, int] = {}
    feed = indexing._Indexer.feed

    def counted(indexer: Any, piece: bytes) -> None:
        pieces[id(indexer)] = pieces.get(id(indexer), 0) + 1
        feed(indexer, piece)

    def interrupt(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(indexing._Indexer, "feed", counted)
    monkeypatch.setattr(scanning, "_collect", interrupt)  # the first finished file: as if Ctrl-C came then
    with pytest.raises(KeyboardInterrupt):
        virtnii.scan([str(tmp_path / "ds")], str(tmp_path / "out"))
    whole = -(-len(blob) // 4096)
    # 4 running, plus any a worker took up between a finish and the interrupt reaching the main thread
    assert len(pieces) < 10, f"{len(pieces)} of 20 files started after the interrupt"
    assert sorted(pieces.values())[0] < whole, f"no running pass ended early: {pieces}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_failure_to_write_a_sidecar_aborts_the_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest, not the source, is at fault: no manifest without that image, no failure naming the file."""
    indexing = importlib.import_module("virtnii.gzindex")

    def disk_full(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(indexing, "write_sidecar", disk_full)
    with pytest.raises(virtnii.ManifestError, match="No space left"):
        virtnii.scan([str(DATA / "anatomical.nii"), str(DATA / "example4d.nii.gz")], str(tmp_path / "out"))
    assert not list(tmp_path.iterdir())
