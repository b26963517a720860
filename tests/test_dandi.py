"""DANDI sources (``dandi://…``) end to end against a fake archive on loopback (``fake_dandi.py``): its REST API,
and its blobs on the local S3 server, holding real NIfTI files (nibabel's and ones nibabel writes).

Scanned as one asset, a sub-path, a glob and a whole dandiset; read back bit for bit against nibabel; the
manifests name blob URLs only (nothing of the API); listings are paged and cost a bounded number of API
requests, however many assets there are; bad assets are reported by their ``dandi://`` names.
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np
import pytest

import virtnii
import virtnii.dandi
from bids2table import load_bids_metadata

from bids_samples import PLACEHOLDERS, build, image_names
from conftest import LocalS3
from fake_dandi import FakeDandi
from faults import FaultProxy
from nifti_samples import DATA, assert_same_voxels, file_to_zarr_order, nibabel_raw, voxels, write_nifti
from virtnii.cli import main

DANDISET = "000026"


def _pair(folder: Path) -> dict[str, bytes]:
    """A NIfTI-1 ``.hdr``/``.img`` pair written by nibabel (float32, big-endian)."""
    hdr = write_nifti(folder / "pair.hdr", voxels((6, 5, 4), ">f4", seed=3), endian=">")
    return {".hdr": hdr.read_bytes(), ".img": (folder / "pair.img").read_bytes()}


@pytest.fixture(scope="module")
def archive(s3_server: LocalS3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A dandiset with BIDS-shaped NIfTI assets (.nii, .nii.gz, NIfTI-2, slope/inter, a pair), sidecars, a Zarr,
    assets that only claim to be NIfTI, and one whose metadata lists only its download URL; published as
    0.230101.0000, then the draft gets one more image.  Returns the fake, and asset path → local original."""
    folder = tmp_path_factory.mktemp("dandi")
    pair = _pair(folder)
    originals = {
        "rawdata/sub-01/anat/sub-01_T1w.nii": DATA / "anatomical.nii",
        "rawdata/sub-01/func/sub-01_task-rest_bold.nii.gz": DATA / "example4d.nii.gz",
        "rawdata/sub-02/anat/sub-02_T1w.nii.gz": DATA / "example_nifti2.nii.gz",
        "rawdata/sub-02/func/sub-02_task-rest_bold.nii": DATA / "functional.nii",
        "rawdata/sub-010/anat/sub-010_T1w.nii": DATA / "reoriented_anat_moved.nii",
    }
    files = {path: original.read_bytes() for path, original in originals.items()}
    files.update({
        "dataset_description.json": b'{"Name": "fake", "BIDSVersion": "1.10.0"}',
        "rawdata/sub-01/anat/sub-01_T1w.json": b'{"EchoTime": 0.003}',
        "rawdata/sub-02/anat/sub-02_PD.hdr": pair[".hdr"],
        "rawdata/sub-02/anat/sub-02_PD.img": pair[".img"],
        "rawdata/sub-03/anat/sub-03_T1w.nii.gz": b"<html>Not the file you were looking for</html>",
        "rawdata/sub-03/anat/sub-03_T2w.nii": b"\x00" * 400,
    })
    originals["rawdata/sub-02/anat/sub-02_PD.hdr"] = folder / "pair.hdr"
    fake = FakeDandi(s3_server)
    try:
        fake.add(DANDISET, files)
        fake.add(DANDISET, {"rawdata/sub-04/anat/sub-04_T1w.nii.gz": (DATA / "standard.nii.gz").read_bytes()},
                 s3_in_metadata=False)
        originals["rawdata/sub-04/anat/sub-04_T1w.nii.gz"] = DATA / "standard.nii.gz"
        fake.add_zarr(DANDISET, "rawdata/sub-01/micr/sub-01_sample.ome.zarr")
        fake.publish(DANDISET, "0.230101.0000")
        fake.add(DANDISET, {"rawdata/sub-05/anat/sub-05_T1w.nii": (DATA / "anatomical.nii").read_bytes()})
        yield {"fake": fake, "originals": originals}
    finally:
        fake.stop()


@pytest.fixture
def fake(archive: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> FakeDandi:
    """The archive as the instance ``fake`` (``dandi://fake/…``), its request log emptied."""
    fake = archive["fake"]
    monkeypatch.setenv(virtnii.dandi.INSTANCES_VARIABLE, f"fake={fake.url}")
    fake.reset_requests()
    return fake


def _assert_reads_like_nibabel(out: Path, name: str, original: Path) -> None:
    img = virtnii.to_nibabel(virtnii.open(str(out))[name])
    assert_same_voxels(img.dataobj.get_unscaled(), nibabel_raw(original))
    np.testing.assert_array_equal(img.affine, nib.load(original).affine)
    assert_same_voxels(virtnii.open(str(out))[name]["0"][...], file_to_zarr_order(nibabel_raw(original)))


def _assert_blob_urls_only(out: Path, fake: FakeDandi, files: list[str] | None = None) -> None:
    """Every source the manifest names is a blob on the S3 server, and nothing names the API or dandi:// (in
    ``files``; default: anywhere in the manifest)."""
    index = json.loads((out / "virtnii.json").read_text())
    blobs = f"{fake.s3.endpoint}/{fake.bucket}/blobs/"
    named = [v for entry in index["images"] for k, v in entry.items() if k in ("source", "data") and v]
    assert named and all(url.startswith(blobs) and "?" not in url for url in named), named
    for path in [p for p in out.rglob("*") if p.is_file() and (files is None or p.name in files)]:
        text = path.read_text(errors="replace")
        assert f"{fake.url}/" not in text and "dandi://" not in text and "/api/" not in text, path


def test_one_asset_is_read_at_its_blob(fake: FakeDandi, archive: dict[str, Any], tmp_path: Path) -> None:
    path = "rawdata/sub-01/func/sub-01_task-rest_bold.nii.gz"
    result = virtnii.scan([f"dandi://fake/{DANDISET}@draft/{path}"], str(tmp_path / "out"))
    assert not result.failures, [str(f) for f in result.failures]
    assert [e.name for e in result.images] == ["sub-01_task-rest_bold"]
    assert fake.requests == [f"GET /api/dandisets/{DANDISET}/versions/draft/assets/?metadata=true&order=path"
                             f"&page_size=1000&path={path}"]
    _assert_reads_like_nibabel(tmp_path / "out", "sub-01_task-rest_bold", archive["originals"][path])
    _assert_blob_urls_only(tmp_path / "out", fake)
    assert fake.requests[1:] == []  # reading asked the API nothing


def test_a_sub_path_names_images_by_asset_path_and_reports_what_is_not_nifti(
        fake: FakeDandi, archive: dict[str, Any], tmp_path: Path) -> None:
    result = virtnii.scan([f"dandi://fake/{DANDISET}@draft/rawdata/"], str(tmp_path / "out"))
    images = {e.name for e in result.images}
    expected = {p[len("rawdata/"):].split(".")[0]: original for p, original in archive["originals"].items()}
    expected["sub-05/anat/sub-05_T1w"] = DATA / "anatomical.nii"  # only in the draft
    assert images == set(expected)
    for name, original in expected.items():
        _assert_reads_like_nibabel(tmp_path / "out", name, original)
    errors = {f.source: f for f in result.failures}
    root = f"dandi://fake/{DANDISET}@draft/rawdata"
    assert set(errors) == {f"{root}/sub-03/anat/sub-03_T1w.nii.gz", f"{root}/sub-03/anat/sub-03_T2w.nii"}
    assert isinstance(errors[f"{root}/sub-03/anat/sub-03_T1w.nii.gz"], virtnii.InvalidGzip)
    assert isinstance(errors[f"{root}/sub-03/anat/sub-03_T2w.nii"], virtnii.InvalidNifti)
    assert all(f"its bytes: {fake.s3.endpoint}/{fake.bucket}/blobs/" in f.problem for f in result.failures)
    _assert_blob_urls_only(tmp_path / "out", fake)
    listings = [r for r in fake.requests if "/assets/?" in r]
    assert len(listings) == 1 and len(fake.requests) == 2  # one listing, one redirect (sub-04: no S3 URL)


def test_a_whole_dandiset_is_listed_in_pages_with_a_bounded_number_of_requests(
        fake: FakeDandi, archive: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Without a version the most recent published one is scanned (not the draft's sub-05); with three assets
    a page, its 13 assets take 5 pages, requested after the first page's count two at a time (the progress bar
    says how many are listed before each round), and nothing more per asset but the one redirect of the asset
    whose metadata names no S3 URL."""
    monkeypatch.setattr(virtnii.dandi, "PAGE_SIZE", 3)
    monkeypatch.setattr(virtnii.dandi, "REQUESTS_AT_ONCE", 2)
    result = virtnii.scan([f"dandi://fake/{DANDISET}"], str(tmp_path / "out"), progress=True)
    published = fake.dandisets[DANDISET].versions["0.230101.0000"]
    err = capsys.readouterr().err
    assert f"3/{len(published)} assets listed" in err and f"9/{len(published)} assets listed" in err  # per round
    assert {e.name for e in result.images} == {p.split(".")[0] for p in archive["originals"]}
    assert len(result.failures) == 2
    assets = len(published)
    pages = [r for r in fake.requests if "/versions/0.230101.0000/assets/?" in r]
    assert len(pages) == math.ceil(assets / 3) == 5
    assert sorted(r.split("page=")[1].split("&")[0] for r in pages[1:]) == ["2", "3", "4", "5"]
    redirects = [r for r in fake.requests if r.endswith("/download/")]
    assert len(redirects) == 1
    assert len(fake.requests) == 1 + len(pages) + len(redirects)  # + the dandiset record (its versions)
    assert len(fake.requests) / assets < 0.6
    _assert_blob_urls_only(tmp_path / "out", fake)
    for name, original in [(p.split(".")[0], o) for p, o in archive["originals"].items()]:
        _assert_reads_like_nibabel(tmp_path / "out", name, original)


def test_pages_without_a_count_are_followed_one_after_the_other(
        fake: FakeDandi, archive: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(virtnii.dandi, "PAGE_SIZE", 4)
    monkeypatch.setattr(fake, "counts", False)
    result = virtnii.scan([f"dandi://fake/{DANDISET}@draft/rawdata"], str(tmp_path / "out"))
    assert len(result.images) == len(archive["originals"]) + 1  # sub-05 is in the draft
    pages = [r for r in fake.requests if "/assets/?" in r]
    assert len(pages) == math.ceil(len([p for p in fake.dandisets[DANDISET].versions["draft"]
                                        if p.startswith("rawdata/")]) / 4) > 2
    assert all("page=" in r for r in pages[1:])


def test_an_instance_capping_pages_lower_is_listed_whole(
        fake: FakeDandi, archive: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages are as long as the server makes them, not as long as asked: asked for 3, given 2, every asset of
    the version is still listed (the pages to ask for come from the first page's length)."""
    monkeypatch.setattr(virtnii.dandi, "PAGE_SIZE", 3)
    monkeypatch.setattr(fake, "max_page_size", 2)
    result = virtnii.scan([f"dandi://fake/{DANDISET}"], str(tmp_path / "out"))
    assert {e.name for e in result.images} == {p.split(".")[0] for p in archive["originals"]}
    published = fake.dandisets[DANDISET].versions["0.230101.0000"]
    pages = [r for r in fake.requests if "/versions/0.230101.0000/assets/?" in r]
    assert len(pages) == math.ceil(len(published) / 2)


def test_a_listing_short_of_its_count_is_an_error_not_a_partial_manifest(
        fake: FakeDandi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fake, "miscount", 1)
    result = virtnii.scan([f"dandi://fake/{DANDISET}"], str(tmp_path / "out"))
    [failure] = result.failures
    assert not result.images and isinstance(failure, virtnii.SourceAccessError)
    assert "where it counted" in str(failure) and "try again" in str(failure)


def test_dandi_and_other_sources_mix_in_one_scan(fake: FakeDandi, tmp_path: Path) -> None:
    result = virtnii.scan([f"dandi://fake/{DANDISET}@draft/rawdata/sub-01/anat/sub-01_T1w.nii",
                           str(DATA / "functional.nii")], str(tmp_path / "out"))
    assert not result.failures and {e.name for e in result.images} == {"sub-01_T1w", "functional"}
    _assert_reads_like_nibabel(tmp_path / "out", "functional", DATA / "functional.nii")
    _assert_reads_like_nibabel(tmp_path / "out", "sub-01_T1w", DATA / "anatomical.nii")
    # the same name found twice: both named by their paths, the asset's without its dandi://
    local = tmp_path / "sub-01_T1w.nii"
    local.write_bytes((DATA / "functional.nii").read_bytes())
    result = virtnii.scan([f"dandi://fake/{DANDISET}@draft/rawdata/sub-01/anat/sub-01_T1w.nii", str(local)],
                          str(tmp_path / "out2"))
    names = {e.name: e for e in result.images}
    asset = f"fake/{DANDISET}@draft/rawdata/sub-01/anat/sub-01_T1w"
    assert asset in names and len(names) == 2 and not any("//" in n or ":" in n for n in names)
    _assert_reads_like_nibabel(tmp_path / "out2", asset, DATA / "anatomical.nii")


def test_a_glob_selects_assets_below_its_fixed_folder(fake: FakeDandi, archive: dict[str, Any],
                                                      tmp_path: Path) -> None:
    result = virtnii.scan([f"dandi://fake/{DANDISET}@0.230101.0000/rawdata/sub-0?/anat/*_T1w.nii*"],
                          str(tmp_path / "out"))
    assert {e.name for e in result.images} == {"sub-01/anat/sub-01_T1w", "sub-02/anat/sub-02_T1w",
                                               "sub-04/anat/sub-04_T1w"}
    [error] = result.failures
    assert error.source.endswith("/rawdata/sub-03/anat/sub-03_T1w.nii.gz")
    assert [r for r in fake.requests if "/assets/?" in r][0].endswith("path=rawdata/")


def test_a_folder_prefix_is_a_folder_not_a_prefix(fake: FakeDandi, archive: dict[str, Any], tmp_path: Path) -> None:
    """The API matches ``path`` as a case-insensitive prefix: ``sub-01`` must not bring in ``sub-010``, nor
    ``SUB-01`` anything."""
    result = virtnii.scan([f"dandi://fake/{DANDISET}@draft/rawdata/sub-01"], str(tmp_path / "out"))
    assert {e.name for e in result.images} == {"anat/sub-01_T1w", "func/sub-01_task-rest_bold"}
    result = virtnii.scan([f"dandi://fake/{DANDISET}@draft/rawdata/SUB-01"], str(tmp_path / "out2"))
    [error] = result.failures
    assert isinstance(error, virtnii.SourceNotFound) and "no asset or folder 'rawdata/SUB-01'" in error.problem


def test_a_pair_given_by_its_hdr_brings_its_img(fake: FakeDandi, archive: dict[str, Any], tmp_path: Path) -> None:
    path = "rawdata/sub-02/anat/sub-02_PD.hdr"
    result = virtnii.scan([("pd", f"dandi://fake/{DANDISET}@draft/{path}")], str(tmp_path / "out"))
    assert not result.failures and [e.name for e in result.images] == ["pd"]
    [entry] = result.images
    assert entry.source != entry.data and entry.data.startswith(f"{fake.s3.endpoint}/{fake.bucket}/blobs/")
    _assert_reads_like_nibabel(tmp_path / "out", "pd", archive["originals"][path])


def test_a_blob_changed_after_the_scan_is_stale(fake: FakeDandi, archive: dict[str, Any], tmp_path: Path) -> None:
    """The fingerprint is the listing's size and ``dandi:dandi-etag``, which is the blob's S3 ETag."""
    path = "rawdata/sub-05/anat/sub-05_T1w.nii"
    virtnii.scan([f"dandi://fake/{DANDISET}@draft/{path}"], str(tmp_path / "out"))
    blob = fake.dandisets[DANDISET].versions["draft"][path]
    original = (DATA / "anatomical.nii").read_bytes()
    changed = bytearray(original)
    changed[-1] ^= 0xFF  # same size, other bytes
    key = blob.blob_url.split(f"{fake.s3.endpoint}/", 1)[1]
    fake.s3.filesystem().pipe_file(key, bytes(changed))
    try:
        with pytest.raises(virtnii.StaleSource, match="etag"):
            virtnii.open(str(tmp_path / "out"))["sub-05_T1w"]["0"][...]
    finally:  # the archive is shared by this module's tests (same bytes: same ETag again)
        fake.s3.filesystem().pipe_file(key, original)


@pytest.mark.parametrize("url, error, problem", [
    ("dandi://nowhere/000026/x.nii", virtnii.SourceAccessError, "unknown DANDI instance 'nowhere'"),
    ("dandi://fake/000026@latest/x.nii", virtnii.SourceAccessError, "'latest' is not a dandiset version"),
    ("dandi://fake/26/x.nii", virtnii.SourceAccessError, "is not a DANDI URL"),
    ("dandi://fake/999999/rawdata/", virtnii.SourceNotFound, "no such dandiset or version (HTTP 404"),
    ("dandi://fake/000026@9.9.9/rawdata/", virtnii.SourceNotFound, "no such dandiset or version (HTTP 404"),
    ("dandi://fake/000026@draft/rawdata/sub-01/micr/sub-01_sample.ome.zarr", virtnii.SourceAccessError,
     "is a Zarr asset"),
    ("dandi://fake/000026@draft/rawdata/sub-02/anat/sub-02_PD.img", virtnii.InvalidNifti, "give its .hdr"),
    ("dandi://fake/000026@draft/rawdata/sub-01/micr/", virtnii.SourceNotFound, "the folder holds no NIfTI"),
])
def test_bad_dandi_sources_are_reported_by_url(fake: FakeDandi, tmp_path: Path, url: str, error: type,
                                               problem: str) -> None:
    result = virtnii.scan([url], str(tmp_path / "out"))
    assert result.manifest is None
    [failure] = result.failures
    assert type(failure) is error and failure.source == url and problem in failure.problem, str(failure)


def test_instances_come_from_the_environment(fake: FakeDandi, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(virtnii.dandi.INSTANCES_VARIABLE, f"Lab={fake.url}/, dandi={fake.url}")
    assert virtnii.dandi.parse("dandi://lab/000026").api == virtnii.dandi.parse("dandi://DANDI/000026").api == fake.url
    monkeypatch.setenv(virtnii.dandi.INSTANCES_VARIABLE, "lab")
    [failure] = virtnii.scan(["dandi://lab/000026"], str(tmp_path / "out")).failures
    assert failure.source == f"{virtnii.dandi.INSTANCES_VARIABLE}=lab" and "NAME=API_URL" in failure.problem


def test_a_name_for_a_folder_is_refused(fake: FakeDandi, tmp_path: Path) -> None:
    with pytest.raises(virtnii.ManifestError, match="names one file"):
        virtnii.scan([("t1", f"dandi://fake/{DANDISET}@draft/rawdata/")], str(tmp_path / "out"))


def test_cli_scans_a_dandi_url_and_reports_bad_assets(fake: FakeDandi, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code = main(["scan", f"dandi://fake/{DANDISET}@draft/rawdata/sub-03/", f"t1=dandi://fake/{DANDISET}@draft/"
                 "rawdata/sub-01/anat/sub-01_T1w.nii", "-o", str(out), "-q"])
    assert code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(f"dandi://fake/{DANDISET}@draft/rawdata/sub-03/anat/" in line for line in lines)
    assert [e["name"] for e in json.loads((out / "virtnii.json").read_text())["images"]] == ["t1"]


def test_dandifs_reads_the_fake_archive_as_virtnii_does(fake: FakeDandi, archive: dict[str, Any]) -> None:
    """An independent client, dandifs, finds the same blobs and bytes behind the fake API: it is a DANDI API
    as far as a third party can tell."""
    dandifs = pytest.importorskip("dandifs")
    fs = dandifs.DandiFileSystem(DANDISET, "draft", instance=fake.url, skip_instance_cache=True)
    path = "rawdata/sub-01/anat/sub-01_T1w.nii"
    blob = fake.dandisets[DANDISET].versions["draft"][path].blob_url
    assert fs.s3_url(path) == blob
    assert fs.cat_file(path, start=0, end=348) == (DATA / "anatomical.nii").read_bytes()[:348]
    assert fs.info(path)["size"] == (DATA / "anatomical.nii").stat().st_size


def test_a_bids_dandiset_is_indexed_like_its_local_copy(fake: FakeDandi, tmp_path: Path) -> None:
    """``virtnii index dandi://…``: the BIDS tree of test_bids.py as a dandiset gives the images, entities,
    inherited sidecars and skip reasons of the local tree, names blob URLs only, and an unchanged re-run is
    one listing request."""
    dataset = build(tmp_path / "ds")
    (dataset / "sub-04" / "anat").mkdir(parents=True)
    write_nifti(dataset / "sub-04" / "anat" / "sub-04_T2w.hdr", voxels((5, 4, 3), "<i2", seed=5))  # a pair
    expected = {**image_names(), "sub-04/anat/sub-04_T2w": "sub-04/anat/sub-04_T2w.hdr"}
    files = {str(p.relative_to(dataset)): p.read_bytes() for p in dataset.rglob("*")
             if p.is_file() and not p.is_symlink()}
    fake.add("000027", files)
    fake.reset_requests()
    out = tmp_path / "out"
    result = virtnii.index("dandi://fake/000027@draft/", str(out), derivatives=True)
    assert sorted(e.name for e in result.images) == sorted(expected)
    assert {s["reason"] for s in result.skipped} == set(PLACEHOLDERS.values()) - {"broken-symlink"}
    assert all(s["source"].startswith("dandi://fake/000027@draft/") for s in result.skipped)
    group = virtnii.open(str(out))
    for name, relative in expected.items():
        assert_same_voxels(group[name]["0"][...], file_to_zarr_order(nibabel_raw(dataset / relative)))
        assert group[name].attrs["bids"]["path"] == relative
        assert group[name].attrs["bids"]["metadata"] == load_bids_metadata(dataset / relative)
    # the job's settings and the report name the dataset by its dandi:// URL; the references name blobs only
    _assert_blob_urls_only(out, fake, files=[json.loads((out / "virtnii.json").read_text())["references"]])
    assert len([r for r in fake.requests if "/assets/?" in r]) == 1 and not fake.requests[1:]
    fake.reset_requests()
    again = virtnii.index("dandi://fake/000027@draft/", str(out), derivatives=True)
    assert again.report.indexed == 0 and len(fake.requests) == 1


@pytest.fixture
def faulty_api(fake: FakeDandi, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """The fake archive's API behind a fault proxy, as the instance ``faulty`` (its blobs on S3 are not)."""
    proxy = FaultProxy(fake.url.removesuffix("/api"), rate=0.3, stall=3.0)
    monkeypatch.setenv(virtnii.dandi.INSTANCES_VARIABLE, f"fake={fake.url},faulty={proxy.url}/api")
    try:
        yield proxy
    finally:
        proxy.stop()


#: Retries quick enough for tests: a stalled API request is given up after a second, any request after 30 s.
_QUICK_RETRY = {"retry": {"attempts": 4, "base_delay": 0.01, "max_delay": 0.05, "timeout": 1.0, "deadline": 30.0}}


def test_api_requests_failing_transiently_are_retried(
        faulty_api: FaultProxy, fake: FakeDandi, archive: dict[str, Any], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A 30 % share of the API's answers reset, stall, truncate or are 429/500/503 (never more than twice in a
    row): the dandiset record and the pages are retried, so the scan finds what a fault-free one finds and reads
    it bit for bit."""
    monkeypatch.setattr(virtnii.dandi, "PAGE_SIZE", 3)
    clean = virtnii.scan([f"dandi://fake/{DANDISET}"], str(tmp_path / "clean"), storage_options=_QUICK_RETRY)
    result = virtnii.scan([f"dandi://faulty/{DANDISET}"], str(tmp_path / "out"), storage_options=_QUICK_RETRY)
    assert sum(faulty_api.injected.values()) > 0, "no fault injected: the test proves nothing"
    assert {e.name for e in result.images} == {e.name for e in clean.images}
    assert sorted(str(f).replace("dandi://faulty/", "dandi://fake/") for f in result.failures) == \
        sorted(map(str, clean.failures))
    for name, original in [(p.split(".")[0], o) for p, o in archive["originals"].items()]:
        _assert_reads_like_nibabel(tmp_path / "out", name, original)


def test_an_api_that_stays_down_is_reported_with_its_attempts(faulty_api: FaultProxy, tmp_path: Path) -> None:
    faulty_api.fail[f"/api/dandisets/{DANDISET}/"] = 503
    result = virtnii.scan([f"dandi://faulty/{DANDISET}"], str(tmp_path / "out"), storage_options=_QUICK_RETRY)
    assert not result.images
    [failure] = result.failures
    assert isinstance(failure, virtnii.SourceUnavailable)
    assert re.search(r"4 attempt\(s\).*HTTP 503", str(failure)), failure
    assert faulty_api.requests[f"/api/dandisets/{DANDISET}/"] == 4


def test_download_redirects_failing_transiently_are_retried(faulty_api: FaultProxy, fake: FakeDandi,
                                                            archive: dict[str, Any]) -> None:
    """An asset listed with only its API download URL is resolved by one redirect, retried like any request:
    through a proxy failing every request for it twice running (a reset, a 503) it resolves at the third attempt,
    and a redirect that stays 503 is given up after exactly its attempts."""
    policy = virtnii.RetryPolicy(**_QUICK_RETRY["retry"])
    api = virtnii.dandi.DandiAPI(f"{faulty_api.url}/api", policy)
    listed = api.assets(DANDISET, "draft", "rawdata/sub-04/", "dandi://faulty/")
    [asset] = [a for a in listed.values() if a.path.endswith("sub-04_T1w.nii.gz")]
    assert asset.blob_url is None and asset.download_url.startswith(fake.url)
    asset.download_url = asset.download_url.replace(fake.url, f"{faulty_api.url}/api")
    faulty_api.reset_counters()
    faulty_api.rate, faulty_api.kinds = 1.0, ("reset", 503)
    assert api.resolve_downloads([asset]) == [None]
    download = urllib.parse.urlsplit(asset.download_url).path
    assert faulty_api.requests[download] == 3 and sum(faulty_api.injected.values()) == 2
    assert asset.blob_url == fake.dandisets[DANDISET].versions["draft"][asset.path].blob_url  # no presigned query
    faulty_api.reset_counters()
    faulty_api.fail[download] = 503
    asset.blob_url = None
    [failure] = api.resolve_downloads([asset])
    assert isinstance(failure, virtnii.SourceUnavailable) and "4 attempt(s)" in str(failure), failure
    assert faulty_api.requests[download] == 4 and asset.blob_url is None


def test_an_asset_pointing_at_a_local_file_is_not_read() -> None:
    """A listing (an instance is any server named in the environment) whose asset's content URL is ``file://``
    must not make the scan read the scanning machine's files: only HTTP(S) and S3 blobs are taken."""
    record = {"path": "sub-01/anat/sub-01_T1w.nii.gz", "size": 10, "metadata": {
        "contentUrl": ["https://api.example/api/assets/a/download/", "file:///etc/passwd"], "digest": {}}}
    asset = virtnii.dandi._asset(record)
    assert asset.blob_url is None and asset.download_url == "https://api.example/api/assets/a/download/"
    record["metadata"]["contentUrl"].append("https://bucket.example/blobs/a")
    assert virtnii.dandi._asset(record).blob_url == "https://bucket.example/blobs/a"
