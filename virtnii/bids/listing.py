"""One listing of a BIDS dataset: every file under its root with its size and ETag/mtime, and what to index.

A dataset on S3 is listed by one recursive ``find`` (paged ``ListObjectsV2`` calls, or ``ListObjectVersions`` ones
where object versions are pinned, which give each object's version id: no per-file request either); a local
one by a ``scandir`` walk that follows no folder links (a tree reached twice would be indexed twice).  What is
not BIDS data is left out: hidden folders (``.git``, ``.datalad``), ``sourcedata/``, ``code/``, ``stimuli/``,
``derivatives/`` unless asked for, and the manifest being written, when it lies inside the dataset.  A dandiset
(``dandi://…``) is listed through the DANDI API in pages (:mod:`virtnii.dandi`): its files are read at their blobs.
"""

from __future__ import annotations

import functools
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec

from ..errors import ManifestError, SourceAccessError, SourceNotFound, VirtniiError, from_os_error, storage_errors
from .. import versions
from ..retry import open_fs
from ..sources import (NIFTI_SUFFIXES, Source, attach_data_file, data_files, file_part, is_local, list_versions,
                       pin, walk_local, with_s3_pool)

#: Top-level folders of a BIDS dataset that hold no data to index (the specification's "sourcedata", "code",
#: "stimuli"); ``derivatives`` is indexed only when asked.
NOT_DATA = ("sourcedata", "code", "stimuli")
DERIVATIVES = "derivatives"


@dataclass
class Listing:
    """The files of a dataset (paths relative to its root → listing info) and what could not be listed."""

    fs: fsspec.AbstractFileSystem
    root: str  # path on fs, no trailing slash (a dandiset's: its URL without dandi://, the base of names)
    url: str  # the root as a URL (fs.unstrip_protocol)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[VirtniiError] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)  # URLs of sub-folders that could not be listed
    #: Where files are read on ``fs`` when not at ``root/relative``: a DANDI asset's blob, by relative path.
    blobs: dict[str, str] = field(default_factory=dict)

    def path(self, relative: str) -> str:
        return self.blobs[relative] if self.blobs else f"{self.root}/{relative}"

    def relative(self, source: Source) -> str:
        """Where ``source`` is in the dataset: its path relative to the root."""
        if source.listed_as:
            return source.listed_as[len(self.url) + 1:]
        return source.path[len(self.root) + 1:]

    @functools.cached_property
    def json_by_folder(self) -> dict[str, list[str]]:
        """JSON file names by folder (relative to the root): where sidecar inheritance looks."""
        folders: dict[str, list[str]] = {}
        for relative in self.files:
            if relative.endswith(".json"):
                folder, _, name = relative.rpartition("/")
                folders.setdefault(folder, []).append(name)
        return folders


def list_dataset(root: str, options: dict[str, Any], *, derivatives: bool = False,
                 exclude: tuple[str, ...] = (), pin_versions: bool | None = None) -> Listing:
    """List the dataset at ``root`` (local folder, fsspec URL or ``dandi://`` folder); ``exclude``: folders
    (relative to the root) to leave out, such as the manifest being written inside it;
    ``pin_versions``: list object versions too (see :func:`virtnii.sources.list_versions`)."""
    if root[:8].lower() == "dandi://":
        listing = _list_dandiset(root, options)
        listing.files = {r: info for r, info in listing.files.items() if _wanted(r, derivatives, exclude)}
        return listing
    try:
        fs, path = open_fs(root, with_s3_pool(root, versions.listing_options(root, options, pin_versions)))
    except (ValueError, ImportError, TypeError) as err:
        raise SourceAccessError(root, f"cannot open this URL: {err}") from err
    path = posixpath.normpath(path) if getattr(fs, "local_file", False) else path.rstrip("/")
    problems: list[VirtniiError] = []
    unlisted: list[str] = []

    def find(fs: fsspec.AbstractFileSystem) -> dict[str, dict[str, Any]]:
        try:
            if not fs.isdir(path):
                raise SourceNotFound(root, "is not a folder (a BIDS dataset is the folder holding "
                                           "dataset_description.json)")
            return walk_local(path, fs, problems, every_file=True, hidden=False, unlisted=unlisted) \
                if is_local(fs) else \
                {p: info for p, info in fs.find(path, detail=True).items() if info.get("type") != "directory"}
        except storage_errors() as err:
            raise from_os_error(root, err, "list") from err

    fs, found = list_versions(fs, pin_versions, find)
    listing = Listing(fs, path, fs.unstrip_protocol(path), problems=problems, unlisted=unlisted)
    prefix = path + "/"
    refused: list[VirtniiError] = []
    for full, info in found.items():
        relative = full[len(prefix):] if full.startswith(prefix) else posixpath.relpath(full, path)
        if any(part in ("", ".", "..") for part in relative.split("/")):  # an object key may be any string
            if relative.lower().endswith(NIFTI_SUFFIXES):
                refused.append(ManifestError(f"{listing.url}/{relative}", "not indexed: '.', '..' or empty "
                                             "parts in its path would name files outside the manifest (rename "
                                             "the object)"))
            continue
        if _wanted(relative, derivatives, exclude):
            listing.files[relative] = info
    listing.problems = [p for p in listing.problems
                        if _wanted(_relative_url(p.source, listing), derivatives, exclude)] + refused
    return listing


def _list_dandiset(root: str, options: dict[str, Any]) -> Listing:
    """A dandiset (or a folder of one) listed through the DANDI API: every file asset, read at its blob."""
    from .. import dandi  # here, not at the top: it builds Sources (an import cycle)

    folder = dandi.list_folder(root, options)
    url = folder.url
    blobs = {relative: asset.blob_url for relative, asset in folder.assets.items() if asset.blob_url}
    if not blobs:
        raise SourceNotFound(root, "holds no file asset (a BIDS dataset is the folder holding "
                                   "dataset_description.json)")
    fs = open_fs(next(iter(blobs.values())), options)[0]
    listing = Listing(fs, url.split("://", 1)[1], url, problems=folder.problems,
                      blobs={relative: fs._strip_protocol(blob) for relative, blob in blobs.items()})
    listing.files = {relative: folder.assets[relative].info() for relative in blobs}
    return listing


def nifti_sources(listing: Listing, pin_versions: bool | None = None) -> tuple[list[Source], list[VirtniiError]]:
    """The images of a listing as scan :class:`~virtnii.sources.Source` objects (``.hdr`` paired with its
    ``.img`` from the same listing: no request per pair), pinned to their versions as
    :func:`virtnii.sources.pin` says, and the pairs missing their data file (or a version to pin)."""
    sources, problems = [], []
    by_path = {listing.path(relative): info for relative, info in listing.files.items()}
    for relative in sorted(listing.files):
        if not file_part(listing.fs, relative).lower().endswith(NIFTI_SUFFIXES):
            continue
        source = Source(listing.fs, listing.path(relative), listing.files[relative], base=listing.root,
                        listed_as=f"{listing.url}/{relative}" if listing.blobs else "")
        try:
            if listing.blobs and source.is_pair:  # its .img is the blob of the asset beside it
                data = next((c for c in data_files(relative) if c in listing.files), None)
                if data is None:
                    raise SourceNotFound(source.listed_as, "no matching data file (.img) beside this .hdr")
                source.data_path, source.data_info = listing.path(data), listing.files[data]
            attach_data_file(source, by_path)
            pin(source, pin_versions)
        except VirtniiError as err:
            problems.append(err)
            continue
        sources.append(source)
    return sources, problems


def _wanted(relative: str, derivatives: bool, exclude: tuple[str, ...]) -> bool:
    parts = relative.split("/")
    if any(part.startswith(".") for part in parts[:-1]) or parts[0] in NOT_DATA:
        return False
    if parts[0] == DERIVATIVES and not derivatives:
        return False
    return not any(relative == e or relative.startswith(e.rstrip("/") + "/") or
                   (parts[0].startswith(e.rstrip("/") + ".partial-")) for e in exclude)


def _relative_url(url: str, listing: Listing) -> str:
    prefix = listing.url + "/"
    return url[len(prefix):] if url.startswith(prefix) else url
