"""The typed manifest entry: one image of a manifest's index file (``virtnii.json``), as code reads it.

The index file is what others rely on (documented in ``docs/manifest.md``); every module that reads it — opening,
``info``, ``verify``, the pyramid builder, the combiner — goes through :class:`ImageEntry`, so a key is spelt
once and a damaged or foreign index file is one clear :class:`~virtnii.errors.ManifestError`, not a ``KeyError``
deep inside a read.
"""

from __future__ import annotations

import functools
import posixpath
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..errors import ManifestError
from ..fingerprint import Fingerprint

#: Folders of a manifest that the index file points into: gzip seek-point sidecars, pyramid level stores.
GZIP_INDEX_FOLDER = "gzindex"
LEVELS_FOLDER = "levels"


@dataclass(frozen=True)
class Level:
    """One written pyramid level of an image: zarr array ``path`` (``"1"``, ``"2"``, …) inside the level store.

    ``factors`` is the downsampling factor along each zarr axis relative to level 0 (1 for t and c), ``chunks``
    and ``shards`` the written array's chunking (``shards`` None without sharding), ``stored_bytes`` what its
    chunk objects take in storage.
    """

    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    factors: tuple[int, ...]
    stored_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "shape": list(self.shape), "chunks": list(self.chunks),
                "shards": None if self.shards is None else list(self.shards), "factors": list(self.factors),
                "stored_bytes": self.stored_bytes}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "Level":
        shards = doc.get("shards")
        return cls(str(doc["path"]), _ints(doc["shape"]), _ints(doc["chunks"]),
                   None if shards is None else _ints(shards), _ints(doc["factors"]), int(doc["stored_bytes"]))


@dataclass(frozen=True)
class Pyramid:
    """The written levels of one image and how they were made.

    ``store`` is the folder holding the level arrays: relative to the manifest folder (``levels/…``, the
    default, so a manifest that is moved or uploaded whole still opens) or an absolute URL (``--out``, or a
    combined manifest pointing at another manifest's levels).  ``tag`` names the inputs the levels were made
    from (source version, level-0 layout, method, chunking, codec): a re-run with the same tag is skipped.
    """

    store: str
    tag: str
    method: str
    codec: dict[str, Any]
    levels: tuple[Level, ...]

    def to_json(self) -> dict[str, Any]:
        return {"store": self.store, "tag": self.tag, "method": self.method, "codec": self.codec,
                "levels": [level.to_json() for level in self.levels]}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "Pyramid":
        store = str(doc["store"])
        if not is_url(store):
            inside(store, f"{LEVELS_FOLDER}/")
        return cls(store, str(doc["tag"]), str(doc["method"]), dict(doc["codec"]),
                   tuple(Level.from_json(level) for level in doc["levels"]))

    @property
    def stored_bytes(self) -> int:
        return sum(level.stored_bytes for level in self.levels)

    @property
    def is_relative(self) -> bool:
        """Whether the store is named relative to the manifest folder (and moves with it)."""
        return not is_url(self.store)

    def url(self, manifest: str) -> str:
        """The store's URL, for a manifest at ``manifest``."""
        return f"{manifest.rstrip('/')}/{self.store}" if self.is_relative else self.store


@dataclass(frozen=True)
class ImageEntry:
    """One image of a manifest: where its voxels are, what they looked like when indexed, what the group holds.

    ``source`` is the header file (``.nii``, ``.nii.gz``, ``.hdr``); ``data``/``data_fingerprint`` the voxel
    file of a ``.hdr/.img`` pair.  Both are absolute URLs, or POSIX paths relative to the manifest folder
    (``../../sub-01/anat/sub-01_T1w.nii``, see :func:`relative_source`) in a manifest scanned with
    ``relative_sources``: readers resolve those against where the manifest is now (:meth:`resolved`).
    ``gzip_index`` is the sidecar descriptor (relative to the manifest) of a gzipped source, whose uncompressed
    size is ``uncompressed_size``.  ``dtype`` is numpy's ``str`` (``"<i2"``)
    or, for RGB, its ``descr`` list.
    """

    name: str
    source: str
    fingerprint: Fingerprint
    nifti_version: int
    shape: tuple[int, ...]
    axes: str
    chunks: tuple[int, ...]
    dtype: str | tuple[tuple[str, str], ...]
    nbytes: int
    gzip_index: str | None = None
    uncompressed_size: int | None = None
    data: str | None = None
    data_fingerprint: Fingerprint | None = None
    pyramid: Pyramid | None = None
    zooms: tuple[float, ...] | None = None  # the header's pixdim[1:ndim+1] (nibabel's get_zooms), NIfTI order
    bids: dict[str, Any] | None = None  # `virtnii index`: {"path": relative to the dataset root, "entities": {…}}
    extra: dict[str, Any] = field(default_factory=dict)  # keys other tools or later versions added: kept as is

    @property
    def data_url(self) -> str:
        """The file holding the voxels (the source itself but for ``.hdr/.img`` pairs)."""
        return self.data or self.source

    @property
    def data_fp(self) -> Fingerprint:
        return self.data_fingerprint if self.data_fingerprint is not None else self.fingerprint

    @property
    def checked_files(self) -> list[tuple[str, Fingerprint]]:
        """Every source file with its recorded fingerprint (header file, and the voxel file of a pair)."""
        files = [(self.source, self.fingerprint)]
        if self.data is not None:
            files.append((self.data, self.data_fp))
        return files

    @property
    def has_relative_sources(self) -> bool:
        """Whether the files are named relative to the manifest folder (and move with it)."""
        return not is_url(self.source)

    def resolved(self, manifest: str) -> "ImageEntry":
        """This entry with relative source names resolved against ``manifest``, the manifest folder's absolute
        URL (``file:///…``, ``s3://bucket/…``): where the files are for a manifest that is there now."""
        if not self.has_relative_sources:
            return self
        return replace(self, source=resolve(manifest, self.source),
                       data=None if self.data is None else resolve(manifest, self.data))

    def files_to_check(self, manifest: str, manifest_options: dict[str, Any], storage_options: dict[str, Any]
                       ) -> list[tuple[str, Fingerprint, dict[str, Any]]]:
        """Every source file as ``(URL, recorded fingerprint, storage options to read it with)`` for a manifest
        at absolute URL ``manifest``: files named relative to it are on its filesystem, so they are read with
        the manifest folder's options; the others with the sources' options."""
        options = manifest_options if self.has_relative_sources else storage_options
        return [(url, recorded, options) for url, recorded in self.resolved(manifest).checked_files]

    @property
    def numpy_dtype(self) -> np.dtype:
        return _numpy_dtype(self.dtype)

    @property
    def levels(self) -> tuple[Level, ...]:
        return self.pyramid.levels if self.pyramid else ()

    def with_pyramid(self, pyramid: Pyramid | None) -> "ImageEntry":
        return replace(self, pyramid=pyramid)

    def renamed(self, name: str) -> "ImageEntry":
        return replace(self, name=name)

    def to_json(self) -> dict[str, Any]:
        """The index-file form: documented keys in a fixed order, optional ones only when set."""
        doc: dict[str, Any] = {
            "name": self.name, "source": self.source, "fingerprint": self.fingerprint,
            "nifti_version": self.nifti_version, "shape": list(self.shape), "axes": self.axes,
            "chunks": list(self.chunks),
            "dtype": self.dtype if isinstance(self.dtype, str) else [list(f) for f in self.dtype],
            "nbytes": self.nbytes, "gzip_index": self.gzip_index,
        }
        if self.uncompressed_size is not None:
            doc["uncompressed_size"] = self.uncompressed_size
        if self.data is not None:
            doc["data"] = self.data
            doc["data_fingerprint"] = self.data_fingerprint
        if self.pyramid is not None:
            doc["pyramid"] = self.pyramid.to_json()
        if self.zooms is not None:
            doc["zooms"] = list(self.zooms)
        if self.bids is not None:
            doc["bids"] = self.bids
        doc.update(self.extra)
        return doc

    @classmethod
    def from_json(cls, doc: Any, manifest: str) -> "ImageEntry":
        """Parse one index-file entry; anything missing or mistyped is a ManifestError naming ``manifest``."""
        try:
            dtype = doc["dtype"]
            entry = cls(
                name=_text(doc["name"]), source=_source(doc["source"]), fingerprint=_fingerprint(doc["fingerprint"]),
                nifti_version=int(doc["nifti_version"]), shape=_ints(doc["shape"]), axes=_text(doc["axes"]),
                chunks=_ints(doc["chunks"]),
                dtype=dtype if isinstance(dtype, str) else tuple((str(n), str(t)) for n, t in dtype),
                nbytes=int(doc["nbytes"]),
                gzip_index=None if doc.get("gzip_index") is None else inside(_text(doc["gzip_index"]), f"{GZIP_INDEX_FOLDER}/"),
                uncompressed_size=None if doc.get("uncompressed_size") is None else int(doc["uncompressed_size"]),
                data=None if doc.get("data") is None else _source(doc["data"]),
                data_fingerprint=None if doc.get("data_fingerprint") is None
                else _fingerprint(doc["data_fingerprint"]),
                pyramid=None if doc.get("pyramid") is None else Pyramid.from_json(doc["pyramid"]),
                zooms=None if doc.get("zooms") is None else tuple(map(float, doc["zooms"])),
                bids=None if doc.get("bids") is None else _bids(doc["bids"]),
                extra={k: v for k, v in doc.items() if k not in _KNOWN_KEYS},
            )
            entry.numpy_dtype  # noqa: B018  (an unknown dtype string is damage too)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            name = doc.get("name") if isinstance(doc, dict) else None
            raise ManifestError(manifest, f"index file entry {name or '?'!s} is damaged ({type(err).__name__}: "
                                          f"{err}); re-run `virtnii scan`") from err
        if entry.data is not None and is_url(entry.data) != is_url(entry.source):
            raise ManifestError(manifest, f"index file entry {entry.name}: names one of its files by URL and the "
                                          "other relative to the manifest")
        if len(entry.shape) != len(entry.axes) or len(entry.chunks) != len(entry.shape):
            raise ManifestError(manifest, f"index file entry {entry.name}: shape, axes and chunks disagree")
        return entry


#: The index-file keys :class:`ImageEntry` reads; others are kept as they are (``extra``).
_KNOWN_KEYS = frozenset({"name", "source", "fingerprint", "nifti_version", "shape", "axes", "chunks", "dtype", "nbytes",
                         "gzip_index", "uncompressed_size", "data", "data_fingerprint", "pyramid", "zooms", "bids"})


@functools.lru_cache(maxsize=256)
def _numpy_dtype(spec: str | tuple[tuple[str, str], ...]) -> np.dtype:
    """numpy's dtype for an entry's ``dtype``, once per spelling: a manifest of 10,000 images has a handful,
    and building one is most of what checking an entry costs."""
    return np.dtype(spec if isinstance(spec, str) else [tuple(f) for f in spec])


def is_url(name: str) -> bool:
    """Whether ``name`` is an absolute location (a URL with a protocol, or an absolute path), not a path
    relative to a manifest folder."""
    return "://" in name or name.startswith("/")


def inside(path: str, folder: str) -> str:
    """``path`` if it names a file inside ``folder`` of a manifest (relative, normalised, no ``..``), else a
    ValueError: a manifest is data, and must not lead its reader to files outside itself."""
    if "://" in path or path.startswith("/") or posixpath.normpath(path) != path or not path.startswith(folder) \
            or ".." in path.split("/"):
        raise ValueError(f"{path!r} is not a path inside the manifest's {folder} folder")
    return path


def relative_source(name: str) -> str:
    """``name`` if it is a source path relative to a manifest folder in normal form, else a ValueError.

    Normal form (``posixpath.normpath`` leaves it unchanged: ``..`` only leading, no empty or ``.`` part) keeps
    one spelling per file, so a reference matches the index file's name for it exactly.
    """
    if is_url(name) or posixpath.normpath(name) != name or name.rsplit("/", 1)[-1] in (".", ".."):
        raise ValueError(f"{name!r} is neither a URL nor a normalised path relative to the manifest folder")
    return name


def resolve(manifest: str, name: str) -> str:
    """The URL of source ``name`` (relative to the manifest folder) for a manifest at absolute URL ``manifest``.

    ``..`` climbs the manifest's own filesystem but never above its root: for an object store or web server
    the first part of the path (the bucket or host) is the root, so a relative source always stays where its
    manifest is (the trust model relies on it).
    """
    anchor, parts = _anchored(manifest)
    for part in relative_source(name).split("/"):
        if part != "..":
            parts.append(part)
        elif parts:
            parts.pop()
        else:
            raise ManifestError(manifest, f"source {name!r} climbs above {anchor}, the root of the manifest's "
                                          "filesystem (or its bucket); re-run `virtnii scan`")
    return anchor + "/".join(parts)


def relative_to(manifest: str, url: str) -> str | None:
    """``url`` as a path relative to the manifest folder at absolute URL ``manifest``, or None if it is not on
    the manifest's filesystem (another protocol, bucket or host), and so cannot move with it."""
    anchor, folders = _anchored(manifest)
    if "://" not in url:
        return None
    url_anchor, parts = _anchored(url)
    if url_anchor != anchor or not parts:
        return None
    common = 0
    while common < min(len(folders), len(parts) - 1) and folders[common] == parts[common]:
        common += 1
    name = "/".join([".."] * (len(folders) - common) + parts[common:])
    try:
        return relative_source(name)
    except ValueError:  # a URL whose path has "." or ".." parts: no single relative spelling
        return None


def _anchored(url: str) -> tuple[str, list[str]]:
    """``(root, folders)`` of an absolute URL: ``file:///`` (or ``memory:///``) and the path's parts, or
    ``s3://bucket/`` (a bucket, host or container: the first part) and the parts after it."""
    protocol, _, rest = url.partition("://")
    if rest.startswith("/"):
        return f"{protocol}:///", [part for part in rest.split("/") if part]
    top, _, path = rest.partition("/")
    return f"{protocol}://{top}/", [part for part in path.split("/") if part]


def _source(value: Any) -> str:
    name = _text(value)
    return name if is_url(name) else relative_source(name)


def _ints(values: Any) -> tuple[int, ...]:
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"expected a list of integers, got {values!r}")
    return tuple(map(int, values))


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"expected a non-empty string, got {value!r}")
    return value


def _bids(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("path"), str) \
            or not isinstance(value.get("entities"), dict):
        raise TypeError(f"expected BIDS information with a path and entities, got {value!r}")
    return value


def _fingerprint(value: Any) -> Fingerprint:
    if not isinstance(value, dict) or not isinstance(value.get("size"), int):
        raise TypeError(f"expected a fingerprint with a size, got {value!r}")
    return dict(value)
