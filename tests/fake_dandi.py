"""A DANDI archive on loopback: the read-only REST API (``/api/…``) as dandi-archive serves it, with the asset blobs
on the tests' local S3 server (moto), fully offline.

It answers the requests virtnii and dandifs make, shaped as the archive's serializers shape them (dandi-archive
``dandiapi/api/views``): the dandiset record (its published and draft versions), paged asset listings
(``count``/``next``/``results``; ``page``, ``page_size`` up to 1,000, ``path`` as a case-insensitive prefix,
``glob``, ``order``, ``metadata``, whose ``contentUrl`` holds the API download URL and the blob's S3 URL and whose
``digest`` holds ``dandi:dandi-etag``), the folder listing ``assets/paths/``, asset metadata, server ``info/``
(dandifs discovers an instance given by URL through it), and ``download/`` redirects to the blob with a
presigned-style query.  Every API request is recorded in :attr:`FakeDandi.requests` and may be delayed by
``latency`` seconds (the S3 server has its own), so tests can bound requests per asset and benchmarks can
charge round trips.

The benchmark ``scripts/bench_remote.py`` imports :class:`FakeDandi`, so the server the tests trust is the one
that is measured.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from conftest import LocalS3, MeteredApp, stop_waitress

DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000  # dandi-archive's DandiPagination
TIMESTAMP = "2024-05-01T12:00:00.000000Z"


@dataclass
class FakeAsset:
    """One asset: a blob on the S3 server (or a Zarr, which has none)."""

    asset_id: str
    path: str
    size: int
    blob_id: str | None = None
    blob_url: str | None = None
    etag: str | None = None
    sha256: str | None = None
    zarr_id: str | None = None
    #: Whether ``metadata.contentUrl`` names the S3 URL beside the API download URL (the archive's always does;
    #: False stands for an archive that lists only the download URL, which must then be followed).
    s3_in_metadata: bool = True

    def record(self, api: str, metadata: bool) -> dict[str, Any]:
        """The asset as a listing gives it (``AssetSerializer``)."""
        record: dict[str, Any] = {"asset_id": self.asset_id, "blob": self.blob_id, "zarr": self.zarr_id,
                                  "path": self.path, "size": self.size, "created": TIMESTAMP,
                                  "modified": TIMESTAMP}
        if metadata:
            record["metadata"] = self.metadata(api)
        return record

    def metadata(self, api: str) -> dict[str, Any]:
        """The asset's full metadata, with the fields the archive computes (``Asset.full_metadata``)."""
        urls = [f"{api}/assets/{self.asset_id}/download/"]
        if self.s3_in_metadata:
            urls.append(self.blob_url or "")
        digest = {"dandi:dandi-etag": self.etag} if self.etag else {}
        if self.sha256:
            digest["dandi:sha2-256"] = self.sha256
        return {"schemaVersion": "0.6.7", "id": f"dandiasset:{self.asset_id}", "identifier": self.asset_id,
                "path": self.path, "contentUrl": urls, "contentSize": self.size, "digest": digest,
                "encodingFormat": "application/x-zarr" if self.zarr_id else "application/octet-stream"}


@dataclass
class FakeDandiset:
    identifier: str
    versions: dict[str, dict[str, FakeAsset]] = field(default_factory=lambda: {"draft": {}})

    def record(self) -> dict[str, Any]:
        published = [v for v in self.versions if v != "draft"]
        version = lambda v: {"version": v, "name": "test", "asset_count": len(self.versions[v]),  # noqa: E731
                             "size": sum(a.size for a in self.versions[v].values()), "status": "Valid",
                             "created": TIMESTAMP, "modified": TIMESTAMP}
        return {"identifier": self.identifier, "created": TIMESTAMP, "modified": TIMESTAMP,
                "contact_person": "", "embargo_status": "OPEN",
                "most_recent_published_version": version(max(published)) if published else None,
                "draft_version": version("draft")}


class FakeDandi:
    """The fake archive, served by waitress on ``127.0.0.1`` and a free port; blobs go to a new bucket on ``s3``.

    ``url`` is the API base (``http://127.0.0.1:PORT/api``): give it to virtnii as an instance
    (``VIRTNII_DANDI_INSTANCES=fake=URL``, then ``dandi://fake/000026/…``) and to dandifs as ``instance=URL``.
    """

    def __init__(self, s3: LocalS3, *, threads: int = 16) -> None:
        import waitress

        self.s3 = s3
        self.bucket = s3.create_bucket("dandiarchive")
        # anyone may read the blobs, as the archive's bucket policy says
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
                                                           "Resource": f"arn:aws:s3:::{self.bucket}/*"}]}
        s3.filesystem().call_s3("put_bucket_policy", Bucket=self.bucket, Policy=json.dumps(policy))
        self.dandisets: dict[str, FakeDandiset] = {}
        self.requests: list[str] = []
        #: Whether pages say how many items there are in all (an API may leave ``count`` out: follow ``next``).
        self.counts = True
        #: The longest page it gives (dandi-archive's cap; another instance may have a lower one).
        self.max_page_size = MAX_PAGE_SIZE
        #: Added to every count: a version changed between the pages of one listing.
        self.miscount = 0
        self._lock = threading.Lock()
        self.meter = MeteredApp(self._app)
        self._server = waitress.create_server(self.meter, host="127.0.0.1", port=0, threads=threads,
                                              asyncore_use_poll=True, clear_untrusted_proxy_headers=True)
        self.url = f"http://127.0.0.1:{self._server.effective_port}/api"
        self._thread = threading.Thread(target=self._server.run, name="fake-dandi", daemon=True)
        self._thread.start()

    @property
    def latency(self) -> float:
        return self.meter.latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        self.meter.latency = seconds

    def stop(self) -> None:
        stop_waitress(self._server)
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------------------------------------- content

    def dandiset(self, identifier: str) -> FakeDandiset:
        return self.dandisets.setdefault(identifier, FakeDandiset(identifier))

    def add(self, identifier: str, files: dict[str, bytes], *, version: str = "draft",
            s3_in_metadata: bool = True) -> list[FakeAsset]:
        """Upload ``files`` (asset path → bytes) as blobs, concurrently, and add them as assets of ``version``.

        The blobs are named as the archive names them (``blobs/<3 hex>/<3 hex>/<uuid>``, no extension) and each
        asset's ``dandi:dandi-etag`` is the ETag the S3 server reports, as the archive checks at upload.
        """
        fs = self.s3.filesystem()
        blobs = {path: str(uuid.uuid4()) for path in files}
        keys = {path: f"{self.bucket}/blobs/{b[:3]}/{b[3:6]}/{b}" for path, b in blobs.items()}
        fs.pipe({keys[path]: data for path, data in files.items() if data})
        for path in (p for p, data in files.items() if not data):
            fs.touch(keys[path])  # an empty PUT through pipe stalls the S3 server (moto under waitress)
        assets = []
        for path, data in files.items():
            etag = fs.info(keys[path])["ETag"].strip('"')
            assets.append(FakeAsset(str(uuid.uuid4()), path, len(data), blobs[path],
                                    f"{self.s3.endpoint}/{keys[path]}", etag, hashlib.sha256(data).hexdigest(),
                                    s3_in_metadata=s3_in_metadata))
        self.dandiset(identifier).versions.setdefault(version, {}).update({a.path: a for a in assets})
        return assets

    def add_zarr(self, identifier: str, path: str, version: str = "draft") -> FakeAsset:
        asset = FakeAsset(str(uuid.uuid4()), path, 4096, zarr_id=str(uuid.uuid4()))
        self.dandiset(identifier).versions.setdefault(version, {})[path] = asset
        return asset

    def publish(self, identifier: str, version: str) -> None:
        """Freeze the draft's assets as published ``version`` (the most recent one, if it sorts last)."""
        dandiset = self.dandiset(identifier)
        dandiset.versions[version] = dict(dandiset.versions["draft"])

    def reset_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    # -------------------------------------------------------------------------------------------------- serving

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path, query = environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", "")
        with self._lock:
            self.requests.append(f"{environ.get('REQUEST_METHOD')} {path}{'?' + query if query else ''}")
        params = {k: v[-1] for k, v in urllib.parse.parse_qs(query, keep_blank_values=True).items()}
        try:
            status, body, headers = self._answer(path, params, environ)
        except KeyError:
            status, body, headers = 404, {"detail": "Not found."}, []
        payload = b"" if body is None else json.dumps(body).encode()
        start_response(f"{status} {'OK' if status < 300 else 'Found' if status < 400 else 'Error'}",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(payload))), *headers])
        return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else payload]

    def _answer(self, path: str, params: dict[str, str], environ: dict[str, Any]) -> tuple[int, Any, list]:
        parts = path.strip("/").split("/")
        if parts[0] != "api":
            raise KeyError(path)
        parts = parts[1:]
        if parts == ["info"]:
            return 200, {"version": "0.0.0-fake", "cli-minimal-version": "0.60.0", "cli-bad-versions": [],
                         "services": {"api": {"url": self.url}, "webui": {"url": self.url.rsplit("/api", 1)[0]},
                                      "jupyterhub": {"url": ""}}}, []
        if len(parts) == 3 and parts[0] == "assets" and parts[2] == "download":
            return self._download(self._asset_by_id(parts[1]))
        if len(parts) == 2 and parts[0] == "assets":
            return 200, self._asset_by_id(parts[1]).metadata(self.url), []
        if parts[0] != "dandisets" or len(parts) < 2:
            raise KeyError(path)
        dandiset = self.dandisets[parts[1]]
        if len(parts) == 2:
            return 200, dandiset.record(), []
        if parts[2] != "versions":
            raise KeyError(path)
        if len(parts) == 3:
            return 200, self._page(environ, params, [dandiset.record()["draft_version"]]), []
        assets = dandiset.versions[parts[3]]
        rest = parts[4:]
        if not rest or rest == ["info"]:
            return 200, {"version": parts[3], "asset_count": len(assets), "metadata": {}}, []
        if rest == ["assets"]:
            return 200, self._assets(environ, params, assets), []
        if rest == ["assets", "paths"]:
            return 200, self._paths(environ, params, assets), []
        if rest[0] == "assets" and len(rest) >= 2:
            asset = next(a for a in assets.values() if a.asset_id == rest[1])
            if rest[2:] == ["download"]:
                return self._download(asset)
            if rest[2:] == ["info"]:
                return 200, asset.record(self.url, metadata=True), []
            if not rest[2:]:
                return 200, asset.metadata(self.url), []
        raise KeyError(path)

    def _asset_by_id(self, asset_id: str) -> FakeAsset:
        for dandiset in self.dandisets.values():
            for assets in dandiset.versions.values():
                for asset in assets.values():
                    if asset.asset_id == asset_id:
                        return asset
        raise KeyError(asset_id)

    def _download(self, asset: FakeAsset) -> tuple[int, Any, list]:
        if asset.blob_url is None:
            return 400, "Unable to provide download link for zarr assets.", []
        name = urllib.parse.quote(asset.path.rsplit("/", 1)[-1])
        # what a presigned S3 URL carries; the S3 server ignores these parameters
        query = f"response-content-disposition=attachment%3B%20filename%3D{name}&X-Amz-Expires=3600"
        return 302, None, [("Location", f"{asset.blob_url}?{query}")]

    def _assets(self, environ: dict[str, Any], params: dict[str, str], assets: dict[str, FakeAsset]) -> Any:
        selected = list(assets.values())
        if "path" in params:
            prefix = params["path"].lower()
            selected = [a for a in selected if a.path.lower().startswith(prefix)]
        if "glob" in params:
            pattern = re.compile("^" + re.escape(params["glob"]).replace("\\*", ".*") + "$", re.IGNORECASE)
            selected = [a for a in selected if pattern.match(a.path)]
        order = params.get("order", "created")
        if order.lstrip("-") == "path":
            selected.sort(key=lambda a: a.path, reverse=order.startswith("-"))
        metadata = params.get("metadata", "").lower() in ("true", "1", "yes")
        return self._page(environ, params, [a.record(self.url, metadata) for a in selected])

    def _paths(self, environ: dict[str, Any], params: dict[str, str], assets: dict[str, FakeAsset]) -> Any:
        prefix = params.get("path_prefix", "")
        children: dict[str, dict[str, Any]] = {}
        for asset in sorted(assets.values(), key=lambda a: a.path):
            if not asset.path.startswith(prefix):
                continue
            head, sep, _ = asset.path[len(prefix):].partition("/")
            child = children.setdefault(prefix + head, {"path": prefix + head, "version": 1, "aggregate_files": 0,
                                                         "aggregate_size": 0, "asset": None})
            child["aggregate_files"] += 1
            child["aggregate_size"] += asset.size
            if not sep:
                child["asset"] = {"asset_id": asset.asset_id, "url": asset.blob_url}
        return self._page(environ, params, list(children.values()))

    def _page(self, environ: dict[str, Any], params: dict[str, str], items: list[Any]) -> dict[str, Any]:
        size = min(int(params.get("page_size", DEFAULT_PAGE_SIZE)), self.max_page_size)
        number = int(params.get("page", 1))
        start = (number - 1) * size
        base = f"{self.url.rsplit('/api', 1)[0]}{environ['PATH_INFO']}"
        link = lambda n: f"{base}?{urllib.parse.urlencode({**params, 'page': n})}"  # noqa: E731
        return {"count": len(items) + self.miscount if self.counts else None, "next": link(number + 1) if start + size < len(items) else None,
                "previous": link(number - 1) if number > 1 else None, "results": items[start:start + size]}

