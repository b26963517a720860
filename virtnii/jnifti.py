"""The NIfTI header as JNIfTI JSON: the attributes of the NIfTI-Zarr ``nifti`` array.

The binary header stays authoritative (the spec says binary wins); the JSON form is for people and web viewers
that want the geometry without a NIfTI parser.  Key names and the enumerations follow the NIfTI-Zarr 1.0 JSON
schema; the code tables are the NIfTI-1 standard's.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

_DATATYPES = {
    2: "uint8", 4: "int16", 8: "int32", 16: "single", 32: "complex64", 64: "double", 128: "rgb24",
    256: "int8", 512: "uint16", 768: "uint32", 1024: "int64", 1280: "uint64", 1536: "double128",
    1792: "complex128", 2048: "complex256", 2304: "rgba32",
}
_XFORMS = {0: "", 1: "scanner_anat", 2: "aligned_anat", 3: "talairach", 4: "mni_152", 5: "template_other"}
_SLICE_ORDERS = {0: "", 1: "seq+", 2: "seq-", 3: "alt+", 4: "alt-", 5: "alt2+", 6: "alt2-"}
_SPACE_UNITS = {0: "", 1: "m", 2: "mm", 3: "um"}
_TIME_UNITS = {0: "", 8: "s", 16: "ms", 24: "us"}
# NIfTI-1 intent codes -> JNIfTI names, with the number of intent parameters each one uses.
_INTENTS = {
    0: ("", 0), 2: ("corr", 1), 3: ("ttest", 1), 4: ("ftest", 2), 5: ("zscore", 0), 6: ("chi2", 1),
    7: ("beta", 2), 8: ("binomial", 2), 9: ("gamma", 2), 10: ("poisson", 1), 11: ("normal", 2),
    12: ("ncftest", 3), 13: ("ncchi2", 2), 14: ("logistic", 2), 15: ("laplace", 2), 16: ("uniform", 2),
    17: ("ncttest", 2), 18: ("weibull", 3), 19: ("chi", 1), 20: ("invgauss", 2), 21: ("extval", 2),
    22: ("pvalue", 0), 23: ("logpvalue", 0), 24: ("log10pvalue", 0), 1001: ("estimate", 0),
    1002: ("label", 0), 1003: ("neuronames", 0), 1004: ("matrix", 2), 1005: ("symmatrix", 1),
    1006: ("dispvec", 0), 1007: ("vector", 0), 1008: ("point", 0), 1009: ("triangle", 0),
    1010: ("quaternion", 0), 1011: ("unitless", 0), 2001: ("tseries", 0), 2002: ("elem", 1),
    2003: ("rgb", 0), 2004: ("rgba", 0), 2005: ("shape", 0),
    2006: ("fsl_fnirt_displacement_field", 0), 2007: ("fsl_cubic_spline_coefficients", 0),
    2008: ("fsl_dct_coefficients", 0), 2009: ("fsl_quadratic_spline_coefficients", 0),
    2016: ("fsl_topup_cubic_spline_coefficients", 0), 2017: ("fsl_topup_quadratic_spline_coefficients", 0),
    2018: ("fsl_topup_field", 0),
}


#: Float fields of both header versions, converted together (NaN/inf become 0: JSON cannot hold them).
_FLOATS = ("intent_p1", "intent_p2", "intent_p3", "vox_offset", "scl_slope", "scl_inter", "cal_max", "cal_min",
           "slice_duration", "toffset", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")


def _text(value: Any, limit: int) -> str:
    """A fixed-width C string field as text: up to the first NUL, undecodable bytes replaced."""
    return bytes(value).split(b"\0", 1)[0].decode("latin-1")[:limit]


def _numbers(values: Iterable[Any]) -> list[float]:
    """Float fields as JSON numbers; NaN/inf (seen in real scl_slope fields) become 0."""
    out = [float(v) for v in values]
    return out if all(map(math.isfinite, out)) else [v if math.isfinite(v) else 0.0 for v in out]


def to_jnifti(h: Mapping[str, Any], has_extensions: bool) -> dict[str, Any]:
    """JNIfTI JSON for header fields ``h`` (NIfTI-1 or NIfTI-2, named as in nibabel's header dtypes).

    ``h`` may be a nibabel header or, much faster for thousands of files, a plain dict of its fields
    (:attr:`virtnii.header.NiftiHeader.fields`).  Runs once per image of a scan, so values are converted in a
    few list passes rather than field by field.
    """
    dim = [int(d) for d in h["dim"]]
    naxes = min(max(dim[0], 3), 5)
    pixdim = _numbers(h["pixdim"])
    (p1, p2, p3, vox_offset, slope, inter, cal_max, cal_min, slice_duration, toffset,
     qb, qc, qd, qx, qy, qz) = _numbers(h[name] for name in _FLOATS)
    intent, nparams = _INTENTS.get(int(h["intent_code"]), ("", 0))
    size = int(h["sizeof_hdr"])
    dim_info = int(h["dim_info"])
    units = int(h["xyzt_units"])
    jnifti: dict[str, Any] = {
        "NIIHeaderSize": size,
        "DimInfo": {"Freq": dim_info & 3, "Phase": (dim_info >> 2) & 3, "Slice": (dim_info >> 4) & 3},
        "Dim": dim[1:1 + naxes],
        "Param1": p1 if nparams > 0 else None,
        "Param2": p2 if nparams > 1 else None,
        "Param3": p3 if nparams > 2 else None,
        "Intent": intent,
        "DataType": _DATATYPES.get(int(h["datatype"]), ""),
        "BitDepth": int(h["bitpix"]),
        "FirstSliceID": int(h["slice_start"]),
        "VoxelSize": [abs(p) for p in pixdim[1:1 + naxes]],
        "Orientation": {"x": "l" if float(h["pixdim"][0]) < 0 else "r", "y": "a", "z": "s"},  # -inf is "l"
        "NIIByteOffset": int(vox_offset),
        "ScaleSlope": slope,
        "ScaleOffset": inter,
        "LastSliceID": int(h["slice_end"]),
        "SliceType": _SLICE_ORDERS.get(int(h["slice_code"]), ""),
        "Unit": {"L": _SPACE_UNITS.get(units & 0x07, ""), "T": _TIME_UNITS.get(units & 0x38, "")},
        "MaxIntensity": cal_max,
        "MinIntensity": cal_min,
        "SliceTime": slice_duration,
        "TimeOffset": toffset,
        "Description": _text(h["descrip"], 80),
        "AuxFile": _text(h["aux_file"], 24),
        "QForm": _XFORMS.get(int(h["qform_code"]), ""),
        "SForm": _XFORMS.get(int(h["sform_code"]), ""),
        "Quatern": {"b": qb, "c": qc, "d": qd},
        "QuaternOffset": {"x": qx, "y": qy, "z": qz},
        "Affine": [_numbers(h[f"srow_{axis}"]) for axis in "xyz"],
        "Name": _text(h["intent_name"], 16),
        "NIIFormat": _text(h["magic"], 4),
        "NIFTIExtension": [1 if has_extensions else 0, 0, 0, 0],
    }
    if size == 348:
        jnifti.update({
            "A75DataTypeName": _text(h["data_type"], 10),
            "A75DBName": _text(h["db_name"], 18),
            "A75Extends": int(h["extents"]),
            "A75SessionError": int(h["session_error"]),
            "A75Regular": int.from_bytes(bytes(h["regular"]), "little"),
            "A75GlobalMax": int(h["glmax"]),
            "A75GlobalMin": int(h["glmin"]),
        })
    return jnifti
