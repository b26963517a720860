"""OME-Zarr multiscales metadata: axes, units, per-level scale and translation, in OME 0.4 and 0.5 form.

OME viewers place voxels from this metadata alone (the affine lives in the NIfTI header), so units and scales
must come from ``xyzt_units``/``pixdim`` exactly, and pyramid levels must keep voxel centres in place.
"""

from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np
import pytest

from virtnii.ome import axes, multiscales, voxel_size

ome_zarr_models = pytest.importorskip("ome_zarr_models")
from ome_zarr_models.v04.image import ImageAttrs as ImageAttrsV04  # noqa: E402 - after the importorskip
from ome_zarr_models.v05.image import ImageAttrs as ImageAttrsV05  # noqa: E402


def _header(zooms: tuple[float, ...] = (1.5, 2.0, 2.5, 0.8), space: str = "mm", time: str = "sec") -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_data_shape((6, 5, 4, 3, 2)[: len(zooms)])
    header.set_zooms(zooms)
    header.set_xyzt_units(space, time)
    return header


def _f32(*values: float) -> list[float]:
    """``values`` as the header stores them (float32 pixdim), which is what OME scales carry."""
    return [float(np.float32(v)) for v in values]


def _validate(attributes: dict[str, Any], zarr_format: int) -> Any:
    """Validate with ome-zarr-models' attribute models (raises pydantic's ValidationError)."""
    if zarr_format == 3:
        return ImageAttrsV05.model_validate(attributes["ome"])
    return ImageAttrsV04.model_validate(attributes)


@pytest.mark.parametrize("names, types", [
    (("z", "y", "x"), ["space"] * 3),
    (("t", "z", "y", "x"), ["time", "space", "space", "space"]),
    (("t", "c", "z", "y", "x"), ["time", "channel", "space", "space", "space"]),
])
def test_axes_types_and_units(names: tuple[str, ...], types: list[str]) -> None:
    result = axes(names, _header())
    assert [a["name"] for a in result] == list(names)
    assert [a["type"] for a in result] == types
    units = {a["name"]: a.get("unit") for a in result}
    assert units == {n: {"t": "second", "c": None}.get(n, "millimeter") for n in names}


@pytest.mark.parametrize("space, time, space_unit, time_unit", [
    ("mm", "sec", "millimeter", "second"),
    ("micron", "msec", "micrometer", "millisecond"),
    ("meter", "usec", "meter", "microsecond"),
    ("unknown", "unknown", None, None),
])
def test_units_come_from_xyzt_units(space: str, time: str, space_unit: str | None, time_unit: str | None) -> None:
    result = {a["name"]: a.get("unit") for a in axes(("t", "z", "y", "x"), _header(space=space, time=time))}
    assert result == {"t": time_unit, "z": space_unit, "y": space_unit, "x": space_unit}


def test_voxel_size_is_pixdim_per_zarr_axis() -> None:
    header = _header((1.5, 2.0, 2.5, 0.8, 1.0))
    assert voxel_size(("t", "c", "z", "y", "x"), header) == _f32(0.8, 1.0, 2.5, 2.0, 1.5)


def test_voxel_size_without_a_usable_pixdim_is_one() -> None:
    header = _header((1.5, 2.0, 2.5))
    header["pixdim"][1:4] = [0.0, float("nan"), -3.0]
    assert voxel_size(("z", "y", "x"), header) == [3.0, 1.0, 1.0]


@pytest.mark.parametrize("zarr_format, version", [(2, "0.4"), (3, "0.5")])
def test_single_level_metadata_validates(zarr_format: int, version: str) -> None:
    names = ("t", "z", "y", "x")
    attributes = multiscales("bold", names, _header(), [[1, 1, 1, 1]], zarr_format)
    model = _validate(attributes, zarr_format)
    [multiscale] = model.multiscales
    assert multiscale.name == "bold"
    [dataset] = multiscale.datasets
    assert dataset.path == "0"
    [scale] = dataset.coordinateTransformations
    assert list(scale.scale) == _f32(0.8, 2.5, 2.0, 1.5)
    if zarr_format == 3:
        assert attributes["ome"]["version"] == version and "version" not in attributes["ome"]["multiscales"][0]
    else:
        assert attributes["multiscales"][0]["version"] == version


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_pyramid_levels_keep_voxel_centres(zarr_format: int) -> None:
    """Level k: scale = voxel size × factor, translation = (factor − 1) / 2 × voxel size on spatial axes only."""
    names = ("t", "z", "y", "x")
    factors = [[1, 1, 1, 1], [1, 2, 2, 2], [1, 4, 4, 2]]
    attributes = multiscales("bold", names, _header(), factors, zarr_format)
    _validate(attributes, zarr_format)
    image = attributes["ome"]["multiscales"][0] if zarr_format == 3 else attributes["multiscales"][0]
    assert [d["path"] for d in image["datasets"]] == ["0", "1", "2"]
    level2 = {t["type"]: t[t["type"]] for t in image["datasets"][2]["coordinateTransformations"]}
    assert level2["scale"] == _f32(0.8, 10.0, 8.0, 3.0)
    assert level2["translation"] == [0.0, 3.75, 3.0, 0.75]
    assert len(image["datasets"][0]["coordinateTransformations"]) == 1  # level 0: no translation
