"""Tables and queries of an indexed dataset, from its index file alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import pytest

import virtnii
from bids_samples import build, image_names
from nifti_samples import DATA
from virtnii.cli import main


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = build(tmp_path_factory.mktemp("q") / "ds")
    out = root.parent / "out"
    virtnii.index(str(root), str(out), derivatives=True)
    shutil.rmtree(root)  # queries must not touch the sources
    return out


def test_table_has_a_row_per_image_with_entities_and_array_facts(manifest: Path) -> None:
    df = virtnii.table(str(manifest))
    assert sorted(df["name"]) == sorted(image_names())
    row = df.set_index("name").loc["sub-01/ses-1/func/sub-01_ses-1_task-rest_run-2_bold"]
    assert (row["sub"], row["ses"], row["task"], row["run"], row["datatype"], row["suffix"], row["ext"]) == \
        ("01", "1", "rest", "2", "func", "bold", ".nii")
    nifti = nib.load(DATA / "functional.nii")
    assert row["shape"] == list(reversed(nifti.shape)) and row["axes"] == "tzyx" and not row["gzip"]
    assert row["zooms"] == [float(z) for z in nifti.header.get_zooms()]
    labels = df.set_index("name").loc["derivatives/seg/sub-02/ses-1/anat/sub-02_ses-1_dseg"]
    assert labels["dataset"] == "derivatives/seg" and labels["dtype"] == "|u1"


def test_find_matches_every_entity_given_and_any_of_a_list(manifest: Path) -> None:
    assert virtnii.find(str(manifest), sub="01", suffix="T1w") == ["sub-01/ses-1/anat/sub-01_ses-1_T1w"]
    bold = virtnii.find(str(manifest), suffix="bold", run=["1", "2"])
    assert sorted(bold) == sorted(n for n in image_names() if n.endswith("_bold"))
    assert virtnii.find(str(manifest), sub="99") == []


def test_a_catalogue_of_several_manifests(manifest: Path, tmp_path: Path) -> None:
    other = tmp_path / "copy"
    shutil.copytree(manifest, other)
    df = virtnii.table([str(manifest), str(other)])
    assert list(df.columns[:2]) == ["manifest", "name"] and len(df) == 2 * len(image_names())


def test_cli_find(manifest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["find", str(manifest), "sub=02", "datatype=anat"]) == 0
    assert capsys.readouterr().out.split() == ["derivatives/seg/sub-02/ses-1/anat/sub-02_ses-1_dseg",
                                               "sub-02/ses-1/anat/sub-02_ses-1_T1w"]
    assert main(["find", str(manifest), "suffix=T2w", "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["name"] == "sub-01/ses-1/anat/sub-01_ses-1_run-1_T2w" and row["zooms"]


def test_cli_find_takes_values_as_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "ds" / "sub-1e3" / "anat" / "sub-1e3_T1w.nii"
    image.parent.mkdir(parents=True)
    shutil.copy(DATA / "anatomical.nii", image)
    virtnii.index(str(tmp_path / "ds"), str(tmp_path / "out"))
    assert main(["find", str(tmp_path / "out"), "sub=1e3"]) == 0  # not the number 1000.0
    assert capsys.readouterr().out.split() == ["sub-1e3/anat/sub-1e3_T1w"]
