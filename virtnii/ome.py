"""OME-Zarr ``multiscales`` metadata for one NIfTI-Zarr image (OME 0.4 with Zarr v2, OME 0.5 with Zarr v3).

OME carries only voxel sizes and units per axis; the affine, qform/sform and slope/inter live in the NIfTI
header (the ``nifti`` array).  Level ``k`` of a pyramid downsampled by ``factors`` gets ``scale = voxel size *
factor`` and ``translation = (factor - 1) / 2 * voxel size``, so that voxel centres stay where they were.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

_SPACE = {1: "meter", 2: "millimeter", 3: "micrometer"}
_TIME = {8: "second", 16: "millisecond", 24: "microsecond"}
_PIXDIM = {"x": 1, "y": 2, "z": 3, "t": 4}


def axes(names: Sequence[str], header: Mapping[str, Any]) -> list[dict[str, str]]:
    """OME ``axes`` for zarr axis ``names`` (e.g. ``("t", "z", "y", "x")``), with units from ``xyzt_units``."""
    units = int(header["xyzt_units"])
    space, time = _SPACE.get(units & 0x07), _TIME.get(units & 0x38)
    out = []
    for name in names:
        axis = {"name": name, "type": {"t": "time", "c": "channel"}.get(name, "space")}
        unit = time if name == "t" else None if name == "c" else space
        if unit:
            axis["unit"] = unit
        out.append(axis)
    return out


def voxel_size(names: Sequence[str], header: Mapping[str, Any]) -> list[float]:
    """Step along each zarr axis at full resolution; 1.0 where the header gives none (0, negative, NaN)."""
    sizes = []
    for name in names:
        value = abs(float(header["pixdim"][_PIXDIM[name]])) if name in _PIXDIM else 1.0
        sizes.append(value if math.isfinite(value) and value > 0 else 1.0)
    return sizes


def multiscales(name: str, names: Sequence[str], header: Mapping[str, Any],
                factors: Sequence[Sequence[int]], zarr_format: int) -> dict[str, Any]:
    """Group attributes holding OME multiscales for levels ``"0", "1", …`` downsampled by ``factors``.

    ``factors[k][i]`` is level ``k``'s downsampling factor along zarr axis ``i`` (level 0: all ones).
    """
    return _multiscales(name, axes(names, header), voxel_size(names, header), factors, zarr_format)


#: What OME's ``type`` and ``metadata`` say of each pyramid method (see virtnii.pyramid.downsample).
METHOD_DESCRIPTIONS = {
    "mean": "mean of each 2x2x2 block (integers rounded half to even; NaN left out)",
    "gaussian": "separable [1,3,3,1]/8 binomial (Gaussian, sigma ~0.87 voxel) at stride 2, edges repeated",
    "mode": "most frequent value of each 2x2x2 block (ties: smallest), for label images",
}


def with_levels(attributes: Mapping[str, Any], factors: Sequence[Sequence[int]], method: str,
                version: str) -> dict[str, Any]:
    """Group attributes of an image, its multiscales rebuilt for levels downsampled by ``factors``.

    The axes and level-0 scale are taken from the existing multiscales (level 0 is what the scan wrote);
    ``type``/``metadata`` name the method, as OME asks of a pyramid.
    """
    v3 = "ome" in attributes
    image = (attributes["ome"] if v3 else attributes)["multiscales"][0]
    base = next(t["scale"] for t in image["datasets"][0]["coordinateTransformations"] if t["type"] == "scale")
    built = _multiscales(image.get("name", ""), image["axes"], base, factors, 3 if v3 else 2)
    target = built["ome"]["multiscales"][0] if v3 else built["multiscales"][0]
    if len(factors) > 1:
        target["type"] = method
        target["metadata"] = {"description": METHOD_DESCRIPTIONS[method], "method": f"virtnii.pyramid.{method}",
                              "version": version}
    return {**{k: v for k, v in attributes.items() if k not in ("ome", "multiscales")}, **built}


def _multiscales(name: str, axes_doc: list[dict[str, str]], base: Sequence[float],
                 factors: Sequence[Sequence[int]], zarr_format: int) -> dict[str, Any]:
    names = [a["name"] for a in axes_doc]
    datasets = []
    for level, level_factors in enumerate(factors):
        scale = [size * f for size, f in zip(base, level_factors)]
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
        if any(f != 1 for f in level_factors):
            shift = [(f - 1) / 2 * size if n in "zyx" else 0.0 for n, size, f in zip(names, base, level_factors)]
            transforms.append({"type": "translation", "translation": shift})
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    image = {"name": name, "axes": axes_doc, "datasets": datasets}
    if zarr_format == 2:
        return {"multiscales": [{"version": "0.4", **image}]}
    return {"ome": {"version": "0.5", "multiscales": [image]}}
