"""End to end over S3, the way a user indexes OpenNeuro: real nibabel files in a bucket, read through s3fs.

Sources sit at ``s3://<bucket>/ds/sub-01/anat/…`` on the local moto server (``conftest.py``); manifests are
written locally and to the bucket; every voxel and the affine are compared with nibabel reading the original
files.  Also checked: credentials never reach a manifest, and a source replaced after scanning is refused.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import fsspec
import nibabel as nib
import numpy as np
import pytest

import virtnii
import virtnii.layout
import virtnii.manifest
import virtnii.references
from conftest import LocalS3, clear_fsspec_caches

DATA = Path(nib.__file__).parent / "tests" / "data"

#: Group name → nibabel test file: big-endian int16 3D, int16 4D with scl_slope/inter, big-endian float32.
PLAIN = {
    "sub-01/anat/sub-01_T1w": "anatomical.nii",
    "sub-01/func/sub-01_task-rest_bold": "functional.nii",
    "sub-02/anat/sub-02_T1w": "reoriented_anat_moved.nii",
}
NAN_NAME = "sub-02/anat/sub-02_desc-masked_T1w"


def _nan_image(path: Path) -> Path:
    """``reoriented_anat_moved.nii`` (big-endian float32, which has no NaNs itself) with a NaN-masked corner.

    Masked float images (NaN outside the brain) are common in derivatives, and NaN != NaN makes a naive
    equality check pass or fail for the wrong reason.
    """
    img = nib.load(DATA / "reoriented_anat_moved.nii")
    data = np.asanyarray(img.dataobj).copy()
    data[:5, :, :4] = np.nan
    out = nib.Nifti1Image(data, img.affine, img.header)
    nib.save(out, path)
    assert nib.load(path).header.endianness == ">", "the NaN copy must stay big-endian"
    return path


@pytest.fixture
def dataset(s3: LocalS3, tmp_path: Path) -> dict[str, Any]:
    """A bucket holding a small BIDS-like dataset at ``ds/``; returns the bucket name and the local originals."""
    bucket = s3.create_bucket("openneuro")
    files = {name: DATA / file for name, file in PLAIN.items()}
    files[NAN_NAME] = _nan_image(tmp_path / "masked.nii")
    fs = s3.filesystem()
    for name, path in files.items():
        fs.put_file(str(path), f"{bucket}/ds/{name}.nii")
    fs.pipe_file(f"{bucket}/ds/dataset_description.json", b'{"Name": "test", "BIDSVersion": "1.10.0"}')
    return {"bucket": bucket, **files}


def _sources(dataset: dict[str, Any]) -> dict[str, Path]:
    return {name: path for name, path in dataset.items() if name != "bucket"}


def _assert_same_image(group: Any, name: str, original: Path) -> None:
    """Every raw voxel, the scaled data and the affine of ``group[name]`` equal nibabel's for ``original``."""
    expected = nib.load(original)
    raw = np.asanyarray(expected.dataobj.get_unscaled())
    array = group[name]["0"]
    # big-endian files stay big-endian in place: zarr 3 keeps the byte order in the bytes codec and decodes
    # to native order
    endian = {"<": "little", ">": "big"}.get(raw.dtype.byteorder, sys.byteorder)
    assert array.metadata.to_dict()["codecs"][0] == {"name": "bytes", "configuration": {"endian": endian}}
    level = array[:]
    np.testing.assert_array_equal(level, raw.T)  # zarr axes are [t, z, y, x]; NaNs compare equal here
    img = virtnii.to_nibabel(group[name])
    np.testing.assert_array_equal(np.asanyarray(img.dataobj.get_unscaled()), raw)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.asanyarray(expected.dataobj))
    np.testing.assert_array_equal(img.affine, expected.affine)


def _manifest_files(fs: Any, root: str) -> Iterator[tuple[str, bytes]]:
    for path in fs.find(root):
        yield path, fs.cat_file(path)


def _assert_no_secrets(s3: LocalS3, files: Iterator[tuple[str, bytes]]) -> None:
    secrets = [s3.storage_options["key"], s3.storage_options["secret"], s3.endpoint, s3.endpoint.split("//")[1]]
    seen = 0
    for path, content in files:
        seen += 1
        for secret in secrets:
            assert secret.encode() not in content, f"{secret!r} written into {path}"
    assert seen >= 2  # at least the index file and the references


def test_folder_url_scan_reads_every_voxel(s3: LocalS3, dataset: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "manifest"
    result = virtnii.scan(f"s3://{dataset['bucket']}/ds", str(out), storage_options=s3.storage_options)
    assert not result.failures
    sources = _sources(dataset)
    assert sorted(e.name for e in result.images) == sorted(sources)
    assert all(e.source.startswith(f"s3://{dataset['bucket']}/ds/sub-0") for e in result.images)
    assert all(e.fingerprint.get("etag") for e in result.images)  # S3 sources are fingerprinted by ETag
    group = virtnii.open(str(out), **s3.storage_options)
    assert sorted(group.group_keys()) == ["sub-01", "sub-02"]
    for name, original in sources.items():
        _assert_same_image(group, name, original)
    _assert_no_secrets(s3, ((str(p), p.read_bytes()) for p in out.rglob("*") if p.is_file()))


def test_explicit_urls_with_manifest_on_s3(s3: LocalS3, dataset: dict[str, Any]) -> None:
    bucket = dataset["bucket"]
    urls = [f"s3://{bucket}/ds/{name}.nii" for name in PLAIN]
    out = f"s3://{bucket}/manifests/ds-v1"
    result = virtnii.scan(urls, out, storage_options=s3.storage_options, manifest_options=s3.storage_options)
    assert not result.failures
    assert result.manifest == out
    group = virtnii.open(out, **s3.storage_options)  # manifest options default to the sources' (same protocol)
    # explicitly named files are named by their stems
    for name, file in PLAIN.items():
        _assert_same_image(group, name.rsplit("/", 1)[1], DATA / file)
    fs = s3.filesystem()
    assert not [p for p in fs.ls(f"{bucket}/manifests") if ".partial-" in p]  # the temporary folder is gone
    _assert_no_secrets(s3, _manifest_files(fs, f"{bucket}/manifests/ds-v1"))


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and everything behind it: causes, contexts and exception-group members."""
    todo, seen = [err], set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
        todo += list(getattr(e, "exceptions", ()))


def test_overwritten_source_raises_stale_source(s3: LocalS3, dataset: dict[str, Any], tmp_path: Path) -> None:
    bucket = dataset["bucket"]
    out = tmp_path / "manifest"
    assert not virtnii.scan(f"s3://{bucket}/ds", str(out), storage_options=s3.storage_options).failures
    name = "sub-01/anat/sub-01_T1w"
    url = f"s3://{bucket}/ds/{name}.nii"
    original = (DATA / PLAIN[name]).read_bytes()
    s3.filesystem().pipe_file(url, original[:-2] + b"\x7f\x7f")  # same size, other voxels: only the ETag differs
    group = virtnii.open(str(out), **s3.storage_options)
    _assert_same_image(group, "sub-02/anat/sub-02_T1w", dataset["sub-02/anat/sub-02_T1w"])  # others still read
    with pytest.raises(Exception) as caught:
        group[name]["0"][:]
    stale = [e for e in _chain(caught.value) if isinstance(e, virtnii.StaleSource)]
    assert stale, f"no StaleSource behind {caught.value!r}"
    assert stale[0].source == url
    assert "etag" in stale[0].problem
    assert isinstance(caught.value, virtnii.StaleSource), f"StaleSource surfaces wrapped: {caught.value!r}"


def test_deleted_source_raises_source_not_found(s3: LocalS3, dataset: dict[str, Any], tmp_path: Path) -> None:
    bucket = dataset["bucket"]
    out = tmp_path / "manifest"
    assert not virtnii.scan(f"s3://{bucket}/ds", str(out), storage_options=s3.storage_options).failures
    name = "sub-01/func/sub-01_task-rest_bold"
    s3.filesystem().rm_file(f"{bucket}/ds/{name}.nii")
    group = virtnii.open(str(out), **s3.storage_options)
    with pytest.raises(virtnii.SourceNotFound, match=f"s3://{bucket}/ds/{name}.nii"):
        group[name]["0"][:]


@pytest.mark.skipif(importlib.util.find_spec("virtnii.gzipfs") is None, reason="gzip layer not available")
def test_nii_gz_over_s3(s3: LocalS3, tmp_path: Path) -> None:
    bucket = s3.create_bucket("openneuro")
    original = DATA / "example4d.nii.gz"  # 4D int16 with header extensions
    url = f"s3://{bucket}/ds/sub-01/func/sub-01_task-rest_bold.nii.gz"
    s3.filesystem().put_file(str(original), url)
    out = f"s3://{bucket}/manifests/gz"
    result = virtnii.scan(f"s3://{bucket}/ds", out, storage_options=s3.storage_options,
                          manifest_options=s3.storage_options)
    assert not result.failures
    assert result.images[0].gzip_index
    group = virtnii.open(out, **s3.storage_options)
    _assert_same_image(group, "sub-01/func/sub-01_task-rest_bold", original)
    _assert_no_secrets(s3, _manifest_files(s3.filesystem(), f"{bucket}/manifests/gz"))


def _unreachable(s3: LocalS3) -> dict[str, Any]:
    """The same credentials, aimed at a port nobody listens on, with two quick attempts per request."""
    return {**s3.storage_options, "endpoint_url": "http://127.0.0.1:9", "retry": {"attempts": 2, "base_delay": 0.01}}


def test_unreachable_endpoint_is_a_clear_error_at_scan_and_at_read(s3: LocalS3, dataset: dict[str, Any],
                                                                   tmp_path: Path) -> None:
    """Network failures reach s3fs's callers as botocore errors, not OSError: they are SourceAccessErrors."""
    bucket = dataset["bucket"]
    result = virtnii.scan(f"s3://{bucket}/ds", str(tmp_path / "none"), storage_options=_unreachable(s3))
    [error] = result.failures
    assert type(error) is virtnii.SourceUnavailable and re.search("(Could not|Cannot) connect", str(error))
    assert result.manifest is None

    out = tmp_path / "manifest"
    assert not virtnii.scan(f"s3://{bucket}/ds", str(out), storage_options=s3.storage_options).failures
    group = virtnii.open(str(out), **_unreachable(s3))
    with pytest.raises(virtnii.SourceAccessError, match=f"s3://{bucket}/ds/sub-01/anat/sub-01_T1w.nii: .*connect"):
        group["sub-01/anat/sub-01_T1w"]["0"][:]


def test_unwritable_manifest_location_is_a_manifest_error(s3: LocalS3, dataset: dict[str, Any]) -> None:
    with pytest.raises(virtnii.ManifestError, match="cannot write the manifest here: Could not connect"):
        virtnii.scan(f"s3://{dataset['bucket']}/ds", "s3://elsewhere/manifest", storage_options=s3.storage_options,
                     manifest_options={**s3.storage_options, "endpoint_url": "http://127.0.0.1:9"})


def test_remote_sources_are_checked_once_per_interval(s3: LocalS3, dataset: dict[str, Any], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent chunk reads share one check, and reads within RECHECK_AFTER of it make no other."""
    bucket, name = dataset["bucket"], "sub-01/func/sub-01_task-rest_bold"
    out = tmp_path / "manifest"
    monkeypatch.setattr(virtnii.references, "plan", functools.partial(virtnii.layout.plan, target=4096, limit=8192))
    assert not virtnii.scan(f"s3://{bucket}/ds", str(out), storage_options=s3.storage_options).failures
    monkeypatch.undo()
    array = virtnii.open(str(out), **s3.storage_options)[name]["0"]
    assert array.nchunks > 1
    monkeypatch.setattr(virtnii.fingerprint, "RECHECK_AFTER", 3600.0)  # however slow this machine is
    s3.reset_counters()
    array[...]  # every chunk at once
    array[0]
    array[...]
    requests = s3.meter().requests
    assert requests.get("HEAD", 0) == 1, requests


def test_open_manifest_rechecks_remote_sources(s3: LocalS3, dataset: dict[str, Any], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A source overwritten while a manifest stays open is refused once its check is RECHECK_AFTER old."""
    from virtnii import fingerprint

    bucket, name = dataset["bucket"], "sub-01/anat/sub-01_T1w"
    out = tmp_path / "manifest"
    assert not virtnii.scan(f"s3://{bucket}/ds", str(out), storage_options=s3.storage_options).failures
    array = virtnii.open(str(out), **s3.storage_options)[name]["0"]
    array[0]
    # a listing made earlier with the same options (the same cached s3fs instance) must not answer the check
    fsspec.filesystem("s3", **s3.storage_options).ls(f"{bucket}/ds/sub-01/anat", detail=True)
    original = (DATA / PLAIN[name]).read_bytes()
    s3.filesystem().pipe_file(f"s3://{bucket}/ds/{name}.nii", original[:-2] + b"\x7f\x7f")
    monkeypatch.setattr(fingerprint, "RECHECK_AFTER", 0.0)
    with pytest.raises(virtnii.StaleSource, match="etag"):
        array[0]


def test_rescan_into_a_manifest_on_s3_replaces_it_index_last(s3: LocalS3, dataset: dict[str, Any],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Object stores cannot rename: new files are copied over the old ones, the index file last, then what only
    the old manifest had is deleted.  A copy failing before the index leaves a manifest that still opens and
    reads right (new references, old index file: never wrong voxels), until a rescan completes."""
    import s3fs

    bucket = dataset["bucket"]
    fs = s3.filesystem()
    fs.put_file(str(DATA / "example4d.nii.gz"), f"{bucket}/ds/sub-03/func/sub-03_bold.nii.gz")
    out, opts = f"s3://{bucket}/manifests/ds", s3.storage_options
    first = virtnii.scan(f"s3://{bucket}/ds", out, storage_options=opts, manifest_options=opts)
    old_sidecars = [f for f in fs.find(f"{bucket}/manifests/ds") if "/gzindex/" in f]
    assert len(old_sidecars) == 2 and len(first.images) == 5

    real_copy = s3fs.S3FileSystem._copy

    async def copy_but_not_the_index(self: Any, path1: Any, path2: Any, **kwargs: Any) -> Any:
        if any(str(p).endswith("/virtnii.json") for p in path1):
            raise OSError("connection reset")
        return await real_copy(self, path1, path2, **kwargs)

    urls = [f"s3://{bucket}/ds/{name}.nii" for name in PLAIN]  # a rescan of fewer files, no .nii.gz
    monkeypatch.setattr(s3fs.S3FileSystem, "_copy", copy_but_not_the_index)
    clear_fsspec_caches()  # new filesystem instances bind their sync methods to the patched coroutine
    with pytest.raises(virtnii.ManifestError, match="connection reset"):
        virtnii.scan(urls, out, storage_options=opts, manifest_options=opts)
    monkeypatch.undo()
    clear_fsspec_caches()
    assert sorted(e.name for e in virtnii.manifest.read_index(out, opts).images) == sorted(
        e.name for e in first.images)  # the old index file stayed
    group = virtnii.open(out, **opts)  # over the new references
    _assert_same_image(group, "sub-01_T1w", DATA / PLAIN["sub-01/anat/sub-01_T1w"])

    clear_fsspec_caches()
    second = virtnii.scan(urls, out, storage_options=opts, manifest_options=opts)
    assert sorted(e.name for e in second.images) == sorted(n.rsplit("/", 1)[1] for n in PLAIN)
    left = fs.find(f"{bucket}/manifests")
    assert not [f for f in left if "/gzindex/" in f or ".partial-" in f], left  # the old sidecars are gone
    group = virtnii.open(out, **opts)
    _assert_same_image(group, "sub-01_T1w", DATA / PLAIN["sub-01/anat/sub-01_T1w"])


def test_pyramid_of_a_manifest_on_s3_and_levels_written_to_s3(s3: LocalS3, dataset: dict[str, Any],
                                                                tmp_path: Path) -> None:
    """Levels inside a manifest on the bucket (references relative to it), and levels sent to the bucket from
    a local manifest (--out, references by s3:// URL): both read back equal to a local build."""
    from virtnii.pyramid import build_pyramids

    bucket, opts = dataset["bucket"], s3.storage_options
    name = "sub-01/anat/sub-01_T1w"
    local = tmp_path / "local"
    virtnii.scan([str(dataset[name])], str(local))
    build_pyramids(str(local), chunks=8)
    expected = virtnii.open(str(local))["anatomical"]  # the same file, named after its local copy

    remote = f"s3://{bucket}/manifests/pyr"
    virtnii.scan(f"s3://{bucket}/ds/sub-01/anat", remote, storage_options=opts, manifest_options=opts)
    result = build_pyramids(remote, chunks=8, **opts)
    assert result.built == ["sub-01_T1w"] and result.images[0].pyramid.store.startswith("levels/")
    files = list(_manifest_files(s3.filesystem(), f"{bucket}/manifests/pyr"))
    assert any("/levels/" in path and path.endswith("virtnii-pyramid.json") for path, _ in files)
    _assert_no_secrets(s3, iter(files))

    sent = tmp_path / "sent"
    virtnii.scan(f"s3://{bucket}/ds/sub-01/anat", str(sent), storage_options=opts)
    out = build_pyramids(str(sent), chunks=8, out=f"s3://{bucket}/levels", out_options=opts, **opts)
    assert out.images[0].pyramid.store.startswith(f"s3://{bucket}/levels/")
    for group in (virtnii.open(remote, **opts)["sub-01_T1w"], virtnii.open(str(sent), **opts)["sub-01_T1w"]):
        for level in result.images[0].levels:
            np.testing.assert_array_equal(group[level.path][...], expected[level.path][...])


def test_extensionless_keys_are_told_by_content(s3: LocalS3, tmp_path: Path) -> None:
    """Blobs stored by uuid (as DANDI does), a .nii and a .nii.gz, given with and without names."""
    bucket = s3.create_bucket("dandi")
    blobs = {"blobs/d86/055/d86055f6-0dde-4f4b-aa6c-1c6d1ae2a0a6": DATA / "anatomical.nii",
             "blobs/4c1/e2b/4c1e2b9a-7f3d-4e8a-9b1c-6a5d2e8f0c11": DATA / "example4d.nii.gz"}
    fs = s3.filesystem()
    for key, original in blobs.items():
        fs.put_file(str(original), f"{bucket}/{key}")
    fs.pipe_file(f"{bucket}/blobs/0aa/0bb/notes", b"not an image\n" * 40)
    plain, gzipped = (f"s3://{bucket}/{key}" for key in blobs)
    out = tmp_path / "out"
    result = virtnii.scan([("sub-01/anat/sub-01_T1w", plain), gzipped, f"s3://{bucket}/blobs/0aa/0bb/notes"],
                          str(out), storage_options=s3.storage_options)
    uuid = gzipped.rsplit("/", 1)[1]
    assert sorted(e.name for e in result.images) == sorted(["sub-01/anat/sub-01_T1w", uuid])
    entries = {e.name: e for e in result.images}
    assert entries["sub-01/anat/sub-01_T1w"].gzip_index is None and entries[uuid].gzip_index
    [error] = result.failures
    assert isinstance(error, virtnii.InvalidNifti) and error.source == f"s3://{bucket}/blobs/0aa/0bb/notes"
    group = virtnii.open(str(out), **s3.storage_options)
    for name, original in zip(["sub-01/anat/sub-01_T1w", uuid], blobs.values()):
        _assert_same_image(group, name, original)
    _assert_no_secrets(s3, ((str(p), p.read_bytes()) for p in out.rglob("*") if p.is_file()))

    # a folder listing still selects by suffix: the blobs are not sniffed
    [nothing] = virtnii.scan(f"s3://{bucket}/blobs", str(tmp_path / "listed"),
                             storage_options=s3.storage_options).failures
    assert isinstance(nothing, virtnii.SourceNotFound) and "folder holds no NIfTI files" in str(nothing)


@pytest.mark.parametrize("key", ["sub-01/../../../../../../../{escape}/x.nii.gz", "sub-01/./anat//x.nii.gz",
                                 "sub-01/__zarr/x.nii.gz"])
def test_keys_that_would_name_files_outside_the_manifest_are_refused(s3: LocalS3, tmp_path: Path, key: str) -> None:
    """An S3 key is any string: one with ``..`` segments must not become a group name, or its gzip sidecar
    would be written outside the manifest (scan) — it is reported (scan and index), nothing is written outside
    OUT, and the other images are indexed; so are keys with ``.``, empty or Zarr-reserved parts."""
    bucket = s3.create_bucket("keys")
    escape = tmp_path / "escaped"
    fs = s3.filesystem()
    fs.put_file(str(DATA / "example4d.nii.gz"), f"{bucket}/ds/{key.format(escape=str(escape).lstrip('/'))}")
    fs.put_file(str(DATA / "anatomical.nii"), f"{bucket}/ds/sub-02/anat/sub-02_T1w.nii")
    fs.pipe_file(f"{bucket}/ds/dataset_description.json", b'{"Name": "keys", "BIDSVersion": "1.10.0"}')
    result = virtnii.scan(f"s3://{bucket}/ds", str(tmp_path / "out"), storage_options=s3.storage_options)
    assert [e.name for e in result.images] == ["sub-02/anat/sub-02_T1w"]
    [refused] = result.failures
    assert isinstance(refused, virtnii.ManifestError) and "not indexed" in str(refused), refused
    assert not escape.exists()
    _assert_same_image(virtnii.open(str(tmp_path / "out"), **s3.storage_options), "sub-02/anat/sub-02_T1w",
                       DATA / "anatomical.nii")
    report = virtnii.index(f"s3://{bucket}/ds", str(tmp_path / "index"), storage_options=s3.storage_options)
    assert [e.name for e in report.images] == ["sub-02/anat/sub-02_T1w"] and not escape.exists()
    assert [s["reason"] for s in report.skipped] == ["bad-name"], report.skipped
