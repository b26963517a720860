"""The JNIfTI JSON header (attributes of the ``nifti`` array): field by field, against the schema and niizarr.

The spec's schema checks types and enumerations but requires no key, so values are checked here directly from
nibabel headers, and compared with the reference implementation's ``nii2json`` on every field where the two
are meant to agree (the exceptions are listed with the reason).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from nifti_samples import SAMPLES, write_samples
from virtnii.jnifti import to_jnifti

SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "spec" / "nifti-zarr-schema-1.0.rc1.json"

#: Keys where virtnii deliberately differs from niizarr 1.0.0rc8's nii2json:
#: Dim/VoxelSize — niizarr writes ``dim[0]`` entries, the schema wants 3 to 5 (so 2-D images get a z of 1);
#: Orientation — niizarr says "l" for any nonzero qfac (pixdim[0]), we say "l" only for qfac -1;
#: A75DataTypeName — niizarr decodes the ``datatype`` code's bytes as text (its RGB24 crash), not ``data_type``;
#: DataType — niizarr's table returns a tuple for RGBA32, not a name; A75* — niizarr writes zeros for NIfTI-2.
DIVERGENT = {"Dim", "VoxelSize", "Orientation", "A75DataTypeName", "DataType"}


def _header(version: int = 1, **fields: Any) -> nib.Nifti1Header:
    header = (nib.Nifti1Header if version == 1 else nib.Nifti2Header)()
    header.set_data_shape((6, 5, 4))
    header.set_data_dtype(np.int16)
    for name, value in fields.items():
        header[name] = value
    return header


@pytest.fixture(scope="module")
def schema_validator() -> Any:
    if not SCHEMA.exists():
        pytest.skip(f"NIfTI-Zarr JSON schema not found at {SCHEMA}")
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    return jsonschema.validators.validator_for(schema)(schema)


@pytest.fixture(scope="module")
def sample_headers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, nib.Nifti1Header]:
    files = write_samples(tmp_path_factory.mktemp("jnifti"))
    return {name: nib.load(path).header for name, path in files.items()}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_agrees_with_niizarr_nii2json(sample_headers: dict[str, nib.Nifti1Header], name: str) -> None:
    niizarr = pytest.importorskip("niizarr._nii2zarr")
    header = sample_headers[name]
    ours = to_jnifti(header, len(header.extensions) > 0)
    try:
        theirs = niizarr.nii2json(header)
    except UnicodeDecodeError:
        assert name.startswith("rgb24"), "niizarr's only known nii2json crash is RGB24"
        return
    shared = set(theirs) & set(ours) - DIVERGENT
    assert shared >= {"NIIHeaderSize", "Intent", "ScaleSlope", "QForm", "SForm", "Affine", "NIIFormat"}
    assert {key: ours[key] for key in shared} == {key: theirs[key] for key in shared}
    if header["dim"][0] >= 3:
        assert ours["Dim"] == theirs["Dim"][:5] and ours["VoxelSize"] == [abs(v) for v in theirs["VoxelSize"][:5]]


@pytest.mark.parametrize("name", list(SAMPLES))
def test_every_sample_validates(sample_headers: dict[str, nib.Nifti1Header], name: str, schema_validator: Any) -> None:
    header = sample_headers[name]
    document = to_jnifti(header, len(header.extensions) > 0)
    assert not [e.message for e in schema_validator.iter_errors(document)]
    json.dumps(document, allow_nan=False)  # strict JSON: no NaN/Infinity tokens


@pytest.mark.parametrize("version, size, magic", [(1, 348, "n+1"), (2, 540, "n+2")])
def test_basic_fields(version: int, size: int, magic: str) -> None:
    header = _header(version)
    header.set_xyzt_units("mm", "sec")
    header.set_zooms((1.5, 2.0, 2.5))
    document = to_jnifti(header, has_extensions=True)
    assert document["NIIHeaderSize"] == size and document["NIIFormat"] == magic
    assert document["Dim"] == [6, 5, 4] and document["DataType"] == "int16" and document["BitDepth"] == 16
    assert document["VoxelSize"] == [1.5, 2.0, 2.5]
    assert document["Unit"] == {"L": "mm", "T": "s"}
    assert document["NIFTIExtension"] == [1, 0, 0, 0]
    assert ("A75DBName" in document) == (version == 1)


def test_dims_are_three_to_five() -> None:
    flat = nib.Nifti1Header()
    flat.set_data_shape((11, 7))
    assert to_jnifti(flat, False)["Dim"] == [11, 7, 1]
    deep = nib.Nifti1Header()
    deep.set_data_shape((6, 5, 4, 3, 2, 1))
    assert to_jnifti(deep, False)["Dim"] == [6, 5, 4, 3, 2]


@pytest.mark.parametrize("dtype, name", [(np.uint8, "uint8"), (np.int8, "int8"), (np.uint16, "uint16"),
                                         (np.int32, "int32"), (np.uint64, "uint64"), (np.float32, "single"),
                                         (np.float64, "double"), (np.complex64, "complex64"),
                                         (np.complex128, "complex128"), ("RGB", "rgb24"), ("RGBA", "rgba32")])
def test_datatype_names_are_jnifti(dtype: Any, name: str) -> None:
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    assert to_jnifti(header, False)["DataType"] == name


def test_intent_parameters_are_null_beyond_what_the_intent_uses(schema_validator: Any) -> None:
    header = _header()
    header.set_intent("t test", (12.0,), name="tmap")
    document = to_jnifti(header, False)
    assert (document["Intent"], document["Param1"], document["Param2"], document["Name"]) == ("ttest", 12.0, None, "tmap")
    header.set_intent("f test", (3.0, 40.0))
    assert (to_jnifti(header, False)["Param1"], to_jnifti(header, False)["Param2"]) == (3.0, 40.0)
    assert not list(schema_validator.iter_errors(to_jnifti(header, False)))


def test_non_finite_and_odd_fields_stay_valid_json(schema_validator: Any) -> None:
    """Real files carry NaN slopes, negative pixdims, non-ASCII descriptions and unknown codes."""
    header = _header(scl_slope=np.nan, scl_inter=np.inf, cal_max=-np.inf, pixdim=[-1, -2, 3, np.nan, 1, 1, 1, 1],
                     descrip=b"caf\xe9 \x00junk", intent_code=9999, slice_code=42, qform_code=7, xyzt_units=0xFF)
    document = to_jnifti(header, False)
    json.dumps(document, allow_nan=False)
    assert document["ScaleSlope"] == 0.0 and document["ScaleOffset"] == 0.0 and document["MaxIntensity"] == 0.0
    assert document["VoxelSize"] == [2.0, 3.0, 0.0]
    assert document["Orientation"]["x"] == "l"
    assert document["Description"] == "café "
    assert (document["Intent"], document["SliceType"], document["QForm"]) == ("", "", "")
    assert not [e.message for e in schema_validator.iter_errors(document)]


def test_affine_and_quaternions_follow_the_header() -> None:
    header = _header()
    affine = np.array([[0, -1.5, 0, 90], [2, 0, 0, -126], [0, 0, 2.5, -72], [0, 0, 0, 1]], dtype=float)
    header.set_sform(affine, code="mni")
    header.set_qform(affine, code="scanner")
    document = to_jnifti(header, False)
    np.testing.assert_allclose(document["Affine"], affine[:3])
    assert (document["SForm"], document["QForm"]) == ("mni_152", "scanner_anat")
    quaternion = [document["Quatern"][k] for k in "bcd"]
    np.testing.assert_allclose(quaternion, header.get_qform_quaternion()[1:], atol=1e-6)
    assert document["QuaternOffset"] == {"x": 90.0, "y": -126.0, "z": -72.0}
