"""A manifest's index file (``virtnii.json``): its format versions, and reading it into typed entries.

The index file is what makes a folder a manifest (it is written last), names the references file in use, and
lists every image with what it was made from (:class:`~virtnii.manifest.entry.ImageEntry`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import fsspec

from ..errors import ManifestError, is_missing, storage_errors
from ..retry import without_policy
from . import recovery
from .entry import ImageEntry

INDEX_FILE = "virtnii.json"
#: Version written.  2 added pyramid levels (references relative to the manifest folder, which a version-1
#: reader would resolve against its working directory): version-1 readers refuse it instead.
MANIFEST_VERSION = 2
#: Version written instead by manifests whose sources are named relative to the manifest folder (``scan
#: relative_sources``), which a version-2 reader would also resolve against its working directory; other
#: manifests keep version 2, so older readers still open them.
RELATIVE_SOURCES_VERSION = 3
#: Versions read.
READABLE_VERSIONS = (1, 2, 3)


@dataclass(frozen=True)
class Index:
    """A manifest's index file: its Zarr format, where its references are, and its images."""

    zarr_format: int
    references: str
    images: tuple[ImageEntry, ...]
    #: What made the manifest, for a tool that updates it in place (``virtnii index``: its settings and the
    #: fingerprints of the metadata files it read), written with the index so the two never disagree.
    job: dict[str, Any] | None = None

    @property
    def ref_format(self) -> str:
        return "parquet" if self.references.endswith(".parquet") else "json"

    def image(self, name: str) -> ImageEntry:
        for entry in self.images:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def text(self) -> str:
        """The index file's text: one image per line, readable and diffable, each through the C JSON encoder
        (``indent=`` falls back to the pure-Python encoder: a quarter of a 2000-file scan)."""
        relative = any(entry.has_relative_sources for entry in self.images)
        head = {"virtnii_manifest": RELATIVE_SOURCES_VERSION if relative else MANIFEST_VERSION,
                "zarr_format": self.zarr_format, "references": self.references,
                **({"job": self.job} if self.job is not None else {})}
        lines = ",\n".join(json.dumps(entry.to_json()) for entry in self.images)
        return json.dumps(head)[:-1] + ', "images": [\n' + lines + "\n]}\n"


def manifest_options_for(manifest: str, manifest_options: dict[str, Any] | None,
                         storage_options: dict[str, Any]) -> dict[str, Any]:
    """Options for reading a manifest folder: as given, else the sources' options for a remote folder (usually
    the same bucket or store) and none for a local one — without their ``retry`` settings, which are the
    sources' (:mod:`virtnii.retry`)."""
    if manifest_options is not None:
        return manifest_options
    remote = (fsspec.core.split_protocol(manifest)[0] or "file") not in ("file", "local")
    return dict(without_policy(storage_options)) if remote else {}


def manifest_url(manifest: str, storage_options: dict[str, Any] | None = None) -> str:
    """The manifest folder's absolute URL (``file:///…`` for a local path), which relative sources resolve
    against: never the reader's working directory."""
    fs, path = fsspec.core.url_to_fs(manifest, **(storage_options or {}))
    return fs.unstrip_protocol(path.rstrip("/"))


def read_index(manifest: str, storage_options: dict[str, Any] | None = None) -> Index:
    """The index file of a manifest folder, checked for a version this code understands and parsed."""
    index = read_index_document(manifest, storage_options)
    job = index.get("job")
    return Index(index["zarr_format"], index["references"],
                 tuple(ImageEntry.from_json(doc, manifest) for doc in index["images"]),
                 job if isinstance(job, dict) else None)


def read_index_document(manifest: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The index file as JSON, its version and layout checked but its entries not parsed: for queries over
    many images, which read a few keys of each (parsing 10,000 typed entries costs 0.4 s)."""
    fs, path = fsspec.core.url_to_fs(manifest, **(storage_options or {}))
    index_path = f"{path.rstrip('/')}/{INDEX_FILE}"
    try:
        try:
            with fs.open(index_path, "rb") as f:
                index = json.load(f)
        except FileNotFoundError:
            # a replacement killed halfway leaves no index at OUT: finish (or undo) it, then read again
            if not recovery.recover(fs, path.rstrip("/"), INDEX_FILE):
                raise
            with fs.open(index_path, "rb") as f:
                index = json.load(f)
    except (*storage_errors(), ValueError) as err:
        if is_missing(err):
            raise ManifestError(manifest, f"not a virtnii manifest (no {INDEX_FILE}); create one with `virtnii scan`"
                                ) from err
        raise ManifestError(manifest, f"cannot read {INDEX_FILE}: {err.__cause__ or err}") from err
    if not isinstance(index, dict) or index.get("virtnii_manifest") not in READABLE_VERSIONS:
        version = index.get("virtnii_manifest") if isinstance(index, dict) else None
        raise ManifestError(manifest, f"{INDEX_FILE} is not a virtnii manifest this version reads (format "
                                      f"{version!r}; this virtnii reads {' and '.join(map(str, READABLE_VERSIONS))}"
                                      "): upgrade virtnii, or re-run `virtnii scan`")
    images = index.get("images")
    if not isinstance(images, list) or index.get("zarr_format") not in (2, 3) \
            or not isinstance(index.get("references"), str):
        raise ManifestError(manifest, f"{INDEX_FILE} is damaged (no images, zarr_format or references)")
    return index
