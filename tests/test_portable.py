"""The portable gzip path, taken where no zlib loads through ctypes (Windows, minimal images): forced here, it must
give the voxels nibabel gives, bit for bit, and decode indexes made by the ctypes path (and the other way round)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import virtnii
from virtnii import gzindex

DATA = Path(nib.__file__).parent / "tests" / "data"
NIBABEL_GZ = sorted(DATA.glob("*.nii.gz"))


@pytest.fixture
def portable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(gzindex.INFLATER_VARIABLE, "portable")


def test_portable_when_no_zlib_loads_through_ctypes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gzindex, "_zlib_ng", lambda: None)
    monkeypatch.setattr(gzindex, "_system_zlib", lambda: None)
    monkeypatch.setattr(gzindex, "_CTYPES_TRIED", False)
    monkeypatch.setattr(gzindex, "_CTYPES_ZLIB", None)  # restored afterwards, with what was loaded
    assert gzindex.inflater().startswith("portable")
    index = gzindex.build_index(str(DATA / "example4d.nii.gz"), [1000, 200_000])
    plain = gzip.decompress((DATA / "example4d.nii.gz").read_bytes())
    raw = (DATA / "example4d.nii.gz").read_bytes()
    assert index.read_range(lambda a, b: raw[a:b], 150_000, 300_000) == plain[150_000:300_000]


def test_version_names_the_inflater() -> None:
    for choice, expected in (("auto", "via ctypes"), ("portable", "portable")):
        out = subprocess.run([sys.executable, "-m", "virtnii.cli", "--version"], capture_output=True, text=True,
                             env={**os.environ, gzindex.INFLATER_VARIABLE: choice}, check=True).stdout
        assert expected in out, out


def test_unknown_inflater_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(gzindex.INFLATER_VARIABLE, "fast")
    with pytest.raises(ValueError, match="'auto' or 'portable'"):
        gzindex.inflater()


@pytest.mark.usefixtures("portable")
def test_nibabel_gz_files_read_bit_exact(tmp_path: Path) -> None:
    assert NIBABEL_GZ
    result = virtnii.scan([str(p) for p in NIBABEL_GZ], str(tmp_path / "out"))
    assert not result.failures, [str(f) for f in result.failures]
    group = virtnii.open(str(tmp_path / "out"))
    for entry in result.images:
        ours = virtnii.to_nibabel(group[entry.name])
        theirs = nib.load(entry.source[len("file://"):])
        np.testing.assert_array_equal(ours.dataobj.get_unscaled(), theirs.dataobj.get_unscaled())
        np.testing.assert_array_equal(ours.affine, theirs.affine)


def _noisy(tmp_path: Path) -> tuple[bytes, bytes, str]:
    """Data with stored and Huffman blocks at every bit offset: noise and a smooth ramp, alternating."""
    rng = np.random.default_rng(3)
    ramp = (np.sin(np.arange(40_000) / 900) * 800 + 1000).astype("<i2").tobytes()
    plain = b"".join(rng.bytes(50_000) + ramp for _ in range(25))
    path = tmp_path / "noisy.gz"
    path.write_bytes(gzip.compress(plain, compresslevel=6))
    return plain, path.read_bytes(), str(path)


@pytest.mark.parametrize("built, decoded", [("auto", "portable"), ("portable", "auto")])
def test_indexes_decode_across_inflaters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, built: str,
                                         decoded: str) -> None:
    plain, raw, path = _noisy(tmp_path)
    monkeypatch.setenv(gzindex.INFLATER_VARIABLE, built)
    index = gzindex.build_index(path, range(5, len(plain), 17_000))
    if built == "auto":
        assert set(index.points["bits"].tolist()) == set(range(8))
    monkeypatch.setenv(gzindex.INFLATER_VARIABLE, decoded)
    starts = index.points["uncmp_offset"].tolist()
    for start, end in zip(starts, [*starts[1:], len(plain)]):
        assert index.read_range(lambda a, b: raw[a:b], start, end) == plain[start:end], start
