"""DANDI archive sources: ``dandi://INSTANCE/DANDISET[@VERSION][/PATH]`` listed through the archive's REST API and
resolved, in bulk, to the S3 blobs that hold their bytes.

A scan lists a version's assets in pages of :data:`PAGE_SIZE` (``GET …/versions/V/assets/?metadata=true``), whose
``metadata.contentUrl`` already names each asset's blob (``https://dandiarchive.s3.amazonaws.com/blobs/d86/055/
<uuid>``) and whose ``metadata.digest`` gives its S3 ETag: 2,000 assets cost 2 API requests (3 when the version
is not given), fetched concurrently after the first page, and no request per asset.  The sources are then those
blobs, read anonymously over HTTPS like any other URL: the references and the index file name blob URLs only,
so opening a manifest asks the DANDI API nothing.  Group names come from the asset paths (``rawdata/sub-I38/
ses-MRI/anat/…``), relative to the folder given, as for a local folder.

Why not ``dandifs`` (PyPI, an fsspec filesystem for DANDI): its public filesystem resolves every asset with API
requests of its own (``s3_url``, ``info`` and each ``cat_file`` query ``assets/?path=…``, plus a look-up of the
dandiset when no version is given), and its bulk listing is private; ``scripts/bench_remote.py --only dandi``
measures a serial dandifs loop against this module.

Assets whose metadata names no S3 URL (an archive that lists only the ``…/assets/<id>/download/`` URL) are
resolved through that URL's redirect, one request each, its query (a presigned signature) dropped.  Zarr assets
are not NIfTI files and are left out of folders (refused when given by path); embargoed dandisets, whose blobs no
anonymous reader can fetch, are refused by the API (HTTP 401/403) and reported as such.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import posixpath
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable

import fsspec
import fsspec.asyn
from fsspec.utils import glob_translate

from . import retry
from .errors import (InvalidNifti, ManifestError, SourceAccessError, SourceNotFound, VirtniiError, from_os_error,
                     storage_errors)
from .sources import NIFTI_SUFFIXES, Source, data_files

#: Instances by the name a ``dandi://`` URL gives, as dandi-cli and dandifs know them: name → API base URL.
INSTANCES = {
    "dandi": "https://api.dandiarchive.org/api",
    "dandi-sandbox": "https://api.sandbox.dandiarchive.org/api",
    "dandi-staging": "https://api-staging.dandiarchive.org/api",
    "ember": "https://api-dandi.emberarchive.org/api",
    "linc": "https://api.lincbrain.org/api",
}
#: More instances (a self-hosted archive), as ``NAME=API_URL`` pairs separated by commas; they win over
#: :data:`INSTANCES`.
INSTANCES_VARIABLE = "VIRTNII_DANDI_INSTANCES"
#: Assets asked for per listing request: the API's maximum (a page of 1,000 with metadata is ~2 MB of JSON).
PAGE_SIZE = 1000
#: Listing pages (after the first, which gives the count) and download redirects requested at once.
REQUESTS_AT_ONCE = 8

_URL = re.compile(r"dandi://(?P<instance>[^/@]+)/(?P<dandiset>[0-9]{6})(?:@(?P<version>[^/]+))?(?:/(?P<path>.*))?",
                  re.IGNORECASE)
_VERSION = re.compile(r"draft|[0-9]+\.[0-9]+\.[0-9]+")
_GLOB = re.compile(r"[*?\[]")
_ZARR_SUFFIXES = (".zarr", ".ngff")


@dataclass(frozen=True)
class DandiLocation:
    """A parsed ``dandi://`` URL: the instance's API, the dandiset, its version if given, and a path in it (an
    asset, a folder, a glob, or ``""`` for the whole dandiset)."""

    instance: str
    api: str
    dandiset: str
    version: str | None
    path: str

    def asset_url(self, version: str, path: str) -> str:
        """The canonical ``dandi://`` URL of one asset of ``version`` (what errors name it by)."""
        return f"dandi://{self.instance}/{self.dandiset}@{version}/{path}"


def instances() -> dict[str, str]:
    """Known instances (:data:`INSTANCES` and those of :data:`INSTANCES_VARIABLE`): name → API base URL."""
    known = dict(INSTANCES)
    for item in filter(None, (part.strip() for part in os.environ.get(INSTANCES_VARIABLE, "").split(","))):
        name, _, api = item.partition("=")
        if not api.strip().lower().startswith(("http://", "https://")):
            raise SourceAccessError(f"{INSTANCES_VARIABLE}={item}", "is not NAME=API_URL (e.g. "
                                                                    "lab=https://api.dandi.lab.org/api)")
        known[name.strip().lower()] = api.strip().rstrip("/")
    return known


def parse(url: str) -> DandiLocation:
    """Split ``dandi://INSTANCE/DANDISET[@VERSION][/PATH]``; a :class:`SourceAccessError` naming ``url`` if it is
    not one or names an unknown instance."""
    match = _URL.fullmatch(url)
    if not match:
        raise SourceAccessError(url, "is not a DANDI URL: give dandi://INSTANCE/DANDISET[@VERSION][/PATH], e.g. "
                                     "dandi://dandi/000026@draft/rawdata/")
    known = instances()
    instance = match["instance"].lower()
    if instance not in known:
        raise SourceAccessError(url, f"unknown DANDI instance {match['instance']!r} (known: {', '.join(known)}; "
                                     f"add one with {INSTANCES_VARIABLE}=NAME=API_URL)")
    version = match["version"]
    if version is not None and not _VERSION.fullmatch(version):
        raise SourceAccessError(url, f"{version!r} is not a dandiset version ('draft' or a published one, "
                                     "e.g. 0.210831.2033)")
    path = urllib.parse.unquote(match["path"] or "").lstrip("/")
    return DandiLocation(instance, known[instance], match["dandiset"], version, path)


@dataclass
class Asset:
    """One asset of a dandiset version, as the listing gives it: where its bytes are and what they were (a Zarr
    asset is a folder of objects: no file)."""

    path: str
    size: int | None
    blob_url: str | None
    etag: str | None
    download_url: str | None
    zarr: bool = False

    def info(self) -> dict[str, Any]:
        """fsspec-style listing info of its blob: the size, and the S3 ETag (``dandi:dandi-etag``), which a reader
        compares with what the blob's server reports before trusting the references."""
        info: dict[str, Any] = {"name": self.blob_url, "size": self.size, "type": "file"}
        if self.etag:
            info["ETag"] = self.etag
        return info


def _remote(url: str) -> bool:
    """Whether ``url`` is one a DANDI archive serves assets at (HTTP(S) or S3)."""
    return url.lower().startswith(("https://", "http://", "s3://"))


def _asset(record: dict[str, Any]) -> Asset:
    """An :class:`Asset` from one listing record."""
    path = str(record.get("path", ""))
    if record.get("zarr") or path.lower().endswith(_ZARR_SUFFIXES):
        return Asset(path, None, None, None, None, zarr=True)
    metadata = record.get("metadata") or {}
    # only addresses an archive gives: never a file:// (or other local) URL that would read the scanning machine
    urls = [u for u in metadata.get("contentUrl") or [] if isinstance(u, str) and _remote(u)]
    downloads = [u for u in urls if u.rstrip("/").endswith("/download")]
    direct = [u for u in urls if u not in downloads]
    digest = metadata.get("digest") or {}
    size = record.get("size", metadata.get("contentSize"))
    return Asset(path, int(size) if size is not None else None, direct[0] if direct else None,
                 digest.get("dandi:dandi-etag"), downloads[0] if downloads else None)


class DandiAPI:
    """The few read-only requests a scan makes to one instance's REST API, over fsspec's HTTP filesystem."""

    def __init__(self, api: str, policy: retry.RetryPolicy) -> None:
        self.api = api.rstrip("/")
        self.policy = policy
        self.fs = retry.filesystem("http", {retry.OPTION: policy})  # each request retried on its own

    def get_many(self, urls: list[str], where: str) -> list[dict[str, Any]]:
        """The JSON answers to ``GET`` each of ``urls``, :data:`REQUESTS_AT_ONCE` at a time; errors name ``where``
        (the ``dandi://`` URL being listed)."""
        bodies = self.fs.cat_ranges(urls, None, None, on_error="return", batch_size=REQUESTS_AT_ONCE,
                                    headers={"Accept": "application/json"})
        pages = []
        for url, body in zip(urls, bodies):
            if isinstance(body, BaseException):
                raise self._error(where, url, body)
            try:
                page = json.loads(body)
            except ValueError as err:
                raise SourceAccessError(where, f"the DANDI API answered {url} with no JSON ({err}): is "
                                               f"{self.api} the API of a DANDI instance?") from err
            if not isinstance(page, dict):
                raise SourceAccessError(where, f"the DANDI API answered {url} with unexpected JSON")
            pages.append(page)
        return pages

    def get(self, url: str, where: str) -> dict[str, Any]:
        return self.get_many([url], where)[0]

    def _error(self, where: str, url: str, err: BaseException) -> VirtniiError:
        if not isinstance(err, storage_errors()):
            raise err
        status = getattr(err, "status", None)
        if isinstance(err, FileNotFoundError) or status == 404:
            return SourceNotFound(where, f"the DANDI API has no such dandiset or version (HTTP 404 for {url})")
        if status in (401, 403):
            return SourceAccessError(where, f"the DANDI API refused to list it (HTTP {status}): an embargoed "
                                            "dandiset? Its blobs cannot be read anonymously, as a manifest needs")
        return from_os_error(where, err, f"list it through the DANDI API ({url})")

    def version(self, location: DandiLocation, where: str) -> str:
        """The version to list: the one given, else the most recent published one, else the draft."""
        if location.version:
            return location.version
        record = self.get(f"{self.api}/dandisets/{location.dandiset}/", where)
        for key in ("most_recent_published_version", "draft_version"):
            if isinstance(record.get(key), dict) and record[key].get("version"):
                return str(record[key]["version"])
        return "draft"

    def assets(self, dandiset: str, version: str, prefix: str, where: str,
               paging: Callable[[str], Any] = lambda note: None) -> dict[str, Asset]:
        """The assets of a version whose path starts with ``prefix`` (case-insensitively, as the API filters), by
        path: the first page gives the count, the others are then asked for :data:`REQUESTS_AT_ONCE` at a time;
        ``paging`` is told before each round how many are listed so far."""
        query = {"metadata": "true", "order": "path", "page_size": str(PAGE_SIZE)}
        if prefix:
            query["path"] = prefix
        base = f"{self.api}/dandisets/{dandiset}/versions/{version}/assets/"
        first = self.get(f"{base}?{urllib.parse.urlencode(query)}", where)
        records = list(first.get("results") or [])
        count, following = first.get("count"), first.get("next")
        total = f"/{count}" if isinstance(count, int) else ""
        if following and total and records:
            # pages as long as the first one: an instance may cap page_size below what was asked
            pages = [f"{base}?{urllib.parse.urlencode({**query, 'page': str(n)})}"
                     for n in range(2, math.ceil(count / len(records)) + 1)]
            for start in range(0, len(pages), REQUESTS_AT_ONCE):
                paging(f"{len(records)}{total} assets listed")
                for page in self.get_many(pages[start:start + REQUESTS_AT_ONCE], where):
                    records += page.get("results") or []
        else:  # no count: follow the links, one page after the other
            while following:
                paging(f"{len(records)}{total} assets listed")
                page = self.get(following, where)
                records += page.get("results") or []
                following = page.get("next")
        assets = {asset.path: asset for asset in map(_asset, records)}
        if isinstance(count, int) and len(assets) != count:  # never a silently partial listing
            raise SourceAccessError(where, f"the DANDI API listed {len(assets)} distinct assets where it counted "
                                           f"{count} (was the version changed while being listed?): try again")
        return assets

    def resolve_downloads(self, assets: list[Asset]) -> list[str | BaseException | None]:
        """Give assets listed with only the API's download URL their blob URL: where that URL redirects (one
        request each, not followed), its presigned query dropped; one outcome per asset: None, what the API
        answered instead of a redirect, or the exception of a request that failed."""
        async def redirect(asset: Asset) -> tuple[int, str | None]:
            """The status and ``Location`` the download URL answers; transient statuses raised, to be retried."""
            session = await self.fs.fs.set_session()
            async with session.get(asset.download_url, allow_redirects=False) as response:
                if response.status in retry.TRANSIENT_STATUS:
                    response.raise_for_status()
                return response.status, response.headers.get("Location")

        async def resolve(asset: Asset, limit: asyncio.Semaphore) -> str | None:
            async with limit:
                status, location = await retry.retried(self.policy, asset.download_url, "resolve its download URL",
                                                       lambda: redirect(asset))
            if status not in (301, 302, 303, 307, 308) or not location:
                return f"HTTP {status} instead of a redirect"
            absolute = urllib.parse.urljoin(str(asset.download_url), location)
            if not _remote(absolute):
                return f"a redirect to {absolute.split(':', 1)[0]}:, not to an HTTP(S) or S3 URL"
            target = urllib.parse.urlsplit(absolute)
            asset.blob_url = target._replace(query="", fragment="").geturl()
            return None

        async def resolve_all() -> list[Any]:
            limit = asyncio.Semaphore(REQUESTS_AT_ONCE)
            return await asyncio.gather(*(resolve(a, limit) for a in assets), return_exceptions=True)

        return fsspec.asyn.sync(self.fs.loop, resolve_all)


def expand(url: str, options: dict[str, Any], name: str = "",
           paging: Callable[[str], Any] = lambda note: None) -> tuple[list[Source], list[VirtniiError]]:
    """The NIfTI sources a ``dandi://`` URL names — an asset, a folder, a glob or a whole dandiset — read at their
    blobs, each known by its asset's URL (``listed_as``) and named, like a local file, by its path below the
    folder given; and what could not be listed or resolved.

    Folders and globs select assets by their NIfTI suffix; an asset given by path is kept whatever its name (its
    first bytes tell).  A ``.hdr`` is paired with the ``.img`` beside it in the same listing.  ``name``: the
    group name given to a single asset (a :class:`ManifestError` for a folder or glob); ``paging(note)``: told
    how a listing of many pages is getting on.
    """
    location = parse(url)
    api = DandiAPI(location.api, retry.policy_of(options))
    version = api.version(location, url)
    path = location.path
    if _GLOB.search(path):
        base = posixpath.dirname(_GLOB.split(path, 1)[0])
        assets = api.assets(location.dandiset, version, f"{base}/" if base else "", url, paging)
        matches = re.compile(glob_translate(path))
        selected, kind = [p for p in assets if matches.fullmatch(p)], "pattern"
    else:
        assets = api.assets(location.dandiset, version, path, url, paging)
        if path in assets:
            if assets[path].zarr:
                raise SourceAccessError(url, "is a Zarr asset (a folder of chunks), not a NIfTI file")
            selected, base, kind = [path], posixpath.dirname(path), "file"
        else:
            base = path.rstrip("/")
            inside = f"{base}/" if base else ""
            selected, kind = [p for p in assets if p.startswith(inside)], "folder"  # the API ignores case
            if not selected:
                what = f"no asset or folder {path!r}" if path else "no file assets"
                raise SourceNotFound(url, f"dandiset {location.dandiset} version {version} has {what}")
    if name and kind != "file":
        raise ManifestError(url, f"is a {kind}: a name ({name!r}) names one file, not the files of a {kind}")
    if kind == "file" and path.lower().endswith((".img", ".img.gz")):
        raise InvalidNifti(url, "is the data file of a .hdr/.img pair: give its .hdr, which is found with it")
    if kind != "file":
        selected = [p for p in selected if p.lower().endswith(NIFTI_SUFFIXES) and not assets[p].zarr]
        if not selected:
            where = "the pattern matches" if kind == "pattern" else "the folder holds"
            raise SourceNotFound(url, f"{where} no NIfTI files ({', '.join(NIFTI_SUFFIXES)})")
    elif path.lower().endswith((".hdr", ".hdr.gz")):  # its .img is beside it, outside the listing of its path
        assets.update(api.assets(location.dandiset, version, f"{base}/" if base else "", url))
    pairs = {p: next((c for c in data_files(p) if c in assets), None)
             for p in selected if p.lower().endswith((".hdr", ".hdr.gz"))}
    failures = _resolve(api, location, version, [assets[p] for p in [*selected, *filter(None, pairs.values())]])
    root = f"{location.instance}/{location.dandiset}@{version}"  # names are made without the dandi://
    filesystems: dict[str, fsspec.AbstractFileSystem] = {}
    found = []
    for p in selected:
        asset, listed_as = assets[p], location.asset_url(version, p)
        files = [asset] if p not in pairs else [asset, assets[pairs[p]]] if pairs[p] else None
        if files is None:
            failures.append(SourceNotFound(listed_as, f"no matching data file {posixpath.basename(data_files(p)[0])}"
                                                      " beside this .hdr"))
            continue
        if any(f.blob_url is None for f in files):
            continue  # reported by _resolve
        sources = []
        for f in files:
            protocol = fsspec.core.split_protocol(f.blob_url)[0] or "file"
            if protocol not in filesystems:
                filesystems[protocol] = retry.open_fs(f.blob_url, options)[0]
            sources.append((filesystems[protocol], f))
        (fs, header), (data_fs, data) = sources[0], sources[-1]
        source = Source(fs, fs._strip_protocol(header.blob_url), header.info(), base=f"{root}/{base}".rstrip("/"),
                        name=name, listed_as=listed_as)
        source.data_path, source.data_info = data_fs._strip_protocol(data.blob_url), data.info()
        found.append(source)
    return found, failures


@dataclass
class DandiFolder:
    """A folder of a dandiset version (or all of it), listed: its canonical URL, its file assets (Zarr assets left
    out) with their blobs, by path relative to it, and the assets whose blob could not be found."""

    url: str
    assets: dict[str, Asset]
    problems: list[VirtniiError]


def list_folder(url: str, options: dict[str, Any]) -> DandiFolder:
    """Every file asset below the folder ``url`` names (``dandi://dandi/000026@draft/`` for a whole dandiset), in
    one paged listing, for a dataset index (:func:`virtnii.bids.listing.list_dataset`)."""
    location = parse(url)
    if _GLOB.search(location.path):
        raise SourceAccessError(url, "is a glob: a dataset is a folder")
    api = DandiAPI(location.api, retry.policy_of(options))
    version = api.version(location, url)
    base = location.path.rstrip("/")
    prefix = f"{base}/" if base else ""
    files = {p: a for p, a in api.assets(location.dandiset, version, prefix, url).items()
             if p.startswith(prefix) and not a.zarr}  # the API matched the prefix case-insensitively
    if not files:
        raise SourceNotFound(url, f"dandiset {location.dandiset} version {version} has no file below "
                                  f"{base!r}" if base else f"dandiset {location.dandiset} version {version} is empty")
    problems = _resolve(api, location, version, list(files.values()))
    return DandiFolder(location.asset_url(version, base).rstrip("/"),
                       {p[len(prefix):]: a for p, a in files.items() if a.blob_url}, problems)


def _resolve(api: DandiAPI, location: DandiLocation, version: str, assets: list[Asset]) -> list[VirtniiError]:
    """Find the blobs of the ``assets`` listed without one (through their download redirects); the errors of
    those that have none, by asset."""
    failures: list[VirtniiError] = []
    unresolved = [a for a in assets if a.blob_url is None and a.download_url]
    for asset, outcome in zip(unresolved, api.resolve_downloads(unresolved) if unresolved else []):
        if isinstance(outcome, BaseException) and not isinstance(outcome, storage_errors()):
            raise outcome
        if outcome is not None:
            problem = outcome if isinstance(outcome, str) else \
                from_os_error(str(asset.download_url), outcome, "get").problem
            failures.append(SourceAccessError(location.asset_url(version, asset.path), f"its download URL "
                                              f"{asset.download_url} does not lead to its blob: {problem}"))
    failures += [SourceAccessError(location.asset_url(version, a.path), "the DANDI API gives no content URL for it")
                 for a in assets if a.blob_url is None and not a.download_url]
    return failures
