"""What ``virtnii verify`` checks beyond the sources' fingerprints: the manifest's own files, and the sources' bytes.

A manifest is three kinds of files that must agree: the index file (``virtnii.json``), the references and the gzip
sidecars.  A references file that is missing or cut short, or a sidecar deleted by a sync tool, is found at the
first read otherwise — by the user, not by ``verify``.  :func:`check_manifest` reads them all and checks that
every image the index file lists has its group, its header and every level-0 chunk, each pointing into the data
file (or gzip index) the index file names, within its size; and that every sidecar parses and describes the same
source version.

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
from fsspec.implementations.reference import LazyReferenceMapper

from . import fingerprint, gzindex
from .errors import ManifestError, StaleSource, VirtniiError, storage_errors
from .references import chunk_key

#: Sidecars loaded at once (each is one or two requests and an inflate of its windows).
_SIDECAR_WORKERS = 16


def check_manifest(manifest: str, index: dict[str, Any], options: dict[str, Any]) -> list[VirtniiError]:
    """Problems of a manifest's references and gzip sidecars, one :class:`ManifestError` per image or file."""
    manifest = manifest.rstrip("/")
    fs, root = fsspec.core.url_to_fs(manifest, **options)
    root = root.rstrip("/")
    refs_url = f"{manifest}/{index.get('references')}"
    try:
        refs = _load_refs(fs, f"{root}/{index['references']}", refs_url)
    except ManifestError as err:
        refs, problems = None, [err]
    else:
        problems = [problem for image in index["images"] if (problem := _image_problem(refs, refs_url, image,
                                                                                        index["zarr_format"]))]
        if isinstance(refs, dict):
            problems += _unlisted(refs, refs_url, index)
    gzipped = [image for image in index["images"] if image.get("gzip_index")]
    with ThreadPoolExecutor(max_workers=_SIDECAR_WORKERS) as pool:
        problems += [p for p in pool.map(lambda image: _sidecar_problem(fs, root, image), gzipped) if p]
    return problems


def _load_refs(fs: fsspec.AbstractFileSystem, path: str, url: str) -> Any:
    """The references as a mapping key → inline bytes/str or ``[url, offset, length]``."""
    try:
        if path.endswith(".parquet"):
            return LazyReferenceMapper(path, fs=fs)  # reads its .zmetadata; chunks are looked up by key
        document = json.loads(fs.cat_file(path))
    except FileNotFoundError as err:
        raise ManifestError(url, "the references file is missing; re-run `virtnii scan`") from err
    except (*storage_errors(), ValueError, KeyError, TypeError) as err:
        raise ManifestError(url, f"cannot read the references ({err}); re-run `virtnii scan`") from err
    if not isinstance(document, dict) or not isinstance(document.get("refs"), dict):
        raise ManifestError(url, "is not kerchunk references (no 'refs' mapping); re-run `virtnii scan`")
    return document["refs"]


def _get(refs: Any, key: str) -> Any:
    """``refs[key]`` with JSON's inline ``base64:`` values decoded; None when the key is missing."""
    try:
        value = refs[key]
    except KeyError:
        return None
    if isinstance(value, str):
        return base64.b64decode(value[7:]) if value.startswith("base64:") else value.encode()
    return value


def _image_problem(refs: Any, refs_url: str, image: dict[str, Any], zarr_format: int) -> ManifestError | None:
    """The first disagreement between an index-file entry and its references, if any."""
    name = image["name"]
    group, array = ("zarr.json", "zarr.json") if zarr_format == 3 else (".zgroup", ".zarray")
    for key in (f"{name}/{group}", f"{name}/0/{array}"):
        if _get(refs, key) is None:
            return ManifestError(refs_url, f"has no {key} for image {name!r} listed in the index file")
    try:
        level = json.loads(_get(refs, f"{name}/0/{array}"))
    except ValueError as err:
        return ManifestError(refs_url, f"{name}/0/{array} is not JSON ({err})")
    if list(level.get("shape", [])) != list(image["shape"]):
        return ManifestError(refs_url, f"image {name!r} has shape {level.get('shape')} in the references but "
                                       f"{image['shape']} in the index file")
    header = _get(refs, chunk_key(f"{name}/nifti", (0,), zarr_format))
    if not isinstance(header, bytes) or len(header) < 348 or header[:4] not in (
            b"\x5c\x01\x00\x00", b"\x00\x00\x01\x5c", b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c"):
        return ManifestError(refs_url, f"the nifti array of image {name!r} holds no NIfTI header")
    if image.get("gzip_index"):
        url, limit = f"gzidx://{image['gzip_index']}", image["uncompressed_size"]
    else:
        url, limit = image.get("data", image["source"]), image.get("data_fingerprint", image["fingerprint"])["size"]
    grid = [range(math.ceil(n / c)) for n, c in zip(image["shape"], image["chunks"])]
    for position in itertools.product(*grid):
        key = chunk_key(f"{name}/0", position, zarr_format)
        ref = _get(refs, key)
        if not isinstance(ref, list) or len(ref) != 3:
            return ManifestError(refs_url, f"chunk {key} of image {name!r} is missing or not a byte range")
        if ref[0] != url or int(ref[1]) + int(ref[2]) > limit:
            return ManifestError(refs_url, f"chunk {key} points at bytes {int(ref[1])}-{int(ref[1]) + int(ref[2])} "
                                           f"of {ref[0]}, but the index file lists {url} of {limit} bytes")
    return None


def _unlisted(refs: dict[str, Any], refs_url: str, index: dict[str, Any]) -> list[ManifestError]:
    """References into files the index file does not list (JSON references, which can be listed cheaply)."""
    listed = {f"gzidx://{image['gzip_index']}" if image.get("gzip_index") else image.get("data", image["source"])
              for image in index["images"]}
    strays = {value[0] for value in refs.values() if isinstance(value, list) and value and value[0] not in listed}
    return [ManifestError(refs_url, f"references {url}, which the index file does not list") for url in sorted(strays)]


def _sidecar_problem(fs: fsspec.AbstractFileSystem, root: str, image: dict[str, Any]) -> ManifestError | None:
    """A gzip sidecar that does not load, or describes another source or version than the index file."""
    try:
        index = gzindex.read_sidecar(fs, f"{root}/{image['gzip_index']}")
    except ManifestError as err:
        return err
    url = fs.unstrip_protocol(f"{root}/{image['gzip_index']}")
    recorded = image.get("data_fingerprint", image["fingerprint"])
    for what, theirs, ours in (("source", index.source, image.get("data", image["source"])),
                               ("fingerprint", index.fingerprint, recorded),
                               ("uncompressed size", index.uncompressed_size, image["uncompressed_size"]),
                               ("compressed size", index.compressed_size, recorded["size"])):
        if theirs != ours:
            return ManifestError(url, f"describes {what} {theirs!r} but the index file says {ours!r}; "
                                      "re-run `virtnii scan`")
    return None


def check_content(fs: fsspec.AbstractFileSystem, path: str, url: str, recorded: fingerprint.Fingerprint) -> None:
    """Raise unless the file's bytes are those indexed: its SHA-256 when one was recorded; else, for gzip, a full
    inflate (zlib checks every member's CRC-32 and length: corruption, not a valid replacement of the same size,
    which the trailer check catches unless the last member is identical); else a ManifestError saying why not."""
    if fingerprint.CONTENT_HASH in recorded:
        digest = fingerprint.content_hash(fs, path, url, recorded["size"])
        if digest != recorded[fingerprint.CONTENT_HASH]:
            raise StaleSource(url, f"content changed since it was indexed (sha256 was "
                                   f"{recorded[fingerprint.CONTENT_HASH]}, now {digest}) although its size and "
                                   "mtime did not; re-run `virtnii scan` on it")
    elif fingerprint.GZIP_TRAILER in recorded:
        gzindex.build_index(url, [], fs=fs, known=recorded)
    else:
        raise ManifestError(url, "no content hash was recorded for it, so its content cannot be verified; "
                                 "re-scan with `virtnii scan --content-hash`")
