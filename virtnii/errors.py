"""One exception family for everything virtnii refuses to do.

Every error names the source (file or URL) and the problem, so that a batch over thousands of files can report
one line per failure and carry on with the rest.
"""

from __future__ import annotations

import asyncio
import functools
import re
import urllib.parse

#: Words that mark a URL query parameter as a secret when they make up its name or a ``-``/``_``/``.``-separated
#: part of it: presigned S3 (``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token``) and GCS
#: (``X-Goog-Signature``) URLs, Azure SAS (``sig``), CloudFront (``Signature``), and API tokens and keys.
SECRET_WORDS = frozenset({"sig", "signature", "token", "secret", "password", "passwd", "pwd", "credential",
                          "credentials", "key", "apikey", "auth", "authorization"})
_QUERY_ITEM = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;#?\s'\"<>]+)=(?P<value>[^&;#\s'\"<>]*)")
_USERINFO = re.compile(r"(?P<lead>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@'\"<>]*):[^/\s@'\"<>]*@")
REDACTED = "REDACTED"


def is_secret_name(name: str) -> bool:
    """Whether a URL query parameter named ``name`` carries a secret (see :data:`SECRET_WORDS`)."""
    lowered = urllib.parse.unquote(name).lower()
    return lowered in SECRET_WORDS or any(part in SECRET_WORDS for part in re.split(r"[-_.]", lowered))


def redact(text: str) -> str:
    """``text`` with every URL secret replaced by ``REDACTED``: values of secret query parameters and the password
    of ``user:password@``.

    Applied to every :class:`VirtniiError`, whose messages quote URLs, sometimes inside a storage library's own
    error text: a presigned URL's signature is as good as the credentials that made it until it expires.
    """
    text = _USERINFO.sub(rf"\g<lead>:{REDACTED}@", text)
    return _QUERY_ITEM.sub(lambda m: f"{m['lead']}{m['name']}={REDACTED}" if is_secret_name(m["name"]) else m[0],
                           text)


class VirtniiError(Exception):
    """Base of all virtnii errors: ``str(err)`` is ``"<source>: <problem>"``, with URL secrets redacted."""

    def __init__(self, source: str, problem: str) -> None:
        self.source = redact(str(source))
        self.problem = redact(str(problem))
        super().__init__(f"{self.source}: {self.problem}")

    def __reduce__(self):  # keep pickling (Dask, multiprocessing) working with two arguments
        return (type(self), (self.source, self.problem))


class SourceNotFound(VirtniiError):
    """The source does not exist (or the storage refuses to say)."""


class SourceAccessError(VirtniiError):
    """The source exists but cannot be read (permissions, network, credentials)."""


class SourceUnavailable(SourceAccessError):
    """The source kept failing for reasons that usually pass (dropped connections, timeouts, HTTP 503, S3
    ``SlowDown``) through every retry (:mod:`virtnii.retry`): trying again later may work."""


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


def error_class(name: str) -> type[VirtniiError]:
    """The VirtniiError subclass called ``name`` (as recorded in a job journal), or VirtniiError itself."""
    for cls in (SourceNotFound, SourceAccessError, SourceUnavailable, InvalidNifti, UnsupportedNifti, InvalidGzip, StaleSource,
                ManifestError):
        if cls.__name__ == name:
            return cls
    return VirtniiError


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
    return code in ("NoSuchKey", "NoSuchBucket", "NoSuchVersion", "NotFound", "404")


def from_os_error(source: str, err: Exception, doing: str) -> VirtniiError:
    """The VirtniiError for a storage error met while ``doing`` something with ``source`` (e.g. ``"read"``); one
    that already is a VirtniiError (a request that failed every retry) as it is."""
    if isinstance(err, VirtniiError):
        return err
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
