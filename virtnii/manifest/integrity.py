"""What ``virtnii verify`` checks beyond the sources' fingerprints: the manifest's own files, and the sources' bytes.

A manifest is three kinds of files that must agree: the index file (``virtnii.json``), the references and the gzip
sidecars.  A references file that is missing or cut short, or a sidecar deleted by a sync tool, is found at the
first read otherwise — by the user, not by ``verify``.  :func:`check_manifest` reads them all and checks that
every image the index file lists has its group, its header and every level-0 chunk, each pointing into the data
file (or gzip index) the index file names, within its size; that every pyramid level it lists is referenced and
every level chunk referenced is in its store; and that every sidecar parses and describes the same source
version.

:func:`check_content` is ``verify --content``: the bytes themselves, for what size and mtime cannot see (a file
rewritten in place with its mtime restored).
"""

from __future__ import annotations

import base64
import itertools
import json
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
from .. import fingerprint, gzindex, versions
from ..errors import ManifestError, StaleSource, VirtniiError, storage_errors
from ..references import chunk_key
from .entry import ImageEntry
from .index import Index
from .refs import load_refs

#: Sidecars loaded at once (each is one or two requests and an inflate of its windows).
_SIDECAR_WORKERS = 16


def check_manifest(manifest: str, index: Index, options: dict[str, Any]) -> list[VirtniiError]:
    """Problems of a manifest's references, gzip sidecars and pyramid levels, one :class:`ManifestError` each."""
    manifest = manifest.rstrip("/")
    fs, root = fsspec.core.url_to_fs(manifest, **options)
    root = root.rstrip("/")
    refs_url = f"{manifest}/{index.references}"
    try:
        refs = load_refs(manifest, index, options)
    except ManifestError as err:
        problems: list[VirtniiError] = [err]
    else:
        problems = [problem for image in index.images
                    if (problem := _image_problem(refs, refs_url, image, index.zarr_format))]
        problems += _unlisted(refs, refs_url, index)
        with ThreadPoolExecutor(max_workers=_SIDECAR_WORKERS) as pool:
            pyramids = [image for image in index.images if image.pyramid]
            problems += [p for p in pool.map(lambda image: _levels_problem(refs, manifest, options, image,
                                                                           index.zarr_format), pyramids) if p]
    gzipped = [image for image in index.images if image.gzip_index]
    with ThreadPoolExecutor(max_workers=_SIDECAR_WORKERS) as pool:
        problems += [p for p in pool.map(lambda image: _sidecar_problem(fs, root, image), gzipped) if p]
    return problems


def _get(refs: dict[str, Any], key: str) -> Any:
    """``refs[key]`` with JSON's inline ``base64:`` values decoded; None when the key is missing."""
    value = refs.get(key)
    if isinstance(value, str):
        return base64.b64decode(value[7:]) if value.startswith("base64:") else value.encode()
    return value


def _image_problem(refs: dict[str, Any], refs_url: str, image: ImageEntry, zarr_format: int) -> ManifestError | None:
    """The first disagreement between an index-file entry and its level-0 references, if any."""
    name = image.name
    group, array = ("zarr.json", "zarr.json") if zarr_format == 3 else (".zgroup", ".zarray")
    for key in (f"{name}/{group}", f"{name}/0/{array}"):
        if _get(refs, key) is None:
            return ManifestError(refs_url, f"has no {key} for image {name!r} listed in the index file")
    try:
        level = json.loads(_get(refs, f"{name}/0/{array}"))
    except ValueError as err:
        return ManifestError(refs_url, f"{name}/0/{array} is not JSON ({err})")
    if tuple(level.get("shape", [])) != image.shape:
        return ManifestError(refs_url, f"image {name!r} has shape {level.get('shape')} in the references but "
                                       f"{list(image.shape)} in the index file")
    header = _get(refs, chunk_key(f"{name}/nifti", (0,), zarr_format))
    if not isinstance(header, bytes) or len(header) < 348 or header[:4] not in (
            b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c", b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c"):
        return ManifestError(refs_url, f"the nifti array of image {name!r} holds no NIfTI header")
    if image.gzip_index:
        url, limit = f"gzidx://{image.gzip_index}", image.uncompressed_size or 0
    else:
        url, limit = image.data_url, image.data_fp["size"]
    grid = [range(math.ceil(n / c)) for n, c in zip(image.shape, image.chunks)]
    for position in itertools.product(*grid):
        key = chunk_key(f"{name}/0", position, zarr_format)
        ref = _get(refs, key)
        if not isinstance(ref, list) or len(ref) != 3:
            return ManifestError(refs_url, f"chunk {key} of image {name!r} is missing or not a byte range")
        if ref[0] != url or int(ref[1]) + int(ref[2]) > limit:
            return ManifestError(refs_url, f"chunk {key} points at bytes {int(ref[1])}-{int(ref[1]) + int(ref[2])} "
                                           f"of {ref[0]}, but the index file lists {url} of {limit} bytes")
    return None


def _levels_problem(refs: dict[str, Any], manifest: str, options: dict[str, Any], image: ImageEntry,
                    zarr_format: int) -> ManifestError | None:
    """A pyramid level the references lack, or a level chunk they name that its store no longer holds."""
    assert image.pyramid is not None
    store = image.pyramid.url(manifest)
    metadata = "zarr.json" if zarr_format == 3 else ".zarray"
    for level in image.levels:
        if _get(refs, f"{image.name}/{level.path}/{metadata}") is None:
            return ManifestError(store, f"level {level.path} of image {image.name!r} is listed in the index file "
                                        "but not in the references; re-run `virtnii pyramid`")
    try:
        fs, path = fsspec.core.url_to_fs(store, **options)
        held = {file[len(path.rstrip("/")) + 1:] for file in fs.find(path)}
    except storage_errors() as err:
        return ManifestError(store, f"cannot list this pyramid level store: {err}")
    prefix = f"{image.pyramid.store}/"
    for level in image.levels:  # the level's own chunk (or shard) keys: no scan of the whole reference set
        grid = [range(math.ceil(n / c)) for n, c in zip(level.shape, level.shards or level.chunks)]
        for position in itertools.product(*grid):
            ref = refs.get(chunk_key(f"{image.name}/{level.path}", position, zarr_format))
            if isinstance(ref, list) and ref and ref[0].startswith(prefix) and ref[0][len(prefix):] not in held:
                return ManifestError(store, f"holds no {ref[0][len(prefix):]}, which the references of image "
                                            f"{image.name!r} name; re-run `virtnii pyramid`")
    return None


def _unlisted(refs: dict[str, Any], refs_url: str, index: Index) -> list[ManifestError]:
    """References into files the index file does not list (its sources, gzip indexes and level stores)."""
    listed = {f"gzidx://{image.gzip_index}" if image.gzip_index else image.data_url for image in index.images}
    stores = tuple(f"{image.pyramid.store}/" for image in index.images if image.pyramid)
    strays = {value[0] for value in refs.values() if isinstance(value, list) and value and value[0] not in listed
              and not value[0].startswith(stores)}
    return [ManifestError(refs_url, f"references {url}, which the index file does not list") for url in sorted(strays)]


def _sidecar_problem(fs: fsspec.AbstractFileSystem, root: str, image: ImageEntry) -> ManifestError | None:
    """A gzip sidecar that does not load, or describes another source or version than the index file."""
    try:
        index = gzindex.read_sidecar(fs, f"{root}/{image.gzip_index}")
        index.load_windows(range(len(index.points)))  # readers load them one by one, as chunks need them
    except ManifestError as err:
        return err
    url = fs.unstrip_protocol(f"{root}/{image.gzip_index}")
    recorded = image.data_fp
    for what, theirs, ours in (("source", index.source, image.data_url),
                               ("fingerprint", index.fingerprint, recorded),
                               ("uncompressed size", index.uncompressed_size, image.uncompressed_size),
                               ("compressed size", index.compressed_size, recorded["size"])):
        if theirs != ours:
            return ManifestError(url, f"describes {what} {theirs!r} but the index file says {ours!r}; "
                                      "re-run `virtnii scan`")
    return None


def check_content(fs: fsspec.AbstractFileSystem, path: str, url: str, recorded: fingerprint.Fingerprint) -> None:
    """Raise unless the file's bytes are those indexed: its SHA-256 when one was recorded; else, for gzip, a full
    inflate (zlib checks every member's CRC-32 and length: corruption, not a valid replacement of the same size,
    which the trailer check catches unless the last member is identical); else a ManifestError saying why not.
    A source pinned to a version is read at that version."""
    if fingerprint.CONTENT_HASH in recorded:
        digest = fingerprint.content_hash(*versions.pinned(fs, path, recorded), url, recorded["size"])
        if digest != recorded[fingerprint.CONTENT_HASH]:
            raise StaleSource(url, f"content changed since it was indexed (sha256 was "
                                   f"{recorded[fingerprint.CONTENT_HASH]}, now {digest}) although its size and "
                                   "mtime did not; re-run `virtnii scan` on it")
    elif fingerprint.GZIP_TRAILER in recorded:
        gzindex.build_index(url, [], fs=fs, known=recorded)
    else:
        raise ManifestError(url, "no content hash was recorded for it, so its content cannot be verified; "
                                 "re-scan with `virtnii scan --content-hash`")
