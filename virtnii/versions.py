"""Object versions: pinning a source to the version of an object that was indexed (S3 ``VersionId``, GCS generation).

On a versioned bucket (OpenNeuro's is) an overwritten object keeps its old bytes under its old version id, so a
manifest that records the id can go on reading exactly what it indexed.  The id is part of the source's
fingerprint (key :data:`VERSION`); references keep the plain URL, and every read of a pinned source names the
version: ``bucket/key?versionId=V`` on S3, ``bucket/key#G`` on GCS, on a filesystem instance made with
``version_aware=True``.  That flag is essential: an s3fs made without it drops ``?versionId=…`` from a path and
reads the *latest* version, silently, which is why :func:`path` refuses such an instance instead of forming one.

Listings give the ids for free when they are versioned listings (s3fs ``version_aware=True`` lists with
``ListObjectVersions``; gcsfs reports ``generation`` in every listing), and so does a HEAD (``info``).  An object
written while its bucket was not versioned has the version ``null``, which a later write replaces in place: it
counts as no version.
"""

from __future__ import annotations

from typing import Any

import fsspec

from . import retry

#: Fingerprint key of the pinned version id (text).
VERSION = "version"
#: Per protocol: the listing/info key holding an object's version, and what joins a path to a version id.
_SCHEMES = {"s3": ("VersionId", "?versionId="), "s3a": ("VersionId", "?versionId="),
            "gs": ("generation", "#"), "gcs": ("generation", "#")}
#: Version ids that name no lasting version (S3 reports ``null`` for objects of an unversioned bucket).
_NO_VERSION = (None, "", "null")


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def has_versions(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether objects on ``fs`` can have versions virtnii pins (S3 and GCS)."""
    return any(p in _SCHEMES for p in _protocols(fs))


def listing_options(url: str, options: dict[str, Any], pin_versions: bool | None) -> dict[str, Any]:
    """``options`` for listing ``url`` so that listings report versions (``version_aware=True`` on S3 and GCS),
    unless ``pin_versions`` is False or the caller chose ``version_aware`` itself."""
    if pin_versions is False or fsspec.core.split_protocol(url)[0] not in _SCHEMES:
        return options
    return {"version_aware": True, **options}


def reported(info: dict[str, Any]) -> str | None:
    """The version an fsspec listing or ``info()`` entry reports for an object, or None (no lasting version)."""
    for key in ("VersionId", "generation"):
        value = info.get(key)
        if value not in _NO_VERSION:
            return str(value)
    return None


def aware(fs: fsspec.AbstractFileSystem, on: bool = True) -> fsspec.AbstractFileSystem:
    """``fs`` if it reads versions named in paths (``on``; else if it does not), or the same filesystem (class and
    options) made to, or not to: ``on=False`` lists without versions."""
    if bool(getattr(fs, "version_aware", False)) == on or not has_versions(fs):
        return fs
    if isinstance(fs, retry.RetryingFileSystem):  # the backend made so, behind the same retries
        return retry.wrap(retry.one_attempt(aware(fs.fs, on)), fs.policy)
    return type(fs)(**{**fs.storage_options, "version_aware": on})


def path(fs: fsspec.AbstractFileSystem, object_path: str, recorded: dict[str, Any]) -> str:
    """The path that reads ``object_path`` as the fingerprint ``recorded`` pinned it (unchanged when it pins no
    version).  ``fs`` must be version-aware (:func:`aware`): another instance would read the latest version."""
    version = recorded.get(VERSION)
    if version is None:
        return object_path
    scheme = next((_SCHEMES[p] for p in _protocols(fs) if p in _SCHEMES), None)
    if scheme is None or not getattr(fs, "version_aware", False):
        raise ValueError(f"cannot read version {version} of {object_path} through {type(fs).__name__} "
                         f"(version_aware={getattr(fs, 'version_aware', None)}): it would read another version")
    return f"{object_path}{scheme[1]}{version}"


def pinned(fs: fsspec.AbstractFileSystem, object_path: str,
           recorded: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path)`` that read ``object_path`` as ``recorded`` pinned it: ``fs`` and the path itself for
    an unpinned source, else a version-aware instance and the path naming the version."""
    if VERSION not in recorded:
        return fs, object_path
    fs = aware(fs)
    return fs, path(fs, object_path, recorded)
