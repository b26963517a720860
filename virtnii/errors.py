"""One exception family for everything virtnii refuses to do.

Every error names the source (file or URL) and the problem, so that a batch over thousands of files can report
one line per failure and carry on with the rest.
"""

from __future__ import annotations

import asyncio
import functools


class VirtniiError(Exception):
    """Base of all virtnii errors: ``str(err)`` is ``"<source>: <problem>"``."""

    def __init__(self, source: str, problem: str) -> None:
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}")

    def __reduce__(self):  # keep pickling (Dask, multiprocessing) working with two arguments
        return (type(self), (self.source, self.problem))


class SourceNotFound(VirtniiError):
    """The source does not exist (or the storage refuses to say)."""


class SourceAccessError(VirtniiError):
    """The source exists but cannot be read (permissions, network, credentials)."""


class InvalidNifti(VirtniiError):
    """The bytes are not a NIfTI-1/NIfTI-2 image virtnii can expose (bad magic, sizes, dims, truncation)."""


class UnsupportedNifti(VirtniiError):
    """A valid NIfTI that cannot be exposed as a zarr array (e.g. float128, more than 5 dimensions)."""


class InvalidGzip(VirtniiError):
    """A ``.nii.gz`` whose gzip stream is not gzip, is truncated, or is corrupt."""


class StaleSource(VirtniiError):
    """The source changed (size, mtime or ETag) since it was indexed: re-scan it."""


class ManifestError(VirtniiError):
    """A manifest folder is missing, unreadable, or was written by an incompatible version."""


@functools.lru_cache(maxsize=None)
def storage_errors() -> tuple[type[BaseException], ...]:
    """What storage backends raise for a file they cannot reach or read, for ``except storage_errors():``.

    fsspec maps most failures to ``OSError`` (``FileNotFoundError``, ``PermissionError``), but network failures
    reach callers as the client library's own types: botocore's (s3fs: no route, DNS, endpoint down, expired
    credentials), aiohttp's (HTTP), and timeouts.  Imported on first use: they are s3fs's dependencies, and a
    local scan need not pay for importing them.
    """
    from aiohttp import ClientError
    from botocore.exceptions import BotoCoreError

    return (OSError, BotoCoreError, ClientError, asyncio.TimeoutError)  # (an OSError from Python 3.11 on)


def is_missing(err: BaseException) -> bool:
    """Whether a storage error means the file is not there — not that it could not be reached or was refused.

    fsspec's HTTP filesystem reports any failed request (404, 403, 500, no server, a dropped connection) as
    ``FileNotFoundError``; its cause says which.  Missing means no cause, an HTTP 404/410, or botocore's
    ``NoSuchKey``-like codes; anything else is a failure to reach or read the file.
    """
    if not isinstance(err, FileNotFoundError):
        return False
    cause = err.__cause__
    if cause is None or isinstance(cause, FileNotFoundError):
        return True
    if getattr(cause, "status", None) in (404, 410):  # aiohttp
        return True
    response = getattr(cause, "response", None)  # botocore's ClientError
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    return code in ("NoSuchKey", "NoSuchBucket", "NotFound", "404")


def from_os_error(source: str, err: Exception, doing: str) -> VirtniiError:
    """The VirtniiError for a storage error met while ``doing`` something with ``source`` (e.g. ``"read"``)."""
    if is_missing(err):
        return SourceNotFound(source, "no such file or object")
    if isinstance(err, FileNotFoundError):  # not missing: see is_missing
        status = getattr(err.__cause__, "status", None)
        if status in (401, 403):
            return SourceAccessError(source, f"permission denied (HTTP {status})")
        return SourceAccessError(source, f"cannot {doing}: {err.__cause__}")
    if isinstance(err, PermissionError):
        return SourceAccessError(source, f"permission denied ({_without_path(err)})")
    return SourceAccessError(source, f"cannot {doing}: {_without_path(err)}")


def _without_path(err: Exception) -> str:
    """An OS error's text without the path it names: the message already starts with the source, and a long path
    printed twice made a line no one reads (``[Errno 36] File name too long: '/…'`` → ``File name too long``)."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        return err.strerror
    return str(err)
