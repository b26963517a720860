"""virtnii: index NIfTI files in place as virtual NIfTI-Zarr (kerchunk references), without copying voxels.

Pipeline: :func:`scan` (headers → references, gzip seek points for ``.nii.gz``) writes a manifest folder;
:func:`open` reads it as a zarr group; :func:`to_nibabel` turns an image group back into a nibabel image.
"""

__version__ = "0.1.0"  # first: subpackages import it while this package is initialising

from .errors import (InvalidGzip, InvalidNifti, ManifestError, SourceAccessError, SourceNotFound, StaleSource,
                     UnsupportedNifti, VirtniiError)
from .reader import open, reference_options, to_nibabel
from .scan import ScanResult, scan
from .verified import verify

__all__ = [
    "scan", "open", "to_nibabel", "reference_options", "verify", "ScanResult",
    "VirtniiError", "SourceNotFound", "SourceAccessError", "InvalidNifti", "UnsupportedNifti", "InvalidGzip",
    "StaleSource", "ManifestError",
]
