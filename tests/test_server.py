"""``virtnii serve`` over loopback: zarr-python and niizarr read the served store as nibabel reads the files, at
every pyramid level; HTTP semantics viewers rely on; bad requests refused without touching a file; the CLI.

The sources are real nibabel test files (big-endian ``.nii``, a 4-D ``.nii.gz`` with extensions, a 4-D ``.nii``
with slope/inter), copied next to the manifests together with canary files that no request may open.
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np
import pytest
import zarr

import virtnii
from conftest import LocalHTTP
from faults import FaultProxy
from nifti_samples import DATA, assert_same_voxels, bids_tree, file_to_zarr_order, nibabel_raw
from test_pyramid import assert_level_equal, expected_levels
from virtnii.errors import ManifestError
from virtnii.server import Store
from virtnii.server.app import running

SOURCES = {"anatomical": "anatomical.nii", "example4d": "example4d.nii.gz", "functional": "functional.nii"}
CANARY = "canary: no request may read this file"

_RECORDING: list[str] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    """Every file this process opens (any thread: the server runs in one), while :func:`files_opened` records."""
    if _RECORDING is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _RECORDING.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@contextmanager
def files_opened() -> Iterator[list[str]]:
    global _RECORDING
    _RECORDING = opened = []
    try:
        yield opened
    finally:
        _RECORDING = None


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Sources, a Zarr v3 (JSON) and a Zarr v2 (Parquet) manifest of them with pyramids, a BIDS dataset's
    manifest, and canaries beside and inside the manifests."""
    root = tmp_path_factory.mktemp("served")
    data = root / "data"
    data.mkdir()
    sources = {name: data / file for name, file in SOURCES.items()}
    for name, file in SOURCES.items():
        shutil.copy(DATA / file, sources[name])
    manifests = {}
    for label, zarr_format, ref_format in (("v3", 3, "json"), ("v2", 2, "parquet")):
        out = root / label
        result = virtnii.scan([str(p) for p in sources.values()], str(out), zarr_format=zarr_format,
                              ref_format=ref_format)
        assert not result.failures
        assert not virtnii.build_pyramids(str(out), chunks=16).failures
        (out / "secret.txt").write_text(CANARY)
        manifests[label] = out
    bids = root / "bids"
    bids_tree(bids)
    virtnii.index(str(bids), str(root / "ds-bids"), progress=False)
    manifests["bids"] = root / "ds-bids"
    (root / "secret.txt").write_text(CANARY)
    return {"root": root, "sources": sources, "manifests": manifests}


@pytest.fixture(scope="module")
def v3(tree: dict[str, Any]) -> Iterator[str]:
    with running([str(tree["manifests"]["v3"])]) as url:
        yield url


def fetch(url: str, method: str = "GET", **headers: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, headers={k.replace("_", "-"): v for k, v in headers.items()})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def raw_request(url: str, target: bytes, method: bytes = b"GET", headers: bytes = b"") -> tuple[int, bytes]:
    """Send a request line exactly as given (no client normalising it); the status and body."""
    host, port = url.split("//")[1].rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers + b"\r\n")
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def _zooms(path: Path) -> list[float]:
    return [float(z) for z in nib.load(path).header.get_zooms()]


def levels_of(group: zarr.Group) -> list[str]:
    return [d["path"] for d in group.attrs["ome"]["multiscales"][0]["datasets"]] if "ome" in group.attrs \
        else [d["path"] for d in group.attrs["multiscales"][0]["datasets"]]


# -- the store over HTTP ------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["v3", "v2"])
def test_zarr_over_http_reads_nibabels_voxels_at_every_level(tree: dict[str, Any], label: str) -> None:
    with running([str(tree["manifests"][label])]) as url:
        served = zarr.open_group(f"{url}zarr/", mode="r")
        assert served.metadata.zarr_format == int(label[1])
        checked = 0
        for name, path in tree["sources"].items():
            image = served[name]
            levels = levels_of(image)
            assert_same_voxels(image["0"][...], file_to_zarr_order(nibabel_raw(path)))
            for level, expected in zip(levels[1:], expected_levels(path, len(levels) - 1, "mean")):
                assert_level_equal(image[level][...], expected)
                checked += 1
            img = virtnii.to_nibabel(image)  # header (affine, slope/inter) from the served `nifti` array
            np.testing.assert_array_equal(img.affine, nib.load(path).affine)
            np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(nib.load(path).dataobj))
        assert checked >= 4  # every image has written levels


def test_niizarr_reads_a_served_image(v3: str, tree: dict[str, Any]) -> None:
    niizarr = pytest.importorskip("niizarr")
    path = tree["sources"]["anatomical"]
    image = niizarr.zarr2nii(zarr.open_group(f"{v3}zarr/anatomical/", mode="r"))
    np.testing.assert_array_equal(np.asarray(image.dataobj), nibabel_raw(path))
    np.testing.assert_allclose(image.header.get_best_affine(), nib.load(path).affine)


def test_v2_manifests_are_served_as_v2(tree: dict[str, Any]) -> None:
    with running([str(tree["manifests"]["v2"])]) as url:
        assert fetch(f"{url}zarr/.zgroup")[0] == 200
        status, headers, body = fetch(f"{url}zarr/anatomical/0/.zarray")
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert json.loads(body)["zarr_format"] == 2
        assert fetch(f"{url}zarr/zarr.json")[0] == 404
        assert fetch(f"{url}zarr/anatomical/0/zarr.json")[0] == 404
        assert fetch(f"{url}zarr/anatomical/0/9.9.9")[0] == 404  # outside the grid of a Parquet reference set


def test_parquet_keys_are_looked_up_exactly(tree: dict[str, Any]) -> None:
    """fsspec's lazy Parquet mapper makes a row number of any key below an array: only the keys zarr itself
    would ask for are served, each with its own chunk's bytes; other spellings and shapes are 404."""
    with running([str(tree["manifests"]["v2"])]) as url:
        array = f"{url}zarr/anatomical/1"  # a written level in 16³ chunks: a grid of several rows
        meta = json.loads(fetch(f"{array}/.zarray")[2])
        grid = [-(-size // step) for size, step in zip(meta["shape"], meta["chunks"])]
        assert grid == [1, 2, 2], grid
        bodies = [fetch(f"{array}/0.{y}.{x}") for y in range(2) for x in range(2)]
        assert all(status == 200 for status, _, _ in bodies) and len({b for _, _, b in bodies}) == 4
        for bad in ["1.0.0", "0.2.0", "0.0.2", "0.1", "0.0.0.0", "0", "00.0.0", "0.01.0", "+0.0.0", " 0.0.0",
                    "0_0.0.0", "\u0660.0.0", "-1.0.0", "0/0/0", "0.0.0.", "0..0.0"]:
            assert fetch(f"{array}/{urllib.parse.quote(bad)}")[0] == 404, bad


def test_several_manifests_are_one_subgroup_each_under_a_root_group(tree: dict[str, Any]) -> None:
    manifests = tree["manifests"]
    with running([str(manifests["v3"]), str(manifests["bids"])]) as url:
        root = zarr.open_group(f"{url}zarr/", mode="r")
        assert root.metadata.zarr_format == 3
        assert_same_voxels(root["v3/anatomical/0"][...], file_to_zarr_order(nibabel_raw(tree["sources"]["anatomical"])))
        t1 = root["ds-bids/sub-01/anat/sub-01_T1w"]
        assert_same_voxels(t1["0"][...], file_to_zarr_order(nibabel_raw(DATA / "anatomical.nii")))
        listing = json.loads(fetch(f"{url}api/images")[2])["images"]
    paths = [image["path"] for image in listing]
    assert paths[:3] == ["v3/anatomical", "v3/example4d", "v3/functional"]
    bold = listing[paths.index("ds-bids/sub-01/func/sub-01_task-rest_bold")]
    assert bold == {"path": "ds-bids/sub-01/func/sub-01_task-rest_bold",
                    "zarr": "/zarr/ds-bids/sub-01/func/sub-01_task-rest_bold/",
                    "view": "/view/ds-bids/sub-01/func/sub-01_task-rest_bold/", "axes": "tzyx",
                    "shape": [20, 3, 21, 17], "dtype": "int16", "zooms": _zooms(DATA / "functional.nii"), "levels": 1,
                    "bids": bold["bids"]}
    assert bold["bids"]["sub"] == "01" and bold["bids"]["task"] == "rest" and bold["bids"]["suffix"] == "bold"
    assert listing[0]["bids"] is None and listing[0]["levels"] > 1  # no entities in a plain scan


def test_several_manifests_must_have_distinct_names_and_one_format(tree: dict[str, Any], tmp_path: Path) -> None:
    manifests = tree["manifests"]
    copy = tmp_path / "v3"
    shutil.copytree(manifests["v3"], copy)
    with pytest.raises(ManifestError, match="subgroup 'v3'"):
        Store([str(manifests["v3"]), str(copy)])
    with pytest.raises(ManifestError, match="mixes Zarr v2 and v3"):
        Store([str(manifests["v3"]), str(manifests["v2"])])


def test_api_listing_matches_the_contract(v3: str) -> None:
    status, headers, body = fetch(f"{v3}api/images")
    assert status == 200 and headers["Content-Type"] == "application/json"
    images = json.loads(body)["images"]
    example = next(image for image in images if image["path"] == "example4d")
    assert example == {"path": "example4d", "zarr": "/zarr/example4d/", "view": "/view/example4d/", "axes": "tzyx",
                       "shape": [2, 24, 96, 128], "dtype": "int16", "zooms": _zooms(DATA / "example4d.nii.gz"),
                       "levels": 4,
                       "bids": None}


def test_nothing_served_names_a_source_or_the_servers_folders(tree: dict[str, Any], v3: str) -> None:
    root = str(tree["root"])
    refs = json.loads(next(tree["manifests"]["v3"].glob("refs*.json")).read_text())["refs"]
    bodies = [fetch(f"{v3}api/images")[2]]
    bodies += [fetch(f"{v3}zarr/{key}")[2] for key in refs if key.endswith("zarr.json") or "/nifti/" in key]
    assert len(bodies) > 10
    for body in bodies:
        assert root.encode() not in body and b"file://" not in body and b"gzidx" not in body


# -- HTTP semantics -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["anatomical/0/c/0/0/0", "example4d/0/c/0/0/0/0", "anatomical/1/c/0/0/0",
                                 "anatomical/zarr.json", "anatomical/nifti/c/0"])
def test_head_get_and_ranges(v3: str, key: str) -> None:
    url = f"{v3}zarr/{key}"
    status, headers, whole = fetch(url)
    assert status == 200 and int(headers["Content-Length"]) == len(whole) > 0
    assert headers["Accept-Ranges"] == "bytes" and headers["Access-Control-Allow-Origin"] == "*"
    status, head, body = fetch(url, "HEAD")
    assert status == 200 and body == b"" and head["Content-Length"] == str(len(whole)) and head["ETag"] == headers["ETag"]
    size = len(whole)
    for wanted, (start, end) in {"bytes=1-10": (1, 11), "bytes=-7": (size - 7, size), "bytes=5-": (5, size),
                                 f"bytes=3-{size + 1000}": (3, size)}.items():
        status, partial, body = fetch(url, Range=wanted)
        assert status == 206 and body == whole[start:end], wanted
        assert partial["Content-Range"] == f"bytes {start}-{end - 1}/{size}"
        assert partial["Content-Length"] == str(end - start)
        status, partial, body = fetch(url, "HEAD", Range=wanted)
        assert status == 206 and partial["Content-Length"] == str(end - start) and body == b""
    status, refused, _ = fetch(url, Range=f"bytes={size}-")
    assert status == 416 and refused["Content-Range"] == f"bytes */{size}"
    assert fetch(url, Range="bytes=-0")[0] == 416
    assert fetch(url, Range="bytes=10-2")[0] == 400
    assert fetch(url, Range="bytes=" + "9" * 30 + "-")[0] == 400
    assert fetch(url, Range="bytes=0-1,4-5")[2] == whole  # several ranges: the whole body, as the RFC allows
    assert fetch(url, Range="lines=0-1")[2] == whole  # unknown unit: ignored


def test_conditional_requests(v3: str) -> None:
    url = f"{v3}zarr/anatomical/0/c/0/0/0"
    _, headers, whole = fetch(url)
    etag, modified = headers["ETag"], headers["Last-Modified"]
    status, cached, body = fetch(url, If_None_Match=etag)
    assert status == 304 and body == b"" and cached["ETag"] == etag
    assert fetch(url, If_None_Match=f'"other", W/{etag}')[0] == 304
    assert fetch(url, If_None_Match='"other"')[0] == 200
    assert fetch(url, If_Modified_Since=modified)[0] == 304
    assert fetch(url, If_None_Match='"other"', If_Modified_Since=modified)[0] == 200  # If-None-Match decides
    assert fetch(url, Range="bytes=0-3", If_Range=etag)[0] == 206
    status, _, body = fetch(url, Range="bytes=0-3", If_Range='"stale"')
    assert status == 200 and body == whole
    _, meta, _ = fetch(f"{v3}zarr/anatomical/zarr.json")
    assert "Last-Modified" not in meta and meta["Cache-Control"] == "no-cache"


def test_etags_come_from_the_fingerprints_not_the_clock(tree: dict[str, Any], tmp_path: Path) -> None:
    source = tmp_path / "anatomical.nii"
    shutil.copy(DATA / "anatomical.nii", source)
    virtnii.scan([str(source)], str(tmp_path / "m"))
    key = "zarr/anatomical/0/c/0/0/0"
    with running([str(tmp_path / "m")]) as url:
        first = fetch(url + key)
    time.sleep(0.01)
    with running([str(tmp_path / "m")]) as url:
        again = fetch(url + key)
    assert again[1]["ETag"] == first[1]["ETag"] and again[1]["Last-Modified"] == first[1]["Last-Modified"]
    os.utime(source, (1_600_000_000, 1_600_000_000))  # same bytes, another version of the file
    virtnii.scan([str(source)], str(tmp_path / "m"))
    with running([str(tmp_path / "m")]) as url:
        rescanned = fetch(url + key)
    assert rescanned[2] == first[2] and rescanned[1]["ETag"] != first[1]["ETag"]
    assert rescanned[1]["Last-Modified"] == "Sun, 13 Sep 2020 12:26:40 GMT"


def test_a_changed_source_is_a_502_never_a_404_and_names_no_file(tmp_path: Path) -> None:
    source = tmp_path / "anatomical.nii"
    shutil.copy(DATA / "anatomical.nii", source)
    virtnii.scan([str(source)], str(tmp_path / "m"))
    with running([str(tmp_path / "m")]) as url:
        assert fetch(f"{url}zarr/anatomical/0/c/0/0/0")[0] == 200
        shutil.copy(DATA / "reoriented_anat_moved.nii", source)
        status, _, body = fetch(f"{url}zarr/anatomical/0/c/0/0/0")
        assert status == 502 and b"StaleSource" in body and str(tmp_path).encode() not in body
        assert fetch(f"{url}zarr/anatomical/zarr.json")[0] == 200  # metadata needs no source


def test_a_source_that_stays_down_is_a_502_after_its_retries(
        http_root: tuple[Path, LocalHTTP], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An HTTP source behind a proxy that answers 503 for good: the chunk request is a 502 (never a 404, which
    zarr would take for fill values) once its attempts are spent, the log says so, and it is answered again once
    the source is back."""
    root, server = http_root
    shutil.copy(DATA / "anatomical.nii", root / "anatomical.nii")
    proxy = FaultProxy(server.url)
    try:
        virtnii.scan([f"{proxy.url}/anatomical.nii"], str(tmp_path / "m"))
        retry = {"attempts": 3, "base_delay": 0.01, "max_delay": 0.02, "timeout": 2.0, "deadline": 20.0}
        with running([str(tmp_path / "m")], storage_options={"retry": retry}) as url:
            proxy.fail["/anatomical.nii"] = 503
            status, _, body = fetch(f"{url}zarr/anatomical/0/c/0/0/0")
            assert status == 502 and b"SourceUnavailable" in body and proxy.url.encode() not in body, body
            assert proxy.requests["/anatomical.nii"] >= 3  # fsspec asks HEAD, then GET, on each attempt
            assert "3 attempt(s) failed" in caplog.text and "HTTP 503" in caplog.text
            del proxy.fail["/anatomical.nii"]
            assert fetch(f"{url}zarr/anatomical/0/c/0/0/0")[0] == 200
    finally:
        proxy.stop()


def test_cors_for_any_origin_and_preflight(v3: str) -> None:
    status, headers, _ = fetch(f"{v3}zarr/anatomical/zarr.json", Origin="https://viewer.example")
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
    assert "Content-Range" in headers["Access-Control-Expose-Headers"]
    status, headers, body = fetch(f"{v3}zarr/anatomical/0/c/0/0/0", "OPTIONS", Origin="https://viewer.example",
                                  Access_Control_Request_Method="GET",
                                  Access_Control_Request_Headers="range, if-none-match",
                                  Access_Control_Request_Private_Network="true")
    assert status == 204 and body == b""
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert "GET" in headers["Access-Control-Allow-Methods"] and "HEAD" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "range, if-none-match"
    assert headers["Access-Control-Allow-Private-Network"] == "true"
    assert fetch(f"{v3}zarr/missing", Origin="https://x")[1]["Access-Control-Allow-Origin"] == "*"  # errors too


def test_unknown_keys_and_methods(v3: str) -> None:
    for path in ["zarr/anatomical/0/c/9/9/9", "zarr/nope/zarr.json", "zarr/", "zarr", "zarr/virtnii.json",
                 "zarr/secret.txt", "zarr/levels", "api/images/x", "static/missing.js", "view/nope/zarr.json", "view/anatomical/9/c/0/0/0/0/0",
                 "nope"]:
        status, headers, body = fetch(v3 + path)
        assert status == 404, path
        assert headers["Cache-Control"] == "no-store"
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, headers, _ = fetch(f"{v3}zarr/anatomical/zarr.json", method)
        assert status == 405 and headers["Allow"] == "GET, HEAD, OPTIONS"


def test_the_page_and_static_files(v3: str) -> None:
    status, headers, body = fetch(v3)
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b"<html" in body
    assert fetch(f"{v3}static/index.html")[2] == body


# -- bad requests -------------------------------------------------------------------------------------------


BAD_TARGETS = {
    400: [b"/zarr/../secret.txt", b"/zarr/%2e%2e/secret.txt", b"/zarr/%2E%2E/%2e%2e/secret.txt",
          b"/static/../../secret.txt", b"/static/%2e%2e/%2e%2e/secret.txt", b"/zarr/anatomical%2Fzarr.json",
          b"/zarr/..%2Fsecret.txt", b"/zarr/..%5Csecret.txt", b"/zarr/..\\secret.txt", b"/zarr/secret.txt%00",
          b"/zarr//secret.txt", b"//secret.txt", b"/zarr/%zz", b"/zarr/%ff%fe", b"/zarr/./zarr.json",
          b"/zarr/anatomical/0/c/0/0/0/../../../../../secret.txt"],
    414: [b"/zarr/" + b"a/" * 3000],
    404: [b"/secret.txt", b"/zarr/secret.txt", b"/zarr/v3/secret.txt", b"/zarr/refs.json", b"/zarr/virtnii.json",
          b"/zarr/gzindex", b"/static/secret.txt", b"/zarr/" + b"x" * 4000],
}


def test_bad_requests_are_refused_without_opening_a_file(tree: dict[str, Any], v3: str) -> None:
    root = str(tree["root"])
    with files_opened() as opened:
        for status, targets in BAD_TARGETS.items():
            for target in targets:
                assert raw_request(v3, target)[0] == status, target
        assert raw_request(v3, b"/zarr/" + b"a" * 9000)[0] == 400  # request line over aiohttp's 8190 bytes
        huge = b"Range: bytes=" + b"9" * 8000 + b"-\r\n"
        assert raw_request(v3, b"/zarr/anatomical/zarr.json", headers=huge)[0] == 400
        many = b"Range: bytes=" + b",".join(b"%d-%d" % (i, i) for i in range(1000)) + b"\r\n"
        assert raw_request(v3, b"/zarr/anatomical/zarr.json", headers=many)[0] == 200  # ignored: whole body
        assert raw_request(v3, b"/zarr/nope", method=b"GARBAGE")[0] in (400, 405)  # aiohttp: 400
    assert [path for path in opened if path.startswith(root)] == []
    assert fetch(f"{v3}zarr/anatomical/0/c/0/0/0")[0] == 200  # still serving


def test_reading_everything_opens_only_the_manifests_and_sources(tree: dict[str, Any], tmp_path: Path) -> None:
    manifest = tree["manifests"]["v3"]
    with files_opened() as opened, running([str(manifest)]) as url:
        served = zarr.open_group(f"{url}zarr/", mode="r")
        for name in tree["sources"]:
            for level in levels_of(served[name]) + ["nifti"]:
                served[name][level][...]
    root = str(tree["root"])
    touched = {path for path in opened if path.startswith(root)}
    allowed = {str(p) for p in tree["sources"].values()}
    assert touched and all(path in allowed or path.startswith(str(manifest) + "/") for path in touched), touched
    assert not any(path.endswith("secret.txt") for path in touched)


def test_reads_never_block_the_event_loop(v3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from fsspec.implementations.local import LocalFileSystem

    original = LocalFileSystem.cat_file

    def slow(self: LocalFileSystem, path: str, *args: Any, **kwargs: Any) -> bytes:
        time.sleep(0.5)
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "cat_file", slow)
    results: list[tuple[int, float]] = []

    def get(key: str) -> None:
        start = time.perf_counter()
        results.append((fetch(f"{v3}zarr/{key}")[0], time.perf_counter() - start))

    keys = ["anatomical/0/c/0/0/0", "functional/0/c/0/0/0/0", "anatomical/1/c/0/0/0", "anatomical/1/c/0/0/1"]
    threads = [threading.Thread(target=get, args=(key,)) for key in keys]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(0.1)
    listed = time.perf_counter()
    assert fetch(f"{v3}api/images")[0] == 200
    listed = time.perf_counter() - listed
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    assert [status for status, _ in results] == [200] * len(keys)
    assert all(took >= 0.5 for _, took in results)
    assert listed < 0.4  # answered while every read was sleeping in a worker thread
    assert elapsed < 0.5 * len(keys)  # and the reads overlapped


def test_many_concurrent_chunk_requests_are_all_exact(v3: str, tree: dict[str, Any]) -> None:
    aiohttp = pytest.importorskip("aiohttp")
    refs = json.loads(next(tree["manifests"]["v3"].glob("refs*.json")).read_text())["refs"]
    keys = [key for key in refs if "/c/" in key] * 4
    expected = {key: fetch(f"{v3}zarr/{key}")[2] for key in set(keys)}

    async def load() -> list[bytes]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
            async def get(key: str) -> bytes:
                async with session.get(f"{v3}zarr/{key}") as response:
                    assert response.status == 200
                    return await response.read()

            return await asyncio.gather(*map(get, keys))

    assert asyncio.run(load()) == [expected[key] for key in keys]


# -- the viewer view's mount point --------------------------------------------------------------------------


def test_a_view_mounts_at_view(tree: dict[str, Any]) -> None:
    seen = []

    def view(image: Any, key: str) -> bytes | None:
        seen.append((image.path, key))
        if key == "zarr.json":
            return json.dumps({"shape": list(image.group["0"].shape)}).encode()
        return None

    async def async_view(image: Any, key: str) -> bytes | None:
        return b"async " + key.encode() if key == "0/c/0/0/0" else None

    with running([str(tree["manifests"]["v3"])], view=view) as url:
        status, headers, body = fetch(f"{url}view/anatomical/zarr.json")
        assert status == 200 and json.loads(body) == {"shape": [25, 41, 33]}
        assert headers["Content-Type"] == "application/json" and headers["ETag"]
        assert fetch(f"{url}view/anatomical/zarr.json", If_None_Match=headers["ETag"])[0] == 304
        assert fetch(f"{url}view/anatomical/zarr.json", Range="bytes=0-0")[2] == b"{"
        assert fetch(f"{url}view/anatomical/0/c/0/0/0")[0] == 404
        assert fetch(f"{url}view/nope/zarr.json")[0] == 404
        assert fetch(f"{url}view/anatomical")[0] == 404
    assert seen == [("anatomical", "zarr.json")] * 3 + [("anatomical", "0/c/0/0/0")]
    with running([str(tree["manifests"]["v3"])], view=async_view) as url:
        assert fetch(f"{url}view/example4d/0/c/0/0/0")[2] == b"async 0/c/0/0/0"


def test_the_view_module_is_mounted_when_installed(tree: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """``virtnii.server.view`` (branch view): one ImageView per image over its served group, one shared cache."""
    made = []

    class ImageView:
        def __init__(self, group: zarr.Group, *, cache: Any) -> None:
            made.append((group["0"].shape, cache))
            time.sleep(0.2)  # a slow first read of the header: concurrent first requests must wait for it

        async def get(self, key: str) -> bytes | None:
            return json.dumps({"key": key}).encode() if key.endswith("zarr.json") else None

    module = types.ModuleType("virtnii.server.view")
    module.__spec__ = importlib.machinery.ModuleSpec("virtnii.server.view", None)
    module.ImageView, module.SlabCache = ImageView, object  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "virtnii.server.view", module)
    with running([str(tree["manifests"]["v3"])]) as url:
        threads = [threading.Thread(target=fetch, args=(f"{url}view/anatomical/zarr.json",)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert json.loads(fetch(f"{url}view/anatomical/0/zarr.json")[2]) == {"key": "0/zarr.json"}
        assert fetch(f"{url}view/anatomical/0/c/0/0/0")[0] == 404
        assert fetch(f"{url}view/functional/zarr.json")[0] == 200
    assert [shape for shape, _ in made] == [(25, 41, 33), (20, 3, 21, 17)]
    assert made[0][1] is made[1][1]


def test_view_chunks_assembled_at_once_are_bounded(tree: dict[str, Any]) -> None:
    """Each view chunk reads a band of its source: however many requests come, at most MAX_VIEWS run at once."""
    from virtnii.server.app import MAX_VIEWS

    running_now, most = 0, 0

    async def view(image: Any, key: str) -> bytes | None:
        nonlocal running_now, most
        running_now += 1
        most = max(most, running_now)
        await asyncio.sleep(0.05)
        running_now -= 1
        return key.encode()

    with running([str(tree["manifests"]["v3"])], view=view) as url:
        threads = [threading.Thread(target=fetch, args=(f"{url}view/anatomical/0/c/0/0/{n}",)) for n in range(40)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert most == MAX_VIEWS


def test_a_view_that_failed_to_open_is_tried_again(tree: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A view whose construction failed (its source unreadable just then) is not kept: the next request makes
    it again, and succeeds once the source is back."""
    attempts = []

    class ImageView:
        def __init__(self, group: zarr.Group, *, cache: Any) -> None:
            attempts.append(1)
            if len(attempts) == 1:
                raise virtnii.SourceUnavailable("s3://bucket/x.nii", "cannot stat: 5 attempt(s) failed")

        async def get(self, key: str) -> bytes | None:
            return b"{}" if key == "zarr.json" else None

    module = types.ModuleType("virtnii.server.view")
    module.__spec__ = importlib.machinery.ModuleSpec("virtnii.server.view", None)
    module.ImageView, module.SlabCache = ImageView, object  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "virtnii.server.view", module)
    with running([str(tree["manifests"]["v3"])]) as url:
        assert fetch(f"{url}view/anatomical/zarr.json")[0] == 502
        assert fetch(f"{url}view/anatomical/zarr.json")[0] == 200
        assert fetch(f"{url}view/anatomical/zarr.json")[0] == 200
    assert len(attempts) == 2


# -- the command line ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_cli_serves_until_a_signal_then_exits_cleanly(tree: dict[str, Any], signum: int) -> None:
    process = subprocess.Popen([sys.executable, "-m", "virtnii.cli", "serve", str(tree["manifests"]["v3"]),
                                "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()  # type: ignore[union-attr]
        match = re.search(r"serving 3 image\(s\) of 1 manifest\(s\) at (http://127\.0\.0\.1:\d+/)", line)
        assert match, line
        assert fetch(f"{match[1]}zarr/anatomical/zarr.json")[0] == 200
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "virtnii: stopped" in stderr and "Traceback" not in stderr


def test_cli_warns_when_bound_beyond_loopback_and_refuses_bad_manifests(tree: dict[str, Any]) -> None:
    process = subprocess.Popen([sys.executable, "-m", "virtnii.cli", "serve", str(tree["manifests"]["v3"]),
                                "--host", "0.0.0.0", "--port", "0"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert "serving" in process.stdout.readline()  # type: ignore[union-attr]
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert "virtnii: warning: serving on 0.0.0.0: anyone who can reach this machine" in stderr
    done = subprocess.run([sys.executable, "-m", "virtnii.cli", "serve", str(tree["root"] / "data")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not a virtnii manifest" in done.stderr
