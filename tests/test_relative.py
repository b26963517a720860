"""A manifest written inside its dataset, naming its sources relative to itself, moves with it.

The tree is real NIfTI from nibabel's test data — a ``.nii``, a ``.nii.gz`` and a ``.hdr/.img`` pair (written by
nibabel from a shipped ``.nii``: nibabel ships no ``.img``) — with the manifest at ``tree/derivatives/virtnii``.
After moving the whole tree (locally, and by copying a bucket prefix on the local S3 server) every image must
read back bit for bit as nibabel reads the moved files, through ``virtnii.open`` and through plain zarr.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import fsspec
import nibabel as nib
import numpy as np
import pytest
import zarr

import virtnii
from conftest import LocalS3
from nifti_samples import DATA
from virtnii.cli import main
from virtnii.manifest import RELATIVE_SOURCES_VERSION, read_index
from virtnii.manifest.entry import relative_source, relative_to, resolve
from virtnii.pyramid import build_pyramids

#: Image name -> file in the tree (the header file of the pair).
FILES = {
    "sub-01/anat/sub-01_T1w": "sub-01/anat/sub-01_T1w.nii",
    "sub-01/func/sub-01_task-rest_bold": "sub-01/func/sub-01_task-rest_bold.nii.gz",
    "sub-02/anat/sub-02_T1w": "sub-02/anat/sub-02_T1w.hdr",
}
MANIFEST = "derivatives/virtnii"


def _make_tree(root: Path) -> Path:
    for folder in ("sub-01/anat", "sub-01/func", "sub-02/anat"):
        (root / folder).mkdir(parents=True)
    shutil.copy(DATA / "anatomical.nii", root / FILES["sub-01/anat/sub-01_T1w"])
    shutil.copy(DATA / "example4d.nii.gz", root / FILES["sub-01/func/sub-01_task-rest_bold"])
    moved = nib.load(DATA / "reoriented_anat_moved.nii")
    nib.save(nib.Nifti1Pair(np.asanyarray(moved.dataobj), moved.affine, moved.header),
             root / "sub-02/anat/sub-02_T1w.img")
    assert (root / FILES["sub-02/anat/sub-02_T1w"]).exists()
    return root


def _raw(path: Path) -> np.ndarray:
    """nibabel's unscaled voxels in zarr axis order ([t,] z, y, x)."""
    return np.asanyarray(nib.load(path).dataobj.get_unscaled()).T


def _assert_reads_back(group: zarr.Group, tree: Path) -> None:
    for name, file in FILES.items():
        np.testing.assert_array_equal(group[name]["0"][:], _raw(tree / file), err_msg=name)


@pytest.fixture
def scanned(tmp_path: Path) -> Path:
    """A tree scanned into ``tree/derivatives/virtnii`` with relative sources, with pyramids."""
    tree = _make_tree(tmp_path / "before" / "tree")
    result = virtnii.scan([str(tree)], str(tree / MANIFEST), relative_sources=True)
    assert not result.failures and len(result.images) == 3
    build_pyramids(str(tree / MANIFEST), chunks=16)
    return tree


def _move(tree: Path, tmp_path: Path) -> Path:
    shutil.move(tree.parent, tmp_path / "after")
    moved = tmp_path / "after" / "tree"
    assert not tree.exists() and (moved / MANIFEST / "virtnii.json").exists()
    return moved


def test_the_manifest_names_its_sources_relative_to_itself(scanned: Path) -> None:
    manifest = scanned / MANIFEST
    index = read_index(str(manifest))
    by_name = {entry.name: entry for entry in index.images}
    assert by_name["sub-01/anat/sub-01_T1w"].source == "../../sub-01/anat/sub-01_T1w.nii"
    pair = by_name["sub-02/anat/sub-02_T1w"]
    assert (pair.source, pair.data) == ("../../sub-02/anat/sub-02_T1w.hdr", "../../sub-02/anat/sub-02_T1w.img")
    assert json.loads((manifest / "virtnii.json").read_text())["virtnii_manifest"] == RELATIVE_SOURCES_VERSION
    [descriptor] = (manifest / "gzindex").rglob("*.gzidx.json")
    assert json.loads(descriptor.read_text())["source"] == "../../sub-01/func/sub-01_task-rest_bold.nii.gz"
    for file in manifest.rglob("*.json"):  # nothing in the manifest says where the tree was
        assert str(scanned.parent) not in file.read_text(), file


def test_a_moved_tree_reads_back_bit_exact(scanned: Path, tmp_path: Path) -> None:
    before = {name: virtnii.open(str(scanned / MANIFEST))[name]["1"][:] for name in FILES}
    tree = _move(scanned, tmp_path)
    manifest = str(tree / MANIFEST)
    group = virtnii.open(manifest)
    _assert_reads_back(group, tree)
    for name, level in before.items():  # levels built before the move
        np.testing.assert_array_equal(group[name]["1"][:], level, err_msg=name)
    plain = zarr.open_group("reference://", mode="r", storage_options=virtnii.reference_options(manifest))
    _assert_reads_back(plain, tree)
    image = virtnii.to_nibabel(group["sub-01/func/sub-01_task-rest_bold"])
    expected = nib.load(tree / FILES["sub-01/func/sub-01_task-rest_bold"]).get_fdata()
    np.testing.assert_array_equal(image.get_fdata(), expected)


def test_parquet_references_move_too(tmp_path: Path) -> None:
    """fsspec's lazy Parquet references hold the same relative names (Zarr v2, as Parquet needs)."""
    tree = _make_tree(tmp_path / "before" / "tree")
    virtnii.scan([str(tree)], str(tree / MANIFEST), relative_sources=True, zarr_format=2, ref_format="parquet")
    tree = _move(tree, tmp_path)
    manifest = str(tree / MANIFEST)
    _assert_reads_back(virtnii.open(manifest), tree)
    _assert_reads_back(zarr.open_group("reference://", mode="r",
                                       storage_options=virtnii.reference_options(manifest)), tree)
    assert virtnii.verify(manifest) == (4, [])


def test_a_manifest_opened_from_another_working_directory(scanned: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative sources resolve against the manifest folder, never the reader's working directory."""
    tree = _move(scanned, tmp_path)
    monkeypatch.chdir(tree / "sub-01")
    _assert_reads_back(virtnii.open(os.path.relpath(tree / MANIFEST)), tree)


def test_verify_export_and_info_after_the_move(scanned: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    tree = _move(scanned, tmp_path)
    manifest = str(tree / MANIFEST)
    checked, problems = virtnii.verify(manifest)
    assert (checked, problems) == (4, [])
    out = virtnii.export(manifest, str(tmp_path / "t1.nii"), "sub-01/anat/sub-01_T1w")
    assert Path(out).read_bytes() == (tree / FILES["sub-01/anat/sub-01_T1w"]).read_bytes()
    assert main(["info", manifest]) == 0
    assert f"file://{tree}/sub-02/anat/sub-02_T1w.hdr" in capsys.readouterr().out


def test_a_source_changed_after_the_move_is_stale(scanned: Path, tmp_path: Path) -> None:
    tree = _move(scanned, tmp_path)
    manifest = str(tree / MANIFEST)
    for file in [*FILES.values(), "sub-02/anat/sub-02_T1w.img"]:
        path = tree / file
        path.write_bytes(path.read_bytes() + b"\0")
    checked, problems = virtnii.verify(manifest)
    assert checked == 4 and len(problems) == 4 and all(isinstance(p, virtnii.StaleSource) for p in problems)
    assert all(str(tree) in str(p) for p in problems)  # named where they are now
    group = virtnii.open(manifest)
    for name in FILES:
        with pytest.raises(virtnii.StaleSource, match=str(tree)):
            group[name]["0"][:]
    with pytest.raises(virtnii.StaleSource):
        virtnii.export(manifest, str(tmp_path / "pair.nii"), "sub-02/anat/sub-02_T1w")


def test_a_pyramid_built_after_the_move_and_verify_with_content_hashes(tmp_path: Path) -> None:
    tree = _make_tree(tmp_path / "before" / "tree")
    virtnii.scan([str(tree)], str(tree / MANIFEST), relative_sources=True, content_hash=True)
    tree = _move(tree, tmp_path)
    manifest = str(tree / MANIFEST)
    result = build_pyramids(manifest, chunks=16)
    assert not result.failures and len(result.built) == 3
    assert virtnii.verify(manifest, content=True) == (4, [])
    assert read_index(manifest).images[0].source.startswith("../../")  # the rewritten index stays relative
    _assert_reads_back(virtnii.open(manifest), tree)


def test_combining_a_relative_manifest_names_its_sources_by_url(scanned: Path, tmp_path: Path) -> None:
    out = tmp_path / "combined"
    virtnii.combine([str(scanned / MANIFEST)], str(out), prefixes=["ds"])
    index = read_index(str(out))
    assert {entry.source for entry in index.images} == {f"file://{scanned}/{file}" for file in FILES.values()}
    [descriptor] = (out / "gzindex").rglob("*.gzidx.json")
    gz = FILES["sub-01/func/sub-01_task-rest_bold"]
    assert json.loads(descriptor.read_text())["source"] == f"file://{scanned}/{gz}"
    assert json.loads((out / "virtnii.json").read_text())["virtnii_manifest"] == 2
    assert virtnii.verify(str(out)) == (4, [])
    group = virtnii.open(str(out))
    for name, file in FILES.items():
        np.testing.assert_array_equal(group[f"ds/{name}"]["0"][:], _raw(scanned / file), err_msg=name)
        assert group[f"ds/{name}"]["1"].shape == virtnii.open(str(scanned / MANIFEST))[name]["1"].shape


def test_cli_scan_relative_sources(tmp_path: Path) -> None:
    tree = _make_tree(tmp_path / "tree")
    assert main(["scan", str(tree), "-o", str(tree / MANIFEST), "--relative-sources", "-q"]) == 0
    assert all(entry.source.startswith("../../") for entry in read_index(str(tree / MANIFEST)).images)


def test_a_source_off_the_manifests_filesystem_is_refused(tmp_path: Path) -> None:
    tree = _make_tree(tmp_path / "tree")
    out = "memory://relative-test/m"
    with pytest.raises(virtnii.ManifestError, match="sub-01_T1w.nii: is not on the filesystem of the manifest"):
        virtnii.scan([str(tree)], out, relative_sources=True)
    assert not fsspec.filesystem("memory").exists(out)
    assert main(["scan", str(tree), "-o", out, "--relative-sources", "-q"]) == 2


def test_a_remote_copy_resolves_on_its_own_filesystem(scanned: Path) -> None:
    """A remote manifest's relative sources are its own store's files: they need no allow_local_sources, and
    the local originals are never read (they are changed here, and the copy still reads)."""
    fs = fsspec.filesystem("memory")
    remote = "memory://relative-copy/tree"
    fs.put(str(scanned), remote, recursive=True)
    try:
        for file in FILES.values():
            (scanned / file).write_bytes(b"changed")
        group = virtnii.open(f"{remote}/{MANIFEST}")
        for name in FILES:
            assert group[name]["0"][:].shape == read_index(f"{remote}/{MANIFEST}").image(name).shape
        assert virtnii.verify(f"{remote}/{MANIFEST}")[1] == []
    finally:
        fs.rm(remote, recursive=True)


def test_a_relative_source_climbing_above_the_root_is_refused(scanned: Path) -> None:
    manifest = scanned / MANIFEST
    index = json.loads((manifest / "virtnii.json").read_text())
    index["images"][0]["source"] = "../" * 40 + "etc/passwd"
    (manifest / "virtnii.json").write_text(json.dumps(index))
    with pytest.raises(virtnii.ManifestError, match="climbs above file:///"):
        virtnii.open(str(manifest))


@pytest.mark.parametrize("source", ["a/../b.nii", "./b.nii", "../x/", "..", "sub//b.nii"])
def test_relative_sources_must_be_normalised(scanned: Path, source: str) -> None:
    manifest = scanned / MANIFEST
    index = json.loads((manifest / "virtnii.json").read_text())
    index["images"][0]["source"] = source
    (manifest / "virtnii.json").write_text(json.dumps(index))
    with pytest.raises(virtnii.ManifestError, match="is neither a URL nor a normalised path"):
        virtnii.open(str(manifest))


def test_a_listed_relative_source_does_not_open_other_files(scanned: Path) -> None:
    """``..`` is allowed only for the sources the index file lists: a chunk reference to another file next to
    them is refused (the level-store rules of test_trust.py are unchanged)."""
    manifest = scanned / MANIFEST
    (scanned / "secret.txt").write_text("not yours")
    refs_path = manifest / read_index(str(manifest)).references
    doc = json.loads(refs_path.read_text())
    doc["refs"]["sub-01/anat/sub-01_T1w/0/c/0/0/0"] = ["../../secret.txt", 0, 9]
    refs_path.write_text(json.dumps(doc))
    with pytest.raises(virtnii.ManifestError, match="must name a file inside it"):
        virtnii.open(str(manifest))["sub-01/anat/sub-01_T1w"]["0"][:]


def test_resolving_and_naming_relative_sources() -> None:
    manifest = "s3://bucket/ds/derivatives/virtnii"
    assert relative_to(manifest, "s3://bucket/ds/sub-01/a.nii") == "../../sub-01/a.nii"
    assert relative_to(manifest, "s3://bucket/ds/derivatives/virtnii/x/a.nii") == "x/a.nii"
    assert relative_to(manifest, "s3://bucket/a.nii") == "../../../a.nii"
    assert relative_to(manifest, "s3://other/ds/a.nii") is None  # another bucket
    assert relative_to(manifest, "gs://bucket/ds/a.nii") is None  # another protocol
    assert relative_to("file:///data/ds/derivatives/virtnii", "file:///a.nii") == "../../../../a.nii"
    assert resolve(manifest, "../../sub-01/a.nii") == "s3://bucket/ds/sub-01/a.nii"
    assert resolve("https://host.org/ds/derivatives/virtnii", "../../a.nii") == "https://host.org/ds/a.nii"
    with pytest.raises(virtnii.ManifestError, match="climbs above s3://bucket/"):
        resolve(manifest, "../../../../other/a.nii")  # never into another bucket
    with pytest.raises(virtnii.ManifestError, match="climbs above https://host.org/"):
        resolve("https://host.org/ds/m", "../../../evil.org/a.nii")  # never onto another host
    assert relative_source("../../a.nii") == "../../a.nii"


# ------------------------------------------------------------------------------------------------------ S3

def test_a_tree_copied_to_another_bucket_prefix_reads_back(s3: LocalS3, tmp_path: Path) -> None:
    tree = _make_tree(tmp_path / "tree")
    bucket = s3.create_bucket("dataset")
    fs = s3.filesystem()
    fs.put(str(tree), f"{bucket}/old/tree", recursive=True)
    old = f"s3://{bucket}/old/tree"
    result = virtnii.scan([old], f"{old}/{MANIFEST}", storage_options=s3.storage_options,
                          manifest_options=s3.storage_options, relative_sources=True)
    assert not result.failures and len(result.images) == 3
    build_pyramids(f"{old}/{MANIFEST}", chunks=16, **s3.storage_options)
    level = virtnii.open(f"{old}/{MANIFEST}", **s3.storage_options)["sub-01/anat/sub-01_T1w"]["1"][:]
    fs.copy(f"{bucket}/old/tree", f"{bucket}/new/tree", recursive=True)  # server-side copies: ETags kept
    fs.rm(f"{bucket}/old", recursive=True)
    manifest = f"s3://{bucket}/new/tree/{MANIFEST}"
    group = virtnii.open(manifest, **s3.storage_options)
    _assert_reads_back(group, tree)
    np.testing.assert_array_equal(group["sub-01/anat/sub-01_T1w"]["1"][:], level)
    plain = zarr.open_group("reference://", mode="r",
                            storage_options=virtnii.reference_options(manifest, **s3.storage_options))
    _assert_reads_back(plain, tree)
    assert virtnii.verify(manifest, **s3.storage_options) == (4, [])
    fs.pipe_file(f"{bucket}/new/tree/{FILES['sub-01/anat/sub-01_T1w']}", b"replaced")
    with pytest.raises(virtnii.StaleSource, match=f"s3://{bucket}/new/tree/sub-01"):
        virtnii.open(manifest, **s3.storage_options)["sub-01/anat/sub-01_T1w"]["0"][:]


def test_a_source_in_another_bucket_is_refused(s3: LocalS3, tmp_path: Path) -> None:
    tree = _make_tree(tmp_path / "tree")
    sources, manifests = s3.create_bucket("sources"), s3.create_bucket("manifests")
    s3.filesystem().put(str(tree), f"{sources}/tree", recursive=True)
    with pytest.raises(virtnii.ManifestError, match=f"s3://{sources}/tree/sub-01.*is not on the filesystem"):
        virtnii.scan([f"s3://{sources}/tree"], f"s3://{manifests}/m", storage_options=s3.storage_options,
                     manifest_options=s3.storage_options, relative_sources=True)
