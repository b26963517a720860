"""``virtnii index``: a whole BIDS dataset of real files, read back bit-exact, with entities, sidecars, reasons
for every skipped file, incremental and resumable re-runs, the same manifest from threads, Dask and S3."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bids2table import load_bids_metadata, parse_bids_entities

import virtnii
from bids_samples import IMAGES, LABELS, PLACEHOLDERS, SIDECARS, build, image_names
from nifti_samples import assert_same_voxels, file_to_zarr_order, nibabel_raw
from virtnii.bids import units
from virtnii.manifest import read_index


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("bids") / "ds")


@pytest.fixture(scope="module")
def indexed(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, virtnii.IndexResult]:
    out = tmp_path_factory.mktemp("manifests") / "ds"
    return out, virtnii.index(str(dataset), str(out), derivatives=True)


def manifest_state(out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """What two runs must agree on: the index entries and the references (the references file's name aside)."""
    index = json.loads((out / "virtnii.json").read_text())
    refs = json.loads((out / index["references"]).read_text())["refs"]
    return index["images"], refs


def test_every_image_reads_back_bit_exact(dataset: Path, indexed: tuple[Path, virtnii.IndexResult]) -> None:
    out, result = indexed
    expected = image_names()
    assert sorted(e.name for e in result.images) == sorted(expected)
    group = virtnii.open(str(out))
    for name, relative in expected.items():
        assert_same_voxels(group[name]["0"][...], file_to_zarr_order(nibabel_raw(dataset / relative)))


def test_groups_carry_entities_and_sidecars_as_bids2table_resolves_them(
        dataset: Path, indexed: tuple[Path, virtnii.IndexResult]) -> None:
    out, _ = indexed
    group = virtnii.open(str(out))
    for name, relative in image_names().items():
        bids = group[name].attrs["bids"]
        assert bids["path"] == relative
        assert bids["entities"] == {k: str(v) for k, v in parse_bids_entities(relative).items()}
        assert bids["metadata"] == load_bids_metadata(dataset / relative)
    func = group["sub-01/ses-1/func/sub-01_ses-1_task-rest_run-1_bold"].attrs["bids"]["metadata"]
    assert func["RepetitionTime"] == 2.5 and func["EchoTime"] == 0.03 and func["TaskName"] == "rest"  # 3 levels
    assert group["sub-02/ses-1/anat/sub-02_ses-1_T1w"].attrs["bids"]["metadata"] == {"MagneticFieldStrength": 3}


def test_root_carries_dataset_description_and_participants(indexed: tuple[Path, virtnii.IndexResult]) -> None:
    out, _ = indexed
    group = virtnii.open(str(out))
    assert group.attrs["dataset_description"] == SIDECARS["dataset_description.json"]
    assert group.attrs["participants"] == [{"participant_id": "sub-01", "age": "30", "sex": "F"},
                                           {"participant_id": "sub-02", "age": "n/a", "sex": "M"}]
    derivative = group["derivatives/seg"].attrs["bids"]
    assert derivative["dataset_description"]["DatasetType"] == "derivative"
    labels = group[LABELS.removesuffix(".nii.gz")]
    assert labels.attrs["bids"]["dataset"] == "derivatives/seg"


def test_every_placeholder_is_reported_with_its_reason(dataset: Path,
                                                       indexed: tuple[Path, virtnii.IndexResult]) -> None:
    out, result = indexed
    reasons = {item["source"].split("/ds/", 1)[1]: item["reason"] for item in result.skipped}
    assert reasons == PLACEHOLDERS
    report = json.loads((out / "index-report.json").read_text())
    assert report["images"] == len(image_names()) and len(report["skipped"]) == len(PLACEHOLDERS)
    assert report["bytes_referenced"] == sum(os.path.getsize(dataset / p) for p in image_names().values())
    assert report["bytes_written"] == sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and
                                          p.name != "index-report.json")


def test_code_hidden_and_unasked_derivatives_are_not_indexed(dataset: Path, tmp_path: Path) -> None:
    result = virtnii.index(str(dataset), str(tmp_path / "out"))
    names = {e.name for e in result.images}
    assert names == set(image_names(derivatives=False))
    assert not any(n.startswith(("code", ".git", "derivatives")) for n in names)


def test_rerun_reads_only_what_changed_and_drops_what_was_removed(dataset: Path, tmp_path: Path) -> None:
    tree = tmp_path / "ds"
    shutil.copytree(dataset, tree, symlinks=True)
    out = tmp_path / "out"
    first = virtnii.index(str(tree), str(out))
    images, refs = manifest_state(out)
    index_file = (out / "virtnii.json").read_bytes()
    again = virtnii.index(str(tree), str(out))
    assert again.report.indexed == 0 and again.report.reused == len(images)
    assert (out / "virtnii.json").read_bytes() == index_file  # nothing to do: nothing rewritten
    assert manifest_state(out) == (images, refs)
    # one image replaced, one removed, one sidecar changed
    changed = "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii"
    shutil.copy(IMAGES["sub-01/ses-1/fmap/sub-01_ses-1_phasediff.nii"], tree / changed)
    os.remove(tree / "sub-02/ses-1/func/sub-02_ses-1_task-rest_run-1_bold.nii.gz")
    (tree / "T1w.json").write_text(json.dumps({"MagneticFieldStrength": 1.5}))
    third = virtnii.index(str(tree), str(out))
    assert third.report.indexed == 1 and third.report.removed == 1
    group = virtnii.open(str(out))
    assert_same_voxels(group[changed.removesuffix(".nii")]["0"][...], file_to_zarr_order(nibabel_raw(tree / changed)))
    assert "sub-02/ses-1/func/sub-02_ses-1_task-rest_run-1_bold" not in {e.name for e in third.images}
    assert group["sub-02/ses-1/anat/sub-02_ses-1_T1w"].attrs["bids"]["metadata"] == {"MagneticFieldStrength": 1.5}
    # nothing the new manifest does not name is left behind
    index = read_index(str(out))
    named = {e.gzip_index for e in index.images if e.gzip_index}
    assert {str(p.relative_to(out)) for p in (out / "gzindex").rglob("*.gzidx.json")} == named
    assert [p.name for p in (out / units.JOURNAL).iterdir()] == [units.LASTING_FILE]
    assert len(list(out.glob("refs.*"))) == 1
    assert first.report.images == len(images)


_KILLED_CHILD = """
import sys, time
import virtnii
from virtnii.bids import units
units.PLAIN_BATCH = 1
units.GZIP_BATCH_BYTES = 1
run = units.run_batch
def slow(*args, **kwargs):
    records = run(*args, **kwargs)
    print("batch", flush=True)
    time.sleep(0.3)
    return records
units.run_batch = slow
virtnii.index(sys.argv[1], sys.argv[2], workers=1, derivatives=True)
"""


def test_a_killed_run_resumes_to_the_same_manifest_and_never_shows_a_half_one(dataset: Path,
                                                                              indexed: tuple[Path, Any],
                                                                              tmp_path: Path) -> None:
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(dataset), str(out)], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout is not None
    for _ in range(3):
        assert child.stdout.readline() == "batch\n"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (out / "virtnii.json").exists()  # nothing half-made is visible: no manifest yet
    finished = len(list((out / units.JOURNAL).glob("*.json")))
    assert finished >= 3
    resumed = virtnii.index(str(dataset), str(out), derivatives=True)
    scanned = len(image_names()) + 2  # the header-only file and the HTML page are read; the other two are not
    assert resumed.report.indexed <= scanned - 3
    assert manifest_state(out) == manifest_state(indexed[0])


def test_a_killed_runs_journal_is_not_used_with_other_settings(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(dataset), str(out)], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout is not None and child.stdout.readline() == "batch\n"
    child.send_signal(signal.SIGKILL)
    child.wait()
    result = virtnii.index(str(dataset), str(out), derivatives=True, zarr_format=2)
    assert result.report.reused == 0
    group = virtnii.open(str(out))
    for name, relative in image_names().items():
        assert_same_voxels(group[name]["0"][...], file_to_zarr_order(nibabel_raw(dataset / relative)))
    assert read_index(str(out)).zarr_format == 2


@pytest.fixture(scope="module")
def dask_client() -> Any:
    """A 2-worker LocalCluster (processes, as a real cluster's workers are), started once for the module."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c, \
            distributed.Client(c) as client:
        yield client


def test_a_dask_cluster_gives_the_same_manifest(dataset: Path, indexed: tuple[Path, Any], tmp_path: Path,
                                                dask_client: Any) -> None:
    virtnii.index(str(dataset), str(tmp_path / "out"), derivatives=True, dask=dask_client)
    assert manifest_state(tmp_path / "out") == manifest_state(indexed[0])


def level_files(out: Path) -> dict[str, bytes]:
    """Every file of the level stores under ``out/levels``, by path relative to it."""
    return {str(p.relative_to(out / "levels")): p.read_bytes() for p in (out / "levels").rglob("*") if p.is_file()}


def test_pyramids_on_a_dask_cluster_are_the_local_ones(dataset: Path, tmp_path: Path, dask_client: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    local = virtnii.index(str(dataset), str(tmp_path / "local"), derivatives=True, pyramid=True)
    monkeypatch.chdir(tmp_path)  # OUT as typed, relative: the workers must be given where it is
    monkeypatch.setattr("virtnii.pyramid.BATCH_IMAGES", 2)  # several tasks, finishing in any order
    from distributed import get_task_stream

    with get_task_stream(dask_client) as tasks:
        on_dask = virtnii.index(str(dataset), "dask", derivatives=True, pyramid=True, dask=dask_client)
    assert sum(task["key"].startswith("build_batch-") for task in tasks.data) > 2  # built there, in batches
    assert on_dask.report.pyramids_built == local.report.pyramids_built > 2
    assert manifest_state(tmp_path / "dask") == manifest_state(tmp_path / "local")
    assert level_files(tmp_path / "dask") == level_files(tmp_path / "local")
    again = virtnii.index(str(dataset), "dask", derivatives=True, pyramid=True, dask=dask_client)
    assert again.report.pyramids_built == 0 and again.report.pyramids_reused == local.report.pyramids_built


def test_one_worker_gives_the_same_manifest(dataset: Path, indexed: tuple[Path, Any], tmp_path: Path) -> None:
    virtnii.index(str(dataset), str(tmp_path / "out"), derivatives=True, workers=1)
    assert manifest_state(tmp_path / "out") == manifest_state(indexed[0])


def test_the_same_tree_on_s3(s3: Any, dataset: Path, tmp_path: Path) -> None:
    bucket = s3.create_bucket("openneuro")
    fs = s3.filesystem()
    for path in dataset.rglob("*"):
        if path.is_file() and not path.is_symlink():
            key = f"{bucket}/ds000001/{path.relative_to(dataset)}"
            if path.stat().st_size:
                fs.pipe_file(key, path.read_bytes())
            else:
                fs.touch(key)  # an empty PUT through pipe_file stalls the test server (moto under waitress)
    out = tmp_path / "out"
    result = virtnii.index(f"s3://{bucket}/ds000001", str(out), derivatives=True, storage_options=s3.storage_options)
    assert sorted(e.name for e in result.images) == sorted(image_names())
    assert {s["reason"] for s in result.skipped} == set(PLACEHOLDERS.values()) - {"broken-symlink"}
    group = virtnii.open(str(out), **s3.storage_options)
    for name, relative in image_names().items():
        assert_same_voxels(group[name]["0"][...], file_to_zarr_order(nibabel_raw(dataset / relative)))
        assert group[name].attrs["bids"]["metadata"] == load_bids_metadata(dataset / relative)
    again = virtnii.index(f"s3://{bucket}/ds000001", str(out), derivatives=True, storage_options=s3.storage_options)
    assert again.report.indexed == 0


def test_pyramid_uses_mode_for_label_images(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = virtnii.index(str(dataset), str(out), derivatives=True, pyramid=True)
    methods = {e.name: e.pyramid.method for e in result.images if e.pyramid}
    assert methods[LABELS.removesuffix(".nii.gz")] == "mode"
    assert methods["sub-02/ses-1/anat/sub-02_ses-1_T1w"] == "mean"
    labels = virtnii.open(str(out))[LABELS.removesuffix(".nii.gz")]
    assert labels.attrs["bids"]["entities"]["suffix"] == "dseg"  # the levels kept the BIDS attributes
    entry = next(e for e in result.images if e.name == LABELS.removesuffix(".nii.gz"))
    assert len(labels.attrs["ome"]["multiscales"][0]["datasets"]) == len(entry.levels) + 1 > 1
    values = set(np.unique(labels["0"][...]))
    assert set(np.unique(labels["1"][...])) <= values
    again = virtnii.index(str(dataset), str(out), derivatives=True, pyramid=True)
    assert again.report.pyramids_built == 0 and again.report.pyramids_reused == len(methods)


def test_out_holding_other_data_is_refused(dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    with pytest.raises(virtnii.ManifestError, match="not a virtnii manifest"):
        virtnii.index(str(dataset), str(tmp_path / "out"))
    assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"


def test_a_manifest_inside_the_dataset_moves_with_it(dataset: Path, tmp_path: Path) -> None:
    tree = tmp_path / "ds"
    shutil.copytree(dataset, tree, symlinks=True)
    out = tree / "derivatives" / "virtnii"
    first = virtnii.index(str(tree), str(out), derivatives=True)
    second = virtnii.index(str(tree), str(out), derivatives=True)
    assert sorted(e.name for e in first.images) == sorted(e.name for e in second.images) == sorted(image_names())
    assert second.report.indexed == 0  # the manifest itself was not taken for data
    assert all(e.has_relative_sources and e.source.startswith("../") for e in second.images)
    moved = tmp_path / "elsewhere" / "ds"
    moved.parent.mkdir()
    shutil.move(tree, moved)
    group = virtnii.open(str(moved / "derivatives" / "virtnii"))
    for name, relative in image_names().items():
        assert_same_voxels(group[name]["0"][...], file_to_zarr_order(nibabel_raw(dataset / relative)))
    third = virtnii.index(str(moved), str(moved / "derivatives" / "virtnii"), derivatives=True)
    assert third.report.indexed == 0 and third.report.removed == 0


def test_the_settings_a_manifest_was_made_with_travel_with_its_index(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    virtnii.index(str(dataset), str(out))
    report_of_a_zarr3_run = (out / "index-report.json").read_text()
    virtnii.index(str(dataset), str(out), zarr_format=2)
    # as if that run had died after publishing, before writing its report
    (out / "index-report.json").write_text(report_of_a_zarr3_run)
    again = virtnii.index(str(dataset), str(out))
    assert again.report.reused == 0 and read_index(str(out)).zarr_format == 3


def test_a_folder_that_cannot_be_listed_keeps_its_images(dataset: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    tree = tmp_path / "ds"
    shutil.copytree(dataset, tree, symlinks=True)
    out = tmp_path / "out"
    first = virtnii.index(str(tree), str(out), pyramid=True)
    stores = sorted(str(p.parent) for p in (out / "levels").rglob("virtnii-pyramid.json"))
    scandir = os.scandir

    def flaky(path: Any) -> Any:
        if str(path) == str(tree / "sub-02"):  # the dataset's folder, not the manifest's levels/sub-02
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", flaky)
    again = virtnii.index(str(tree), str(out), pyramid=True)
    assert sorted(e.name for e in again.images) == sorted(e.name for e in first.images)
    assert again.report.removed == 0 and any(s["reason"] == "permission" for s in again.skipped)
    assert sorted(str(p.parent) for p in (out / "levels").rglob("virtnii-pyramid.json")) == stores
    group = virtnii.open(str(out))
    assert_same_voxels(group["sub-02/ses-1/anat/sub-02_ses-1_T1w"]["0"][...],
                       file_to_zarr_order(nibabel_raw(tree / "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz")))


def test_a_dataset_that_lists_nothing_does_not_empty_its_manifest(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    virtnii.index(str(dataset), str(out))
    before = (out / "virtnii.json").read_bytes()
    (tmp_path / "empty").mkdir()
    with pytest.raises(virtnii.ManifestError, match="refusing to empty it"):
        virtnii.index(str(tmp_path / "empty"), str(out))
    assert (out / "virtnii.json").read_bytes() == before


def test_a_killed_runs_journal_is_not_used_once_the_dataset_moved(dataset: Path, tmp_path: Path) -> None:
    tree = tmp_path / "ds"
    shutil.copytree(dataset, tree, symlinks=True)
    out = tmp_path / "out"  # outside the dataset: sources are absolute URLs, which name where it was
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(tree), str(out)], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout is not None and child.stdout.readline() == "batch\n"
    child.send_signal(signal.SIGKILL)
    child.wait()
    moved = tmp_path / "moved"
    shutil.move(tree, moved)
    result = virtnii.index(str(moved), str(out), derivatives=True)
    assert result.report.reused == 0
    assert all(e.source.startswith(moved.as_uri()) for e in result.images)
