"""A BIDS dataset built from real NIfTI files nobody here wrote (nibabel's, nilearn's and dipy's shipped data).

Two subjects, sessions, runs, 4-D func, dwi, fmap, a derivative with a label image, sidecars at the root,
subject, session and file levels (so inheritance has something to resolve), participants.tsv, and the
placeholders real archives hold (bids-examples' zero-byte and header-only files, an HTML error page saved as
``.nii.gz``, a git-annex link not fetched).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from nifti_samples import DATA

NILEARN = Path(__import__("nilearn").__file__).parent / "datasets" / "data"
DIPY = Path(__import__("dipy").__file__).parent / "data" / "files"

#: Image path (relative to the dataset root) -> the real file copied there.
IMAGES = {
    "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii": DATA / "anatomical.nii",  # big-endian int16
    "sub-01/ses-1/anat/sub-01_ses-1_run-1_T2w.nii.gz": DATA / "example_nifti2.nii.gz",  # NIfTI-2
    "sub-01/ses-1/func/sub-01_ses-1_task-rest_run-1_bold.nii.gz": DATA / "example4d.nii.gz",  # 4-D, extensions
    "sub-01/ses-1/func/sub-01_ses-1_task-rest_run-2_bold.nii": DATA / "functional.nii",  # 4-D, slope/inter
    "sub-01/ses-1/dwi/sub-01_ses-1_dwi.nii.gz": DIPY / "small_101D.nii.gz",  # uint16 4-D
    "sub-01/ses-1/fmap/sub-01_ses-1_phasediff.nii": DATA / "reoriented_anat_moved.nii",  # big-endian float32
    "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz": NILEARN / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "sub-02/ses-1/func/sub-02_ses-1_task-rest_run-1_bold.nii.gz": DATA / "example4d.nii.gz",
}
#: The derivative's label image: the nilearn grey-matter template cut into 4 classes (uint8).
LABELS = "derivatives/seg/sub-02/ses-1/anat/sub-02_ses-1_dseg.nii.gz"
#: Placeholder path -> the reason code the index report must give it.
PLACEHOLDERS = {
    "sub-03/anat/sub-03_T1w.nii": "zero-byte",
    "sub-03/anat/sub-03_T2w.nii": "header-only",
    "sub-03/func/sub-03_task-rest_bold.nii.gz": "not-nifti",
    "sub-03/dwi/sub-03_dwi.nii.gz": "broken-symlink",
}
SIDECARS = {
    "dataset_description.json": {"Name": "virtnii test dataset", "BIDSVersion": "1.9.0", "DatasetType": "raw"},
    "task-rest_bold.json": {"TaskName": "rest", "RepetitionTime": 2.0, "SliceTiming": [0.0, 0.5, 1.0, 1.5]},
    "sub-01/sub-01_task-rest_bold.json": {"RepetitionTime": 2.5},  # subject level overrides the root
    "sub-01/ses-1/func/sub-01_ses-1_task-rest_run-1_bold.json": {"EchoTime": 0.03},  # file level adds
    "T1w.json": {"MagneticFieldStrength": 3},
    "sub-01/ses-1/sub-01_ses-1_T1w.json": {"MagneticFieldStrength": 7, "Manufacturer": "X"},
    "sub-01/ses-1/dwi/sub-01_ses-1_dwi.json": {"PhaseEncodingDirection": "j-"},
    "sub-01/ses-1/fmap/sub-01_ses-1_phasediff.json": {"EchoTime1": 0.004, "EchoTime2": 0.006},
    "derivatives/seg/dataset_description.json": {"Name": "seg", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
                                                 "GeneratedBy": [{"Name": "test"}]},
    "derivatives/seg/sub-02/ses-1/anat/sub-02_ses-1_dseg.json": {"Description": "4 classes"},
}
PARTICIPANTS = "participant_id\tage\tsex\nsub-01\t30\tF\nsub-02\tn/a\tM\n"


def build(root: Path) -> Path:
    """Write the dataset under ``root``; returns ``root``."""
    for relative, source in IMAGES.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    grey = nib.load(NILEARN / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
    classes = np.digitize(np.asanyarray(grey.dataobj), [40, 120, 200]).astype(np.uint8)
    (root / LABELS).parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(classes, grey.affine), root / LABELS)
    for relative, doc in SIDECARS.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(json.dumps(doc))
    (root / "participants.tsv").write_text(PARTICIPANTS)
    (root / "sub-01/ses-1/dwi/sub-01_ses-1_dwi.bval").write_text("0 1000\n")
    (root / "code").mkdir()
    shutil.copy(DATA / "anatomical.nii", root / "code" / "not_data.nii")  # code/ holds no data to index
    (root / ".git").mkdir()
    shutil.copy(DATA / "anatomical.nii", root / ".git" / "hidden.nii")
    placeholders(root)
    return root


def placeholders(root: Path) -> None:
    """The bad files of :data:`PLACEHOLDERS`."""
    for relative in PLACEHOLDERS:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
    (root / "sub-03/anat/sub-03_T1w.nii").write_bytes(b"")
    (root / "sub-03/anat/sub-03_T2w.nii").write_bytes((DATA / "anatomical.nii").read_bytes()[:352])
    (root / "sub-03/func/sub-03_task-rest_bold.nii.gz").write_text(
        "<!DOCTYPE html><html><body>404 Not Found</body></html>")
    os.symlink("../../.git/annex/objects/XX/YY/SHA256E-s1--0.nii.gz/SHA256E-s1--0.nii.gz",
               root / "sub-03/dwi/sub-03_dwi.nii.gz")


def image_names(derivatives: bool = True) -> dict[str, str]:
    """Group name -> relative path of every image that must be indexed."""
    paths = list(IMAGES) + ([LABELS] if derivatives else [])
    return {p.removesuffix(".gz").removesuffix(".nii"): p for p in paths}
