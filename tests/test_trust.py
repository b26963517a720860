"""A manifest is data, never a key to the machine: crafted index files and references cannot make a reader read
files the manifest does not own, leave the manifest folder, or reach the reader's own files and network from a
manifest fetched from elsewhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import pytest

import virtnii
from nifti_samples import DATA
from virtnii.pyramid import build_pyramids


def _edit_json(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def _refs(out: Path) -> Path:
    return out / virtnii.manifest.read_index(str(out)).references


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    out = tmp_path / "m"
    shutil.copy(DATA / "anatomical.nii", tmp_path / "a.nii")
    shutil.copy(DATA / "example4d.nii.gz", tmp_path / "g.nii.gz")
    virtnii.scan([str(tmp_path / "a.nii"), str(tmp_path / "g.nii.gz")], str(out))
    build_pyramids(str(out), chunks=16)
    (tmp_path / "secret.txt").write_text("not yours")
    return out


def test_a_chunk_reference_to_a_file_the_index_does_not_list_is_refused(manifest: Path, tmp_path: Path) -> None:
    secret = str(tmp_path / "secret.txt")
    _edit_json(_refs(manifest), lambda d: d["refs"].update({"a/0/c/0/0/0": [f"file://{secret}", 0, 9]}))
    with pytest.raises(virtnii.ManifestError, match="is referenced but not listed"):
        virtnii.open(str(manifest))["a"]["0"][...]


@pytest.mark.parametrize("target", ["../secret.txt", "levels/../../secret.txt", "/etc/hostname"])
def test_a_relative_reference_cannot_leave_the_manifest(manifest: Path, target: str) -> None:
    _edit_json(_refs(manifest), lambda d: d["refs"].update({"a/1/c/0/0/0": [target]}))
    with pytest.raises(virtnii.ManifestError):
        virtnii.open(str(manifest))["a"]["1"][...]


def test_a_reference_without_protocol_outside_the_level_stores_is_refused(manifest: Path) -> None:
    _edit_json(_refs(manifest), lambda d: d["refs"].update({"a/1/c/0/0/0": ["virtnii.json"]}))
    with pytest.raises(virtnii.ManifestError, match="not listed"):
        virtnii.open(str(manifest))["a"]["1"][...]


@pytest.mark.parametrize("key, value", [("gzip_index", "gzindex/../../secret.txt"),
                                        ("gzip_index", "/etc/passwd"),
                                        ("gzip_index", "levels/x.gzidx.json")])
def test_index_entries_pointing_outside_their_folders_are_refused(manifest: Path, key: str, value: str) -> None:
    def change(doc):
        for image in doc["images"]:
            if image["gzip_index"]:
                image[key] = value

    _edit_json(manifest / "virtnii.json", change)
    with pytest.raises(virtnii.ManifestError, match="not a path inside the manifest's gzindex/ folder"):
        virtnii.open(str(manifest))


def test_a_level_store_outside_the_levels_folder_is_refused(manifest: Path) -> None:
    def change(doc):
        doc["images"][0]["pyramid"]["store"] = "../elsewhere"

    _edit_json(manifest / "virtnii.json", change)
    with pytest.raises(virtnii.ManifestError, match="levels/ folder"):
        virtnii.open(str(manifest))


def test_a_gzidx_url_escaping_the_manifest_is_refused(manifest: Path) -> None:
    refs = json.loads(_refs(manifest).read_text())["refs"]
    key = next(k for k, v in refs.items() if isinstance(v, list) and v[0].startswith("gzidx://"))
    _edit_json(_refs(manifest), lambda d: d["refs"].update({key: ["gzidx://gzindex/../../secret.txt", 0, 4]}))
    with pytest.raises(virtnii.ManifestError, match="may not lead outside the manifest"):
        virtnii.open(str(manifest))["g"]["0"][...]


def test_a_descriptor_naming_an_index_file_elsewhere_is_refused(manifest: Path) -> None:
    [descriptor] = (manifest / "gzindex").rglob("*.gzidx.json")
    _edit_json(descriptor, lambda d: d.update(index="../../secret.txt"))
    with pytest.raises(virtnii.ManifestError, match="outside its own folder"):
        virtnii.open(str(manifest))["g"]["0"][...]


@pytest.mark.parametrize("source", ["file:///etc/passwd", "http://127.0.0.1:9/x.nii", "http://10.1.2.3/x.nii",
                                    "http://[::1]/x.nii", "http://localhost/x.nii", "https://169.254.169.254/x.nii"])
def test_a_remote_manifest_may_not_point_at_the_readers_own_files_or_network(manifest: Path, source: str) -> None:
    """The manifest copied to a remote store (memory://) with one source changed to a local target."""
    def change(doc):
        doc["images"][0]["source"] = source

    _edit_json(manifest / "virtnii.json", change)
    remote = "memory://trust-test/m"
    fs = fsspec.filesystem("memory")
    if fs.exists(remote):
        fs.rm(remote, recursive=True)
    fs.put(str(manifest), remote, recursive=True)
    with pytest.raises(virtnii.ManifestError, match="may not do; open it with allow_local_sources=True"):
        virtnii.open(remote)
    virtnii.open(remote, allow_local_sources=True)  # asked for: opens (reading it is then the source's business)
    fs.rm(remote, recursive=True)


def test_public_hosts_and_local_manifests_are_not_restricted(manifest: Path) -> None:
    assert virtnii.open(str(manifest))["a"]["0"].shape == (25, 41, 33)  # local manifest, local sources
    from virtnii.reader import _local_target

    assert _local_target("https://dandiarchive.s3.amazonaws.com/blobs/x") is None
    assert _local_target("s3://openneuro.org/ds000001/x.nii.gz") is None
    assert _local_target("http://8.8.8.8/x.nii") is None
