"""Hardening: same-size rewrites with the mtime restored, manifests whose own files are damaged, secrets in URLs,
identifying header extensions."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import niizarr
import numpy as np
import pytest
import zarr

import virtnii
from conftest import LocalHTTP
from virtnii.cli import main

DATA = Path(nib.__file__).parent / "tests" / "data"


def _rewrite_keeping_mtime(path: Path, data: bytes) -> None:
    """What ``cp -p`` / ``rsync -t`` over the file do: other bytes, same size, same mtime."""
    stat = path.stat()
    assert len(data) == stat.st_size
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:]


def _copies(tmp_path: Path, *names: str) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    for name in names:
        shutil.copy(DATA / name, folder / name)
    return folder


# ------------------------------------------------------------------------------ same size, mtime restored

def test_gzip_replaced_with_same_size_and_mtime_is_stale_before_reading(tmp_path: Path) -> None:
    src = _copies(tmp_path, "example4d.nii.gz")
    path = src / "example4d.nii.gz"
    out = tmp_path / "out"
    result = virtnii.scan([str(src)], str(out))
    assert result.images[0].fingerprint["gzip_trailer"] == path.read_bytes()[-8:].hex()
    original = path.read_bytes()
    _rewrite_keeping_mtime(path, original[:-8] + _flip(original[-8:], 0))  # another file's trailer
    with pytest.raises(virtnii.StaleSource, match="example4d.nii.gz: changed since it was indexed \\(gzip_trailer"):
        virtnii.open(str(out))["example4d"]["0"][...]
    checked, problems = virtnii.verify(str(out))
    assert checked == 1 and len(problems) == 1 and "gzip_trailer" in str(problems[0])


def test_verify_content_finds_a_flipped_bit_in_a_gzip_without_a_recorded_hash(tmp_path: Path) -> None:
    src = _copies(tmp_path, "example4d.nii.gz")
    path = src / "example4d.nii.gz"
    virtnii.scan([str(src)], str(tmp_path / "out"))
    original = path.read_bytes()
    _rewrite_keeping_mtime(path, _flip(original, len(original) // 2))
    assert virtnii.verify(str(tmp_path / "out"))[1] == []  # size, mtime and trailer all unchanged
    [problem] = virtnii.verify(str(tmp_path / "out"), content=True)[1]
    assert isinstance(problem, virtnii.InvalidGzip) and "example4d.nii.gz" in str(problem)


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz"])
def test_content_hash_recorded_at_scan_and_compared_by_verify_content(tmp_path: Path, capsys, name: str) -> None:
    src = _copies(tmp_path, name)
    path = src / name
    out = tmp_path / "out"
    assert main(["scan", str(src), "-o", str(out), "-q", "--content-hash"]) == 0
    [entry] = json.loads((out / "virtnii.json").read_text())["images"]
    import hashlib
    assert entry["fingerprint"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert main(["verify", str(out), "--content"]) == 0
    assert "1 of 1 source file(s) unchanged since indexing (content compared)" in capsys.readouterr().out
    original = path.read_bytes()
    _rewrite_keeping_mtime(path, original[:-100] + _flip(original[-100:], 0))  # one voxel, not the trailer
    assert main(["verify", str(out)]) == 0  # the fingerprint alone cannot see it
    capsys.readouterr()
    assert main(["verify", str(out), "--content"]) == 1
    err = capsys.readouterr().err
    assert f"{name}: content changed since it was indexed (sha256 was" in err or "CRC" in err


def test_verify_content_without_a_recorded_hash_says_so(tmp_path: Path) -> None:
    virtnii.scan([str(DATA / "anatomical.nii")], str(tmp_path / "out"))
    [problem] = virtnii.verify(str(tmp_path / "out"), content=True)[1]
    assert isinstance(problem, virtnii.ManifestError) and "--content-hash" in str(problem)


def test_pair_hashes_both_files(tmp_path: Path) -> None:
    img = nib.load(DATA / "anatomical.nii")
    nib.save(nib.Nifti1Pair(np.asanyarray(img.dataobj), img.affine, img.header), tmp_path / "p.hdr")
    result = virtnii.scan([str(tmp_path / "p.hdr")], str(tmp_path / "out"), content_hash=True)
    [entry] = result.images
    assert len(entry.fingerprint["sha256"]) == len(entry.data_fingerprint["sha256"]) == 64
    _rewrite_keeping_mtime(tmp_path / "p.img", _flip((tmp_path / "p.img").read_bytes(), 5000))
    [problem] = virtnii.verify(str(tmp_path / "out"), content=True)[1]
    assert "p.img: content changed" in str(problem)


# ------------------------------------------------------------------------------------ the manifest itself

@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    virtnii.scan([str(DATA / "anatomical.nii"), str(DATA / "example4d.nii.gz")], str(out))
    assert virtnii.verify(str(out)) == (2, [])
    return out


def test_verify_reports_missing_or_damaged_references(manifest: Path, capsys) -> None:
    refs = manifest / "refs.json"
    text = refs.read_text()
    refs.write_text(text[: len(text) // 2])
    assert main(["verify", str(manifest)]) == 1
    captured = capsys.readouterr()
    assert "refs.json: cannot read the references" in captured.err
    assert "2 of 2 source file(s) unchanged since indexing; 1 problem(s) with the manifest itself" in captured.out
    refs.unlink()
    [problem] = virtnii.verify(str(manifest))[1]
    assert isinstance(problem, virtnii.ManifestError) and "references file is missing" in str(problem)


def test_verify_reports_references_that_disagree_with_the_index_file(manifest: Path) -> None:
    document = json.loads((manifest / "refs.json").read_text())
    refs = document["refs"]
    del refs["anatomical/0/c/0/0/0"]
    key = next(k for k in refs if k.startswith("example4d/0/c/"))
    refs[key] = [refs[key][0], refs[key][1], 10**9]
    (manifest / "refs.json").write_text(json.dumps(document))
    problems = [str(p) for p in virtnii.verify(str(manifest))[1]]
    assert len(problems) == 2
    assert any("chunk anatomical/0/c/0/0/0 of image 'anatomical' is missing" in p for p in problems)
    assert any(f"chunk {key} points at bytes" in p for p in problems)


def test_verify_reports_missing_damaged_or_foreign_sidecars(manifest: Path, tmp_path: Path) -> None:
    [descriptor] = (manifest / "gzindex").glob("*.gzidx.json")
    [index_file] = (manifest / "gzindex").glob("*.gzidx.gz")
    saved = index_file.read_bytes()
    index_file.write_bytes(saved[: len(saved) // 2])
    [problem] = virtnii.verify(str(manifest))[1]
    assert isinstance(problem, virtnii.ManifestError) and "unreadable gzip index" in str(problem)
    index_file.unlink()
    [problem] = virtnii.verify(str(manifest))[1]
    assert "gzip index missing" in str(problem)
    index_file.write_bytes(saved)
    meta = json.loads(descriptor.read_text())
    meta["fingerprint"]["mtime"] += 1  # a sidecar of another version of the source
    descriptor.write_text(json.dumps(meta))
    [problem] = virtnii.verify(str(manifest))[1]
    assert "describes fingerprint" in str(problem)
    descriptor.unlink()
    [problem] = virtnii.verify(str(manifest))[1]
    assert "gzidx.json" in str(problem)


def test_verify_reads_every_window_of_a_sidecar(tmp_path: Path) -> None:
    """Readers load a sidecar's windows only as chunks need them; verify inflates them all."""
    volume = np.random.default_rng(0).integers(0, 40, (256, 256, 128), dtype=np.int16)  # 4 chunks of 4 MiB
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "t1.nii.gz")
    out = tmp_path / "out"
    virtnii.scan([str(tmp_path / "t1.nii.gz")], str(out))
    assert virtnii.verify(str(out)) == (1, [])
    [descriptor] = (out / "gzindex").glob("*.gzidx.json")
    [index_file] = (out / "gzindex").glob("*.gzidx.gz")
    members = json.loads(descriptor.read_text())["index_members"]
    assert len(members) == 5  # the point table, 3 windows, the end
    data = bytearray(index_file.read_bytes())
    data[members[2] + 20:members[2] + 40] = bytes(20)
    index_file.write_bytes(bytes(data))
    [problem] = virtnii.verify(str(out))[1]
    assert isinstance(problem, virtnii.ManifestError)
    assert index_file.name in str(problem) and "window 1" in str(problem) and "damaged" in str(problem)


def test_verify_checks_parquet_references(tmp_path: Path) -> None:
    out = tmp_path / "out"
    virtnii.scan([str(DATA / "anatomical.nii"), str(DATA / "example4d.nii.gz")], str(out), zarr_format=2,
                 ref_format="parquet")
    assert virtnii.verify(str(out)) == (2, [])
    shutil.rmtree(out / "refs.parquet" / "anatomical" / "0")
    [problem] = virtnii.verify(str(out))[1]
    assert "chunk anatomical/0/0.0.0 of image 'anatomical' is missing" in str(problem)


# ----------------------------------------------------------------------------------------- URL secrets

PRESIGNED = ("?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAVIRTNIITEST%2F20260101%2Fus-east-1"
             "&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-Signature=f00dfacefeedbeef")


def test_redact_hides_secret_query_values_and_passwords() -> None:
    from virtnii.errors import redact

    text = redact(f"https://h/x.nii{PRESIGNED} and https://u:hunter2@h/y.nii and ?sig=abc&se=2026&token=t")
    assert "f00dface" not in text and "AKIAVIRTNIITEST" not in text and "hunter2" not in text
    assert "sig=REDACTED&se=2026&token=REDACTED" in text and "X-Amz-Expires=3600" in text
    err = virtnii.SourceNotFound(f"https://h/x.nii{PRESIGNED}", f"cannot read https://h/x.nii{PRESIGNED}")
    assert "f00dface" not in str(err) and "f00dface" not in err.source + err.problem


def test_presigned_urls_are_refused_unless_asked_and_never_printed(http_root: tuple[Path, LocalHTTP],
                                                                    tmp_path: Path, capsys) -> None:
    root, server = http_root
    shutil.copy(DATA / "anatomical.nii", root / "a.nii")
    shutil.copy(DATA / "example4d.nii.gz", root / "b.nii.gz")
    urls = [f"{server.url}/a.nii{PRESIGNED}", f"{server.url}/b.nii.gz{PRESIGNED}", f"{server.url}/nope.nii{PRESIGNED}"]
    out = tmp_path / "out"
    assert main(["scan", *urls, "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "X-Amz-Credential, X-Amz-Signature" in err and "--write-url-secrets" in err
    assert "f00dface" not in err and "AKIAVIRTNII" not in err and not out.exists()

    assert main(["scan", *urls, "-o", str(out), "-q", "--write-url-secrets"]) == 1  # nope.nii is missing
    captured = capsys.readouterr()
    assert "nope.nii" in captured.err and "f00dface" not in captured.err + captured.out
    index = json.loads((out / "virtnii.json").read_text())
    assert sorted(image["name"] for image in index["images"]) == ["a", "b"]  # the query is no part of a name
    assert all(image["source"].endswith(PRESIGNED) for image in index["images"])  # asked for: needed to read
    group = virtnii.open(str(out))
    for name, original in (("a", "anatomical.nii"), ("b", "example4d.nii.gz")):
        np.testing.assert_array_equal(virtnii.to_nibabel(group[name]).dataobj.get_unscaled(),
                                      nib.load(DATA / original).dataobj.get_unscaled())
    assert main(["info", str(out)]) == 0
    assert "f00dface" not in capsys.readouterr().out
    (root / "a.nii").unlink()
    problems = virtnii.verify(str(out))[1]
    assert problems and all("f00dface" not in str(p) for p in problems)


def test_local_file_names_with_question_marks_are_not_urls(tmp_path: Path) -> None:
    path = tmp_path / "odd?token=1.nii"
    shutil.copy(DATA / "anatomical.nii", path)
    result = virtnii.scan([str(path)], str(tmp_path / "out"))
    assert not result.failures and result.images[0].name == "odd?token=1"


# ------------------------------------------------------------------------------------------ extensions

def test_no_extensions_leaves_identifying_text_out_and_voxels_unchanged(tmp_path: Path) -> None:
    img = nib.load(DATA / "anatomical.nii")
    img = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header)
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"PatientName=Doe^Jane"))
    nib.save(img, tmp_path / "ext.nii.gz")
    nib.save(img, tmp_path / "ext.nii")
    with_ext = tmp_path / "with"
    virtnii.scan([str(tmp_path / "ext.nii"), str(tmp_path / "ext.nii.gz")], str(with_ext))
    assert b"PatientName" in _decoded_refs(with_ext)
    out = tmp_path / "out"
    assert main(["scan", str(tmp_path / "ext.nii"), str(tmp_path / "ext.nii.gz"), "-o", str(out), "-q",
                 "--no-extensions"]) == 0
    assert b"PatientName" not in _decoded_refs(out)
    group = virtnii.open(str(out))
    expected = np.asanyarray(nib.load(tmp_path / "ext.nii").dataobj.get_unscaled())
    for name in ("ext", "ext_nii_gz"):
        raw = np.asarray(group[name]["nifti"][:]).tobytes()
        assert len(raw) == 352 and raw[348:] == bytes(4)
        assert group[name]["nifti"].attrs.get("NIIFormat") is not None
        ours = virtnii.to_nibabel(group[name])
        assert len(ours.header.extensions) == 0
        np.testing.assert_array_equal(ours.dataobj.get_unscaled(), expected)
        np.testing.assert_array_equal(ours.affine, img.affine)
        theirs = niizarr.zarr2nii(zarr.storage.FsspecStore(group.store.fs, read_only=True, path=name))
        np.testing.assert_array_equal(np.asanyarray(theirs.dataobj), expected)


def _decoded_refs(out: Path) -> bytes:
    """The references with inline base64 values decoded (the header bytes are base64 there)."""
    import base64
    refs = json.loads((out / "refs.json").read_text())["refs"]
    return b"".join(base64.b64decode(v[7:]) if isinstance(v, str) and v.startswith("base64:") else
                    json.dumps(v).encode() for v in refs.values())
