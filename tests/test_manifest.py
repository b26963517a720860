"""Manifest folder: all-or-nothing writes, the index file, replacement of an existing manifest."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import virtnii
import virtnii.layout
import virtnii.references
from nifti_samples import file_to_zarr_order
from virtnii import manifest
from virtnii.manifest import writer

DATA = Path(nib.__file__).parent / "tests" / "data"


def test_index_file_describes_each_image(tmp_path: Path) -> None:
    virtnii.scan([str(DATA / "functional.nii")], str(tmp_path / "out"))
    index = json.loads((tmp_path / "out" / "virtnii.json").read_text())
    assert index["virtnii_manifest"] == 2 and index["zarr_format"] == 3 and index["references"] == "refs.json"
    (image,) = index["images"]
    assert image["name"] == "functional"
    assert image["source"] == (DATA / "functional.nii").as_uri()
    assert image["shape"] == [20, 3, 21, 17] and image["axes"] == "tzyx" and image["dtype"] == "<i2"
    assert image["nbytes"] == 17 * 21 * 3 * 20 * 2
    assert image["fingerprint"]["size"] == (DATA / "functional.nii").stat().st_size


def test_failed_commit_leaves_no_partial_folder_and_keeps_old_manifest(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    virtnii.scan([str(DATA / "anatomical.nii")], str(out))
    before = (out / "refs.json").read_bytes()

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(writer, "build_refs", explode)
    with pytest.raises(RuntimeError):
        virtnii.scan([str(DATA / "functional.nii")], str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "refs.json").read_bytes() == before


def test_rescan_replaces_manifest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    virtnii.scan([str(DATA / "anatomical.nii")], str(out))
    virtnii.scan([str(DATA / "functional.nii")], str(out), zarr_format=2)
    index = manifest.read_index(str(out))
    assert [i.name for i in index.images] == ["functional"] and index.zarr_format == 2
    assert not (out / "zarr.json").exists()


@pytest.mark.parametrize("content, problem", [(None, "not a virtnii manifest"),
                                               ('{"virtnii_manifest": 99}', "format 99"),
                                               ("{not json", "cannot read")])
def test_unreadable_manifests_raise_manifest_error(tmp_path: Path, content: str | None, problem: str) -> None:
    if content is not None:
        (tmp_path / "virtnii.json").write_text(content)
    with pytest.raises(virtnii.ManifestError, match=problem):
        virtnii.open(str(tmp_path))


def test_parquet_references_need_zarr_v2(tmp_path: Path) -> None:
    with pytest.raises(virtnii.ManifestError, match="zarr-format 2"):
        virtnii.scan([str(DATA / "anatomical.nii")], str(tmp_path / "out"), ref_format="parquet")
    virtnii.scan([str(DATA / "anatomical.nii")], str(tmp_path / "out"), ref_format="parquet", zarr_format=2)
    group = virtnii.open(str(tmp_path / "out"))
    assert group["anatomical/0"].shape == (25, 41, 33)


@pytest.mark.parametrize("damage, problem", [("delete", "are missing"), ("truncate", "cannot read references")])
def test_missing_or_damaged_references_raise_manifest_error(tmp_path: Path, damage: str, problem: str) -> None:
    virtnii.scan([str(DATA / "anatomical.nii")], str(tmp_path / "out"))
    refs = tmp_path / "out" / "refs.json"
    if damage == "delete":
        refs.unlink()
    else:
        refs.write_bytes(refs.read_bytes()[:100])
    with pytest.raises(virtnii.ManifestError, match=problem):
        virtnii.open(str(tmp_path / "out"))


def _parquet_files(out: Path, array: str) -> list[str]:
    return sorted(p.name for p in (out / "refs.parquet" / array).glob("refs.*.parq"))


def test_parquet_record_size_fits_the_largest_array(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parquet files hold as many rows as the array with the most chunks has chunks (one file per array), not
    kerchunk's 100,000 padded rows; beyond the cap, an array takes several files."""
    monkeypatch.setattr(virtnii.references, "plan", functools.partial(virtnii.layout.plan, target=256, limit=1024))
    sources = {"functional": DATA / "functional.nii", "anatomical": DATA / "anatomical.nii"}
    expected = {name: file_to_zarr_order(nib.load(path).dataobj.get_unscaled()) for name, path in sources.items()}
    out = tmp_path / "out"
    virtnii.scan([str(p) for p in sources.values()], str(out), zarr_format=2, ref_format="parquet")
    group = virtnii.open(str(out))
    chunks = {name: group[name]["0"].nchunks for name in sources}
    assert 1 < chunks["functional"] < chunks["anatomical"]
    assert json.loads((out / "refs.parquet" / ".zmetadata").read_text())["record_size"] == chunks["anatomical"]
    for name in sources:
        assert _parquet_files(out, f"{name}/0") == ["refs.0.parq"]
        np.testing.assert_array_equal(group[name]["0"][...], expected[name])

    monkeypatch.setattr(writer, "MAX_RECORD_SIZE", 8)
    virtnii.scan([str(p) for p in sources.values()], str(out), zarr_format=2, ref_format="parquet")
    group = virtnii.open(str(out))
    for name in sources:
        assert len(_parquet_files(out, f"{name}/0")) == -(-chunks[name] // 8)
        np.testing.assert_array_equal(group[name]["0"][...], expected[name])


def test_references_and_index_that_disagree_never_read_unchecked(tmp_path: Path) -> None:
    """An interrupted replacement on an object store can pair new references with the old index file: a source
    the index does not list is refused, and .nii.gz images still read through their own versioned sidecars."""
    virtnii.scan([str(DATA / "anatomical.nii")], str(tmp_path / "old"))
    virtnii.scan([str(DATA / "functional.nii"), str(DATA / "example4d.nii.gz")], str(tmp_path / "new"))
    shutil.copy(tmp_path / "old" / "virtnii.json", tmp_path / "new" / "virtnii.json")
    group = virtnii.open(str(tmp_path / "new"))
    with pytest.raises(virtnii.ManifestError, match="functional.nii: is referenced but not listed"):
        group["functional"]["0"][...]
    expected = file_to_zarr_order(nib.load(DATA / "example4d.nii.gz").dataobj.get_unscaled())
    np.testing.assert_array_equal(group["example4d"]["0"][...], expected)


def test_references_through_storage_the_index_file_does_not_list_are_refused(tmp_path: Path) -> None:
    """The old index file listed only .nii.gz (no filesystem for plain files is set up): still a clear error."""
    virtnii.scan([str(DATA / "example4d.nii.gz")], str(tmp_path / "old"))
    virtnii.scan([str(DATA / "functional.nii")], str(tmp_path / "new"))
    shutil.copy(tmp_path / "old" / "virtnii.json", tmp_path / "new" / "virtnii.json")
    with pytest.raises(virtnii.ManifestError, match="which the manifest's index file does not list"):
        virtnii.open(str(tmp_path / "new"))["functional"]["0"][...]
