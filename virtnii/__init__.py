"""virtnii: index NIfTI files in place as virtual NIfTI-Zarr (kerchunk references), without copying voxels.

Pipeline: :func:`scan` (headers → references, gzip seek points for ``.nii.gz``) writes a manifest folder;
:func:`build_pyramids` writes its images' downsampled levels and adds them to it; :func:`combine` merges
manifests; :func:`open` reads one as a zarr group; :func:`to_nibabel` turns an image group back into a nibabel
image; :func:`export` streams a level back out as a NIfTI file.  :func:`index` does the whole job for a BIDS
dataset (entities, sidecars, resumable batches, optionally on Dask), :func:`table` and :func:`find` query it;
:func:`serve` serves manifests over HTTP as plain Zarr, for web viewers.
"""

__version__ = "0.1.0"  # first: subpackages import it while this package is initialising

from .errors import (InvalidGzip, InvalidNifti, ManifestError, SourceAccessError, SourceNotFound, SourceUnavailable,
                     StaleSource, UnsupportedNifti, VirtniiError)
from .bids import IndexResult, find, index, table
from .export import export
from .manifest.combine import combine
from .pyramid import PyramidResult, build_pyramids
from .reader import open, reference_options, to_nibabel
from .retry import RetryPolicy
from .scan import ScanResult, scan
from .server import serve
from .verified import verify

__all__ = [
    "scan", "build_pyramids", "combine", "open", "to_nibabel", "export", "reference_options", "verify",
    "index", "table", "find", "serve", "ScanResult", "PyramidResult", "IndexResult",
    "VirtniiError", "SourceNotFound", "SourceAccessError", "InvalidNifti", "UnsupportedNifti", "InvalidGzip",
    "StaleSource", "ManifestError", "SourceUnavailable", "RetryPolicy",
]
