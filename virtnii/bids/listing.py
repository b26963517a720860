"""One listing of a BIDS dataset: every file under its root with its size and ETag/mtime, and what to index.

A dataset on S3 is listed by one recursive ``find`` (paged ``ListObjectsV2`` calls, no per-file request); a local
one by a ``scandir`` walk that follows no folder links (a tree reached twice would be indexed twice).  What is
not BIDS data is left out: hidden folders (``.git``, ``.datalad``), ``sourcedata/``, ``code/``, ``stimuli/``,
``derivatives/`` unless asked for, and the manifest being written, when it lies inside the dataset.
"""

from __future__ import annotations

import functools
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec

from ..errors import SourceAccessError, SourceNotFound, VirtniiError, from_os_error, storage_errors
from ..retry import open_fs
from ..sources import NIFTI_SUFFIXES, Source, attach_data_file, file_part, is_local, walk_local, with_s3_pool

#: Top-level folders of a BIDS dataset that hold no data to index (the specification's "sourcedata", "code",
#: "stimuli"); ``derivatives`` is indexed only when asked.
NOT_DATA = ("sourcedata", "code", "stimuli")
DERIVATIVES = "derivatives"


@dataclass
class Listing:
    """The files of a dataset (paths relative to its root → listing info) and what could not be listed."""

    fs: fsspec.AbstractFileSystem
    root: str  # path on fs, no trailing slash
    url: str  # the root as a URL (fs.unstrip_protocol)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[VirtniiError] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)  # URLs of sub-folders that could not be listed

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}"

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
                 exclude: tuple[str, ...] = ()) -> Listing:
    """List the dataset at ``root`` (local folder or fsspec URL); ``exclude``: folders (relative to the root)
    to leave out, such as the manifest being written inside it."""
    try:
        fs, path = open_fs(root, with_s3_pool(root, options))
    except (ValueError, ImportError, TypeError) as err:
        raise SourceAccessError(root, f"cannot open this URL: {err}") from err
    path = posixpath.normpath(path) if getattr(fs, "local_file", False) else path.rstrip("/")
    listing = Listing(fs, path, fs.unstrip_protocol(path))
    try:
        if not fs.isdir(path):
            raise SourceNotFound(root, "is not a folder (a BIDS dataset is the folder holding "
                                       "dataset_description.json)")
        found = walk_local(path, fs, listing.problems, every_file=True, hidden=False,
                           unlisted=listing.unlisted) if is_local(fs) else \
            {p: info for p, info in fs.find(path, detail=True).items() if info.get("type") != "directory"}
    except storage_errors() as err:
        raise from_os_error(root, err, "list") from err
    prefix = path + "/"
    for full, info in found.items():
        relative = full[len(prefix):] if full.startswith(prefix) else posixpath.relpath(full, path)
        if _wanted(relative, derivatives, exclude):
            listing.files[relative] = info
    listing.problems = [p for p in listing.problems if _wanted(_relative_url(p.source, listing), derivatives, exclude)]
    return listing


def nifti_sources(listing: Listing) -> tuple[list[Source], list[VirtniiError]]:
    """The images of a listing as scan :class:`~virtnii.sources.Source` objects (``.hdr`` paired with its
    ``.img`` from the same listing: no request per pair), and the pairs missing their data file."""
    sources, problems = [], []
    by_path = {listing.path(relative): info for relative, info in listing.files.items()}
    for relative in sorted(listing.files):
        if not file_part(listing.fs, relative).lower().endswith(NIFTI_SUFFIXES):
            continue
        source = Source(listing.fs, listing.path(relative), listing.files[relative], base=listing.root)
        try:
            attach_data_file(source, by_path)
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
