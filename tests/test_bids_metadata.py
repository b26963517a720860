"""Sidecar inheritance over one listing equals bids2table's ``load_bids_metadata``, case by case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bids2table import load_bids_metadata

from virtnii.bids import metadata
from virtnii.bids.listing import list_dataset

IMAGE = "sub-01/ses-1/func/sub-01_ses-1_task-rest_run-1_bold.nii.gz"
CASES = {
    "root only": {"task-rest_bold.json": {"A": 1}},
    "nearest wins": {"task-rest_bold.json": {"A": 1, "B": 1}, "sub-01/sub-01_task-rest_bold.json": {"A": 2},
                     "sub-01/ses-1/func/sub-01_ses-1_task-rest_run-1_bold.json": {"C": 3}},
    "other run does not apply": {"sub-01/ses-1/func/sub-01_ses-1_task-rest_run-2_bold.json": {"A": 9},
                                 "task-rest_bold.json": {"A": 1}},
    "other task does not apply": {"task-motor_bold.json": {"A": 9}, "bold.json": {"B": 2}},
    "other suffix does not apply": {"task-rest_T1w.json": {"A": 9}, "task-rest_bold.json": {"A": 1}},
    "extra entity does not apply": {"task-rest_acq-fast_bold.json": {"A": 9}},
    "not an object is skipped": {"task-rest_bold.json": [1, 2], "sub-01/sub-01_bold.json": {"B": 1}},
}


def _tree(root: Path, sidecars: dict[str, object]) -> None:
    (root / IMAGE).parent.mkdir(parents=True)
    (root / IMAGE).write_bytes(b"\x1f\x8b")
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    for path, doc in sidecars.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(json.dumps(doc))


@pytest.mark.parametrize("case", CASES)
def test_sidecars_merge_as_bids2table_merges_them(tmp_path: Path, case: str) -> None:
    _tree(tmp_path, CASES[case])
    listing = list_dataset(str(tmp_path), {})
    chain = metadata.sidecar_chain(IMAGE, listing, "")
    texts, problems = metadata.read_texts(listing, chain)
    assert not problems
    assert metadata.merged(chain, texts) == load_bids_metadata(tmp_path / IMAGE)


def test_a_derivative_stops_at_its_own_root(tmp_path: Path) -> None:
    image = "derivatives/prep/sub-01/anat/sub-01_desc-brain_mask.nii.gz"
    _tree(tmp_path, {"mask.json": {"Raw": 1}, "derivatives/prep/mask.json": {"Type": "Brain"},
                     "derivatives/prep/dataset_description.json": {"Name": "prep", "DatasetType": "derivative"}})
    (tmp_path / image).parent.mkdir(parents=True)
    (tmp_path / image).write_bytes(b"")
    listing = list_dataset(str(tmp_path), {}, derivatives=True)
    root = metadata.dataset_root(image, listing)
    assert root == "derivatives/prep"
    chain = metadata.sidecar_chain(image, listing, root)
    texts, _ = metadata.read_texts(listing, chain)
    assert metadata.merged(chain, texts) == load_bids_metadata(tmp_path / image) == {"Type": "Brain"}


def test_a_broken_sidecar_is_reported_not_fatal(tmp_path: Path) -> None:
    _tree(tmp_path, {"task-rest_bold.json": {"A": 1}})
    (tmp_path / "sub-01/sub-01_bold.json").write_text("{not json")
    listing = list_dataset(str(tmp_path), {})
    chain = metadata.sidecar_chain(IMAGE, listing, "")
    texts, problems = metadata.read_texts(listing, chain)
    assert metadata.merged(chain, texts) == {"A": 1}
    assert len(problems) == 1 and "sub-01_bold.json" in problems[0].source and "JSON" in problems[0].problem


def test_participants_rows_keep_their_text(tmp_path: Path) -> None:
    assert metadata.participants("participant_id\tage\nsub-01\t30\nsub-02\tn/a\n") == [
        {"participant_id": "sub-01", "age": "30"}, {"participant_id": "sub-02", "age": "n/a"}]
