"""Combining manifests: every image (level 0, pyramid levels, header) reads as in its own manifest."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import virtnii
from nifti_samples import DATA, bids_tree
from virtnii.manifest.combine import combine
from virtnii.pyramid import build_pyramids


def _all_arrays(group, name: str) -> dict[str, np.ndarray]:
    image = group[name]
    return {key: np.asarray(image[key][...]) for key in image.array_keys()}


@pytest.fixture
def two(tmp_path: Path) -> tuple[Path, Path]:
    """A BIDS-like folder (plain .nii, pyramid built) and a .nii.gz manifest (gzip sidecars, pyramid)."""
    bids_tree(tmp_path / "bids")
    virtnii.scan([str(tmp_path / "bids")], str(tmp_path / "a"))
    build_pyramids(str(tmp_path / "a"), chunks=8)
    virtnii.scan([str(DATA / "example4d.nii.gz"), str(DATA / "example_nifti2.nii.gz")], str(tmp_path / "b"))
    build_pyramids(str(tmp_path / "b"), chunks=16)
    return tmp_path / "a", tmp_path / "b"


@pytest.mark.parametrize("prefixes", [None, ["site-a", "site-b/gz"]])
def test_combined_images_read_like_their_own_manifests(two, tmp_path: Path, prefixes) -> None:
    a, b = two
    index = combine([str(a), str(b)], str(tmp_path / "all"), prefixes=prefixes)
    combined = virtnii.open(str(tmp_path / "all"))
    expected_names = []
    for manifest, prefix in zip((a, b), prefixes or ["", ""]):
        own = virtnii.open(str(manifest))
        for entry in virtnii.manifest.read_index(str(manifest)).images:
            name = f"{prefix}/{entry.name}" if prefix else entry.name
            expected_names.append(name)
            mine, theirs = _all_arrays(combined, name), _all_arrays(own, entry.name)
            assert sorted(mine) == sorted(theirs) and len(mine) > 2  # nifti, 0 and levels
            for key in theirs:
                np.testing.assert_array_equal(mine[key], theirs[key])
            assert combined[name].attrs.asdict() == own[entry.name].attrs.asdict()
    assert sorted(e.name for e in index.images) == sorted(expected_names)
    # the gzip sidecars travel with the combined manifest: the inputs' copies are no longer needed
    shutil.rmtree(b / "gzindex")
    fresh = virtnii.open(str(tmp_path / "all"))
    name = "site-b/gz/example4d" if prefixes else "example4d"
    assert fresh[name]["0"][...].any()
    assert (tmp_path / "all" / "gzindex").exists()


def test_levels_of_an_input_that_disappear_are_an_error_not_zeros(two, tmp_path: Path) -> None:
    a, b = two
    combine([str(a), str(b)], str(tmp_path / "all"))
    shutil.rmtree(a / "levels")
    group = virtnii.open(str(tmp_path / "all"))
    with pytest.raises(virtnii.VirtniiError, match="no such file"):
        group["sub-01/anat/sub-01_T1w"]["1"][...]


def test_name_clashes_are_refused_before_anything_is_written(two, tmp_path: Path) -> None:
    a, b = two
    with pytest.raises(virtnii.ManifestError, match=r"clash: sub-01/anat/sub-01_T1w \(in .* and .*\).*--prefix"):
        combine([str(a), str(a)], str(tmp_path / "all"))
    shutil.copy(DATA / "anatomical.nii", tmp_path / "sub-01.nii")
    virtnii.scan([str(tmp_path / "sub-01.nii")], str(tmp_path / "single"))  # an image named like a's folder
    with pytest.raises(virtnii.ManifestError, match="sub-01 .an image, and a folder of other images"):
        combine([str(a), str(tmp_path / "single")], str(tmp_path / "all"))
    with pytest.raises(virtnii.ManifestError, match="plain group path"):
        combine([str(a)], str(tmp_path / "all"), prefixes=["../up"])
    assert not (tmp_path / "all").exists() and not list(tmp_path.glob("all.partial-*"))


def test_zarr_formats_must_agree(two, tmp_path: Path) -> None:
    a, _ = two
    virtnii.scan([str(DATA / "anatomical.nii")], str(tmp_path / "v2"), zarr_format=2)
    with pytest.raises(virtnii.ManifestError, match="cannot combine Zarr v2 and Zarr v3"):
        combine([str(a), str(tmp_path / "v2")], str(tmp_path / "all"))


def test_parquet_inputs_and_output(tmp_path: Path) -> None:
    virtnii.scan([str(DATA / "functional.nii")], str(tmp_path / "f"), zarr_format=2, ref_format="parquet")
    build_pyramids(str(tmp_path / "f"), chunks=8)
    virtnii.scan([str(DATA / "example4d.nii.gz")], str(tmp_path / "g"), zarr_format=2)
    index = combine([str(tmp_path / "f"), str(tmp_path / "g")], str(tmp_path / "all"))
    assert index.references == "refs.parquet"
    combined, own = virtnii.open(str(tmp_path / "all")), virtnii.open(str(tmp_path / "f"))
    for key, value in _all_arrays(own, "functional").items():
        np.testing.assert_array_equal(_all_arrays(combined, "functional")[key], value)
