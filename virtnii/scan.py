"""Scan NIfTI sources (files, folders, globs at any fsspec URL) into one manifest.

The flow: find the sources (:mod:`virtnii.sources`), read the headers of a batch with one concurrent ranged read
each, parse the batch at once (:func:`virtnii.header.parse_many`), index ``.nii.gz`` data in place (one
streaming pass each, in worker threads), build references, and write the manifest all-or-nothing.  A bad source
is reported and skipped; the good ones still make a manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping

import fsspec
from tqdm.auto import tqdm

from . import fingerprint, gzindex
from .manifest import GZIP_INDEX_FOLDER, ImageEntry
from .errors import InvalidGzip, InvalidNifti, ManifestError, VirtniiError, from_os_error, storage_errors
from .header import (HEAD_BYTES, MAX_HEADER_BYTES, NiftiHeader, check_data_size, header_extent, is_markup, parse,
                     parse_many, single_file_magic, without_extensions)
from .manifest import REF_FILES, ManifestWriter, manifest_url
from .manifest.entry import inside, relative_to
from .manifest.writer import SidecarFolder
from .references import ZARR_FORMATS, ImageRefs, image_refs
from .sources import CONCURRENT_READS, Source, SourceSpec, assign_names, by_listed_name, expand, is_local
from .verified import ranges_ignored

#: Uncompressed sources whose headers are fetched together (concurrently on object stores).
HEADER_BATCH = 512
#: Compressed bytes read first from a ``.nii.gz``: its header, and the start of the index pass (which reuses
#: them), so a file this small costs one request in all.
GZIP_FIRST_READ = 2**20
#: ``.nii.gz`` files indexed at once from remote storage: each pass is mostly waiting (a request per piece), and
#: inflating runs outside the GIL.  Locally, one per core.
GZIP_REMOTE_WORKERS = 16


@dataclass
class ScanResult:
    """What a scan made: the manifest URL (None when nothing could be indexed), its image entries, and failures."""

    manifest: str | None
    images: list[ImageEntry]
    failures: list[VirtniiError]


def scan(sources: Iterable[SourceSpec] | str, out: str, *, zarr_format: int = 3, ref_format: str = "json",
         storage_options: dict[str, Any] | None = None, manifest_options: dict[str, Any] | None = None,
         progress: bool = False, content_hash: bool = False, extensions: bool = True,
         write_url_secrets: bool = False, relative_sources: bool = False,
         pin_versions: bool | None = None) -> ScanResult:
    """Index NIfTI ``sources`` in place and write one manifest folder at ``out``.

    Parameters
    ----------
    sources
        Files (``.nii``, ``.nii.gz``, ``.hdr``, ``.hdr.gz``), folders (searched recursively) or globs, as local
        paths or fsspec URLs (``s3://…``, ``https://…``, ``memory://…``).  Folders and globs select files by
        those suffixes; a file given by itself without one (a DANDI blob, a presigned URL) is told by its first
        bytes: NIfTI-1/NIfTI-2 single-file magic, or gzip holding one (:func:`sniff`; ``.hdr``/``.img`` pairs
        need their names).  ``dandi://INSTANCE/DANDISET[@VERSION][/PATH]`` names DANDI assets (one, a folder, a
        glob or a whole dandiset), listed through the archive's API in bulk and read at their S3 blobs
        (:mod:`virtnii.dandi`).  A ``(name, url)`` pair instead of a string names the file's image group
        (``[("sub-01/anat/sub-01_T1w", "https://…/blobs/d86/055/…"), …]``, or ``list(mapping.items())``):
        used verbatim, checked by :func:`~virtnii.sources.check_names` (a :class:`ManifestError` if unusable).
        Without one an image is named by its path below the folder it was found in (a file by its stem, an
        extension-less URL by its last segment; a query is never part of a name).
    out
        Manifest folder (local path or fsspec URL); replaced if it exists.
    zarr_format
        3 (Zarr v3 + OME 0.5, default) or 2 (Zarr v2 + OME 0.4).
    ref_format
        ``"json"`` (kerchunk v1 JSON) or ``"parquet"`` (fsspec's lazy Parquet references; Zarr v2 only,
        because fsspec's Parquet reader understands only Zarr v2 metadata).
    storage_options
        Options for reading the sources (e.g. ``{"anon": True}``); never written into the manifest.
    manifest_options
        Options for writing ``out`` when it is remote (default: none).
    progress
        Show a progress bar on stderr.
    content_hash
        Record each source's SHA-256 in its fingerprint, for ``virtnii verify --content``: costs reading every
        ``.nii``/``.img`` whole (``.nii.gz`` files are read whole anyway, to index them).
    extensions
        Keep header extensions in the ``nifti`` arrays (default); ``False`` drops them (they may carry
        identifying text) and clears the extension flag.
    write_url_secrets
        Index URLs whose query holds credentials (presigned URLs), which then appear in the manifest; refused
        by default.
    relative_sources
        Name every source by its path relative to ``out`` (``../../sub-01/anat/sub-01_T1w.nii.gz``), so that a
        manifest written inside its dataset still opens once both are moved, cloned or uploaded together.  Every
        source must then be on ``out``'s filesystem (same protocol; same bucket or host): one that is not is a
        :class:`~virtnii.errors.ManifestError` naming it, before anything is indexed.
    pin_versions
        Record each object's version (S3 ``VersionId``, GCS generation) and read exactly that version whenever
        the manifest is read, so that it keeps returning the bytes it indexed after the object is overwritten
        (:mod:`virtnii.versions`).  ``None`` (default): wherever the storage reports versions; ``True``: a
        source without one is a failure; ``False``: never (reads then raise ``StaleSource`` once it changes).
    """
    if not str(out).strip():
        raise ManifestError(repr(out), "is not a manifest folder name (give the folder to write, e.g. -o OUT)")
    if zarr_format not in ZARR_FORMATS:
        raise ManifestError(out, f"zarr_format must be 2 or 3, not {zarr_format!r}")
    if ref_format not in REF_FILES:
        raise ManifestError(out, f"reference format must be one of {sorted(REF_FILES)}, not {ref_format!r}")
    if ref_format == "parquet" and zarr_format != 2:
        raise ManifestError(out, "Parquet references need --zarr-format 2 (fsspec's Parquet reference reader "
                                 "understands only Zarr v2 metadata)")
    options = dict(storage_options or {})
    if isinstance(sources, Mapping):  # list() of it would scan its names
        raise TypeError("give named sources as (name, url) pairs: list(mapping.items())")
    sources = [sources] if isinstance(sources, str) else list(sources)
    with tqdm(total=len(sources), unit="source", desc="list", disable=not progress) as listing:
        def listed(count: int) -> None:
            listing.set_postfix_str(f"{count} NIfTI files", refresh=False)
            listing.update(1)

        found, failures = expand(sources, options, listed, write_url_secrets=write_url_secrets,
                                 paging=listing.set_postfix_str, pin_versions=pin_versions)
    failures += assign_names(found)
    names = relative_names(out, manifest_options, found) if relative_sources else {}
    images: list[ImageRefs] = []
    entries: list[ImageEntry] = []
    plain = [s for s in found if not s.is_gzip]  # with the files known by content: their header read sniffs them
    gzipped = [s for s in found if s.is_gzip]
    with ManifestWriter(out, manifest_options) as writer, \
            tqdm(total=len(found), unit="file", desc="scan", disable=not progress) as bar, \
            tqdm(total=sum(s.data_info["size"] for s in gzipped), unit="B", unit_scale=True, desc="gzip index",
                 disable=not (progress and (gzipped or any(s.by_content for s in plain))), position=1) as gz_bar:
        # In batches, so the bar moves on big archives; the next batch is fetched while this one is parsed.
        batches = [plain[i:i + HEADER_BATCH] for i in range(0, len(plain), HEADER_BATCH)]
        with ThreadPoolExecutor(max_workers=1) as prefetch:
            pending = [prefetch.submit(read_plain_headers, batch) for batch in batches[:1]]
            for k, batch in enumerate(batches):
                heads = pending.pop().result()
                if k + 1 < len(batches):
                    pending.append(prefetch.submit(read_plain_headers, batches[k + 1]))
                sniffed = [s for s in batch if s.is_gzip]  # known by content, found compressed: indexed below
                if sniffed:
                    gzipped += sniffed
                    gz_bar.total += sum(s.data_info["size"] for s in sniffed)
                    kept = [i for i, s in enumerate(batch) if not s.is_gzip]
                    batch, heads = [batch[i] for i in kept], [heads[i] for i in kept]
                outcomes = _plain_images(batch, heads, zarr_format, extensions)
                if content_hash:
                    _record_hashes(batch, outcomes, _gzip_workers(batch))
                for source, outcome in zip(batch, outcomes):
                    _collect(source, outcome, names, images, entries, failures, bar)
        stop = threading.Event()

        def advance(consumed: int) -> None:
            """Progress of an index pass; ends the pass early once the scan is being abandoned."""
            if stop.is_set():
                raise _Abandoned()
            gz_bar.update(consumed)

        with ThreadPoolExecutor(max_workers=_gzip_workers(gzipped)) as pool:
            try:  # from the first submission: an interrupt while submitting must stop the passes already running
                jobs = {pool.submit(index_gzip_source, s, writer, zarr_format, advance, extensions=extensions,
                                    content_hash=content_hash, names=names): s for s in gzipped}
                for job in as_completed(jobs):
                    try:
                        outcome = job.result()
                    except ManifestError:  # writing its sidecar failed: the manifest, not this source, is at fault
                        raise
                    except VirtniiError as err:
                        outcome = err
                    _collect(jobs[job], outcome, names, images, entries, failures, bar)
            except BaseException:  # Ctrl-C or a bug: do not index the rest of an archive before giving up
                stop.set()
                pool.shutdown(cancel_futures=True)
                raise
        if not images:
            return ScanResult(None, [], by_listed_name(failures, found))
        order = sorted(range(len(images)), key=lambda i: images[i].name)
        writer.commit([images[i] for i in order], [entries[i] for i in order], zarr_format, ref_format)
    return ScanResult(out, [entries[i] for i in order], by_listed_name(failures, found))


class _Abandoned(Exception):
    """Raised inside an index pass when the scan it belongs to is being abandoned (Ctrl-C, an error)."""


def _gzip_workers(sources: list[Source]) -> int:
    """Threads for indexing ``sources``: one per core for local files, more where requests wait on a network."""
    if all(is_local(s.fs) for s in sources):
        return os.cpu_count() or 1
    return GZIP_REMOTE_WORKERS


def _collect(source: Source, outcome: tuple[ImageRefs, ImageEntry] | VirtniiError, names: dict[str, str],
             images: list[ImageRefs], entries: list[ImageEntry], failures: list[VirtniiError], bar: tqdm) -> None:
    """Add one finished source to the results (or to the failures) and advance the progress bar.

    Sources are indexed (and errors name them) by URL; ``names`` then gives the manifest's name for each
    (:func:`relative_names`), in its entry and in the chunk references of an uncompressed file.
    """
    bar.update(1)
    if isinstance(outcome, VirtniiError):
        failures.append(outcome)
        return
    refs, entry = named(outcome, names)
    images.append(refs)
    entries.append(entry)


def named(outcome: tuple[ImageRefs, ImageEntry], names: dict[str, str]) -> tuple[ImageRefs, ImageEntry]:
    """An indexed source's references and entry with its files named as ``names`` says (relative sources):
    in the entry, and in the chunk references of an uncompressed file (a gzip sidecar names its own)."""
    refs, entry = outcome
    if names:
        if not entry.gzip_index:
            refs.url = names[refs.url]
        entry = replace(entry, source=names[entry.source], data=None if entry.data is None else names[entry.data])
    return refs, entry


def relative_names(out: str, manifest_options: dict[str, Any] | None, found: list[Source]) -> dict[str, str]:
    """Each source file's path relative to the manifest folder ``out``, by URL; a ManifestError for the first
    one not on ``out``'s filesystem, which no relative path can name."""
    base = manifest_url(out, manifest_options)
    names = {}
    for source in found:
        for url in (source.url, source.data_url):
            name = relative_to(base, url)
            if name is None:
                raise ManifestError(url, f"is not on the filesystem of the manifest folder {base} (another "
                                         "protocol, bucket or host), so it cannot be named relative to it: scan "
                                         "without relative sources, or write the manifest beside the sources")
            names[url] = name
    return names


# ---------------------------------------------------------------------------------------------------- headers

def _fetch_ranges(fs: fsspec.AbstractFileSystem, paths: list[str], ends: list[int]) -> list[bytes | Exception]:
    """First ``ends[i]`` bytes of each path, concurrently on async filesystems (one GET each)."""
    if not paths:
        return []
    if is_local(fs) and hasattr(os, "pread"):  # POSIX
        return [_read_local(path, end) for path, end in zip(paths, ends)]
    if fs.async_impl:
        return fs.cat_ranges(paths, [0] * len(paths), ends, on_error="return", batch_size=CONCURRENT_READS)
    return fs.cat_ranges(paths, [0] * len(paths), ends, on_error="return")


def _read_local(path: str, end: int) -> bytes | OSError:
    """The first ``end`` bytes of a local file (fsspec's file objects cost 5x the read itself)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        return err
    try:
        return os.pread(fd, end, 0)
    except OSError as err:
        return err
    finally:
        os.close(fd)


def read_plain_headers(sources: list[Source]) -> list[bytes | VirtniiError]:
    """Raw headers of uncompressed sources, one concurrent ranged read per file (a second for big extensions or a
    ``.hdr`` over :data:`~virtnii.header.HEAD_BYTES`).

    A source known by its content (no NIfTI suffix) is sniffed from that same read (:func:`sniff`), which sets
    its ``gzip``: one found compressed gets back its first compressed bytes, for the caller to index it as a
    ``.nii.gz`` instead (:func:`index_gzip_source` reads it from the start), one found to be no NIfTI file its
    error.
    """
    outcomes: list[Any] = [None] * len(sources)
    by_fs: dict[int, list[int]] = {}
    for i, s in enumerate(sources):
        by_fs.setdefault(id(s.fs), []).append(i)
    for members in by_fs.values():
        fs = sources[members[0]].fs
        wants = [min(sources[i].info["size"], HEAD_BYTES) for i in members]
        heads = _fetch_ranges(fs, [sources[i].read_path for i in members], wants)
        retry = []
        for i, want, head in zip(members, wants, heads):
            s = sources[i]
            if isinstance(head, Exception):
                outcomes[i] = from_os_error(s.url, head, "read")
                continue
            if len(head) > want:  # the whole file came back: the next ranged read (a chunk) would get it too
                outcomes[i] = ranges_ignored(s.url, 0, want, len(head))
                continue
            try:
                if s.by_content and s.gzip is None:
                    s.gzip = sniff(s.url, head)
                    if s.gzip:
                        outcomes[i] = head
                        continue
                extent = header_extent(s.url, head, s.is_pair, s.info["size"])
            except VirtniiError as err:
                outcomes[i] = err
                continue
            if extent > len(head) and extent <= s.info["size"]:
                retry.append((i, extent))
            else:
                outcomes[i] = head[:extent]
        more = _fetch_ranges(fs, [sources[i].read_path for i, _ in retry], [e for _, e in retry])
        for (i, _), head in zip(retry, more):
            outcomes[i] = from_os_error(sources[i].url, head, "read") if isinstance(head, Exception) else head
    return outcomes


def _plain_images(sources: list[Source], heads: list[bytes | VirtniiError], zarr_format: int,
                  extensions: bool = True) -> list[tuple[ImageRefs, ImageEntry] | VirtniiError]:
    """Headers (parsed together), references and index entries of a batch of uncompressed sources."""
    outcomes: list[Any] = list(heads)
    read = [i for i, head in enumerate(heads) if not isinstance(head, VirtniiError)]
    headers = parse_many([sources[i].url for i in read], [heads[i] for i in read], [sources[i].is_pair for i in read])
    for i, header in zip(read, headers):
        outcomes[i] = (header if isinstance(header, VirtniiError)
                       else _plain_image(sources[i], header, zarr_format, extensions))
    return outcomes


def _plain_image(source: Source, header: NiftiHeader, zarr_format: int,
                 extensions: bool = True) -> tuple[ImageRefs, ImageEntry] | VirtniiError:
    try:
        check_data_size(source.data_url, header, int(source.data_info["size"]))
        refs = image_refs(source.name, header if extensions else without_extensions(header), source.data_url,
                          zarr_format)
    except VirtniiError as err:
        return err
    return refs, _entry(source, header, refs)


def _record_hashes(sources: list[Source], outcomes: list[Any], workers: int) -> None:
    """Add the content hash of each indexed source (and of a pair's data file) to its entry's fingerprints, in
    place; a source that cannot be hashed becomes its error.  Files are hashed concurrently, streamed."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = {}
        for i, (source, outcome) in enumerate(zip(sources, outcomes)):
            if isinstance(outcome, VirtniiError):
                continue
            files = [(source.read_path, source.url, source.info),
                     (source.data_read_path, source.data_url, source.data_info)]
            jobs[i] = [pool.submit(fingerprint.content_hash, source.fs, path, url, int(info["size"]))
                       for path, url, info in files[:2 if source.is_pair else 1]]
        for i, futures in jobs.items():
            try:
                digests = [future.result() for future in futures]
            except VirtniiError as err:
                outcomes[i] = err
                continue
            refs, entry = outcomes[i]
            header_fp = {**entry.fingerprint, fingerprint.CONTENT_HASH: digests[0]}
            data_fp = {**entry.data_fingerprint, fingerprint.CONTENT_HASH: digests[1]} if len(digests) > 1 \
                else entry.data_fingerprint
            outcomes[i] = (refs, replace(entry, fingerprint=header_fp, data_fingerprint=data_fp))


def sniff(url: str, head: bytes) -> bool:
    """Whether a file whose name does not say what it is (no NIfTI suffix) is a gzip-compressed NIfTI (True) or
    an uncompressed single-file one (False), from its first bytes; an :class:`InvalidNifti` naming it otherwise.

    NIfTI-1/NIfTI-2 single-file magic (``n+1``, ``n+2``) makes it plain; gzip magic makes it compressed if what
    its first bytes inflate to has that magic (a gzipped tar or CSV is no image).  A pair's ``.hdr`` is refused:
    its ``.img`` is found by name.
    """
    if head[:2] != b"\x1f\x8b":
        problem = _not_single_file(head)
        if problem:
            raise InvalidNifti(url, f"not a NIfTI file: {problem}")
        return False
    try:
        inflated, _ = _gunzip_members(head, 348)  # where NIfTI-1's magic ends (NIfTI-2's: at 8)
    except zlib.error as err:
        raise InvalidGzip(url, f"corrupt gzip data at the start of the file: {err}") from err
    problem = _not_single_file(inflated)
    if problem:
        raise InvalidNifti(url, f"not a NIfTI file: gzip-compressed, and inside it {problem}")
    return True


def _not_single_file(head: bytes) -> str | None:
    """What a file's first bytes are, when they are not a single-file NIfTI (else None)."""
    magic = single_file_magic(head)
    if magic:
        return None
    if magic is False:
        return "the header of a .hdr/.img pair, whose .img is found by name: give it its .hdr name, beside the .img"
    if not head:
        return "an empty file"
    if is_markup(head):
        return "an HTML/XML document (wrong URL, an expired link, or an error/login page?)"
    return "no NIfTI-1/NIfTI-2 magic in its first bytes"


# ------------------------------------------------------------------------------------------------------- gzip

def gunzip_head(fs: fsspec.AbstractFileSystem, path: str, url: str, size: int,
                need: Callable[[bytes], int]) -> tuple[bytes, bytes]:
    """``(compressed, head)``: the compressed bytes read from the start of a gzip file, and the first
    ``need(head)`` bytes they inflate to (shorter if the file ends first).

    The first read takes up to :data:`GZIP_FIRST_READ` bytes, which the index pass reuses (a small ``.nii.gz``
    is read once, whole); later reads grow fourfold.  Only what the header needs is inflated.
    """
    if size == 0:
        raise InvalidGzip(url, "empty file")
    step, limit = min(size, GZIP_FIRST_READ), HEAD_BYTES
    compressed = b""
    while True:
        if len(compressed) < step:
            compressed = _read_gzip_start(fs, path, url, step)
        try:
            head, cut = _gunzip_members(compressed, limit)
        except zlib.error as err:
            raise InvalidGzip(url, f"corrupt gzip data at the start of the file: {err}") from err
        if cut and step == size:  # said before the header is judged: its bytes are missing, not wrong
            raise InvalidGzip(url, f"truncated: the gzip stream stops at byte {size} before its end (after "
                                   f"{len(head)} decompressed bytes); the file is incomplete")
        wanted = need(head)  # at most MAX_HEADER_BYTES (header_extent refuses more)
        if len(head) >= wanted:
            return compressed, head[:wanted]
        if len(head) >= limit:  # more of these bytes to inflate
            limit = wanted
        elif step < size:  # the bytes ran out before the header did
            step = min(size, step * 4)
        else:
            return compressed, head


def _read_gzip_start(fs: fsspec.AbstractFileSystem, path: str, url: str, end: int) -> bytes:
    """The first ``end`` compressed bytes, checked to be gzip and exactly what was asked for."""
    try:
        compressed = fs.cat_file(path, start=0, end=end)
    except storage_errors() as err:
        raise from_os_error(url, err, "read") from err
    if len(compressed) > end:
        raise ranges_ignored(url, 0, end, len(compressed))
    if compressed[:2] != b"\x1f\x8b":
        raise InvalidGzip(url, "not gzip data (no gzip magic bytes): is it an uncompressed .nii named .gz?")
    return compressed


def _gunzip_members(data: bytes, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes inflated from ``data``, across gzip members (a header may span several), and whether
    ``data`` ended inside a member before ``limit`` was reached."""
    out = bytearray()
    while data and len(out) < limit:
        member = zlib.decompressobj(wbits=31)
        out += member.decompress(data, limit - len(out))
        if not member.eof:
            return bytes(out), len(out) < limit
        data = member.unused_data
    return bytes(out), False


def index_gzip_source(source: Source, writer: SidecarFolder, zarr_format: int,
                      advance: Callable[[int], Any] = lambda n: None, *, extensions: bool = True,
                      content_hash: bool = False, names: dict[str, str] | None = None) -> tuple[ImageRefs, ImageEntry]:
    """Header, seek-point index and references of a ``.nii.gz`` (or gzipped pair), indexed in place.

    ``advance(n)`` is told of every ``n`` more compressed bytes indexed (a progress bar's ``update``).
    ``names`` maps source URLs to the manifest's names for them (relative sources), which the sidecar uses.  The data
    file's fingerprint is the index's: with the gzip trailer, and the content hash if asked for.
    """
    fs, url = source.fs, source.url
    if source.is_pair:
        _, raw = gunzip_head(fs, source.read_path, url, source.info["size"], lambda head: MAX_HEADER_BYTES)
        prefix = b""  # the voxels are in the .img.gz
    else:
        prefix, raw = gunzip_head(fs, source.read_path, url, source.info["size"],
                                  lambda head: header_extent(url, head, False, 2**62))
    header = parse(url, raw, source.is_pair)
    check_data_size(source.data_url, header, int(source.data_info["size"]), compressed=True)
    # planned against the source URL (errors name it); the gzidx:// URL replaces it once the index is written
    layout_refs = image_refs(source.name, header if extensions else without_extensions(header), source.data_url,
                             zarr_format)
    offsets = layout_refs.offsets.tolist()
    done = [0]

    def progress(consumed: int) -> None:
        advance(consumed - done[0])
        done[0] = consumed

    index = gzindex.build_index(source.data_url, offsets, fs=source.fs, prefix=prefix,
                                known=source.data_fingerprint, progress=progress,
                                content_hash=content_hash)
    check_data_size(source.data_url, header, index.uncompressed_size)
    folder, _, base = source.name.rpartition("/")
    # names were checked (assign_names, check_names); this guards the write itself
    relative = inside(f"{GZIP_INDEX_FOLDER}/{folder}".rstrip("/"), GZIP_INDEX_FOLDER)
    with writer.writing():
        written = gzindex.write_sidecar(index, writer.fs, f"{writer.tmp}/{relative}", f"{base}.{_version_tag(index)}",
                                        (names or {}).get(index.source))
    descriptor = f"{relative}/{written}"
    layout_refs.url = f"gzidx://{descriptor}"
    entry = _entry(source, header, layout_refs, descriptor, index.uncompressed_size)
    if source.is_pair:  # the data file's fingerprint is the index's (trailer, hash); the header file hashed here
        header_fp = dict(entry.fingerprint)
        if content_hash:
            header_fp[fingerprint.CONTENT_HASH] = fingerprint.content_hash(fs, source.read_path, url,
                                                                           int(source.info["size"]))
        return layout_refs, replace(entry, fingerprint=header_fp, data_fingerprint=index.fingerprint)
    return layout_refs, replace(entry, fingerprint=index.fingerprint)


def _version_tag(index: gzindex.GzipIndex) -> str:
    """8 hex digits naming this version of a source and its chunking, part of the sidecar's file name.

    Sidecar paths mirror the image names (``sub-01/anat/…``), which are unique within a manifest; the tag makes
    them unique across rescans too.  A reader still holding the references of an earlier scan (opened before
    the manifest was replaced) then finds its own sidecar or none — never the index of a changed source, whose
    seek points would serve other bytes at its old offsets.
    """
    identity = json.dumps(index.fingerprint, sort_keys=True).encode() + index.stops.tobytes()
    return hashlib.blake2b(identity, digest_size=4).hexdigest()


# -------------------------------------------------------------------------------------------------- entries


def _entry(source: Source, header: NiftiHeader, refs: ImageRefs, gzip_index: str | None = None,
           uncompressed_size: int | None = None) -> ImageEntry:
    """The index-file entry of one image: where it came from, what it looked like, what it holds."""
    layout = refs.layout
    dtype = header.dtype
    return ImageEntry(
        name=source.name, source=source.url, fingerprint=source.fingerprint,
        nifti_version=header.version, shape=layout.shape, axes="".join(layout.axes), chunks=layout.chunks,
        dtype=dtype.str if not dtype.fields else tuple((n, t) for n, t in dtype.descr), nbytes=layout.nbytes,
        gzip_index=gzip_index, uncompressed_size=uncompressed_size,
        data=source.data_url if source.is_pair else None,
        data_fingerprint=source.data_fingerprint if source.is_pair else None,
        zooms=tuple(float(z) for z in header.fields["pixdim"][1:len(header.shape) + 1]))
