"""Pinned object versions on the local S3 server: a manifest of a versioned bucket keeps reading what it indexed.

OpenNeuro's bucket is versioned and datasets get new snapshots; these tests overwrite real NIfTI objects with
other real NIfTI data and check that a pinned manifest still returns the original voxels bit-exact (level 0
straight from the ``.nii``, and through the gzip index for a ``.nii.gz``), that an unpinned one raises
``StaleSource`` as before, that a deleted version is a clear error, and that ``virtnii index`` records versions
from its one listing and re-reads only the object that got a new version.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

import virtnii
from conftest import LocalS3, clear_fsspec_caches
from virtnii import versions
from virtnii.errors import SourceAccessError
from virtnii.sources import list_versions

DATA = Path(nib.__file__).parent / "tests" / "data"
#: What each object holds when indexed, and the other image that overwrites it afterwards.
ORIGINAL = {"sub-01_T1w.nii": "anatomical.nii", "sub-01_bold.nii.gz": "example4d.nii.gz"}
REPLACEMENT = {"sub-01_T1w.nii": "functional.nii", "sub-01_bold.nii.gz": "example_nifti2.nii.gz"}


def _versioned_bucket(s3: LocalS3) -> str:
    bucket = s3.create_bucket("openneuro")
    s3.filesystem().call_s3("put_bucket_versioning", Bucket=bucket,
                            VersioningConfiguration={"Status": "Enabled"})
    return bucket


def _put(s3: LocalS3, bucket: str, files: dict[str, str], folder: str = "ds/sub-01/anat") -> None:
    fs = s3.filesystem()
    for key, file in files.items():
        fs.put_file(str(DATA / file), f"{bucket}/{folder}/{key}")
    clear_fsspec_caches()  # listings cached by another instance must not hide the new objects


def _raw(file: str) -> np.ndarray:
    """nibabel's raw voxels of a test file, in zarr's axis order."""
    return np.asanyarray(nib.load(DATA / file).dataobj.get_unscaled()).T


def _group_name(key: str) -> str:
    return "sub-01/anat/" + key.split(".", 1)[0]


@pytest.fixture
def pinned(s3: LocalS3, tmp_path: Path) -> dict[str, Any]:
    """A versioned bucket with a .nii and a .nii.gz, scanned with the default (pinning) and with pinning off,
    then both objects overwritten with other images."""
    bucket = _versioned_bucket(s3)
    _put(s3, bucket, ORIGINAL)
    manifests = {}
    for pin in (None, False):
        out = tmp_path / f"manifest-{pin}"
        result = virtnii.scan(f"s3://{bucket}/ds", str(out), storage_options=s3.storage_options, pin_versions=pin)
        assert not result.failures
        manifests[pin] = (out, result)
    _put(s3, bucket, REPLACEMENT)
    return {"bucket": bucket, "manifests": manifests}


def test_scan_records_each_object_version_by_default(s3: LocalS3, pinned: dict[str, Any]) -> None:
    fs = s3.filesystem(version_aware=True)
    _, result = pinned["manifests"][None]
    for entry in result.images:
        key = entry.source.split("/anat/", 1)[1]
        history = fs.object_version_info(f"{pinned['bucket']}/ds/sub-01/anat/{key}")
        indexed = [v["VersionId"] for v in history if not v["IsLatest"]]  # overwritten since
        assert entry.fingerprint[versions.VERSION] == indexed[0]
        assert entry.fingerprint["size"] == (DATA / ORIGINAL[key]).stat().st_size
    _, unpinned = pinned["manifests"][False]
    assert all(versions.VERSION not in entry.fingerprint for entry in unpinned.images)


@pytest.mark.parametrize("key", sorted(ORIGINAL))
def test_pinned_manifest_reads_the_indexed_voxels_after_an_overwrite(s3: LocalS3, pinned: dict[str, Any],
                                                                    key: str) -> None:
    out, _ = pinned["manifests"][None]
    group = virtnii.open(str(out), **s3.storage_options)
    image = group[_group_name(key)]
    np.testing.assert_array_equal(image["0"][:], _raw(ORIGINAL[key]))  # .nii.gz: through the gzip index
    expected = nib.load(DATA / ORIGINAL[key])
    np.testing.assert_array_equal(np.asanyarray(virtnii.to_nibabel(image).dataobj), np.asanyarray(expected.dataobj))
    checked, problems = virtnii.verify(str(out), content=True, **s3.storage_options)
    assert checked == 2
    assert not [p for p in problems if not p.problem.startswith("no content hash")]  # the .nii has no hash


def test_unpinned_manifest_raises_stale_source_after_an_overwrite(s3: LocalS3, pinned: dict[str, Any]) -> None:
    out, _ = pinned["manifests"][False]
    group = virtnii.open(str(out), **s3.storage_options)
    for key in ORIGINAL:
        with pytest.raises(virtnii.StaleSource, match=f"s3://{pinned['bucket']}/ds/sub-01/anat/{key}"):
            group[_group_name(key)]["0"][:]


def test_pinned_export_is_the_original_file(s3: LocalS3, pinned: dict[str, Any], tmp_path: Path) -> None:
    out, _ = pinned["manifests"][None]
    exported = virtnii.export(str(out), str(tmp_path / "t1.nii"), "sub-01/anat/sub-01_T1w", **s3.storage_options)
    assert Path(exported).read_bytes() == (DATA / ORIGINAL["sub-01_T1w.nii"]).read_bytes()


def test_deleted_pinned_version_names_the_source_and_version(s3: LocalS3, pinned: dict[str, Any]) -> None:
    out, result = pinned["manifests"][None]
    entry = next(e for e in result.images if e.name == "sub-01/anat/sub-01_bold")
    version = entry.fingerprint[versions.VERSION]
    s3.filesystem().call_s3("delete_object", Bucket=pinned["bucket"], Key="ds/sub-01/anat/sub-01_bold.nii.gz",
                            VersionId=version)
    clear_fsspec_caches()
    group = virtnii.open(str(out), **s3.storage_options)
    with pytest.raises(virtnii.SourceNotFound, match=f"sub-01_bold.nii.gz: was indexed at version {version}, "
                                                     "which no longer exists"):
        group["sub-01/anat/sub-01_bold"]["0"][:]
    np.testing.assert_array_equal(group["sub-01/anat/sub-01_T1w"]["0"][:], _raw(ORIGINAL["sub-01_T1w.nii"]))
    _, problems = virtnii.verify(str(out), **s3.storage_options)
    assert [type(p) for p in problems] == [virtnii.SourceNotFound]
    assert version in problems[0].problem


def test_unversioned_bucket_pins_nothing_by_default_and_refuses_explicit_pinning(s3: LocalS3,
                                                                                 tmp_path: Path) -> None:
    bucket = s3.create_bucket("plain")
    _put(s3, bucket, ORIGINAL)
    result = virtnii.scan(f"s3://{bucket}/ds", str(tmp_path / "default"), storage_options=s3.storage_options)
    assert not result.failures
    assert all(versions.VERSION not in e.fingerprint for e in result.images)
    explicit = virtnii.scan(f"s3://{bucket}/ds", str(tmp_path / "explicit"), storage_options=s3.storage_options,
                            pin_versions=True)
    assert explicit.manifest is None and not (tmp_path / "explicit").exists()
    assert [type(f) for f in explicit.failures] == [SourceAccessError] * 2
    assert all("cannot be pinned to a version" in f.problem and "'null'" in f.problem for f in explicit.failures)


def test_explicit_pinning_of_local_files_is_a_clear_failure(tmp_path: Path) -> None:
    result = virtnii.scan(str(DATA / "anatomical.nii"), str(tmp_path / "out"), pin_versions=True)
    assert result.manifest is None
    assert "has no object versions" in result.failures[0].problem


def test_cli_pin_versions(s3: LocalS3, tmp_path: Path) -> None:
    bucket = _versioned_bucket(s3)
    _put(s3, bucket, {"sub-01_T1w.nii": "anatomical.nii"})
    plain = s3.create_bucket("plain")
    _put(s3, plain, {"sub-01_T1w.nii": "anatomical.nii"})
    options = [arg for key, value in (("endpoint_url", s3.endpoint), ("key", s3.storage_options["key"]),
                                      ("secret", s3.storage_options["secret"])) for arg in ("-s", f"{key}={value}")]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "virtnii.cli", *args], capture_output=True, text=True,
                              timeout=120)

    done = run("scan", f"s3://{bucket}/ds", "-o", str(tmp_path / "pinned"), "-q", "--pin-versions", *options)
    assert done.returncode == 0, done.stderr
    index = json.loads((tmp_path / "pinned" / "virtnii.json").read_text())
    version = index["images"][0]["fingerprint"][versions.VERSION]
    assert f"(version {version})" in run("info", str(tmp_path / "pinned")).stdout
    refused = run("scan", f"s3://{plain}/ds", "-o", str(tmp_path / "refused"), "-q", "--pin-versions", *options)
    assert refused.returncode == 2
    assert "virtnii: error: " in refused.stderr and "cannot be pinned to a version" in refused.stderr
    assert "Traceback" not in refused.stderr
    off = run("scan", f"s3://{bucket}/ds", "-o", str(tmp_path / "off"), "-q", "--no-pin-versions", *options)
    assert off.returncode == 0, off.stderr
    assert versions.VERSION not in json.loads((tmp_path / "off" / "virtnii.json").read_text())["images"][0][
        "fingerprint"]


def test_versioned_listing_refused_falls_back_only_by_default(s3: LocalS3) -> None:
    bucket = _versioned_bucket(s3)
    _put(s3, bucket, ORIGINAL)
    fs = s3.filesystem(version_aware=True)

    def refusing(listed: Any) -> dict[str, Any]:  # a policy without s3:ListBucketVersions
        if listed.version_aware:
            raise SourceAccessError(f"s3://{bucket}/ds", "permission denied (AccessDenied)")
        return listed.find(f"{bucket}/ds", detail=True)

    used, found = list_versions(fs, None, refusing)
    assert not used.version_aware and len(found) == 2
    assert all(versions.reported(info) is None for info in found.values())  # plain listing: no versions to pin
    with pytest.raises(SourceAccessError, match="AccessDenied"):
        list_versions(fs, True, refusing)


def test_a_path_naming_a_version_is_never_read_by_an_unaware_filesystem(s3: LocalS3) -> None:
    bucket = _versioned_bucket(s3)
    plain = s3.filesystem()
    plain.pipe_file(f"{bucket}/x", b"old")
    old = s3.filesystem(version_aware=True).info(f"{bucket}/x")["VersionId"]
    plain.pipe_file(f"{bucket}/x", b"new")
    # the trap versions.path avoids: s3fs without version_aware drops ?versionId= and reads the latest version
    assert plain.cat_file(f"{bucket}/x?versionId={old}") == b"new"
    with pytest.raises(ValueError, match="would read another version"):
        versions.path(plain, f"{bucket}/x", {"size": 3, versions.VERSION: old})
    fs, path = versions.pinned(plain, f"{bucket}/x", {"size": 3, versions.VERSION: old})
    assert fs.version_aware and fs.cat_file(path) == b"old"
    assert versions.pinned(plain, f"{bucket}/x", {"size": 3}) == (plain, f"{bucket}/x")


def _dataset(s3: LocalS3, bucket: str) -> None:
    s3.filesystem().pipe_file(f"{bucket}/ds/dataset_description.json", b'{"Name": "t", "BIDSVersion": "1.10.0"}')
    _put(s3, bucket, {"sub-01_T1w.nii": "anatomical.nii", "sub-01_bold.nii.gz": "example4d.nii.gz"},
         "ds/sub-01/anat")
    _put(s3, bucket, {"sub-02_T1w.nii": "reoriented_anat_moved.nii"}, "ds/sub-02/anat")


def test_index_records_versions_from_one_listing_and_rereads_only_new_versions(s3: LocalS3,
                                                                              tmp_path: Path) -> None:
    bucket = _versioned_bucket(s3)
    _dataset(s3, bucket)
    out = tmp_path / "manifest"
    s3.reset_counters()
    first = virtnii.index(f"s3://{bucket}/ds", str(out), storage_options=s3.storage_options)
    requests = s3.meter().requests
    assert not first.skipped and first.report.indexed == 3
    versions_at = {e.name: e.fingerprint[versions.VERSION] for e in first.images}
    assert len(set(versions_at.values())) == 3
    # listing (ListObjectVersions pages) + one header GET per .nii + the .nii.gz pass: no HEAD per file
    assert requests.get("HEAD", 0) <= 1, requests

    _put(s3, bucket, {"sub-01_T1w.nii": "functional.nii"})  # a new version of one object
    again = virtnii.index(f"s3://{bucket}/ds", str(out), storage_options=s3.storage_options)
    assert (again.report.indexed, again.report.reused) == (1, 2)
    now = {e.name: e.fingerprint[versions.VERSION] for e in again.images}
    changed = [name for name in now if now[name] != versions_at[name]]
    assert changed == ["sub-01/anat/sub-01_T1w"]
    group = virtnii.open(str(out), **s3.storage_options)
    np.testing.assert_array_equal(group["sub-01/anat/sub-01_T1w"]["0"][:], _raw("functional.nii"))
    np.testing.assert_array_equal(group["sub-01/anat/sub-01_bold"]["0"][:], _raw("example4d.nii.gz"))

    # the same bytes uploaded again: same size and ETag, but a new version, which the manifest must read
    _put(s3, bucket, {"sub-02_T1w.nii": "reoriented_anat_moved.nii"}, "ds/sub-02/anat")
    third = virtnii.index(f"s3://{bucket}/ds", str(out), storage_options=s3.storage_options)
    assert (third.report.indexed, third.report.reused) == (1, 2)
    unpinned = virtnii.index(f"s3://{bucket}/ds", str(out), storage_options=s3.storage_options, pin_versions=False)
    assert unpinned.report.indexed == 3  # pinned entries are not reused as unpinned ones
    assert all(versions.VERSION not in e.fingerprint for e in unpinned.images)


def test_index_of_an_unversioned_bucket(s3: LocalS3, tmp_path: Path) -> None:
    bucket = s3.create_bucket("plain")
    _dataset(s3, bucket)
    result = virtnii.index(f"s3://{bucket}/ds", str(tmp_path / "default"), storage_options=s3.storage_options)
    assert not result.skipped and len(result.images) == 3
    assert all(versions.VERSION not in e.fingerprint for e in result.images)
    explicit = virtnii.index(f"s3://{bucket}/ds", str(tmp_path / "explicit"), storage_options=s3.storage_options,
                             pin_versions=True)
    assert not explicit.images and len(explicit.skipped) == 3
