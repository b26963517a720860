"""CLI: exit codes, one line per failure, info output; the CLI and the Python API agree."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest

from virtnii.cli import main, named_source

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


def test_scan_help_has_exit_codes_and_examples(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["scan", "--help"])
    text = capsys.readouterr().out
    assert "exit status:" in text and "examples:" in text and "virtnii scan /data/ds000001" in text
    for code in ("0 ", "1 ", "2 ", "3 ", "130"):
        assert f"  {code}" in text, code
    assert "143 terminated (SIGTERM" in text


@pytest.mark.parametrize("debug", ["", "--debug", "env"])
def test_an_internal_error_exits_3_never_1(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch,
                                           debug: str) -> None:
    """A bug must not look like "some sources failed" (1): exit 3, one line, traceback only when asked for."""
    import virtnii.cli

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("something virtnii did not expect")

    monkeypatch.setattr(virtnii.cli, "scan", broken)
    if debug == "env":
        monkeypatch.setenv("VIRTNII_DEBUG", "1")
    assert main(["scan", str(DATA / "anatomical.nii"), "-o", str(tmp_path / "out")] + ([debug] if debug == "--debug"
                                                                                         else [])) == 3
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("virtnii: internal error: RuntimeError: something virtnii did "
                                                  "not expect -- a bug in virtnii, please report it")
    assert ("Traceback" in err) == bool(debug)


def test_interrupt_says_nothing_was_written(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """Manifests are all-or-nothing: Ctrl-C never leaves an incomplete one, and the message must not say it may."""
    import virtnii.cli

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(virtnii.cli, "scan", interrupted)
    assert main(["scan", str(DATA / "anatomical.nii"), "-o", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert err == f"virtnii: interrupted: {tmp_path / 'out'} was left as it was (a manifest is put in place only " \
                  "once complete)\n"


def test_an_empty_out_is_one_clear_line(capsys) -> None:
    assert main(["scan", str(DATA / "anatomical.nii"), "-o", ""]) == 2
    assert capsys.readouterr().err == ("virtnii: error: '': is not a manifest folder name (give the folder to write, "
                                       "e.g. -o OUT)\n")


def test_info_reads_a_remote_manifest_with_the_storage_options(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`info s3://…/manifest --anon` once ignored --anon (and -s): they apply to a remote manifest, as in
    virtnii.open, unless -m gives the manifest its own."""
    import virtnii.cli
    import virtnii.manifest

    seen: list[dict[str, object]] = []

    def read_index(manifest: str, options: dict[str, object]) -> virtnii.manifest.Index:
        seen.append(options)
        return virtnii.manifest.Index(3, "refs.json", ())

    monkeypatch.setattr(virtnii.cli, "read_index", read_index)
    assert main(["info", "s3://bucket/manifest", "--anon", "-s", "endpoint_url=http://x"]) == 0
    assert main(["info", "s3://bucket/manifest", "--anon", "-m", "profile=lab"]) == 0
    assert seen == [{"anon": True, "endpoint_url": "http://x"}, {"profile": "lab"}]


def test_sigterm_cleans_up_like_ctrl_c(tmp_path: Path) -> None:
    """`timeout` and schedulers send SIGTERM: the scan stops, nothing is left behind (no OUT.partial-*), exit 143.

    The child scans .nii.gz files whose index pass is replaced by one that waits (checking, as real passes do,
    whether the scan is being abandoned), so the signal always arrives while the partial folder exists."""
    import gzip
    import signal

    for i in range(3):
        (tmp_path / f"s{i}.nii.gz").write_bytes(gzip.compress((DATA / "anatomical.nii").read_bytes()))
    child = f"""
import importlib, sys, time
import virtnii.cli
import threading
first = threading.Lock()
def waiting(source, writer, zarr_format, advance, **options):
    if first.acquire(blocking=False):  # one line, whichever worker starts first (two printing at once interleave)
        print("indexing", flush=True)
    while True:
        advance(0)
        time.sleep(0.01)
importlib.import_module("virtnii.scan").index_gzip_source = waiting
sys.exit(virtnii.cli.main(["scan", {str(tmp_path)!r}, "-o", {str(tmp_path / 'out')!r}, "-q"]))
"""
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    assert process.stdout is not None and process.stdout.readline() == "indexing\n"
    assert list(tmp_path.glob("out.partial-*"))
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert err.endswith("virtnii: terminated: " + str(tmp_path / "out") + " was left as it was (a manifest is put "
                        "in place only once complete)\n"), err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s0.nii.gz", "s1.nii.gz", "s2.nii.gz"]


def test_example_runs_the_whole_job_and_every_check_holds(tmp_path: Path, capsys) -> None:
    assert main(["example", "-o", str(tmp_path / "ex")]) == 0
    out = capsys.readouterr().out
    assert out.count("equals a numpy block mean of nibabel's voxels: True") == 4
    assert out.count("byte for byte the (decompressed) source") == 4 and "False" not in out


def test_pyramid_combine_export_commands(tmp_path: Path, capsys) -> None:
    """The CLI is the API's thin shell: same results, exit codes by outcome, one line per problem."""
    source = tmp_path / "a.nii"
    source.write_bytes((DATA / "anatomical.nii").read_bytes())
    assert main(["scan", str(source), "-o", str(tmp_path / "m"), "-q"]) == 0
    assert main(["pyramid", str(tmp_path / "m"), "--chunks", "8", "-q"]) == 0
    assert "pyramid: 1 image(s) built" in capsys.readouterr().out
    assert main(["pyramid", str(tmp_path / "m"), "--chunks", "8", "-q"]) == 0
    again = capsys.readouterr().out
    assert "0 image(s) built" in again and "1 already complete" in again
    assert main(["info", str(tmp_path / "m")]) == 0
    assert "level 1: 13x21x17, chunks 8x8x8" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "m"), "-o", str(tmp_path / "a_out.nii"), "-q"]) == 0
    assert (tmp_path / "a_out.nii").read_bytes() == source.read_bytes()
    assert main(["export", str(tmp_path / "m"), "--level", "7", "-o", str(tmp_path / "x.nii"), "-q"]) == 2
    assert "has levels 0, 1, 2, 3, not 7" in capsys.readouterr().err
    assert main(["combine", str(tmp_path / "m"), str(tmp_path / "m"), "-o", str(tmp_path / "c")]) == 2
    assert "clash" in capsys.readouterr().err
    assert main(["combine", str(tmp_path / "m"), str(tmp_path / "m"), "--prefix", "x", "--prefix", "y",
                 "-o", str(tmp_path / "c")]) == 0
    assert "2 image(s)" in capsys.readouterr().out
    source.write_bytes(source.read_bytes()[:-2] + b"\0\0")  # same size, new mtime: stale
    import os
    os.utime(source, (1, 1))
    assert main(["pyramid", str(tmp_path / "m"), "--chunks", "4", "-q"]) == 2  # the only image failed
    assert "changed since it was indexed" in capsys.readouterr().err


def test_index_exit_codes_and_summary(tmp_path: Path, capsys) -> None:
    from bids_samples import build, image_names

    import virtnii

    root = build(tmp_path / "ds")
    out = tmp_path / "out"
    assert main(["index", str(root), "-o", str(out), "-q", "--derivatives"]) == 1  # the placeholders were skipped
    text = capsys.readouterr().out
    assert f"index: {len(image_names())} image(s)" in text and "skipped 1 × zero-byte" in text
    assert sorted(e.name for e in virtnii.manifest.read_index(str(out)).images) == sorted(image_names())
    for placeholder in (root / "sub-03").rglob("*"):
        if placeholder.is_file() or placeholder.is_symlink():
            placeholder.unlink()
    assert main(["index", str(root), "-o", str(out), "-q", "--derivatives"]) == 0
    assert "(0 read," in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["index", str(tmp_path / "empty"), "-o", str(tmp_path / "out2"), "-q"]) == 2
    assert "nothing indexed" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [
    ("t1=https://host/blobs/d86/055/uuid", ("t1", "https://host/blobs/d86/055/uuid")),
    ("sub-01/anat/T1w=s3://bucket/blobs/x?versionId=3", ("sub-01/anat/T1w", "s3://bucket/blobs/x?versionId=3")),
    ("t1=file:///data/blob", ("t1", "file:///data/blob")),
    ("https://host/x?X-Amz-Expires=300", "https://host/x?X-Amz-Expires=300"),  # '=' in the query
    ("s3://bucket/key=value/a.nii", "s3://bucket/key=value/a.nii"),
    ("/data/a=b/x.nii", "/data/a=b/x.nii"), ("a=b.nii", "a=b.nii"),  # local paths with '='
])
def test_name_equals_url_is_recognised_only_unambiguously(text: str, expected: object) -> None:
    assert named_source(text) == expected


def test_scan_names_images_as_given_on_the_command_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "a=b").mkdir()
    blob, gz = tmp_path / "a=b" / "d86055f6", tmp_path / "4c1e2b9a"
    shutil.copy(DATA / "anatomical.nii", blob)
    shutil.copy(DATA / "example4d.nii.gz", gz)
    out = tmp_path / "out"
    assert main(["scan", f"sub-01/anat/sub-01_T1w=file://{blob}", str(gz), "-o", str(out), "-q"]) == 0
    assert sorted(image["name"] for image in json.loads((out / "virtnii.json").read_text())["images"]) == \
        ["4c1e2b9a", "sub-01/anat/sub-01_T1w"]
    assert main(["scan", str(blob), "--name", "t1", "-o", str(out), "-q"]) == 0  # a path with '=' is a path
    assert [image["name"] for image in json.loads((out / "virtnii.json").read_text())["images"]] == ["t1"]
    capsys.readouterr()

    for argv, words in ((["--name", "t1", str(blob), str(gz)], "--name: names the one file given, not 2"),
                        ([f"x=file://{blob}", "--name", "t1"], "is named twice"),
                        ([f"../up=file://{blob}"], "no part of a group name may be '.', '..'")):
        assert main(["scan", *argv, "-o", str(tmp_path / "refused"), "-q"]) == 2
        assert words in capsys.readouterr().err
        assert not (tmp_path / "refused").exists()
