"""Find the NIfTI sources behind files, folders and globs at any fsspec URL, and name their image groups.

Listing gives each source's size and ETag/mtime (its fingerprint) for free; ``.hdr`` files are paired with their
``.img``; names follow the paths below the folder a source was found under (BIDS ``sub-01/anat/sub-01_T1w``),
unique within a manifest.  Problems are collected per source, so one bad file never stops a batch.
"""

from __future__ import annotations

import collections
import functools
import os
import posixpath
import re
import stat
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import (InvalidNifti, SourceAccessError, SourceNotFound, VirtniiError, from_os_error, is_secret_name,
                     storage_errors)

#: File names the scanner picks up in folders; ``.img``/``.img.gz`` are found through their ``.hdr``.
NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".hdr.gz")
_GLOB = re.compile(r"[*?\[]")
#: What local paths that are not regular files are, for the error that reports them: opening a FIFO for reading
#: blocks until something writes to it (a scan hung forever), and devices and sockets hold no NIfTI file.
_SPECIAL_FILES = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
                  stat.S_IFBLK: "a block device"}


@dataclass
class Source:
    """One image to index: its header file and the file holding its voxels (the same file for ``.nii``)."""

    fs: fsspec.AbstractFileSystem
    path: str
    info: dict[str, Any]
    data_path: str = ""
    data_info: dict[str, Any] = field(default_factory=dict)
    base: str = ""
    name: str = ""

    @functools.cached_property
    def url(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    @functools.cached_property
    def data_url(self) -> str:
        return self.url if self.data_path == self.path else self.fs.unstrip_protocol(self.data_path)

    @property
    def is_pair(self) -> bool:
        return file_part(self.fs, self.path).lower().endswith((".hdr", ".hdr.gz"))

    @property
    def is_gzip(self) -> bool:
        return file_part(self.fs, self.data_path).lower().endswith(".gz")


def file_part(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """``path`` without a web URL's query (``?…``), which is not part of the file's name (on other filesystems a
    ``?`` is an ordinary character of a name)."""
    return path.split("?", 1)[0] if _is_http(fs) else path


def expand(sources: list[str], options: dict[str, Any],
           listed: Callable[[int], Any] = lambda found: None, *,
           write_url_secrets: bool = False) -> tuple[list[Source], list[VirtniiError]]:
    """Resolve files, folders and globs to :class:`Source` objects with their listing info.

    ``listed(n)`` is called after each of ``sources``, with the number of NIfTI files found so far: listing a
    big bucket takes a while, with nothing else to show.  URLs whose query holds a secret (a presigned URL's
    signature) are refused unless ``write_url_secrets``: references must carry the whole URL to read it.
    """
    found: dict[str, Source] = {}
    failures: list[VirtniiError] = []
    for src in sources:
        try:
            secrets = [] if write_url_secrets else url_secrets(src)
            if secrets:
                failures.append(SourceAccessError(src, f"its query holds credentials ({', '.join(secrets)}), which "
                                                       "would be written into the manifest; to index it anyway "
                                                       "(anyone with the manifest can then read the file until "
                                                       "they expire), pass --write-url-secrets"))
                continue
            _expand_one(src, options, found, failures)
        finally:
            listed(len(found))
    sources_out = []
    for source in found.values():
        try:
            _attach_data_file(source)
            for url, info in ((source.url, source.info), (source.data_url, source.data_info)):
                if info.get("size") is None:
                    raise _no_size(url)
            sources_out.append(source)
        except VirtniiError as err:
            failures.append(err)
    return sources_out, failures


def url_secrets(url: str) -> list[str]:
    """Names of the query parameters of ``url`` that carry secrets (none for local paths, where ``?`` is just a
    character of a file name)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("", "file"):
        return []
    return [name for name, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if is_secret_name(name)]


def _expand_one(src: str, options: dict[str, Any], found: dict[str, Source], failures: list[VirtniiError]) -> None:
    """Add the NIfTI files behind one file, folder or glob ``src`` to ``found`` (by URL), or its error to
    ``failures``."""
    parts = urllib.parse.urlsplit(src)
    if parts.password is not None or (parts.username is not None and parts.scheme not in ("", "file")):
        hidden = parts._replace(netloc=(parts.hostname or "") + (f":{parts.port}" if parts.port else "")).geturl()
        failures.append(SourceAccessError(hidden, "credentials in a URL would be written into the manifest; "
                                                  "give them as storage options (-s KEY=VALUE) instead"))
        return
    try:
        fs, path = fsspec.core.url_to_fs(src, **with_s3_pool(src, options))
    except (ValueError, ImportError, TypeError) as err:
        failures.append(SourceAccessError(src, f"cannot open this URL: {err}"))
        return
    if getattr(fs, "local_file", False):
        path = posixpath.normpath(path)  # d/../d/a.nii and d/a.nii are one source
    elif not path.strip("/"):
        failures.append(SourceAccessError(src, "names no bucket or folder: a whole storage service cannot be "
                                               "listed (give e.g. s3://BUCKET/PREFIX)"))
        return
    reported = len(failures)
    try:
        listing, base, pattern = _list(fs, path, src, failures)
    except VirtniiError as err:
        failures.append(err)
        return
    names = [p for p in sorted(listing) if file_part(fs, p).lower().endswith(NIFTI_SUFFIXES)]
    for p in names:
        source = Source(fs, p, listing[p], base=base)
        found.setdefault(source.url, source)
    if not names and len(failures) == reported:  # "nothing indexed" must always say why
        where = "the pattern matches" if pattern else "the folder holds"
        failures.append(SourceNotFound(src, f"{where} no NIfTI files ({', '.join(NIFTI_SUFFIXES)})"))


def _no_size(url: str) -> SourceAccessError:
    """The error for a file whose size the storage does not tell: references and staleness checks need it."""
    if url.lower().endswith(".gz"):
        why = ("the server reports no size for it, as web servers do when they label .gz files "
               "'Content-Encoding: gzip' (and unzip them on the way); serve it without a Content-Encoding "
               "(Apache: RemoveEncoding .gz) to index it in place")
    else:
        why = "the storage reports no size for it (no Content-Length); virtnii needs sizes to index in place"
    return SourceAccessError(url, why)


#: Concurrent header reads on remote filesystems, and the S3 connection pool that serves them.  botocore's default
#: pool of 10 caps a scan, which issues one GET per file, at 10 per round trip (~330 files/s at 30 ms); 64
#: measured ~1.4x faster on the simulated 30 ms S3 of scripts/bench_scan.py.  The same number bounds the reads
#: in flight: fsspec's default (1280) queues the rest inside aiohttp and re-arms a wait on every pending read
#: per completion, which cost 0.4 ms of CPU per GET (20% of a scan) at 20 ms latency.
CONCURRENT_READS = 64


def with_s3_pool(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with a larger botocore connection pool for ``s3://`` URLs, unless the caller set one."""
    if fsspec.core.split_protocol(url)[0] not in ("s3", "s3a"):
        return options
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("max_pool_connections", CONCURRENT_READS)
    return {**options, "config_kwargs": config}


def _list(fs: fsspec.AbstractFileSystem, path: str, src: str,
          failures: list[VirtniiError]) -> tuple[dict[str, dict[str, Any]], str, bool]:
    """``({path: info}, base folder, whether src was a pattern)`` for a file, a folder (recursive) or a glob.

    The base folder is what group names are made relative to: the folder itself, the glob's fixed leading
    folder, or a file's parent.  A path that exists is taken literally even if it holds glob characters
    (``br[ack]et.nii``).  Local files and sub-folders that cannot be listed are added to ``failures``.
    """
    try:
        if _GLOB.search(path) and not _is_http(fs) and not fs.exists(path):  # a URL's "?" starts a query
            base = posixpath.dirname(_GLOB.split(path, 1)[0])
            matches = {p: i for p, i in fs.glob(path, detail=True).items() if i.get("type") != "directory"}
            if is_local(fs):  # fingerprints as fs.info() gives them (see _stat_local)
                infos = {p: _stat_local(p, fs, failures) for p in matches if p.lower().endswith(NIFTI_SUFFIXES)}
                matches = {p: info for p, info in infos.items() if info is not None}
            return matches, base, True
        info = fs.info(path)
        if info.get("type") == "directory":
            listing = _walk_local(path, fs, failures) if is_local(fs) else fs.find(path, detail=True)
            return listing, path.rstrip("/"), False
    except storage_errors() as err:
        raise from_os_error(src, err, "list") from err
    except ValueError as err:  # what fsspec backends raise for paths they cannot list (s3fs: "all of S3")
        raise SourceAccessError(src, f"cannot list: {err}") from err
    if not file_part(fs, path).lower().endswith(NIFTI_SUFFIXES):
        raise InvalidNifti(src, f"not a NIfTI file name (expected one of {', '.join(NIFTI_SUFFIXES)})")
    if is_local(fs):
        local = _stat_local(path, fs, failures)
        return ({path: local} if local is not None else {}), posixpath.dirname(path), False
    if info.get("type", "file") != "file":
        raise SourceAccessError(src, f"is not a regular file (the storage says {info['type']!r})")
    return {path: info}, posixpath.dirname(file_part(fs, path)), False


def _is_http(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return bool({"http", "https"} & set(protocols))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is fsspec's own local file system (not a subclass, which may change how it reads), where
    listing and reading skip fsspec's per-call overhead."""
    return type(fs) is LocalFileSystem


def _walk_local(folder: str, fs: LocalFileSystem, failures: list[VirtniiError]) -> dict[str, dict[str, Any]]:
    """NIfTI-named files under a local ``folder``, as ``fs.find(folder, detail=True)`` lists them, at a third of
    the cost (fsspec builds each info dict through two ``stat`` calls and path normalisation; for a BIDS tree
    that was a fifth of a scan).

    Like fsspec, symbolic links to folders are not entered (a tree reached twice would index, and name, its
    images twice), and links to files are sources.  A sub-folder or file that cannot be listed or stat'ed is
    reported in ``failures`` and the rest of the tree is still indexed.
    """
    root = folder.rstrip("/") or "/"
    found: dict[str, dict[str, Any]] = {}
    pending = [root]
    while pending:
        current = pending.pop()
        try:
            entries = os.scandir(current)
        except OSError as err:
            if current == root:
                raise
            failures.append(from_os_error(fs.unstrip_protocol(current), err, "list"))
            continue
        with entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif entry.name.lower().endswith(NIFTI_SUFFIXES):
                    info = _stat_local(entry.path, fs, failures)
                    if info is not None:
                        found[entry.path] = info
    return found


def _stat_local(path: str, fs: LocalFileSystem, failures: list[VirtniiError]) -> dict[str, Any] | None:
    """Listing info of a local regular file (or link to one), or None with the reason added to ``failures``.

    ``stat`` follows links, so sizes and mtimes are the target's, as ``fs.info`` gives them when a reader checks
    the fingerprint (fsspec's own ``find`` and ``glob`` give a link's own mtime: every linked source looked
    changed).  FIFOs, sockets and devices are reported, never opened.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError as err:
        if os.path.islink(path):
            failures.append(SourceNotFound(fs.unstrip_protocol(path), "is a broken symbolic link (a DataLad "
                                                                       "or git-annex file not fetched yet? "
                                                                       "`datalad get` it)"))
        else:
            failures.append(from_os_error(fs.unstrip_protocol(path), err, "stat"))
        return None
    except OSError as err:  # a link to itself (ELOOP), a folder that cannot be entered (EACCES), ...
        failures.append(from_os_error(fs.unstrip_protocol(path), err, "stat"))
        return None
    if not stat.S_ISREG(st.st_mode):
        kind = _SPECIAL_FILES.get(stat.S_IFMT(st.st_mode), "a special file")
        failures.append(SourceAccessError(fs.unstrip_protocol(path), f"is {kind}, not a regular file: only regular "
                                                                     "files (and links to them) are indexed"))
        return None
    return {"name": path, "size": st.st_size, "type": "file", "mtime": st.st_mtime}


def _attach_data_file(source: Source) -> None:
    """Point a ``.hdr`` at its ``.img`` (same folder, same compression); a ``.nii`` holds its own data."""
    if not source.is_pair:
        source.data_path, source.data_info = source.path, source.info
        return
    lower = source.path.lower()
    stem = source.path[: -len(".hdr.gz")] if lower.endswith(".gz") else source.path[: -len(".hdr")]
    suffix = ".img.gz" if lower.endswith(".gz") else ".img"
    for candidate in (stem + suffix, stem + suffix.upper()):
        try:
            source.data_info = source.fs.info(candidate)
            source.data_path = candidate
            return
        except FileNotFoundError:
            continue
        except storage_errors() as err:
            raise SourceAccessError(source.url, f"cannot stat its data file {candidate}: {err}") from err
    raise SourceNotFound(source.url, f"no matching data file {posixpath.basename(stem + suffix)} beside this .hdr")


def assign_names(sources: list[Source]) -> None:
    """Group names: each path relative to the folder it was found under, extension dropped.

    A file given by name is named by its stem; a folder's files keep their sub-paths (BIDS ``sub-01/anat/…``).
    When two sources would share a name, both are named relative to the sources' common folder instead, and if
    that still collides (``x.nii`` beside ``x.nii.gz``) the extension is kept.
    """
    def stem(rel: str) -> str:
        return re.sub(r"\.(nii|hdr)(\.gz)?$", "", rel, flags=re.IGNORECASE)

    paths = [file_part(s.fs, s.path) for s in sources]  # a presigned URL's query is no part of a name
    names = [stem(_relative(p, s.base) if s.base else p) for s, p in zip(sources, paths)]
    clashing = {n for n, count in collections.Counter(names).items() if count > 1}
    if clashing:
        folders = [posixpath.dirname(p) for p, n in zip(paths, names) if n in clashing]
        common = posixpath.commonpath(folders) if len({f.startswith("/") for f in folders}) == 1 else ""
        names = [stem(_relative(p, common) if common else p.lstrip("/")) if n in clashing else n
                 for p, n in zip(paths, names)]
    # An image group may not sit inside another image group (s.nii beside s/0.nii would overwrite s/0): such
    # names are flattened; and any name still taken gets its extension, then a counter.
    images = set(names)
    taken: set[str] = set()
    for source, path, name in zip(sources, paths, names):
        parts = name.split("/")
        if any("/".join(parts[:k]) in images for k in range(1, len(parts))):
            name = name.replace("/", "_")
        if name in taken:
            name = (_relative(path, source.base) if source.base else path).replace(".", "_")
        unique, count = name, 1
        while unique in taken:
            count += 1
            unique = f"{name}_{count}"
        taken.add(unique)
        source.name = unique


def _relative(path: str, folder: str) -> str:
    """``path`` relative to ``folder`` (usually a prefix of it: a string cut, where ``relpath`` costs 15 µs)."""
    prefix = folder.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else posixpath.relpath(path, folder)
