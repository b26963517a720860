"""CLI: exit codes, one line per failure, info output; the CLI and the Python API agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest

from virtnii.cli import main

DATA = Path(nib.__file__).parent / "tests" / "data"


def test_scan_then_info(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["scan", str(DATA / "anatomical.nii"), str(DATA / "functional.nii"), "-o", str(out), "-q"]) == 0
    assert "indexed 2 image(s)" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 image(s), Zarr v3" in text and "anatomical" in text and "25x41x33" in text and ">i2" in text


def test_partial_failure_exits_1_with_one_line_per_bad_source(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.nii"
    bad.write_bytes(b"\x00" * 400)
    code = main(["scan", str(DATA / "anatomical.nii"), str(bad), str(tmp_path / "nope.nii"), "-o",
                 str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 2 and all(line.startswith("virtnii: error: ") for line in err)
    assert any("bad.nii" in line for line in err) and any("nope.nii" in line for line in err)
    assert (tmp_path / "out" / "virtnii.json").exists()


def test_nothing_indexed_exits_2_and_writes_nothing(tmp_path: Path, capsys) -> None:
    assert main(["scan", str(tmp_path / "nope.nii"), "-o", str(tmp_path / "out"), "-q"]) == 2
    assert "nothing indexed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_option_combination_is_one_clear_line(tmp_path: Path, capsys) -> None:
    code = main(["scan", str(DATA / "anatomical.nii"), "-o", str(tmp_path / "out"), "--format", "parquet"])
    err = capsys.readouterr().err
    assert code == 2 and "need --zarr-format 2" in err and "Traceback" not in err


def test_info_on_a_folder_that_is_not_a_manifest(tmp_path: Path, capsys) -> None:
    assert main(["info", str(tmp_path)]) == 2
    assert "not a virtnii manifest" in capsys.readouterr().err


def test_storage_options_are_parsed_as_json_and_never_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # LocalFileSystem accepts and ignores unknown options: a stand-in for credentials given on the command line
    assert main(["scan", str(DATA / "anatomical.nii"), "-o", str(out), "-q", "-s", "secret=hunter2-XYZ",
                 "-s", "max_concurrency=4"]) == 0
    for path in out.rglob("*"):
        if path.is_file():
            assert b"hunter2-XYZ" not in path.read_bytes(), path
    index = json.loads((out / "virtnii.json").read_text())
    assert "secret" not in json.dumps(index)


def test_usage_errors_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["scan", "x.nii"])
    assert exc.value.code == 2


def test_verify_reports_changed_and_missing_sources(tmp_path: Path, capsys) -> None:
    import os
    import shutil

    for name in ("anatomical.nii", "functional.nii", "example4d.nii.gz"):
        shutil.copy(DATA / name, tmp_path / name)
    out = tmp_path / "out"
    assert main(["scan", str(tmp_path), "-o", str(out), "-q"]) == 0
    assert main(["verify", str(out)]) == 0
    assert "3 of 3 source file(s) unchanged" in capsys.readouterr().out
    stat = (tmp_path / "functional.nii").stat()
    os.utime(tmp_path / "functional.nii", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    (tmp_path / "example4d.nii.gz").unlink()
    assert main(["verify", str(out)]) == 1
    captured = capsys.readouterr()
    assert "1 of 3 source file(s) unchanged" in captured.out
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2
    assert any("functional.nii" in e and "changed since it was indexed" in e for e in errors)
    assert any("example4d.nii.gz" in e and "no longer exists" in e for e in errors)


def test_info_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    """`virtnii info OUT | head`: the reader leaves early; no BrokenPipeError traceback, exit 0."""
    blob = (DATA / "anatomical.nii").read_bytes()
    for i in range(400):  # enough lines to overflow a pipe's buffer
        (tmp_path / "ds" / f"sub-{i:03d}").mkdir(parents=True)
        (tmp_path / "ds" / f"sub-{i:03d}" / f"sub-{i:03d}_T1w.nii").write_bytes(blob)
    assert main(["scan", str(tmp_path / "ds"), "-o", str(tmp_path / "out")]) == 0
    process = subprocess.Popen([sys.executable, "-m", "virtnii.cli", "info", str(tmp_path / "out")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.readline()
    process.stdout.close()
    assert process.wait(timeout=60) == 0
    assert process.stderr.read() == b""
