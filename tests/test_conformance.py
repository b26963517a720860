"""virtnii against the outside world: real files nobody here wrote, nibabel, niizarr, OME and the spec's schema.

Every voxel read through virtnii must equal nibabel's raw read of the same file bit for bit; every image group
must be readable by the NIfTI-Zarr reference reader (PyPI ``nifti-zarr``), carry OME metadata that
``ome-zarr-models`` accepts and a JNIfTI header that the NIfTI-Zarr schema accepts — in both zarr formats, and
through plain ``zarr.open_group("reference://")`` and Parquet references as well as :func:`virtnii.open`.
"""

from __future__ import annotations

import functools
import io
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
import pytest
import zarr

import virtnii
import virtnii.layout
import virtnii.references
from nifti_samples import (SAMPLES, assert_same_voxels, file_to_zarr_order, nibabel_image, nibabel_raw,
                           write_samples)

SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "spec" / "nifti-zarr-schema-1.0.rc1.json"
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
#: Installed files bigger than this would slow the suite; none of today's wheels ships one uncompressed.
MAX_INSTALLED_BYTES = 64 * 2**20


def installed_niftis() -> dict[str, Path]:
    """Uncompressed, data-bearing NIfTI files shipped in installed packages (``.nii``, ``.hdr`` with ``.img``).

    Keyed by path relative to site-packages, which names the package the file came from.
    """
    found: dict[str, Path] = {}
    for root in {Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")}:
        for folder, _, files in os.walk(root):
            for name in files:
                path = Path(folder) / name
                lower = name.lower()
                has_data = lower.endswith(".nii") or (lower.endswith(".hdr") and path.with_suffix(".img").exists())
                if has_data and path.stat().st_size <= MAX_INSTALLED_BYTES:
                    found[str(path.relative_to(root))] = path
    return dict(sorted(found.items()))


INSTALLED = installed_niftis()


def _refused_by_design(path: Path) -> bool:
    """Files NIfTI-Zarr cannot hold: more than five axes that are not singletons (e.g. CIFTI dconn)."""
    image = nib.load(path)
    shape = getattr(image, "nifti_header", image.header).get_data_shape()  # CIFTI images reshape theirs
    return len(shape) > 5 and any(n != 1 for n in shape[5:])


INDEXABLE = {key: path for key, path in INSTALLED.items() if not _refused_by_design(path)}
REFUSED = {key: path for key, path in INSTALLED.items() if _refused_by_design(path)}


@dataclass
class Scanned:
    """One scan: the result, the opened manifest, and the file behind each image name."""

    result: virtnii.ScanResult
    group: zarr.Group
    paths: dict[str, Path]
    manifest: str


def _scan(paths: dict[str, Path], out: Path, zarr_format: int, **options: object) -> Scanned:
    result = virtnii.scan([str(p) for p in paths.values()], str(out), zarr_format=zarr_format, **options)
    by_source = {f"file://{p}": p for p in paths.values()}
    names = {entry.name: by_source[entry.source] for entry in result.images}
    return Scanned(result, virtnii.open(str(out)), names, str(out))


@pytest.fixture(scope="module", params=[3, 2], ids=["zarr3", "zarr2"])
def installed_scan(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Scanned:
    """All installed files in one manifest (the refused ones reported as failures)."""
    return _scan(INSTALLED, tmp_path_factory.mktemp("installed") / "manifest", request.param)


@pytest.fixture(scope="module")
def sample_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_samples(tmp_path_factory.mktemp("samples"))


@pytest.fixture(scope="module", params=[(3, "default"), (2, "default"), (3, "tiny"), (2, "tiny")],
                ids=lambda p: f"zarr{p[0]}-{p[1]}-chunks")
def sample_scan(request: pytest.FixtureRequest, sample_files: dict[str, Path],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scanned]:
    """All synthetic samples in one manifest; "tiny" chunks (~256 B) cut every sample into many byte ranges,
    so that chunk offsets (rows, slabs, volumes, t/c order) are exercised, not just one-chunk images."""
    zarr_format, chunking = request.param
    with pytest.MonkeyPatch.context() as patch:
        if chunking == "tiny":
            patch.setattr(virtnii.references, "plan", functools.partial(virtnii.layout.plan, target=256, limit=1024))
        scanned = _scan(sample_files, tmp_path_factory.mktemp("scan") / "manifest", zarr_format)
    assert not scanned.result.failures
    yield scanned


def _assert_matches_nibabel(group: zarr.Group, path: Path) -> None:
    """Voxels (zarr array, nibabel proxy raw and scaled), affine and slope/inter all equal nibabel's."""
    expected = nibabel_image(path)
    raw = nibabel_raw(path)
    assert_same_voxels(group["0"][...], file_to_zarr_order(raw))
    image = virtnii.to_nibabel(group)
    assert_same_voxels(image.dataobj.get_unscaled(), raw)
    assert_same_voxels(np.asarray(image.dataobj), np.asarray(expected.dataobj))
    np.testing.assert_array_equal(image.affine, expected.affine)
    np.testing.assert_array_equal(image.header.get_slope_inter(), expected.header.get_slope_inter())
    assert image.shape == expected.shape


# ------------------------------------------------------------------------------------------ installed files


def test_installed_files_include_nibabel_and_dipy_data() -> None:
    """Guard the discovery itself: an empty list would make every test below pass vacuously."""
    keys = set(INSTALLED)
    for name in ("anatomical.nii", "functional.nii", "reoriented_anat_moved.nii", "row_major.dconn.nii"):
        assert any(k.endswith(f"nibabel/tests/data/{name}") for k in keys), name
    if (NIBABEL_DATA.parent.parent.parent / "dipy").exists():
        assert any(k.endswith("dipy/data/files/small_64D.nii") for k in keys)


@pytest.mark.parametrize("key", list(INDEXABLE))
def test_installed_file_reads_like_nibabel(installed_scan: Scanned, key: str) -> None:
    names = [name for name, path in installed_scan.paths.items() if path == INDEXABLE[key]]
    assert len(names) == 1, f"{key} was not indexed: {installed_scan.result.failures}"
    _assert_matches_nibabel(installed_scan.group[names[0]], INDEXABLE[key])


def test_refused_installed_files_fail_as_unsupported_naming_the_file(installed_scan: Scanned) -> None:
    assert any(key.endswith("row_major.dconn.nii") for key in REFUSED)
    failures = {f.source: f for f in installed_scan.result.failures}
    assert len(failures) == len(REFUSED)
    for path in REFUSED.values():
        error = failures[f"file://{path}"]
        assert isinstance(error, virtnii.UnsupportedNifti)
        assert path.name in str(error) and "5 axes" in str(error)


# ---------------------------------------------------------------------------------------- synthetic samples


@pytest.mark.parametrize("name", list(SAMPLES))
def test_sample_reads_like_nibabel(sample_scan: Scanned, name: str) -> None:
    _assert_matches_nibabel(sample_scan.group[name], sample_scan.paths[name])


@pytest.mark.parametrize("name", list(SAMPLES))
def test_nifti_array_holds_the_header_bytes_as_stored(sample_scan: Scanned, name: str) -> None:
    """The ``nifti`` array is the stored header with its extensions (the whole ``.hdr`` of a pair): u1, 1 chunk."""
    path = sample_scan.paths[name]
    array = sample_scan.group[name]["nifti"]
    raw = np.asarray(array[:]).tobytes()
    assert array.dtype == np.uint8 and array.chunks == array.shape and array.ndim == 1
    assert not array.compressors and not array.filters
    assert raw == path.read_bytes()[: len(raw)]
    header = nib.load(path).header
    assert len(raw) >= header.sizeof_hdr
    if path.suffix == ".hdr":
        assert len(raw) == path.stat().st_size
    reparsed = type(header).from_fileobj(io.BytesIO(raw))
    assert [(e.get_code(), e.get_content()) for e in reparsed.extensions] == \
        [(e.get_code(), e.get_content()) for e in header.extensions]
    assert array.attrs["NIFTIExtension"][0] == (1 if header.extensions else 0)  # the JSON header agrees


def test_five_dimensional_axes_are_t_c_z_y_x(sample_scan: Scanned) -> None:
    """Spelled out for one voxel, so a transposition that happens to survive the bulk checks cannot."""
    raw = nibabel_raw(sample_scan.paths["5d_t_and_c"])
    array = sample_scan.group["5d_t_and_c"]["0"]
    x, y, z, t, c = 4, 1, 2, 2, 1
    assert array.shape == (3, 2, 3, 4, 5)
    assert array[t, c, z, y, x] == raw[x, y, z, t, c]
    attributes = sample_scan.group["5d_t_and_c"].attrs.asdict()
    multiscales = attributes["ome"]["multiscales"] if "ome" in attributes else attributes["multiscales"]
    assert [a["name"] for a in multiscales[0]["axes"]] == ["t", "c", "z", "y", "x"]


# ------------------------------------------------------------------------------------------------- niizarr


def _assert_niizarr_reads(group: zarr.Group, path: Path) -> None:
    niizarr = pytest.importorskip("niizarr")
    image = niizarr.zarr2nii(group)
    assert_same_voxels(np.asarray(image.dataobj), nibabel_raw(path))
    np.testing.assert_array_equal(image.header.get_best_affine(), nib.load(path).header.get_best_affine())


@pytest.mark.parametrize("name", list(SAMPLES))
def test_niizarr_reads_sample(sample_scan: Scanned, name: str) -> None:
    _assert_niizarr_reads(sample_scan.group[name], sample_scan.paths[name])


def test_niizarr_reads_installed_files(installed_scan: Scanned) -> None:
    for name, path in installed_scan.paths.items():
        _assert_niizarr_reads(installed_scan.group[name], path)


# --------------------------------------------------------------------------------------- OME and JNIfTI schema


def _assert_valid_ome(group: zarr.Group, zarr_format: int) -> None:
    pytest.importorskip("ome_zarr_models")
    import ome_zarr_models
    from ome_zarr_models.v04.image import Image as ImageV04
    from ome_zarr_models.v05.image import Image as ImageV05

    model_class = ImageV05 if zarr_format == 3 else ImageV04
    model = model_class.from_zarr(group)  # raises (pydantic ValidationError) on invalid metadata
    assert isinstance(ome_zarr_models.open_ome_zarr(group), model_class)
    [multiscale] = model.attributes.ome.multiscales if zarr_format == 3 else model.attributes.multiscales
    assert [d.path for d in multiscale.datasets] == ["0"]


def test_ome_metadata_validates_for_every_sample(sample_scan: Scanned) -> None:
    zarr_format = sample_scan.group.metadata.zarr_format
    for name in SAMPLES:
        _assert_valid_ome(sample_scan.group[name], zarr_format)


def test_ome_metadata_validates_for_installed_files(installed_scan: Scanned) -> None:
    for name in installed_scan.paths:
        _assert_valid_ome(installed_scan.group[name], installed_scan.group.metadata.zarr_format)


@functools.lru_cache(maxsize=1)
def _schema_validator() -> object:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def _nifti_attributes(group: zarr.Group) -> dict[str, object]:
    attributes = dict(group["nifti"].attrs)
    attributes.pop("_ARRAY_DIMENSIONS", None)  # zarr 2 convention, not part of the header
    return attributes


@pytest.mark.skipif(not SCHEMA.exists(), reason=f"NIfTI-Zarr JSON schema not found at {SCHEMA}")
def test_jnifti_header_validates_against_the_spec_schema(sample_scan: Scanned, installed_scan: Scanned) -> None:
    validator = _schema_validator()
    for scanned in (sample_scan, installed_scan):
        for name in scanned.paths:
            attributes = _nifti_attributes(scanned.group[name])
            assert attributes, f"{name}: no JSON header"
            errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(attributes)]
            assert not errors, f"{name}: {errors}"


# ------------------------------------------------------------------------------- plain zarr, Parquet references


def test_plain_zarr_opens_the_manifest_through_reference_options(sample_scan: Scanned) -> None:
    """Users without virtnii.open (any zarr 3 code) get the same group from ``reference://``."""
    group = zarr.open_group("reference://", mode="r", storage_options=virtnii.reference_options(sample_scan.manifest))
    assert sorted(group.group_keys()) == sorted(SAMPLES)
    for name, path in sample_scan.paths.items():
        assert_same_voxels(group[name]["0"][...], file_to_zarr_order(nibabel_raw(path)))


#: Parquet writes one file per array (a few ms each), so a representative subset keeps the test fast.
PARQUET_SAMPLES = ("int16_be", "rgb24", "complex128", "2d", "5d_t_and_c", "prime_nz", "slope_inter", "extensions",
                   "nifti2", "pair_nifti1_be")


def test_parquet_references_read_like_nibabel(sample_files: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny chunks, so that each image has many rows in its Parquet file."""
    monkeypatch.setattr(virtnii.references, "plan", functools.partial(virtnii.layout.plan, target=256, limit=1024))
    scanned = _scan({name: sample_files[name] for name in PARQUET_SAMPLES}, tmp_path / "manifest", 2,
                    ref_format="parquet")
    monkeypatch.undo()
    assert not scanned.result.failures
    assert sorted(scanned.paths) == sorted(PARQUET_SAMPLES)
    assert not (tmp_path / "manifest" / "refs.json").exists()
    plain = zarr.open_group("reference://", mode="r", storage_options=virtnii.reference_options(scanned.manifest))
    for name, path in scanned.paths.items():
        array = scanned.group[name]["0"]
        assert array.nchunks > 1 or array.nbytes <= 1024
        _assert_matches_nibabel(scanned.group[name], path)
        assert_same_voxels(plain[name]["0"][...], file_to_zarr_order(nibabel_raw(path)))
