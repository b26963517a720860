"""Finding sources and naming their groups: folders, globs and files at any fsspec URL, links, BIDS names.

A folder of a real archive holds links (DataLad), files that vanish or cannot be read, names that collide; each
must end as one source with a stable name, or as one failure naming the file, with the rest still indexed.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest

import virtnii
from nifti_samples import DATA, bids_tree, nibabel_raw
from virtnii import fingerprint
from virtnii.sources import assign_names, expand


def test_glob_and_explicit_files_are_deduplicated(tmp_path: Path) -> None:
    files = bids_tree(tmp_path / "ds")
    sources = [str(tmp_path / "ds" / "sub-01" / "*" / "*.nii"), str(files["sub-01/anat/sub-01_T1w"])]
    found, failures = expand(sources, {})
    assert not failures
    assert len(found) == 2


def test_same_stem_in_one_folder_gets_distinct_names(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    shutil.copy(DATA / "anatomical.nii", tmp_path / "a" / "x.nii")
    shutil.copy(DATA / "anatomical.nii", tmp_path / "a" / "x.NII")
    found, _ = expand([str(tmp_path / "a")], {})
    assign_names(found)
    assert len({s.name for s in found}) == 2


def test_image_inside_another_image_group_is_renamed(tmp_path: Path) -> None:
    (tmp_path / "ds" / "s").mkdir(parents=True)
    shutil.copy(DATA / "anatomical.nii", tmp_path / "ds" / "s.nii")
    shutil.copy(DATA / "functional.nii", tmp_path / "ds" / "s" / "0.nii")
    result = virtnii.scan([str(tmp_path / "ds")], str(tmp_path / "out"))
    assert sorted(e.name for e in result.images) == ["s", "s_0"]
    group = virtnii.open(str(tmp_path / "out"))
    np.testing.assert_array_equal(virtnii.to_nibabel(group["s"]).dataobj.get_unscaled(), nibabel_raw(DATA / "anatomical.nii"))
    np.testing.assert_array_equal(virtnii.to_nibabel(group["s_0"]).dataobj.get_unscaled(), nibabel_raw(DATA / "functional.nii"))


def test_one_file_named_two_ways_is_one_source(tmp_path: Path) -> None:
    shutil.copytree(DATA, tmp_path / "d", ignore=shutil.ignore_patterns("*.gz", "*.hdr", "*.img", "*.dconn.nii"))
    found, _ = expand([str(tmp_path / "d" / "anatomical.nii"), str(tmp_path / "d" / ".." / "d" / "anatomical.nii")], {})
    assert len(found) == 1


def test_credentials_in_a_url_are_refused_and_not_echoed(tmp_path: Path) -> None:
    result = virtnii.scan(["http://user:s3cr3t@127.0.0.1:9/a.nii"], str(tmp_path / "out"))
    assert result.manifest is None
    (failure,) = result.failures
    assert "storage options" in str(failure) and "s3cr3t" not in str(failure)


def test_local_listing_matches_fsspec(tmp_path: Path) -> None:
    """virtnii lists local folders itself (for speed): it must find what fsspec finds, fingerprinted as the
    read-time check (``fs.info``) will see them — for a symbolic link, the target's size and mtime (fsspec's own
    ``find`` gives the link's mtime, which made every read of a linked source a false StaleSource)."""
    files = bids_tree(tmp_path / "ds")
    os.utime(files["sub-01/anat/sub-01_T1w"], (1e9, 1e9))
    (tmp_path / "ds" / "sub-02" / "link.nii").symlink_to(files["sub-01/anat/sub-01_T1w"])
    found, failures = expand([str(tmp_path / "ds")], {})
    assert not failures
    fs = fsspec.filesystem("file")
    expected = [p for p in fs.find(str(tmp_path / "ds")) if p.endswith(".nii")]
    assert sorted(s.path for s in found) == sorted(expected)
    for source in found:
        assert fingerprint.from_info(source.info) == fingerprint.from_info(fs.info(source.path))
    for source, name in ((tmp_path / "ds", "sub-02/link"), (tmp_path / "ds" / "sub-0*" / "*.nii", "sub-02/link")):
        virtnii.scan([str(source)], str(tmp_path / "out"))
        linked = virtnii.to_nibabel(virtnii.open(str(tmp_path / "out"))[name]).dataobj.get_unscaled()
        np.testing.assert_array_equal(linked, nibabel_raw(files["sub-01/anat/sub-01_T1w"]))


def test_symlinked_folders_are_not_entered(tmp_path: Path) -> None:
    """As in fsspec: a linked folder (``latest -> sub-01``, or a cycle) would index its images twice, under names
    that depend on listing order."""
    files = bids_tree(tmp_path / "ds")
    for link, target in (("aa", "sub-01"), ("zz", "sub-01"), ("sub-01/anat/loop", ".")):
        (tmp_path / "ds" / link).symlink_to(tmp_path / "ds" / target, target_is_directory=True)
    result = virtnii.scan([str(tmp_path / "ds")], str(tmp_path / "out"))
    assert not result.failures
    assert sorted(e.name for e in result.images) == sorted(files)


@pytest.mark.parametrize("glob", [False, True])
def test_broken_links_are_reported_and_the_rest_indexed(tmp_path: Path, glob: bool) -> None:
    """DataLad datasets hold files not fetched yet as links to nothing; a link to itself cannot even be stat'ed."""
    files = bids_tree(tmp_path / "ds")
    anat = tmp_path / "ds" / "sub-01" / "anat"
    (anat / "sub-01_T2w.nii").symlink_to("../../.git/annex/objects/XX/missing")
    (anat / "sub-01_PD.nii").symlink_to("sub-01_PD.nii")
    source = anat / "*.nii" if glob else tmp_path / "ds"
    result = virtnii.scan([str(source)], str(tmp_path / "out"))
    expected = ["sub-01_T1w"] if glob else sorted(files)
    assert sorted(e.name for e in result.images) == expected
    errors = {Path(e.source).name: e for e in result.failures}
    assert sorted(errors) == ["sub-01_PD.nii", "sub-01_T2w.nii"]
    missing = errors["sub-01_T2w.nii"]
    assert isinstance(missing, virtnii.SourceNotFound) and "datalad get" in str(missing)
    assert isinstance(errors["sub-01_PD.nii"], virtnii.SourceAccessError)


def test_unlistable_subfolder_is_reported_and_the_rest_indexed(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    files = bids_tree(tmp_path / "ds")
    locked = tmp_path / "ds" / "sub-02"
    real_scandir = os.scandir

    def scandir(path: str) -> Any:  # chmod does not stop root, who runs CI: refuse the folder here instead
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = virtnii.scan([str(tmp_path / "ds")], str(tmp_path / "out"))
    assert sorted(e.name for e in result.images) == sorted(n for n in files if not n.startswith("sub-02"))
    [error] = result.failures
    assert isinstance(error, virtnii.SourceAccessError) and "permission denied" in str(error)
    assert error.source == locked.as_uri()


def test_expand_reports_progress_after_each_source(tmp_path: Path) -> None:
    files = bids_tree(tmp_path / "ds")
    counts: list[int] = []
    expand([str(tmp_path / "ds" / "sub-01"), str(tmp_path / "missing"), str(tmp_path / "ds")], {}, counts.append)
    assert counts == [2, 2, len(files)]


@pytest.mark.parametrize("how", ["folder", "glob", "file", "link"])
def test_fifos_and_sockets_are_reported_never_opened(tmp_path: Path, how: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening a FIFO for reading blocks until something writes to it: `scan d` with a FIFO in it hung forever.
    Only regular files (and links to them) are sources; the rest are reported by name, without being opened."""
    import socket

    files = bids_tree(tmp_path / "ds")
    anat = tmp_path / "ds" / "sub-01" / "anat"
    os.mkfifo(anat / "sub-01_T2w.nii")
    monkeypatch.chdir(anat)  # a socket's path must fit in 108 bytes: bind it by a relative name
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("sub-01_PD.nii")
        (tmp_path / "link.nii").symlink_to(anat / "sub-01_T2w.nii")
        given = {"folder": [tmp_path / "ds"], "glob": [anat / "*.nii"], "link": [tmp_path / "link.nii"],
                 "file": [anat / "sub-01_T2w.nii", anat / "sub-01_PD.nii", anat / "sub-01_T1w.nii"]}[how]
        found, failures = expand([str(p) for p in given], {})
    kept = {Path(s.path).name for s in found}
    assert kept == ({f.name for f in files.values()} if how == "folder" else set() if how == "link"
                    else {"sub-01_T1w.nii"})
    errors = {Path(e.source).name: str(e) for e in failures}
    assert all(isinstance(e, virtnii.SourceAccessError) for e in failures)
    if how == "link":
        assert list(errors) == ["link.nii"] and "named pipe (FIFO)" in errors["link.nii"]
        return
    assert sorted(errors) == ["sub-01_PD.nii", "sub-01_T2w.nii"]
    assert "named pipe (FIFO), not a regular file" in errors["sub-01_T2w.nii"]
    assert "a socket, not a regular file" in errors["sub-01_PD.nii"]


def test_an_existing_path_with_glob_characters_is_literal(tmp_path: Path) -> None:
    """`br[ack]et.nii` exists: it is the file, not a pattern matching `brat.nii` (which once indexed nothing)."""
    shutil.copy(DATA / "anatomical.nii", tmp_path / "br[ack]et.nii")
    shutil.copy(DATA / "functional.nii", tmp_path / "brat.nii")
    found, failures = expand([str(tmp_path / "br[ack]et.nii")], {})
    assert [Path(s.path).name for s in found] == ["br[ack]et.nii"] and not failures
    found, failures = expand([str(tmp_path / "br[ack]t.nii")], {})  # not a file: still a pattern
    assert [Path(s.path).name for s in found] == ["brat.nii"] and not failures


@pytest.mark.parametrize("kind", ["empty_folder", "folder_without_nifti", "glob_matching_nothing",
                                  "glob_matching_other_files"])
def test_a_source_that_yields_nothing_says_why(tmp_path: Path, kind: str) -> None:
    (tmp_path / "d").mkdir()
    if kind in ("folder_without_nifti", "glob_matching_other_files"):
        (tmp_path / "d" / "notes.txt").write_text("no images here")
    given = str(tmp_path / "d") if "folder" in kind else str(tmp_path / "d" / ("*.nii" if kind ==
                                                                                  "glob_matching_nothing" else "*"))
    found, failures = expand([given], {})
    assert not found
    [error] = failures
    assert isinstance(error, virtnii.SourceNotFound) and error.source == given
    assert ("pattern matches no NIfTI files" if "glob" in kind else "folder holds no NIfTI files") in str(error)


@pytest.mark.parametrize("url", ["s3://", "s3:///", "s3a://"])
def test_a_url_naming_no_bucket_is_refused_clearly(url: str) -> None:
    """`virtnii scan s3:// --anon` was a ValueError traceback from s3fs ("Cannot traverse all of S3")."""
    found, failures = expand([url], {"anon": True})
    assert not found
    [error] = failures
    assert isinstance(error, virtnii.SourceAccessError) and error.source == url and "names no bucket" in str(error)


# ------------------------------------------------------------------------------------------------ given names

@pytest.mark.parametrize("names, words", [
    (["", "b"], "no empty parts"), (["/abs", "b"], "no empty parts"), (["a/", "b"], "no empty parts"),
    (["a//b", "c"], "no empty parts"), (["a/../b", "c"], "'.', '..'"), ([".", "b"], "'.', '..'"),
    (["a/__meta", "b"], "reserves names starting with '__'"), (["same", "same"], "given to"),
    (["a", "a/b"], "inside the image 'a'"),
])
def test_unusable_names_are_refused_before_anything_is_read(tmp_path: Path, names: list[str], words: str) -> None:
    urls = [str(DATA / "anatomical.nii"), str(DATA / "functional.nii")]
    with pytest.raises(virtnii.ManifestError, match=re.escape(words)) as caught:
        virtnii.scan(list(zip(names, urls)), str(tmp_path / "out"))
    assert caught.value.source in urls
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["folder", "glob"])
def test_a_name_names_one_file_not_a_folder_or_glob(tmp_path: Path, how: str) -> None:
    bids_tree(tmp_path / "ds")
    given = str(tmp_path / "ds") if how == "folder" else str(tmp_path / "ds" / "sub-01" / "*" / "*.nii")
    with pytest.raises(virtnii.ManifestError, match="names one file"):
        expand([("t1", given)], {})


def test_found_names_make_way_for_given_ones(tmp_path: Path) -> None:
    """A given name is used verbatim: a found file whose name it takes (or would hold inside it) is renamed."""
    files = bids_tree(tmp_path / "ds")
    (tmp_path / "x").mkdir()
    shutil.copy(DATA / "anatomical.nii", tmp_path / "x" / "anatomical.nii")
    t1 = files["sub-01/anat/sub-01_T1w"]
    sources = [str(tmp_path / "ds"), ("sub-02/anat/sub-02_T1w", str(t1)),  # taken from the folder's sub-02
               ("anatomical/t1", str(tmp_path / "x" / "anatomical.nii")), str(DATA / "anatomical.nii")]
    found, failures = expand(sources, {})
    assert not failures
    assign_names(found)
    by_path = {s.path: s.name for s in found}
    assert by_path[str(t1)] == "sub-02/anat/sub-02_T1w"  # given wins over the folder that found it
    assert by_path[str(tmp_path / "x" / "anatomical.nii")] == "anatomical/t1"
    assert by_path[str(files["sub-02/anat/sub-02_T1w"])] not in ("sub-02/anat/sub-02_T1w", "sub-02")
    assert by_path[str(DATA / "anatomical.nii")] != "anatomical"  # it would hold the given anatomical/t1
    assert len(set(by_path.values())) == len(found) == len(files) + 2


def test_one_file_given_two_names_is_refused(tmp_path: Path) -> None:
    with pytest.raises(virtnii.ManifestError, match="given two names, 'a' and 'b'"):
        expand([("a", str(DATA / "anatomical.nii")), ("b", str(DATA / ".." / "data" / "anatomical.nii"))], {})


def test_named_sources_are_pairs_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="items"):
        virtnii.scan({"t1": str(DATA / "anatomical.nii")}, str(tmp_path / "out"))
    with pytest.raises(TypeError, match="pair of strings"):
        virtnii.scan([("t1", str(DATA / "anatomical.nii"), "extra")], str(tmp_path / "out"))
