"""Find the NIfTI sources behind files, folders and globs at any fsspec URL, and name their image groups.

Listing gives each source's size and ETag/mtime (its fingerprint) for free; ``.hdr`` files are paired with their
``.img``; names follow the paths below the folder a source was found under (BIDS ``sub-01/anat/sub-01_T1w``),
unique within a manifest, unless the caller gives one (``(name, url)``).  Folders and globs select files by their
NIfTI suffix; a file given by itself without one (a DANDI blob ``…/blobs/d86/055/<uuid>``, a presigned URL) is
kept, and its first bytes tell the scan what it is.  ``dandi://`` URLs are listed through the DANDI API
(:mod:`virtnii.dandi`) and read at their blobs, known by their asset paths.  Problems are collected per source, so
one bad file never stops a batch.
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
from typing import Any, Callable, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from . import versions
from .errors import (InvalidNifti, ManifestError, SourceAccessError, SourceNotFound, VirtniiError, from_os_error,
                     is_secret_name, storage_errors)
from .fingerprint import Fingerprint, from_info
from .retry import open_fs

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
    #: For a file whose name has no NIfTI suffix (:attr:`by_content`): None until the scan has read its first bytes,
    #: then whether they are gzip (:func:`virtnii.scan.sniff`).
    gzip: bool | None = None
    #: The URL the file was listed under when its bytes are read at another that says nothing of it: a DANDI
    #: asset (``dandi://…/sub-01/anat/sub-01_T1w.nii.gz``) read at its blob (``…/blobs/d86/055/<uuid>``).  Its
    #: name then tells what the file is, names its image group, and errors name the file by it.
    listed_as: str = ""
    #: Whether reads and fingerprints are of the object versions the listing reported (:func:`pin`).
    pin: bool = False

    @functools.cached_property
    def url(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    @functools.cached_property
    def data_url(self) -> str:
        return self.url if self.data_path == self.path else self.fs.unstrip_protocol(self.data_path)

    @property
    def fingerprint(self) -> Fingerprint:
        """The header file as listed, as its manifest entry records it (with its version when pinned)."""
        return from_info(self.info, version=self.pin)

    @property
    def data_fingerprint(self) -> Fingerprint:
        return from_info(self.data_info, version=self.pin)

    @property
    def read_path(self) -> str:
        """The path that reads the header file: at the version listed when pinned (``fs`` is then version-aware)."""
        return versions.path(self.fs, self.path, self.fingerprint)

    @property
    def data_read_path(self) -> str:
        return versions.path(self.fs, self.data_path, self.data_fingerprint)

    @functools.cached_property
    def by_content(self) -> bool:
        """Whether the name does not say what the file is (no NIfTI suffix), so that its first bytes must: only for
        files given by themselves (folders and globs select by suffix)."""
        return not self.file_name.lower().endswith(NIFTI_SUFFIXES)

    @property
    def file_name(self) -> str:
        """What the file is called: the URL it was listed under, or its path (without a web URL's query)."""
        return self.listed_as or file_part(self.fs, self.path)

    @property
    def is_pair(self) -> bool:
        """A ``.hdr`` (with an ``.img``): known by name only, so a file known by its content never is one."""
        return self.file_name.lower().endswith((".hdr", ".hdr.gz"))

    @property
    def is_gzip(self) -> bool:
        """By name, or for a file known by its content by what its first bytes said: False until they are read,
        so that it goes to the uncompressed files' header read, which reads them."""
        if self.by_content:
            return bool(self.gzip)
        return (self.listed_as or file_part(self.fs, self.data_path)).lower().endswith(".gz")  # a pair's .img too


def file_part(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """``path`` without a web URL's query (``?…``), which is not part of the file's name (on other filesystems a
    ``?`` is an ordinary character of a name)."""
    return path.split("?", 1)[0] if _is_http(fs) else path


#: A source as :func:`expand` takes it: a file, folder or glob, or a ``(name, url)`` pair naming its image group.
SourceSpec = str | tuple[str, str]


def expand(sources: list[SourceSpec], options: dict[str, Any],
           listed: Callable[[int], Any] = lambda found: None, *, write_url_secrets: bool = False,
           paging: Callable[[str], Any] = lambda note: None,
           pin_versions: bool | None = None) -> tuple[list[Source], list[VirtniiError]]:
    """Resolve files, folders and globs to :class:`Source` objects with their listing info.

    ``listed(n)`` is called after each of ``sources``, with the number of NIfTI files found so far: listing a
    big bucket takes a while, with nothing else to show; ``paging(note)`` is told how a listing of many pages
    is getting on (a dandiset's: ``"3000/25000 assets listed"``).  URLs whose query holds a secret (a presigned URL's
    signature) are refused unless ``write_url_secrets``: references must carry the whole URL to read it.
    A ``(name, url)`` pair gives its file the group ``name`` (:func:`check_names`); a name that cannot be
    used as given (or is given to a folder or glob) is a :class:`ManifestError`, raised: the caller asked for a
    manifest that cannot be made.  Sources are pinned to their object versions as :func:`pin` says.
    """
    check_names([s for s in sources if isinstance(s, tuple)])
    found: dict[str, Source] = {}
    failures: list[VirtniiError] = []
    for spec in sources:
        name, src = spec if isinstance(spec, tuple) else ("", spec)
        try:
            secrets = [] if write_url_secrets else url_secrets(src)
            if secrets:
                failures.append(SourceAccessError(src, f"its query holds credentials ({', '.join(secrets)}), which "
                                                       "would be written into the manifest; to index it anyway "
                                                       "(anyone with the manifest can then read the file until "
                                                       "they expire), pass --write-url-secrets"))
                continue
            _expand_one(src, options, found, failures, name, paging, pin_versions)
        finally:
            listed(len(found))
    sources_out = []
    for source in found.values():
        try:
            attach_data_file(source)
            for url, info in ((source.url, source.info), (source.data_url, source.data_info)):
                if info.get("size") is None:
                    raise _no_size(url)
            pin(source, pin_versions)
            sources_out.append(source)
        except VirtniiError as err:
            failures.append(err)
    return sources_out, failures


def check_names(named: list[tuple[str, str]]) -> None:
    """Refuse, as a :class:`ManifestError` naming the file, group names given for files (``(name, url)``) that a
    manifest cannot hold as given — they are used verbatim, never adjusted as found names are.

    A name is ``/``-separated parts, none empty (no leading, trailing or doubled ``/``), none ``.``/``..`` or
    dots only (zarr refuses them, and they would climb out of the gzip sidecar folder), none starting with
    ``__`` (reserved by Zarr v3); no two files may share a name, and no image may sit inside another image's
    group (``a`` and ``a/b``).
    """
    owners: dict[str, str] = {}
    for pair in named:
        if len(pair) != 2 or not all(isinstance(text, str) for text in pair):
            raise TypeError(f"a named source is a (name, url) pair of strings, not {pair!r}")
        name, url = pair
        parts = name.split("/")
        if not all(parts):
            raise ManifestError(url, f"cannot be named {name!r}: a group name has no empty parts (no leading, "
                                     "trailing or doubled '/')")
        if any(set(part) == {"."} for part in parts):
            raise ManifestError(url, f"cannot be named {name!r}: no part of a group name may be '.', '..' or dots only")
        if any(part.startswith("__") for part in parts):
            raise ManifestError(url, f"cannot be named {name!r}: Zarr reserves names starting with '__'")
        if owners.setdefault(name, url) != url:
            raise ManifestError(url, f"cannot be named {name!r}: that name is given to {owners[name]} too")
    for name, url in owners.items():
        parts = name.split("/")
        for k in range(1, len(parts)):
            outer = "/".join(parts[:k])
            if outer in owners:
                raise ManifestError(url, f"cannot be named {name!r}: it would sit inside the image {outer!r} "
                                         f"({owners[outer]})")


def url_secrets(url: str) -> list[str]:
    """Names of the query parameters of ``url`` that carry secrets (none for local paths, where ``?`` is just a
    character of a file name)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("", "file"):
        return []
    return [name for name, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if is_secret_name(name)]


def _expand_one(src: str, options: dict[str, Any], found: dict[str, Source], failures: list[VirtniiError],
                name: str = "", paging: Callable[[str], Any] = lambda note: None,
                pin_versions: bool | None = None) -> None:
    """Add the NIfTI files behind one file, folder or glob ``src`` to ``found`` (by URL), or its error to
    ``failures``; a file given a ``name`` keeps it, even if a folder or glob found it too."""
    parts = urllib.parse.urlsplit(src)
    if parts.password is not None or (parts.username is not None and parts.scheme not in ("", "file")):
        hidden = parts._replace(netloc=(parts.hostname or "") + (f":{parts.port}" if parts.port else "")).geturl()
        failures.append(SourceAccessError(hidden, "credentials in a URL would be written into the manifest; "
                                                  "give them as storage options (-s KEY=VALUE) instead"))
        return
    if src[:8].lower() == "dandi://":
        _expand_dandi(src, options, found, failures, name, paging)
        return
    try:
        fs, path = open_fs(src, with_s3_pool(src, versions.listing_options(src, options, pin_versions)))
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
        fs, (listing, base, kind) = list_versions(fs, pin_versions, lambda fs: _list(fs, path, src, failures))
    except VirtniiError as err:
        failures.append(err)
        return
    if name and kind != "file":
        raise ManifestError(src, f"is a {kind}: a name ({name!r}) names one file, not the files of a {kind}")
    # a file given by itself is kept whatever its name (its first bytes tell); folders and globs select by suffix
    paths = [p for p in sorted(listing) if kind == "file" or file_part(fs, p).lower().endswith(NIFTI_SUFFIXES)]
    for p in paths:
        source = Source(fs, p, listing[p], base=base, name=name)
        known = found.setdefault(source.url, source)
        if name and known.name != name:
            if known.name:
                raise ManifestError(src, f"is given two names, {known.name!r} and {name!r}")
            found[source.url] = source  # a name given wins over a glob or folder that found the file too
    if not paths and len(failures) == reported:  # "nothing indexed" must always say why
        where = "the pattern matches" if kind == "pattern" else "the folder holds"
        failures.append(SourceNotFound(src, f"{where} no NIfTI files ({', '.join(NIFTI_SUFFIXES)})"))


def _expand_dandi(src: str, options: dict[str, Any], found: dict[str, Source], failures: list[VirtniiError],
                  name: str, paging: Callable[[str], Any]) -> None:
    """:func:`_expand_one` for a ``dandi://`` URL: its assets are found by the URLs they are listed under (two
    assets may share a blob), and a name given to one wins over a folder or glob that found it too."""
    from . import dandi  # here, not at the top: it builds Sources (an import cycle)

    try:
        listed, problems = dandi.expand(src, options, name, paging)
    except ManifestError:
        raise
    except VirtniiError as err:
        failures.append(err)
        return
    failures += problems
    for source in listed:
        known = found.setdefault(source.listed_as, source)
        if name and known.name != name:
            if known.name:
                raise ManifestError(src, f"is given two names, {known.name!r} and {name!r}")
            found[source.listed_as] = source


_Listed = TypeVar("_Listed")


def list_versions(fs: fsspec.AbstractFileSystem, pin_versions: bool | None,
                  list_files: Callable[[fsspec.AbstractFileSystem], _Listed]
                  ) -> tuple[fsspec.AbstractFileSystem, _Listed]:
    """``(fs, list_files(fs))``, where ``fs`` lists object versions (:func:`virtnii.versions.listing_options`).

    When pinning is only the default (``pin_versions`` None), a versioned listing the store refuses — a policy
    without ``s3:ListBucketVersions``, an S3-compatible store without versions — is made again without versions,
    on a filesystem whose sources are then not pinned: the default must not fail scans that worked without it.
    """
    try:
        return fs, list_files(fs)
    except SourceAccessError:
        if pin_versions is not None or not getattr(fs, "version_aware", False):
            raise
    fs = versions.aware(fs, False)
    return fs, list_files(fs)


def pin(source: Source, pin_versions: bool | None) -> None:
    """Pin ``source`` to the object versions its listing reported (:mod:`virtnii.versions`), so that its manifest
    reads exactly what was indexed even after the object is overwritten.

    ``pin_versions`` None (the default) pins where the storage reported a version for every file of the source
    (versioned S3 buckets, GCS) and listed it through a version-aware filesystem; True pins or raises a
    :class:`SourceAccessError` saying why it cannot; False never pins.
    """
    if pin_versions is False:
        return
    files = [(source.url, source.info)] + ([(source.data_url, source.data_info)] if source.is_pair else [])
    unversioned = [url for url, info in files if versions.reported(info) is None]
    if not unversioned and getattr(source.fs, "version_aware", False):
        source.pin = True
    elif pin_versions:
        if not versions.has_versions(source.fs):
            why = "this storage has no object versions (only S3 and GCS objects have them)"
        elif unversioned:
            why = ("the storage reports no version for it: its bucket is not versioned, or was not when it was "
                   "written (S3 version 'null')")
        else:
            why = "it was listed without versions (version_aware=False in the storage options)"
        raise SourceAccessError(unversioned[0] if unversioned else source.url,
                                f"cannot be pinned to a version: {why}; index it with --no-pin-versions")


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
          failures: list[VirtniiError]) -> tuple[dict[str, dict[str, Any]], str, str]:
    """``({path: info}, base folder, what src is)`` for a ``"file"``, a ``"folder"`` (recursive) or a
    ``"pattern"`` (glob).

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
            return matches, base, "pattern"
        info = fs.info(path)
        if info.get("type") == "directory":
            listing = walk_local(path, fs, failures) if is_local(fs) else fs.find(path, detail=True)
            return listing, path.rstrip("/"), "folder"
    except storage_errors() as err:
        raise from_os_error(src, err, "list") from err
    except ValueError as err:  # what fsspec backends raise for paths they cannot list (s3fs: "all of S3")
        raise SourceAccessError(src, f"cannot list: {err}") from err
    if file_part(fs, path).lower().endswith((".img", ".img.gz")):  # its header says what it holds, not itself
        raise InvalidNifti(src, "is the data file of a .hdr/.img pair: give its .hdr, which is found with it")
    if is_local(fs):
        local = _stat_local(path, fs, failures)
        return ({path: local} if local is not None else {}), posixpath.dirname(path), "file"
    if info.get("type", "file") != "file":
        raise SourceAccessError(src, f"is not a regular file (the storage says {info['type']!r})")
    return {path: info}, posixpath.dirname(file_part(fs, path).rstrip("/")), "file"  # …/download/ is "download"


def _is_http(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return bool({"http", "https"} & set(protocols))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is fsspec's own local file system (not a subclass, which may change how it reads), where
    listing and reading skip fsspec's per-call overhead."""
    return type(fs) is LocalFileSystem


def walk_local(folder: str, fs: LocalFileSystem, failures: list[VirtniiError], *, every_file: bool = False,
               hidden: bool = True, unlisted: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """NIfTI-named files under a local ``folder``, as ``fs.find(folder, detail=True)`` lists them, at a third of
    the cost (fsspec builds each info dict through two ``stat`` calls and path normalisation; for a BIDS tree
    that was a fifth of a scan).

    Like fsspec, symbolic links to folders are not entered (a tree reached twice would index, and name, its
    images twice), and links to files are sources.  A sub-folder or file that cannot be listed or stat'ed is
    reported in ``failures`` (and a sub-folder's URL added to ``unlisted``) and the rest of the tree is still
    indexed.  ``every_file``: the other regular files too (a BIDS dataset's sidecars), passed over quietly
    when they cannot be stat'ed; ``hidden=False``: folders named ``.*`` (``.git``, ``.datalad``) not entered.
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
            if unlisted is not None:
                unlisted.append(fs.unstrip_protocol(current))
            continue
        with entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if hidden or not entry.name.startswith("."):
                        pending.append(entry.path)
                    continue
                if entry.name.lower().endswith(NIFTI_SUFFIXES):
                    info = _stat_local(entry.path, fs, failures)
                elif every_file:
                    info = _stat_local(entry.path, fs, [])
                else:
                    continue
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


def attach_data_file(source: Source, listed: dict[str, dict[str, Any]] | None = None) -> None:
    """Point a ``.hdr`` at its ``.img`` (same folder, same compression); a ``.nii`` holds its own data.

    ``listed``: the listing of the source's folder by path (a dataset listed whole), so a pair costs no request;
    otherwise the data file is asked for with ``fs.info``.
    """
    if not source.is_pair:
        source.data_path, source.data_info = source.path, source.info
        return
    if source.data_path:  # found with it (a DANDI pair's .img is another blob of the same listing)
        return
    candidates = data_files(source.path)
    for candidate in candidates:
        try:
            source.data_info = source.fs.info(candidate) if listed is None else listed[candidate]
            source.data_path = candidate
            return
        except (FileNotFoundError, KeyError):
            continue
        except storage_errors() as err:
            raise SourceAccessError(source.url, f"cannot stat its data file {candidate}: {err}") from err
    raise SourceNotFound(source.url, f"no matching data file {posixpath.basename(candidates[0])} beside this .hdr")


def data_files(header: str) -> tuple[str, str]:
    """Where the ``.img`` of a ``.hdr`` may be: beside it, with the same compression, its suffix in either case."""
    gz = header.lower().endswith(".gz")
    stem = header[: -len(".hdr.gz")] if gz else header[: -len(".hdr")]
    suffix = ".img.gz" if gz else ".img"
    return stem + suffix, stem + suffix.upper()


def assign_names(sources: list[Source]) -> list[VirtniiError]:
    """Group names: each path relative to the folder it was found under, extension dropped; returns the sources
    refused (taken out of ``sources``), whose names could not be made safe.

    A file given by path is named by its stem (an extension-less URL by its last segment: a DANDI blob by its
    uuid); a folder's files keep their sub-paths (BIDS ``sub-01/anat/…``).
    When two sources would share a name, both are named relative to the sources' common folder instead, and if
    that still collides (``x.nii`` beside ``x.nii.gz``) the extension is kept.  Sources that already have a
    name (given by the caller, checked by :func:`check_names`) keep it, and the others avoid it.
    """
    def stem(rel: str) -> str:
        return re.sub(r"\.(nii|hdr)(\.gz)?$", "", rel, flags=re.IGNORECASE)

    listed = sources
    given = {s.name for s in sources if s.name}
    # a found name may not be an image group holding a given one (a beside a/b): it is treated as taken
    holding = {"/".join(parts[:k]) for parts in (n.split("/") for n in given) for k in range(1, len(parts))}
    sources = [s for s in sources if not s.name]
    # a presigned URL's query is no part of a name, nor the dandi:// of a DANDI asset
    paths = [(s.listed_as.split("://", 1)[-1] if s.listed_as else file_part(s.fs, s.path)).rstrip("/")
             for s in sources]
    names = [stem(_relative(p, s.base) if s.base else p) for s, p in zip(sources, paths)]
    clashing = {n for n, count in collections.Counter(names).items() if count > 1}
    if clashing:
        folders = [posixpath.dirname(p) for p, n in zip(paths, names) if n in clashing]
        common = posixpath.commonpath(folders) if len({f.startswith("/") for f in folders}) == 1 else ""
        names = [stem(_relative(p, common) if common else p.lstrip("/")) if n in clashing else n
                 for p, n in zip(paths, names)]
    # An image group may not sit inside another image group (s.nii beside s/0.nii would overwrite s/0): such
    # names are flattened; and any name still taken gets its extension, then a counter.
    images = set(names) | given
    taken = given | holding
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
    refused = [s for s in sources if unsafe_name(s.name)]
    listed[:] = [s for s in listed if s not in refused]
    return [ManifestError(s.listed_as or s.url, f"not indexed: its path makes the group name {s.name!r}, whose "
                                                "'.', '..', empty or '__' parts would escape or break the "
                                                "manifest (rename the object, or give it a name)")
            for s in refused]


def unsafe_name(name: str) -> bool:
    """Whether a group name has a part that is empty, dots only (``..`` climbs out of the folders the name is
    joined to: the gzip sidecars', the pyramid levels') or reserved by Zarr v3 (``__``)."""
    return any(not part or set(part) == {"."} or part.startswith("__") for part in name.split("/"))


def by_listed_name(failures: list[VirtniiError], sources: list[Source]) -> list[VirtniiError]:
    """``failures`` with each error about a file read at a URL other than the one it was listed under (a DANDI
    asset's blob) naming the file by the URL it was listed under, the blob's URL kept in the problem."""
    listed = {url: s.listed_as for s in sources if s.listed_as for url in (s.url, s.data_url)}
    return [type(err)(listed[err.source], f"{err.problem} (its bytes: {err.source})") if err.source in listed
            else err for err in failures]


def _relative(path: str, folder: str) -> str:
    """``path`` relative to ``folder`` (usually a prefix of it: a string cut, where ``relpath`` costs 15 µs)."""
    prefix = folder.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else posixpath.relpath(path, folder)
