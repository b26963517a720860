"""Merge several manifests (single images, whole datasets) into one, without touching a voxel.

Merging works on typed entries: each image of each input is one :class:`~virtnii.entry.ImageEntry` plus the
references under its group, moved as a unit — renamed (``prefix/name``), its gzip sidecar copied into the new
manifest (they are small: 0.7 % of the compressed file) and its ``gzidx://`` URLs pointed at the copy, its
pyramid level store (which is not copied: levels are the only voxel bytes virtnii writes) referenced by
absolute URL, and so are sources an input names relative to itself (in its entry, its references and its gzip
descriptor): the combined manifest is elsewhere, and a path relative to it would name other files.  Names that
clash — the same image twice, or an image where another's folder should be — are refused with the list of
clashes, before anything is written; ``prefixes`` keep inputs apart.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, replace
from typing import Any, Sequence

import fsspec

from .. import gzindex
from .entry import GZIP_INDEX_FOLDER, ImageEntry, resolve
from ..errors import ManifestError, storage_errors
from .index import Index, manifest_options_for, read_index
from .refs import load_refs
from .writer import ManifestWriter

GZIDX = "gzidx://"


@dataclass
class StoredRefs:
    """The references of one image group as a manifest holds them (a name and its keys), ready to be written."""

    name: str
    refs: dict[str, Any]

    def kerchunk(self) -> dict[str, Any]:
        return self.refs


def combine(manifests: Sequence[str], out: str, *, prefixes: Sequence[str] | None = None,
            ref_format: str | None = None, manifest_options: dict[str, Any] | None = None,
            out_options: dict[str, Any] | None = None) -> Index:
    """Write one manifest at ``out`` holding every image of ``manifests``; returns its index.

    ``prefixes`` (one per manifest, ``""`` for none) put each input's images under a group of that name.
    ``ref_format`` defaults to the first input's.  All inputs must share one Zarr format.  ``out`` is written
    all-or-nothing, like a scan's manifest.
    """
    if not manifests:
        raise ManifestError(out, "nothing to combine: name at least one manifest")
    prefixes = list(prefixes) if prefixes is not None else [""] * len(manifests)
    if len(prefixes) != len(manifests):
        raise ManifestError(out, f"{len(prefixes)} prefixes for {len(manifests)} manifests: give one each")
    inputs = []
    for manifest, prefix in zip(manifests, prefixes):
        manifest = manifest.rstrip("/")
        options = manifest_options_for(manifest, manifest_options, {})
        inputs.append((manifest, _prefix(manifest, prefix), options, read_index(manifest, options)))
    formats = {index.zarr_format for *_, index in inputs}
    if len(formats) > 1:
        raise ManifestError(out, "cannot combine Zarr v2 and Zarr v3 manifests: rescan with one --zarr-format")
    zarr_format = formats.pop()
    ref_format = ref_format or inputs[0][3].ref_format
    _refuse_clashes(out, [(manifest, _joined(prefix, entry.name)) for manifest, prefix, _, index in inputs
                          for entry in index.images])
    images: list[StoredRefs] = []
    entries: list[ImageEntry] = []
    with ManifestWriter(out, out_options) as writer:
        for manifest, prefix, options, index in inputs:
            refs = load_refs(manifest, index, options)
            fs, root = fsspec.core.url_to_fs(manifest, **options)
            for entry in index.images:
                moved, image_refs = _move(entry, refs, prefix, fs, root.rstrip("/"), writer)
                entries.append(moved)
                images.append(StoredRefs(moved.name, image_refs))
        order = sorted(range(len(entries)), key=lambda i: entries[i].name)
        writer.commit([images[i] for i in order], [entries[i] for i in order], zarr_format, ref_format)
    return read_index(out, out_options)


def _prefix(manifest: str, prefix: str) -> str:
    clean = prefix.strip("/")
    if clean and (posixpath.normpath(clean) != clean or clean.startswith("..") or "//" in prefix):
        raise ManifestError(manifest, f"prefix {prefix!r} must be a plain group path (e.g. ds000001 or site-a/ds1)")
    return clean


def _joined(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _refuse_clashes(out: str, names: list[tuple[str, str]]) -> None:
    """Two images of one name, or an image named like another's folder (a group cannot be both)."""
    seen: dict[str, str] = {}
    clashes = []
    for manifest, name in names:
        if name in seen:
            clashes.append(f"{name} (in {seen[name]} and {manifest})")
        seen.setdefault(name, manifest)
    folders = {name[:i] for _, name in names for i, c in enumerate(name) if c == "/"}
    clashes += [f"{name} (an image, and a folder of other images)" for _, name in names if name in folders]
    if clashes:
        shown = "; ".join(clashes[:5]) + (f"; and {len(clashes) - 5} more" if len(clashes) > 5 else "")
        raise ManifestError(out, f"image names clash: {shown}. Give each manifest a prefix "
                                 "(virtnii combine A B --prefix a --prefix b)")


def _move(entry: ImageEntry, refs: dict[str, Any], prefix: str, fs: fsspec.AbstractFileSystem, root: str,
          writer: ManifestWriter) -> tuple[ImageEntry, dict[str, Any]]:
    """One image's entry and references as the combined manifest holds them."""
    name = _joined(prefix, entry.name)
    old_gzidx = new_gzidx = None
    old_data = entry.data_url
    entry = entry.resolved(fs.unstrip_protocol(root))
    gzip_index = entry.gzip_index
    if entry.gzip_index:
        gzip_index = _copy_sidecar(entry.gzip_index, prefix, fs, root, writer)
        old_gzidx, new_gzidx = GZIDX + entry.gzip_index, GZIDX + gzip_index
    pyramid = entry.pyramid
    old_store = new_store = None
    if pyramid is not None and pyramid.is_relative:
        old_store, new_store = pyramid.store, fs.unstrip_protocol(f"{root}/{pyramid.store}")
        pyramid = replace(pyramid, store=new_store)
    head = f"{entry.name}/"
    moved: dict[str, Any] = {}
    for key, value in refs.items():
        if not key.startswith(head):
            continue
        if isinstance(value, list) and value:
            url = value[0]
            if url == old_gzidx:
                value = [new_gzidx, *value[1:]]
            elif url == old_data:
                value = [entry.data_url, *value[1:]]
            elif old_store is not None and url.startswith(f"{old_store}/"):
                value = [new_store + url[len(old_store):], *value[1:]]
        moved[f"{name}/{key[len(head):]}"] = value
    return replace(entry, name=name, gzip_index=gzip_index, pyramid=pyramid), moved


def _copy_sidecar(descriptor: str, prefix: str, fs: fsspec.AbstractFileSystem, root: str,
                  writer: ManifestWriter) -> str:
    """Copy a gzip index descriptor and its index file into the new manifest; returns the descriptor's path.

    A source the descriptor names relative to its manifest is named by its URL in the copy."""
    target = f"{GZIP_INDEX_FOLDER}/{prefix}/{descriptor[len(GZIP_INDEX_FOLDER) + 1:]}" if prefix else descriptor
    source_folder, target_folder = posixpath.dirname(f"{root}/{descriptor}"), posixpath.dirname(target)
    try:
        text = fs.cat_file(f"{root}/{descriptor}")
        meta = json.loads(text)
        index_file = meta["index"]
        if meta["virtnii_gzip_index"] == gzindex.RELATIVE_DESCRIPTOR_VERSION:
            meta.update(virtnii_gzip_index=gzindex.DESCRIPTOR_VERSION,
                        source=resolve(fs.unstrip_protocol(root), meta["source"]))
            text = json.dumps(meta).encode()
        data = fs.cat_file(f"{source_folder}/{index_file}")
    except (*storage_errors(), ValueError, KeyError, TypeError) as err:
        raise ManifestError(fs.unstrip_protocol(f"{root}/{descriptor}"),
                            f"cannot copy this gzip index: {err}; re-run `virtnii scan`") from err
    with writer.writing():
        writer.fs.makedirs(f"{writer.tmp}/{target_folder}", exist_ok=True)
        writer.fs.pipe_file(f"{writer.tmp}/{target_folder}/{index_file}", data)
        writer.fs.pipe_file(f"{writer.tmp}/{target}", text)
    return target
