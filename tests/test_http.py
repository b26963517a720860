"""Sources over HTTP(S), as a lab web server or a CDN serves a BIDS folder: byte ranges, ETags, no listing.

The files are real nibabel test files served from a local folder by :class:`conftest.LocalHTTP`; every voxel read
through the manifest is compared with nibabel reading the original.
"""

from __future__ import annotations

import gzip
import importlib
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

import virtnii
from conftest import LocalHTTP
from nifti_samples import assert_same_voxels, file_to_zarr_order, nibabel_raw

DATA = Path(nib.__file__).parent / "tests" / "data"
#: Served name → nibabel file: big-endian int16 3-D, int16 4-D (gzip), NIfTI-2 (gzip); plus a pair made here.
FILES = {"anat.nii": "anatomical.nii", "bold.nii.gz": "example4d.nii.gz", "n2.nii.gz": "example_nifti2.nii.gz"}


def _serve(root: Path) -> dict[str, Path]:
    for name, original in FILES.items():
        shutil.copy(DATA / original, root / name)
    img = nib.load(DATA / "anatomical.nii")
    nib.save(nib.Nifti1Pair(np.asanyarray(img.dataobj), img.affine, img.header), root / "pair.hdr")
    return {**{name: DATA / original for name, original in FILES.items()}, "pair.hdr": root / "pair.hdr"}


def _unscaled(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj.get_unscaled())


def test_http_sources_read_like_nibabel(http_root: tuple[Path, LocalHTTP], tmp_path: Path) -> None:
    root, server = http_root
    originals = _serve(root)
    result = virtnii.scan([f"{server.url}/{name}" for name in originals], str(tmp_path / "out"))
    assert not result.failures, [str(f) for f in result.failures]
    assert all("etag" in entry.fingerprint for entry in result.images)
    group = virtnii.open(str(tmp_path / "out"))
    for name, original in originals.items():
        img = virtnii.to_nibabel(group[name.split(".")[0]])
        np.testing.assert_array_equal(img.dataobj.get_unscaled(), _unscaled(original))
        np.testing.assert_array_equal(img.affine, nib.load(original).affine)


def test_replaced_http_source_is_stale(http_root: tuple[Path, LocalHTTP], tmp_path: Path) -> None:
    root, server = http_root
    _serve(root)
    virtnii.scan([f"{server.url}/anat.nii"], str(tmp_path / "out"))
    shutil.copy(DATA / "reoriented_anat_moved.nii", root / "anat.nii")  # another image of another size
    with pytest.raises(virtnii.StaleSource, match="anat.nii: changed since it was indexed"):
        virtnii.open(str(tmp_path / "out"))["anat"]["0"][...]


def test_missing_http_source_is_named(http_root: tuple[Path, LocalHTTP], tmp_path: Path) -> None:
    root, server = http_root
    _serve(root)
    result = virtnii.scan([f"{server.url}/anat.nii", f"{server.url}/nope.nii"], str(tmp_path / "out"))
    assert [e.name for e in result.images] == ["anat"]
    [error] = result.failures
    assert isinstance(error, virtnii.SourceNotFound) and error.source == f"{server.url}/nope.nii"


def test_gzip_content_encoding_is_a_clear_error(http_root: tuple[Path, LocalHTTP], tmp_path: Path) -> None:
    """Servers that label .gz files ``Content-Encoding: gzip`` report no size and unzip ranges on the way:
    such a source cannot be indexed in place, and the error must say why and what to change."""
    root, server = http_root
    _serve(root)
    server.gzip_encoding = True
    result = virtnii.scan([f"{server.url}/anat.nii", f"{server.url}/bold.nii.gz"], str(tmp_path / "out"))
    assert [e.name for e in result.images] == ["anat"]
    [error] = result.failures
    assert isinstance(error, virtnii.SourceAccessError) and error.source == f"{server.url}/bold.nii.gz"
    assert "Content-Encoding" in str(error)


def test_server_ignoring_byte_ranges_is_refused_at_scan(http_root: tuple[Path, LocalHTTP], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen when a header read brings back more than asked for: a .nii over 16 KiB, a .nii.gz over the first
    compressed read (1 MiB; made 4 KiB here).  Smaller files are read whole anyway, and refused at the first
    voxel read (next test)."""
    monkeypatch.setattr(importlib.import_module("virtnii.scan"), "GZIP_FIRST_READ", 4096)
    root, server = http_root
    _serve(root)
    server.ranges = False
    result = virtnii.scan([f"{server.url}/anat.nii", f"{server.url}/bold.nii.gz"], str(tmp_path / "out"))
    assert result.manifest is None and not (tmp_path / "out").exists()
    assert sorted(e.source for e in result.failures) == [f"{server.url}/anat.nii", f"{server.url}/bold.nii.gz"]
    for error in result.failures:
        assert isinstance(error, virtnii.SourceAccessError) and "ignores byte ranges" in str(error)


@pytest.mark.parametrize("name", ["anat", "bold"])
def test_server_that_stops_honouring_ranges_is_named_at_read(http_root: tuple[Path, LocalHTTP], tmp_path: Path,
                                                               name: str) -> None:
    """A whole file where a chunk was asked for would be a reshape error or wrong voxels: it is refused."""
    root, server = http_root
    _serve(root)
    virtnii.scan([f"{server.url}/anat.nii", f"{server.url}/bold.nii.gz"], str(tmp_path / "out"))
    server.ranges = False
    with pytest.raises(virtnii.SourceAccessError, match=f"{name}.nii(.gz)?: asked for bytes .*ignores byte ranges"):
        virtnii.open(str(tmp_path / "out"))[name]["0"][...]


#: Retries that fail fast: the errors below are about what the server said, not about waiting.
QUICK_RETRY = {"retry": {"attempts": 2, "base_delay": 0.01}}


@pytest.mark.parametrize("status, error_class, words", [(403, virtnii.SourceAccessError, "permission denied"),
                                                        (500, virtnii.SourceUnavailable, "2 attempt(s) failed"),
                                                        (404, virtnii.SourceNotFound, "no such file")])
def test_http_errors_are_named_by_what_the_server_said(http_root: tuple[Path, LocalHTTP], tmp_path: Path,
                                                       status: int, error_class: type, words: str) -> None:
    """fsspec reports every failed HTTP request as FileNotFoundError; virtnii tells a 403 from a 404, and a 500
    (retried, then given up on) from both."""
    root, server = http_root
    _serve(root)
    server.fail["anat.nii"] = status
    [error] = virtnii.scan([f"{server.url}/anat.nii"], str(tmp_path / "out"), storage_options=QUICK_RETRY).failures
    assert type(error) is error_class and words in str(error) and error.source == f"{server.url}/anat.nii"


def test_unreachable_server_is_an_access_error_not_a_missing_file(tmp_path: Path) -> None:
    root = tmp_path / "www"
    root.mkdir()
    server = LocalHTTP(root)
    server.stop()  # nothing listens on its port any more
    [error] = virtnii.scan([f"{server.url}/anat.nii"], str(tmp_path / "out"), storage_options=QUICK_RETRY).failures
    assert type(error) is virtnii.SourceUnavailable and "Cannot connect" in str(error)


def test_http_refusal_at_read_time_is_not_a_missing_file(http_root: tuple[Path, LocalHTTP], tmp_path: Path) -> None:
    root, server = http_root
    _serve(root)
    virtnii.scan([f"{server.url}/anat.nii"], str(tmp_path / "out"))
    server.fail["anat.nii"] = 403
    with pytest.raises(virtnii.SourceAccessError, match="anat.nii: permission denied"):
        virtnii.open(str(tmp_path / "out"))["anat"]["0"][...]
    count, problems = virtnii.verify(str(tmp_path / "out"))
    assert count == 1 and [type(p) for p in problems] == [virtnii.SourceAccessError]


# ------------------------------------------------------------------------- extension-less and query-string URLs

#: Served without a suffix, as DANDI stores blobs (``blobs/<3 hex>/<3 hex>/<uuid>``): a .nii, a .nii.gz, and what
#: else sits behind such URLs — a PNG, an HTML page, a gzipped text file, the header of a pair.
BLOBS = {"d86/055/d86055f6-0dde-4f4b-aa6c-1c6d1ae2a0a6": "anatomical.nii",
         "4c1/e2b/4c1e2b9a-7f3d-4e8a-9b1c-6a5d2e8f0c11": "example4d.nii.gz"}
#: A presigned-style query with no secret in it: part of the address, kept in the references.
QUERY = "?X-Amz-Expires=300&response-content-type=x"


def _serve_blobs(root: Path) -> dict[str, Path]:
    for key, original in BLOBS.items():
        (root / "blobs" / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / original, root / "blobs" / key)
    return {key.rsplit("/", 1)[1]: DATA / original for key, original in BLOBS.items()}


def _assert_reads_like_nibabel(group: Any, name: str, original: Path) -> None:
    assert_same_voxels(group[name]["0"][...], file_to_zarr_order(nibabel_raw(original)))
    np.testing.assert_array_equal(virtnii.to_nibabel(group[name]).affine, nib.load(original).affine)


def test_extensionless_urls_are_told_by_their_first_bytes(http_root: tuple[Path, LocalHTTP], tmp_path: Path) -> None:
    """A .nii and a .nii.gz behind uuid URLs with a query are indexed as such, named by their uuid (never the
    query), read through references that keep the query; non-NIfTI blobs are reported by URL."""
    root, server = http_root
    originals = _serve_blobs(root)
    others = {"png": b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(400), "html": b"<!DOCTYPE html><html>Sign in</html>",
              "gzip-text": gzip.compress(b"subject,age\n" * 100),
              "pair": nib.Nifti1Pair(np.zeros((2, 2, 2), "u1"), np.eye(4)).header.binaryblock}
    for kind, blob in others.items():
        (root / "blobs" / kind).write_bytes(blob)
    shutil.copy(DATA / "anatomical.nii", root / "anat.nii")  # the same file by name: the same requests
    urls = [f"{server.url}/blobs/{key}{QUERY}" for key in BLOBS] + [f"{server.url}/blobs/{kind}" for kind in others]
    out = tmp_path / "out"
    result = virtnii.scan(urls + [f"{server.url}/anat.nii"], str(out))

    assert sorted(e.name for e in result.images) == sorted([*originals, "anat"])
    entries = {e.name: e for e in result.images}
    plain, gzipped = originals
    assert entries[plain].gzip_index is None and entries[gzipped].gzip_index
    assert all(entries[name].source.endswith(QUERY) for name in originals)
    assert f"{plain}{QUERY}" in (out / "refs.json").read_text()  # the plain file's chunks are read with the query
    key = next(iter(BLOBS))
    assert server.requests[f"blobs/{key}"] == server.requests["anat.nii"]  # the sniff is the header read
    group = virtnii.open(str(out))
    for name, original in originals.items():
        _assert_reads_like_nibabel(group, name, original)

    errors = {e.source.rsplit("/", 1)[1]: e for e in result.failures}
    assert sorted(errors) == sorted(others)
    assert all(isinstance(e, virtnii.InvalidNifti) and "not a NIfTI file" in str(e) for e in errors.values())
    assert "HTML" in str(errors["html"]) and "no NIfTI-1/NIfTI-2 magic" in str(errors["png"])
    assert "gzip-compressed, and inside it" in str(errors["gzip-text"]) and ".hdr" in str(errors["pair"])


def test_extensionless_urls_get_the_names_given(http_root: tuple[Path, LocalHTTP], tmp_path: Path) -> None:
    root, server = http_root
    originals = _serve_blobs(root)
    names = ["sub-01/anat/sub-01_T1w", "sub-01/func/sub-01_task-rest_bold"]
    urls = [f"{server.url}/blobs/{key}{QUERY}" for key in BLOBS]
    result = virtnii.scan(list(zip(names, urls)), str(tmp_path / "out"))
    assert not result.failures and sorted(e.name for e in result.images) == names
    group = virtnii.open(str(tmp_path / "out"))
    for name, original in zip(names, originals.values()):
        _assert_reads_like_nibabel(group, name, original)


def test_secrets_in_an_extensionless_urls_query_are_refused(http_root: tuple[Path, LocalHTTP],
                                                            tmp_path: Path) -> None:
    root, server = http_root
    originals = _serve_blobs(root)
    signed = f"{QUERY}&X-Amz-Signature=f00dfacefeedbeef"
    urls = [(name, f"{server.url}/blobs/{key}{signed}") for name, key in zip(["t1", "bold"], BLOBS)]
    result = virtnii.scan(urls, str(tmp_path / "out"))
    assert result.manifest is None and len(result.failures) == 2
    for error in result.failures:
        assert isinstance(error, virtnii.SourceAccessError) and "X-Amz-Signature" in str(error)
        assert "f00dface" not in str(error) and "--write-url-secrets" in str(error)

    result = virtnii.scan(urls, str(tmp_path / "out"), write_url_secrets=True)
    assert not result.failures and all(e.source.endswith(signed) for e in result.images)
    group = virtnii.open(str(tmp_path / "out"))
    for name, original in zip(["t1", "bold"], originals.values()):
        _assert_reads_like_nibabel(group, name, original)
