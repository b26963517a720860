"""A manifest replacement killed at any step is finished or undone by the next run or reader; leftovers of dead
writers are removed, those of running ones never."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

import virtnii
from nifti_samples import DATA


def _scan(out: Path, name: str = "anatomical.nii") -> None:
    assert not virtnii.scan([str(DATA / name)], str(out)).failures


def _names(out: Path) -> list[str]:
    return [e.name for e in virtnii.manifest.read_index(str(out)).images]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _killed_between_renames(tmp_path: Path) -> tuple[Path, Path]:
    """The state a SIGKILL between the two renames leaves: OUT gone, the old manifest in .old, the new one
    complete in the partial folder, its owner dead."""
    out = tmp_path / "out"
    _scan(out)
    _scan(tmp_path / "new", "functional.nii")
    partial = tmp_path / "out.partial-deadbeef"
    shutil.move(tmp_path / "new", partial)
    shutil.move(out, tmp_path / "out.partial-deadbeef.old")
    (tmp_path / "out.partial-deadbeef.owner").write_text(json.dumps({"host": os.uname().nodename,
                                                                      "pid": _dead_pid()}))
    return out, partial


def test_open_finishes_a_swap_killed_between_the_renames(tmp_path: Path) -> None:
    out, _ = _killed_between_renames(tmp_path)
    assert _names(out) == ["functional"]  # the new manifest, which was complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert virtnii.open(str(out))["functional"]["0"].shape == (20, 3, 21, 17)


def test_a_later_scan_finishes_it_too(tmp_path: Path) -> None:
    out, _ = _killed_between_renames(tmp_path)
    _scan(tmp_path / "other")  # unrelated
    _scan(out, "example4d.nii.gz")
    assert _names(out) == ["example4d"] and sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]


def test_a_killed_swap_without_the_new_manifest_puts_the_old_back(tmp_path: Path) -> None:
    out, partial = _killed_between_renames(tmp_path)
    (partial / "virtnii.json").unlink()  # killed before the new manifest was complete
    assert _names(out) == ["anatomical"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leftovers_of_dead_writers_go_and_running_ones_stay(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _scan(out)
    dead, running, foreign = (tmp_path / f"out.partial-{n}" for n in ("dead0000", "live0000", "else0000"))
    for folder, owner in ((dead, {"host": os.uname().nodename, "pid": _dead_pid()}),
                          (running, {"host": os.uname().nodename, "pid": os.getpid()}),
                          (foreign, {"host": "another-machine", "pid": 1})):
        folder.mkdir()
        (folder / "gzindex").mkdir()
        Path(f"{folder}.owner").write_text(json.dumps(owner))
    _scan(out, "functional.nii")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["out", "out.partial-else0000", "out.partial-else0000.owner", "out.partial-live0000",
                    "out.partial-live0000.owner"]


def test_a_sigkilled_scan_leaves_nothing_the_next_run_keeps(tmp_path: Path) -> None:
    """A real SIGKILL in the middle of a scan: the next scan into the same place removes what it left."""
    import gzip

    for i in range(3):
        (tmp_path / f"s{i}.nii.gz").write_bytes(gzip.compress((DATA / "anatomical.nii").read_bytes()))
    child = f"""
import os, signal, importlib
import virtnii
scan = importlib.import_module("virtnii.scan")
original = scan.index_gzip_source
def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
scan.index_gzip_source = killed
virtnii.scan([{str(tmp_path)!r}], {str(tmp_path / 'out')!r})
"""
    run = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=60)
    assert run.returncode == -9
    assert list(tmp_path.glob("out.partial-*"))  # what the kill left
    _scan(tmp_path / "out")
    assert not list(tmp_path.glob("out.partial-*"))
