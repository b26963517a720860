"""One listing of a BIDS dataset: every file under its root with its size and ETag/mtime, and what to index.

A dataset on S3 is listed by one recursive ``find`` (paged ``ListObjectsV2`` calls, no per-file request); a local
one by a ``scandir`` walk that follows no folder links (a tree reached twice would be indexed twice).  What is
not BIDS data is left out: hidden folders (``.git``, ``.datalad``), ``sourcedata/``, ``code/``, ``stimuli/``,
``derivatives/`` unless asked for, and the manifest being written, when it lies inside the dataset.
"""

from __future__ import annotations

import os
import posixpath
import stat
from dataclasses import dataclass, field
from typing import Any

import fsspec

from ..errors import SourceAccessError, SourceNotFound, VirtniiError, from_os_error, storage_errors
from ..sources import NIFTI_SUFFIXES, Source, file_part, is_local, with_s3_pool

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


def list_dataset(root: str, options: dict[str, Any], *, derivatives: bool = False,
                 exclude: tuple[str, ...] = ()) -> Listing:
    """List the dataset at ``root`` (local folder or fsspec URL); ``exclude``: folders (relative to the root)
    to leave out, such as the manifest being written inside it."""
    try:
        fs, path = fsspec.core.url_to_fs(root, **with_s3_pool(root, options))
    except (ValueError, ImportError, TypeError) as err:
        raise SourceAccessError(root, f"cannot open this URL: {err}") from err
    path = posixpath.normpath(path) if getattr(fs, "local_file", False) else path.rstrip("/")
    listing = Listing(fs, path, fs.unstrip_protocol(path))
    try:
        if not fs.isdir(path):
            raise SourceNotFound(root, "is not a folder (a BIDS dataset is the folder holding "
                                       "dataset_description.json)")
        found = _walk_local(path, fs, listing.problems, listing.unlisted) if is_local(fs) else \
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
    files = listing.files
    for relative in sorted(files):
        name = file_part(listing.fs, relative).lower()
        if not name.endswith(NIFTI_SUFFIXES):
            continue
        source = Source(listing.fs, listing.path(relative), files[relative], base=listing.root)
        if name.endswith((".hdr", ".hdr.gz")):
            stem = relative[: -len(".hdr.gz")] if name.endswith(".gz") else relative[: -len(".hdr")]
            suffix = ".img.gz" if name.endswith(".gz") else ".img"
            data = next((c for c in (stem + suffix, stem + suffix.upper()) if c in files), None)
            if data is None:
                problems.append(SourceNotFound(source.url, f"no matching data file "
                                                           f"{posixpath.basename(stem + suffix)} beside this .hdr"))
                continue
            source.data_path, source.data_info = listing.path(data), files[data]
        else:
            source.data_path, source.data_info = source.path, source.info
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


def _walk_local(folder: str, fs: fsspec.AbstractFileSystem, problems: list[VirtniiError],
                unlisted: list[str]) -> dict[str, dict[str, Any]]:
    """Every regular file under a local folder with ``fs.info``'s size and mtime (of a link's target).

    Links to folders are not entered; broken links and special files (FIFOs, devices) with a NIfTI name are
    reported, since they are images a user expects to see indexed; other such files are passed over.
    """
    found: dict[str, dict[str, Any]] = {}
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            entries = os.scandir(current)
        except OSError as err:
            if current == folder:
                raise
            problems.append(from_os_error(fs.unstrip_protocol(current), err, "list"))
            unlisted.append(fs.unstrip_protocol(current))
            continue
        with entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if not entry.name.startswith("."):
                        pending.append(entry.path)
                    continue
                nifti = entry.name.lower().endswith(NIFTI_SUFFIXES)
                try:
                    st = os.stat(entry.path)
                except FileNotFoundError as err:
                    if nifti and os.path.islink(entry.path):
                        problems.append(SourceNotFound(fs.unstrip_protocol(entry.path),
                                                       "is a broken symbolic link (a DataLad or git-annex file not "
                                                       "fetched yet? `datalad get` it)"))
                    elif nifti:
                        problems.append(from_os_error(fs.unstrip_protocol(entry.path), err, "stat"))
                    continue
                except OSError as err:
                    if nifti:
                        problems.append(from_os_error(fs.unstrip_protocol(entry.path), err, "stat"))
                    continue
                if stat.S_ISREG(st.st_mode):
                    found[entry.path] = {"name": entry.path, "size": st.st_size, "type": "file",
                                         "mtime": st.st_mtime}
                elif nifti:
                    problems.append(SourceAccessError(fs.unstrip_protocol(entry.path),
                                                      "is not a regular file: only regular files (and links to "
                                                      "them) are indexed"))
    return found
