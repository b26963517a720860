"""Export: level 0 gives back the source's bytes; level k is a NIfTI nibabel reads, placed where level 0 is."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import virtnii
from nifti_samples import DATA, nibabel_raw, write_samples
from test_pyramid import expected_levels, level_affine
from virtnii.export import export
from virtnii.pyramid import build_pyramids

REAL = [DATA / "anatomical.nii", DATA / "functional.nii", DATA / "example4d.nii.gz",
        DATA / "example_nifti2.nii.gz", DATA / "reoriented_anat_moved.nii"]
SYNTHETIC = ["int16_be", "float32_nan", "complex64", "rgb24", "5d_t_and_c", "extensions", "vox_offset_zero",
             "nifti2_be", "pair_nifti1_be", "pair_extensions", "2d"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    samples = write_samples(tmp_path_factory.mktemp("samples"), SYNTHETIC)
    out = tmp_path_factory.mktemp("export") / "manifest"
    result = virtnii.scan([str(p) for p in [*REAL, *samples.values()]], str(out))
    assert not result.failures
    build_pyramids(str(out), chunks=4)
    return out, {e.name: Path(e.source.removeprefix("file://")) for e in result.images}


def test_level0_of_a_single_file_source_is_its_bytes(manifest, tmp_path: Path) -> None:
    out, names = manifest
    checked = 0
    for name, source in names.items():
        if source.suffix == ".hdr":
            continue
        target = tmp_path / f"{name}.nii"
        export(str(out), str(target), name)
        original = gzip.decompress(source.read_bytes()) if source.name.endswith(".gz") else source.read_bytes()
        assert target.read_bytes() == original, name
        checked += 1
    assert checked == len(names) - 2


def test_level0_of_a_pair_is_a_single_file_with_the_same_voxels_and_placement(manifest, tmp_path: Path) -> None:
    out, names = manifest
    for name in ("pair_nifti1_be", "pair_extensions"):
        target = tmp_path / f"{name}.nii.gz"
        export(str(out), str(target), name)
        image, source = nib.load(target), nib.load(names[name])
        assert image.header["magic"] == b"n+1"
        np.testing.assert_array_equal(np.asanyarray(image.dataobj.get_unscaled()), nibabel_raw(names[name]))
        np.testing.assert_array_equal(image.affine, source.affine)
        assert [e.get_content() for e in image.header.extensions] == [e.get_content() for e in source.header.extensions]


def test_level_k_is_the_level_with_a_header_placing_it_like_level0(manifest, tmp_path: Path) -> None:
    out, names = manifest
    index = virtnii.manifest.read_index(str(out))
    checked = 0
    for name, source in names.items():
        entry = index.image(name)
        expected = expected_levels(source, len(entry.levels), "mean")
        for level, data in zip(entry.levels, expected):
            target = tmp_path / f"{name}.{level.path}.nii"
            export(str(out), str(target), name, level=int(level.path))
            image, original = nib.load(target), nib.load(source)
            raw = np.asanyarray(image.dataobj.get_unscaled())
            zarr_order = raw.transpose(tuple(reversed(range(raw.ndim)))) if raw.ndim <= 4 else \
                raw.transpose(3, 4, 2, 1, 0)
            if raw.ndim == 2:
                zarr_order = zarr_order[None]
            got = zarr_order.view(np.uint8) if data.dtype.names else zarr_order
            want = np.ascontiguousarray(data).view(np.uint8) if data.dtype.names else data
            np.testing.assert_array_equal(got.reshape(want.shape), want)
            zyx = [f for f, a in zip(level.factors, entry.axes) if a in "zyx"]
            np.testing.assert_allclose(image.header.get_best_affine(),
                                       level_affine(original.header.get_best_affine(), zyx), atol=1e-4)
            assert image.header.get_slope_inter() == original.header.get_slope_inter() or \
                np.isnan(image.header.get_slope_inter()[0])
            checked += 1
    assert checked >= 20


def test_export_names_the_problem(manifest, tmp_path: Path) -> None:
    out, _ = manifest
    with pytest.raises(virtnii.ManifestError, match="name the one to export"):
        export(str(out), str(tmp_path / "x.nii"))
    with pytest.raises(virtnii.ManifestError, match="not 9"):
        export(str(out), str(tmp_path / "x.nii"), "anatomical", level=9)
    with pytest.raises(virtnii.ManifestError, match="no image named"):
        export(str(out), str(tmp_path / "x.nii"), "nope")
    (tmp_path / "blocked").write_text("")
    with pytest.raises(virtnii.ManifestError, match="cannot write the exported image"):
        export(str(out), str(tmp_path / "blocked" / "x.nii"), "anatomical")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked"]  # no partial file left
