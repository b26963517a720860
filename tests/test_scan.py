"""Scanner: source expansion, naming, mixed good/bad batches, and any fsspec URL (memory://) end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import fsspec
import nibabel as nib
import numpy as np
import pytest

import virtnii
from virtnii.scan import assign_names, expand

DATA = Path(nib.__file__).parent / "tests" / "data"


def _bids_tree(root: Path) -> dict[str, Path]:
    """A small BIDS-like tree of real nibabel files: two subjects, anat + func."""
    files = {
        "sub-01/anat/sub-01_T1w": DATA / "anatomical.nii",
        "sub-01/func/sub-01_task-rest_bold": DATA / "functional.nii",
        "sub-02/anat/sub-02_T1w": DATA / "reoriented_anat_moved.nii",
    }
    out = {}
    for name, src in files.items():
        dest = root / f"{name}.nii"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
        out[name] = dest
    (root / "dataset_description.json").write_text("{}")
    return out


def _raw(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj.get_unscaled())


def test_folder_scan_names_groups_after_bids_paths(tmp_path: Path) -> None:
    files = _bids_tree(tmp_path / "ds")
    result = virtnii.scan([str(tmp_path / "ds")], str(tmp_path / "out"))
    assert not result.failures
    assert sorted(e["name"] for e in result.images) == sorted(files)
    group = virtnii.open(str(tmp_path / "out"))
    # listing walks the hierarchy (a known zarr/fsspec pitfall is empty listings of subgroups)
    assert sorted(group.group_keys()) == ["sub-01", "sub-02"]
    assert sorted(group["sub-01"].group_keys()) == ["anat", "func"]
    for name, path in files.items():
        np.testing.assert_array_equal(virtnii.to_nibabel(group[name]).dataobj.get_unscaled(), _raw(path))


def test_glob_and_explicit_files_are_deduplicated(tmp_path: Path) -> None:
    files = _bids_tree(tmp_path / "ds")
    sources = [str(tmp_path / "ds" / "sub-01" / "*" / "*.nii"), str(files["sub-01/anat/sub-01_T1w"])]
    found, failures = expand(sources, {})
    assert not failures
    assert len(found) == 2


def test_same_stem_in_one_folder_gets_distinct_names(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    shutil.copy(DATA / "anatomical.nii", tmp_path / "a" / "x.nii")
    shutil.copy(DATA / "anatomical.nii", tmp_path / "a" / "x.NII")
    found, _ = expand([str(tmp_path / "a")], {})
    assign_names(found)
    assert len({s.name for s in found}) == 2


def test_good_sources_are_kept_when_others_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.nii"
    bad.write_bytes(b"<!DOCTYPE html><html>not found</html>")
    result = virtnii.scan([str(DATA / "anatomical.nii"), str(bad), str(tmp_path / "missing.nii")],
                          str(tmp_path / "out"))
    assert [e["name"] for e in result.images] == ["anatomical"]
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
        assert sorted(e["name"] for e in result.images) == ["anat", "func"]
        assert not fs.exists("/vn-out.partial")
        group = virtnii.open("memory://vn-out")
        np.testing.assert_array_equal(virtnii.to_nibabel(group["func"]).dataobj.get_unscaled(),
                                      _raw(DATA / "functional.nii"))
    finally:
        fs.rm("/vn-src", recursive=True)
        fs.rm("/vn-out", recursive=True)
