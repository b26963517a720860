"""Seek-point indexes: built in one pass, exact on real files, every bit offset, multi-member, GZIDX compatible.

Every test runs twice: with zlib's inflate through ctypes, and with the portable path forced (indexed_gzip's seek
points, Python's zlib for the checks, ISA-L for decoding), which is what runs where no zlib loads through ctypes.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fsspec
import fsspec.implementations.local
import indexed_gzip
import nibabel as nib
import numpy as np
import pytest
import rapidgzip

from virtnii import gzindex
from virtnii.errors import InvalidGzip, ManifestError, SourceAccessError, SourceNotFound

SITE = Path(nib.__file__).parent.parent
REAL_FILES = sorted(
    [*(SITE / "nibabel" / "tests" / "data").glob("*.nii.gz"),
     *(SITE / "nilearn" / "datasets" / "data").glob("mni_icbm152_*.nii.gz"),
     *(p for p in (SITE / "dipy" / "data" / "files").glob("*.nii.gz") if p.stat().st_size < 500_000)],
    key=lambda p: p.name)


@pytest.fixture(autouse=True, params=["auto", "portable"])
def inflater(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(gzindex.INFLATER_VARIABLE, request.param)
    return request.param


def _mri_like(n: int, seed: int = 0) -> bytes:
    """Compressible but not trivial bytes (a smooth ramp plus noise), like int16 MRI voxels."""
    rng = np.random.default_rng(seed)
    ramp = (np.sin(np.arange(n // 2) / 5000) * 800 + 1000).astype(np.int16)
    return (ramp + rng.integers(-20, 20, n // 2, dtype=np.int16)).tobytes()


def _counting_fetch(raw: bytes, calls: list[tuple[int, int]]):
    def fetch(start: int, end: int) -> bytes:
        calls.append((start, end))
        return raw[start:end]
    return fetch


def _check_reads(index: gzindex.GzipIndex, raw: bytes, plain: bytes, bounds: list[int]) -> None:
    """Every [bounds[i], bounds[i+1]) range decodes to the same bytes as gzip, with one fetch each."""
    for start, end in zip(bounds[:-1], bounds[1:]):
        calls: list[tuple[int, int]] = []
        assert index.read_range(_counting_fetch(raw, calls), start, end) == plain[start:end], (start, end)
        assert len(calls) == 1


@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.name)
def test_real_files_read_like_gzip(path: Path) -> None:
    raw = path.read_bytes()
    plain = gzip.decompress(raw)
    bounds = sorted({0, *np.linspace(0, len(plain), 9, dtype=int)[1:-1].tolist(), len(plain)})
    index = gzindex.build_index(str(path), bounds[1:-1])
    assert index.uncompressed_size == len(plain)
    assert index.compressed_size == len(raw)
    assert index.fingerprint["size"] == len(raw)
    assert index.source == f"file://{path}"
    _check_reads(index, raw, plain, bounds)
    rng = np.random.default_rng(len(raw))
    for start in rng.integers(0, len(plain), 10).tolist():
        end = start + int(rng.integers(1, 200_000))
        assert index.read_range(lambda a, b: raw[a:b], start, end) == plain[start:end]


def test_every_bit_offset_and_only_needed_points(tmp_path: Path) -> None:
    plain = _mri_like(6 << 20)
    path = tmp_path / "bits.gz"
    path.write_bytes(gzip.compress(plain, compresslevel=6))
    raw = path.read_bytes()
    offsets = list(range(1000, len(plain), 64 * 1024))
    index = gzindex.build_index(str(path), offsets)
    bits = set(index.points["bits"].tolist())
    assert bits == set(range(8)), bits
    assert not index.points["has_window"][0] and index.points["uncmp_offset"][0] == 0  # the stream start
    assert index.points["has_window"][1:].all()
    assert len(index.points) <= len(offsets) + 1  # one point per offset at most, shared when possible
    # every point serves some offset, and sits less than a deflate block (~50 KB here) before it
    per_offset = np.searchsorted(index.points["uncmp_offset"], offsets, side="right") - 1
    assert set(per_offset.tolist()) | {0} == set(range(len(index.points)))
    assert (np.asarray(offsets) - index.points["uncmp_offset"][per_offset] < 128 * 1024).all()
    _check_reads(index, raw, plain, [0, *offsets, len(plain)])


def _block_type(raw: bytes, point: np.void) -> int:
    """BTYPE of the deflate block starting at a seek point (0 stored, 1 fixed, 2 dynamic Huffman)."""
    bit = 8 * int(point["cmp_offset"]) - int(point["bits"])  # deflate packs bits from the low end of each byte
    header = [(raw[(bit + i) // 8] >> ((bit + i) % 8)) & 1 for i in range(3)]
    return header[1] | header[2] << 1


def test_stored_blocks_at_unaligned_points(tmp_path: Path) -> None:
    """Noisy data makes zlib emit stored blocks, which pad to the file's byte grid: decode must keep that grid."""
    rng = np.random.default_rng(7)
    plain = b"".join(rng.bytes(90_000) + _mri_like(60_000, seed) for seed in range(30))
    path = tmp_path / "stored.gz"
    path.write_bytes(gzip.compress(plain, compresslevel=6))
    raw = path.read_bytes()
    offsets = list(range(7, len(plain), 20_000))
    index = gzindex.build_index(str(path), offsets)
    stored = [p for p in index.points[1:] if _block_type(raw, p) == 0]
    assert any(p["bits"] for p in stored), "no unaligned seek point at a stored block: the test lost its point"
    assert {_block_type(raw, p) for p in index.points[1:]} >= {0, 2}
    _check_reads(index, raw, plain, [0, *offsets, len(plain)])


def test_stops_fetch_only_the_span_needed(tmp_path: Path, inflater: str) -> None:
    plain = _mri_like(4 << 20)
    path = tmp_path / "span.gz"
    path.write_bytes(gzip.compress(plain))
    raw = path.read_bytes()
    offsets = list(range(0, len(plain), 1 << 20))
    index = gzindex.build_index(str(path), offsets)
    spans = [index.span(a, b) for a, b in zip(offsets, [*offsets[1:], len(plain)])]
    # exact stops from our own pass; indexed_gzip's points lie up to its spacing (a quarter chunk) either side
    assert sum(s.cmp_end - s.cmp_start for s in spans) < len(raw) * (1.1 if inflater == "auto" else 1.6)
    for s, (a, b) in zip(spans, zip(offsets, [*offsets[1:], len(plain)])):
        assert index.decode(s, raw[s.cmp_start:s.cmp_end], a, b) == plain[a:b]


def _multi_member(tmp_path: Path, padding: bytes = b"") -> tuple[Path, bytes, list[int]]:
    pieces = [_mri_like(n, seed) for seed, n in enumerate([300_000, 10, 0, 500_000, 200_000])]
    path = tmp_path / "multi.gz"
    path.write_bytes(b"".join(gzip.compress(p, mtime=0) for p in pieces) + padding)
    return path, b"".join(pieces), np.cumsum([0, *map(len, pieces)]).tolist()


@pytest.mark.parametrize("padding", [b"", b"\0" * 1000], ids=["plain", "zero-padded"])
def test_multi_member(tmp_path: Path, padding: bytes) -> None:
    path, plain, starts = _multi_member(tmp_path, padding)
    raw = path.read_bytes()
    offsets = [1, 150_000, starts[1], starts[3] + 5, starts[4] - 3, starts[4] + 100_000]
    index = gzindex.build_index(str(path), offsets)
    assert index.uncompressed_size == len(plain)
    assert index.members["uncmp_offset"].tolist() == [0, *starts[1:5]]  # member starts (incl. the empty one)
    assert (index.points["bits"][~index.points["has_window"]] == 0).all()
    _check_reads(index, raw, plain, [0, *offsets, len(plain)])
    # ranges spanning several members, from a point that is not byte aligned
    assert index.read_range(lambda a, b: raw[a:b], 150_000, starts[4] + 1000) == plain[150_000:starts[4] + 1000]
    assert index.read_range(lambda a, b: raw[a:b], 0, len(plain)) == plain


def test_gzidx_round_trip_and_offsets_zero_and_end(tmp_path: Path) -> None:
    plain = _mri_like(1 << 20)
    path = tmp_path / "rt.gz"
    path.write_bytes(gzip.compress(plain))
    index = gzindex.build_index(str(path), [0, 300_000, len(plain), len(plain) + 10])
    again = gzindex.GzipIndex.from_gzidx(index.to_gzidx(), index.source, index.fingerprint)
    assert (again.points == index.points).all()
    assert (again.windows == index.windows).all()
    assert (again.compressed_size, again.uncompressed_size) == (index.compressed_size, index.uncompressed_size)
    raw = path.read_bytes()
    assert again.read_range(lambda a, b: raw[a:b], 299_990, 400_000) == plain[299_990:400_000]
    assert index.read_range(lambda a, b: raw[a:b], len(plain) - 5, len(plain) + 99) == plain[-5:]
    assert index.read_range(lambda a, b: raw[a:b], 10, 10) == b""


def _read_with_indexed_gzip(gz: Path, gzidx: bytes, ranges: list[tuple[int, int]]) -> list[bytes]:
    with indexed_gzip.IndexedGzipFile(str(gz), auto_build=False) as f:
        f.import_index(fileobj=io.BytesIO(gzidx))
        out = []
        for start, end in ranges:
            f.seek(start)
            out.append(f.read(end - start))
    return out


def test_sidecar_loads_in_indexed_gzip_and_rapidgzip(tmp_path: Path) -> None:
    path, plain, starts = _multi_member(tmp_path)
    offsets = [100_000, starts[3] + 7, starts[4] + 50_000]
    index = gzindex.build_index(str(path), offsets)
    fs = fsspec.filesystem("file")
    name = gzindex.write_sidecar(index, fs, str(tmp_path / "gzindex"), "multi")
    assert name == "multi.gzidx.json"
    gzidx = gzip.decompress((tmp_path / "gzindex" / "multi.gzidx.gz").read_bytes())
    ranges = [(o, o + 20_000) for o in offsets] + [(0, 10), (starts[1] - 5, starts[3] + 5)]
    assert _read_with_indexed_gzip(path, gzidx, ranges) == [plain[a:b] for a, b in ranges]
    with rapidgzip.open(str(path), parallelization=1) as f:
        f.import_index(io.BytesIO(gzidx))
        for a, b in ranges:
            f.seek(a)
            assert f.read(b - a) == plain[a:b]
    loaded = gzindex.read_sidecar(fs, str(tmp_path / "gzindex" / name))
    assert (loaded.points == index.points).all() and (loaded.stops == index.stops).all()
    assert (loaded.members == index.members).all() and loaded.fingerprint == index.fingerprint
    assert loaded.span(*ranges[-1]) == index.span(*ranges[-1])


class _CountingFileSystem(fsspec.implementations.local.LocalFileSystem):
    """A local filesystem that records every ``cat_file`` as ``(file name, start, end, bytes returned)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[tuple[str, int | None, int | None, int]] = []

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        data = super().cat_file(path, start=start, end=end, **kwargs)
        self.reads.append((Path(path).name, start, end, len(data)))
        return data


def _sidecar_of_many_windows(tmp_path: Path) -> tuple[Path, bytes, list[int], gzindex.GzipIndex, str]:
    """An 8 MiB gzip file indexed every 512 KiB (16 points, 15 windows), its sidecar in tmp_path/gzindex."""
    plain = _mri_like(8 << 20)
    path = tmp_path / "many.gz"
    path.write_bytes(gzip.compress(plain))
    offsets = list(range(0, len(plain), 512 * 1024))
    index = gzindex.build_index(str(path), offsets)
    name = gzindex.write_sidecar(index, fsspec.filesystem("file"), str(tmp_path / "gzindex"), "many")
    return path, plain, offsets, index, str(tmp_path / "gzindex" / name)


def test_sidecar_layout_2_reads_the_table_then_only_the_windows_decoded(tmp_path: Path) -> None:
    path, plain, offsets, index, descriptor = _sidecar_of_many_windows(tmp_path)
    windows = int(index.points["has_window"].sum())
    assert windows >= 12
    meta = json.loads(Path(descriptor).read_text())
    assert meta["index_layout"] == 2 and len(meta["index_members"]) == windows + 2
    sidecar = (tmp_path / "gzindex" / meta["index"]).read_bytes()
    assert meta["index_members"][-1] == len(sidecar)
    assert gzip.decompress(sidecar) == index.to_gzidx()  # one gzip file, whatever reads it
    bounds = meta["index_members"]

    fs = _CountingFileSystem(skip_instance_cache=True)
    loaded = gzindex.read_sidecar(fs, descriptor)
    assert fs.reads == [("many.gzidx.json", None, None, len(Path(descriptor).read_bytes())),
                        ("many.gzidx.gz", 0, bounds[1], bounds[1])]  # the point table's member, no window
    assert isinstance(loaded.windows, gzindex.SidecarWindows) and loaded.windows.read_count == 0
    assert (loaded.points == index.points).all()

    raw = path.read_bytes()
    chunk = 9
    start, end = offsets[chunk], offsets[chunk + 1]
    fs.reads.clear()
    assert loaded.read_range(lambda a, b: raw[a:b], start, end) == plain[start:end]
    point = loaded.span(start, end).point
    member = int(np.cumsum(index.points["has_window"])[point])  # member 0 is the table
    assert fs.reads == [("many.gzidx.gz", bounds[member], bounds[member + 1], bounds[member + 1] - bounds[member])]
    assert loaded.windows.read_count == 1
    assert bounds[1] + bounds[member + 1] - bounds[member] < len(sidecar) / 8  # what a first chunk read of it

    # every range, in random order, from windows read once each
    ranges = [(a, b) for a, b in zip(offsets, [*offsets[1:], len(plain)])] + [(5, 3 << 20), (len(plain) - 9, None)]
    for k in np.random.default_rng(3).permutation(len(ranges)).tolist():
        a, b = ranges[k]
        assert loaded.read_range(lambda x, y: raw[x:y], a, b or len(plain)) == plain[a:b]
    assert loaded.windows.read_count == windows
    window_reads = [r for r in fs.reads if r[0] == "many.gzidx.gz"]
    assert len(window_reads) == len({r[1] for r in window_reads}) == windows
    assert loaded.to_gzidx() == index.to_gzidx()


def test_sidecar_windows_read_once_under_concurrent_first_reads(tmp_path: Path) -> None:
    path, plain, offsets, index, descriptor = _sidecar_of_many_windows(tmp_path)
    fs = _CountingFileSystem(skip_instance_cache=True)
    loaded = gzindex.read_sidecar(fs, descriptor)
    raw = path.read_bytes()
    ranges = [(a, b) for a, b in zip(offsets, [*offsets[1:], len(plain)])] * 4
    order = np.random.default_rng(5).permutation(len(ranges)).tolist()
    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(lambda k: loaded.read_range(lambda a, b: raw[a:b], *ranges[k]), order))
    assert out == [plain[slice(*ranges[k])] for k in order]
    window_reads = [r[1] for r in fs.reads if r[0] == "many.gzidx.gz" and r[1] != 0]
    assert sorted(window_reads) == sorted(set(window_reads)) and len(window_reads) == index.points["has_window"].sum()
    reads = len(fs.reads)
    loaded.load_windows(range(len(index.points)))  # all there: no read
    assert len(fs.reads) == reads


def test_load_windows_reads_a_run_of_neighbours_at_once(tmp_path: Path) -> None:
    _, _, _, index, descriptor = _sidecar_of_many_windows(tmp_path)
    fs = _CountingFileSystem(skip_instance_cache=True)
    loaded = gzindex.read_sidecar(fs, descriptor)
    fs.reads.clear()
    loaded.load_windows([3, 4, 5, 9, 10])
    assert len(fs.reads) == 2 and loaded.windows.read_count == 5
    for point in (3, 4, 5, 9, 10):
        assert (loaded.window(point) == index.window(point)).all()
    assert loaded.window(0) is None  # the stream start: no window, nothing read
    assert len(fs.reads) == 2


def test_layout_1_sidecars_are_still_read(tmp_path: Path) -> None:
    """Sidecars written before layout 2: the GZIDX bytes gzipped whole, no index_layout or index_members."""
    path, plain, offsets, index, descriptor = _sidecar_of_many_windows(tmp_path)
    meta = json.loads(Path(descriptor).read_text())
    del meta["index_layout"], meta["index_members"]
    Path(descriptor).write_text(json.dumps(meta))
    (tmp_path / "gzindex" / meta["index"]).write_bytes(gzip.compress(index.to_gzidx(), compresslevel=6, mtime=0))
    loaded = gzindex.read_sidecar(fsspec.filesystem("file"), descriptor)
    assert isinstance(loaded.windows, np.ndarray) and (loaded.windows == index.windows).all()
    raw = path.read_bytes()
    assert loaded.read_range(lambda a, b: raw[a:b], offsets[5] - 3, offsets[7]) == plain[offsets[5] - 3:offsets[7]]


def test_layout_2_from_a_server_ignoring_byte_ranges_uses_the_whole_file(tmp_path: Path) -> None:
    """A manifest served without Range support (``python -m http.server``) sends the whole sidecar for the
    point table's read: it is used whole, as layout 1 is."""
    path, plain, offsets, index, descriptor = _sidecar_of_many_windows(tmp_path)

    class IgnoringRanges(_CountingFileSystem):
        def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
            return super().cat_file(path, **kwargs)

    fs = IgnoringRanges(skip_instance_cache=True)
    loaded = gzindex.read_sidecar(fs, descriptor)
    assert isinstance(loaded.windows, np.ndarray) and (loaded.windows == index.windows).all()
    raw = path.read_bytes()
    assert loaded.read_range(lambda a, b: raw[a:b], offsets[3], offsets[5]) == plain[offsets[3]:offsets[5]]
    assert len(fs.reads) == 2  # descriptor, sidecar


@pytest.mark.parametrize("damage, message", [
    ("members not increasing", "index_members"), ("members missing", "index_members"),
    ("too few members", "window members"), ("layout 3", "layout 3"), ("table member cut", "unreadable"),
])
def test_damaged_layout_2_descriptor_is_a_manifest_error(tmp_path: Path, damage: str, message: str) -> None:
    *_, descriptor = _sidecar_of_many_windows(tmp_path)
    meta = json.loads(Path(descriptor).read_text())
    members = meta["index_members"]
    if damage == "members not increasing":
        members[3], members[4] = members[4], members[3]
    elif damage == "members missing":
        del meta["index_members"]
    elif damage == "too few members":
        del members[2]
    elif damage == "layout 3":
        meta["index_layout"] = 3
    elif damage == "table member cut":
        members[1] -= 5
    Path(descriptor).write_text(json.dumps(meta))
    with pytest.raises(ManifestError, match=message) as info:
        gzindex.read_sidecar(fsspec.filesystem("file"), descriptor)
    assert "many.gzidx.json" in str(info.value)


@pytest.mark.parametrize("damage", ["window corrupted", "sidecar truncated"])
def test_damaged_window_is_a_manifest_error_when_read(tmp_path: Path, damage: str) -> None:
    path, plain, offsets, index, descriptor = _sidecar_of_many_windows(tmp_path)
    meta = json.loads(Path(descriptor).read_text())
    sidecar = tmp_path / "gzindex" / meta["index"]
    data = bytearray(sidecar.read_bytes())
    bounds = meta["index_members"]
    if damage == "window corrupted":
        data[bounds[-2] + 30:bounds[-2] + 60] = bytes(30)
    else:
        data = data[:bounds[-2] + 10]
    sidecar.write_bytes(bytes(data))
    loaded = gzindex.read_sidecar(fsspec.filesystem("file"), descriptor)
    raw = path.read_bytes()
    assert loaded.read_range(lambda a, b: raw[a:b], offsets[1], offsets[2]) == plain[offsets[1]:offsets[2]]
    with pytest.raises(ManifestError, match="many.gzidx.gz.*(damaged|replaced)"):
        loaded.read_range(lambda a, b: raw[a:b], len(plain) - 10, len(plain))
    # a failed read is not remembered: the next try reads again (and fails again)
    with pytest.raises(ManifestError):
        loaded.load_windows([len(index.points) - 1])


def test_reads_an_index_made_by_indexed_gzip(tmp_path: Path) -> None:
    plain = _mri_like(3 << 20)
    path = tmp_path / "ig.gz"
    path.write_bytes(gzip.compress(plain))
    with indexed_gzip.IndexedGzipFile(str(path), spacing=256 * 1024) as f:
        f.build_full_index()
        exported = io.BytesIO()
        f.export_index(fileobj=exported)
    index = gzindex.GzipIndex.from_gzidx(exported.getvalue(), str(path), {})
    assert len(index.points) > 8
    raw = path.read_bytes()
    for start in range(0, len(plain), 700_001):
        assert index.read_range(lambda a, b: raw[a:b], start, start + 300_000) == plain[start:start + 300_000]


def test_memory_url_and_progress(tmp_path: Path) -> None:
    plain = _mri_like(20 << 20)
    raw = gzip.compress(plain, compresslevel=1)
    fsspec.filesystem("memory").pipe_file("/gzindex-test/progress.gz", raw)
    seen: list[int] = []
    index = gzindex.build_index("memory://gzindex-test/progress.gz", [5 << 20], progress=seen.append)
    assert index.source == "memory:///gzindex-test/progress.gz"
    assert seen == sorted(seen) and seen[-1] == len(raw) and len(seen) >= 2
    fs = fsspec.filesystem("memory")
    name = gzindex.write_sidecar(index, fs, "/gzindex-test/manifest/gzindex", "p")
    loaded = gzindex.read_sidecar(fs, f"/gzindex-test/manifest/gzindex/{name}")
    assert loaded.read_range(lambda a, b: raw[a:b], 5 << 20, 6 << 20) == plain[5 << 20:6 << 20]


# ------------------------------------------------------------------------------------------------ bad input


def _corrupt(tmp_path: Path, how: str) -> Path:
    plain = _mri_like(2 << 20)
    raw = bytearray(gzip.compress(plain))
    if how == "truncated":
        raw = raw[: len(raw) // 2]
    elif how == "corrupt deflate":
        raw[len(raw) // 3: len(raw) // 3 + 64] = bytes(range(64))
    elif how == "wrong CRC":
        raw[-8] ^= 0xFF
    elif how == "wrong length":
        raw[-4] ^= 0xFF
    elif how == "not gzip":
        raw = bytearray(plain[:100_000])
    elif how == "trailing garbage":
        raw += b"PK\x03\x04 not a gzip member"
    elif how == "empty":
        raw = bytearray()
    path = tmp_path / f"{how.replace(' ', '_')}.nii.gz"
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("how, message", [
    ("truncated", "truncated"), ("corrupt deflate", "corrupt"), ("wrong CRC", "CRC-32 mismatch"),
    ("wrong length", "length mismatch"), ("not gzip", "not gzip"), ("trailing garbage", "unexpected data"),
    ("empty", "empty"),
])
def test_bad_gzip_raises_invalid_gzip(tmp_path: Path, how: str, message: str) -> None:
    path = _corrupt(tmp_path, how)
    with pytest.raises(InvalidGzip, match=message) as info:
        gzindex.build_index(str(path), [1000])
    assert info.value.source == str(path)
    assert str(path) in str(info.value)
    if how == "trailing garbage":  # where the garbage starts: right after the member
        size = path.stat().st_size - len(b"PK\x03\x04 not a gzip member")
        assert f"unexpected data at byte {size} " in str(info.value)


def test_missing_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFound) as info:
        gzindex.build_index(str(tmp_path / "nope.nii.gz"), [0])
    assert "nope.nii.gz" in str(info.value)
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    path = tmp_path / "locked.nii.gz"
    path.write_bytes(gzip.compress(b"x" * 1000))
    path.chmod(0)
    with pytest.raises(SourceAccessError, match="locked.nii.gz"):
        gzindex.build_index(str(path), [0])


def test_decode_of_damaged_data_is_invalid_gzip(tmp_path: Path) -> None:
    plain = _mri_like(1 << 20)
    path = tmp_path / "d.gz"
    path.write_bytes(gzip.compress(plain))
    index = gzindex.build_index(str(path), [500_000])
    raw = bytearray(path.read_bytes())
    span = index.span(500_000, 600_000)
    with pytest.raises(InvalidGzip, match="short|corrupt"):
        index.decode(span, bytes(raw[span.cmp_start:span.cmp_start + 100]), 500_000, 600_000)
    raw[span.cmp_start + 1: span.cmp_start + 40] = zlib.compress(b"junk" * 50)[:39]
    with pytest.raises(InvalidGzip):
        index.decode(span, bytes(raw[span.cmp_start:span.cmp_end]), 500_000, 600_000)


def test_damaged_sidecar_is_a_manifest_error(tmp_path: Path) -> None:
    path = tmp_path / "s.gz"
    path.write_bytes(gzip.compress(_mri_like(200_000)))
    fs = fsspec.filesystem("file")
    folder = str(tmp_path / "gzindex")
    name = gzindex.write_sidecar(gzindex.build_index(str(path), [1000]), fs, folder, "s")
    (tmp_path / "gzindex" / "s.gzidx.gz").write_bytes(gzip.compress(b"GZIDX\x01\x00 cut short"))
    with pytest.raises(ManifestError, match="s.gzidx.json.*GZIDX"):
        gzindex.read_sidecar(fs, f"{folder}/{name}")
    (tmp_path / "gzindex" / "s.gzidx.gz").unlink()
    with pytest.raises(ManifestError, match="missing"):
        gzindex.read_sidecar(fs, f"{folder}/{name}")
