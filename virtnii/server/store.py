"""The served store: the keys of one or more manifests, as bytes, with what HTTP needs to know of each.

Framework-independent.  Each manifest is opened through :func:`virtnii.reader.reference_filesystem`, the
ReferenceFileSystem :func:`virtnii.open` reads (sources behind :class:`~virtnii.verified.VerifiedFileSystem`,
``.nii.gz`` decoded through ``gzidx://``, written levels as they are, remote manifests refused local sources),
so a key served is exactly the bytes zarr reads locally, and no reference is resolved here.  Only keys of the
manifests' references exist: a key is found by an exact lookup in them (one subgroup per manifest when there are
several, under a synthesized root group), never by joining a path to a folder.  Source URLs and storage
options stay in the server: a key's ETag is a digest of its reference and of the fingerprints recorded for the
files behind it, and errors reaching a client name the key, not the source.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import posixpath
import urllib.parse
from dataclasses import dataclass
from typing import Any, Sequence

import zarr
from fsspec.implementations.reference import ReferenceFileSystem
from zarr.storage import FsspecStore

from ..errors import ManifestError
from ..manifest import METADATA_KEYS, ImageEntry, Index, manifest_options_for, manifest_url, read_index
from ..reader import reference_filesystem

#: The root group synthesized over several manifests, by zarr format.
ROOT_GROUPS = {3: ("zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": {}}),
               2: (".zgroup", {"zarr_format": 2})}


@dataclass(frozen=True)
class ServedManifest:
    """One manifest as served: ``prefix`` is ``""`` for a manifest served alone, else its folder name + ``/``."""

    name: str
    prefix: str
    index: Index
    references: ReferenceFileSystem

    @property
    def lazy(self) -> bool:
        """Parquet references: a lookup may read a Parquet file (so it runs in a thread)."""
        return not isinstance(self.references.references, dict)


@dataclass(frozen=True, eq=False)
class ServedImage:
    """One image as served: ``path`` is its group under ``/zarr/`` (the manifest's name for it, prefixed by the
    manifest folder's name when several are served), ``entry`` its index-file entry."""

    path: str
    entry: ImageEntry
    manifest: ServedManifest

    @functools.cached_property
    def group(self) -> zarr.Group:
        """The image's zarr group over the server's own references (for views computed from the image; opening
        reads its metadata: call it outside the event loop)."""
        store = FsspecStore(self.manifest.references, read_only=True, path=self.entry.name)
        return zarr.open_group(store=store, mode="r", zarr_format=self.manifest.index.zarr_format)

    def summary(self) -> dict[str, Any]:
        """The image's row of ``/api/images`` (see docs/serve.md): where it is served, and what it is."""
        entry = self.entry
        url = urllib.parse.quote(self.path)
        dtype = entry.numpy_dtype
        return {
            "path": self.path, "zarr": f"/zarr/{url}/", "view": f"/view/{url}/", "axes": entry.axes,
            "shape": list(entry.shape),
            "dtype": {3: "rgb24", 4: "rgba32"}.get(len(dtype.fields or ()), dtype.name),
            "zooms": None if entry.zooms is None else list(entry.zooms), "levels": 1 + len(entry.levels),
            "bids": None if entry.bids is None else entry.bids["entities"],
        }


@dataclass(frozen=True)
class Key:
    """A key that exists: what a response needs before any source is read.

    ``value`` holds bytes known without reading a source (metadata, inlined headers, the synthesized root);
    ``size`` is None only for a reference to a whole object (a written level's chunk), whose size is known
    once read.
    """

    key: str
    manifest: ServedManifest | None
    inner: str  # the key in the manifest's own references
    image: ServedImage | None
    value: bytes | None
    size: int | None
    etag: str
    last_modified: float | None  # for bytes read from the sources only: the latest recorded mtime

    @property
    def content_type(self) -> str:
        return content_type(self.key)


class Store:
    """The keys of ``manifests`` (local paths or fsspec URLs), read through their references.

    One manifest is served as its own tree; several are one subgroup each, named after the manifest folder,
    under a synthesized root group (all must share one zarr format).  ``storage_options`` are for the
    sources, ``manifest_options`` for remote manifest folders (as :func:`virtnii.open` takes them).
    """

    def __init__(self, manifests: Sequence[str], *, storage_options: dict[str, Any] | None = None,
                 manifest_options: dict[str, Any] | None = None, allow_local_sources: bool = False) -> None:
        if not manifests:
            raise ManifestError("virtnii serve", "no manifest given")
        storage_options = dict(storage_options or {})
        opened = []
        for manifest in manifests:
            options = manifest_options_for(manifest, manifest_options, storage_options)
            name = manifest_url(manifest, options).rstrip("/").rsplit("/", 1)[-1]
            references = reference_filesystem(manifest, manifest_options, allow_local_sources=allow_local_sources,
                                              **storage_options)
            opened.append((manifest, name, read_index(manifest, options), references))
        formats = {index.zarr_format for _, _, index, _ in opened}
        if len(formats) > 1:
            raise ManifestError(", ".join(manifests), "mixes Zarr v2 and v3 manifests, which cannot share one "
                                                      "root group: serve each format on its own")
        self.zarr_format = formats.pop()
        names = [name for _, name, _, _ in opened]
        for (manifest, name, _, _) in opened:
            if len(opened) > 1 and (names.count(name) > 1 or name.startswith("__") or not name.strip(".")):
                raise ManifestError(manifest, f"cannot be served beside the others as subgroup {name!r} (folder "
                                              "names must be unique, not dots only, not starting with '__'): "
                                              "rename a folder, or merge them with `virtnii combine --prefix`")
        self.manifests = [ServedManifest(name, f"{name}/" if len(opened) > 1 else "", index, references)
                          for _, name, index, references in opened]
        self.images = {served.prefix + entry.name: ServedImage(served.prefix + entry.name, entry, served)
                       for served in self.manifests for entry in served.index.images}
        root_key, root_doc = ROOT_GROUPS[self.zarr_format]
        self._root = {root_key: json.dumps(root_doc).encode()} if len(opened) > 1 else {}
        self._by_name = {served.name: served for served in self.manifests}

    def listing(self) -> dict[str, Any]:
        """``/api/images``: every image, in the manifests' order."""
        return {"images": [image.summary() for image in self.images.values()]}

    def image(self, path: str) -> ServedImage | None:
        """The image whose group holds ``path`` (an image path, or a key inside its group), if any."""
        while path:
            found = self.images.get(path)
            if found is not None:
                return found
            path = path.rpartition("/")[0]
        return None

    async def key(self, key: str) -> Key | None:
        """What ``key`` (a path under ``/zarr/``, without the leading ``/``) is, or None if it is no key of the
        store.  Reads no source; a Parquet reference set may read its own files (in a thread)."""
        if key in self._root:
            value = self._root[key]
            return Key(key, None, key, None, value, len(value), _etag([value]), None)
        served, inner = self._manifest_of(key)
        if served is None or not inner:
            return None
        lookup = functools.partial(_reference, served.references, inner, served.lazy)
        ref = await asyncio.to_thread(lookup) if served.lazy else lookup()
        if ref is None:
            return None
        image = self.image(key)
        facts: list[Any] = []
        if image is not None:
            entry = image.entry
            facts = [entry.fingerprint, entry.data_fingerprint, entry.pyramid.tag if entry.pyramid else None]
        if isinstance(ref, list):
            mtimes = [fp.get("mtime") for _, fp in image.entry.checked_files] if image is not None else []
            mtimes = [m for m in mtimes if isinstance(m, (int, float))]
            last_modified = max(mtimes) if len(ref) == 3 and mtimes else None
            return Key(key, served, inner, image, None, int(ref[2]) if len(ref) == 3 else None,
                       _etag([json.dumps([ref, facts], sort_keys=True).encode()]), last_modified)
        value = await served.references._cat_file(inner)  # inlined: decoded as zarr would read it, no I/O
        return Key(key, served, inner, image, value, len(value),
                   _etag([value, json.dumps(facts, sort_keys=True).encode()]), None)

    async def read(self, key: Key, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of an existing key (all of it by default), from its source, with every check
        :func:`virtnii.open` makes: a changed or unreadable source raises its :class:`~virtnii.VirtniiError`."""
        if key.value is not None:
            return key.value[start:end]
        assert key.manifest is not None
        return await key.manifest.references._cat_file(key.inner, start=start, end=end)

    def _manifest_of(self, key: str) -> tuple[ServedManifest | None, str]:
        if len(self.manifests) == 1:
            return self.manifests[0], key
        name, _, inner = key.partition("/")
        return self._by_name.get(name), inner


#: Content types of the static files' suffixes, which mimetypes does not know everywhere.
_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
          ".json": "application/json", ".map": "application/json", ".css": "text/css", ".html": "text/html",
          ".svg": "image/svg+xml", ".png": "image/png"}


def content_type(name: str) -> str:
    """The Content-Type of a served key or file: JSON for zarr metadata, bytes for chunks."""
    if name.rsplit("/", 1)[-1] in METADATA_KEYS:
        return "application/json"
    return _TYPES.get(posixpath.splitext(name)[1].lower(), "application/octet-stream")


def _reference(references: ReferenceFileSystem, key: str, lazy: bool = False) -> Any:
    """The reference of ``key`` (a list, or inlined text/bytes), or None when the manifest has no such key.

    ``lazy`` (Parquet references): fsspec's lazy mapper turns any key below an array into a row number without
    checking it (``0.1.0`` of a 2×1×1 grid is row 1, ``00.0.0`` row 0), so a chunk key is first checked to be
    one the array has, spelled as zarr spells it: else another chunk's bytes would answer a key that is not.
    """
    if lazy and posixpath.basename(key) not in METADATA_KEYS and not _chunk_of_v2_array(references, key):
        return None
    try:
        ref = references.references[key]
    except (KeyError, ValueError, IndexError, TypeError):  # Parquet: a key outside any array's grid
        return None
    if isinstance(ref, (list, tuple)):  # Parquet marks a chunk it does not have [nan]
        return [ref[0], *map(int, ref[1:])] if ref and isinstance(ref[0], str) else None
    return ref


def _chunk_of_v2_array(references: ReferenceFileSystem, key: str) -> bool:
    """Whether ``key`` is ``ARRAY/CHUNK`` for a Zarr v2 array of ``references`` and a chunk inside its grid,
    in canonical form (ASCII decimal indices without leading zeros, one per dimension, the array's separator)."""
    for cut in [i for i, c in enumerate(key) if c == "/"][::-1]:
        array, chunk = key[:cut], key[cut + 1:]
        try:
            meta = json.loads(references.references[f"{array}/.zarray"])
        except (KeyError, ValueError, IndexError, TypeError):
            continue
        separator = meta.get("dimension_separator") or "."
        indices = chunk.split(separator)
        grid = [-(-size // step) for size, step in zip(meta["shape"], meta["chunks"])]
        if not grid:  # a 0-d array's one chunk
            return chunk == "0"
        return len(indices) == len(grid) and all(
            index.isascii() and index.isdigit() and str(int(index)) == index and int(index) < extent
            for index, extent in zip(indices, grid))
    return False


def _etag(parts: Sequence[bytes]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return f'"{digest.hexdigest()[:32]}"'

