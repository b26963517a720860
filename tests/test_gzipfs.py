"""``gzidx://``: uncompressed ranges of indexed gzip files, through fsspec, kerchunk references and zarr."""

from __future__ import annotations

import gzip
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fsspec
import nibabel as nib
import numpy as np
import pytest
import zarr
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
from fsspec.implementations.reference import ReferenceNotReachable

import virtnii
from virtnii import gzindex, gzipfs
from virtnii.errors import ManifestError, SourceNotFound, StaleSource
from virtnii.gzipfs import GzipIndexFileSystem

SHAPE = (24, 64, 96)  # z, y, x of an int16 volume
OFFSET = 352
SLAB = 4  # z-slices per chunk


def _volume() -> np.ndarray:
    rng = np.random.default_rng(1)
    z, y, x = np.indices(SHAPE)
    return (1000 + 300 * np.sin(x / 9 + y / 13 + z / 5) + rng.normal(0, 15, SHAPE)).astype("<i2")


def _chunk_offsets() -> list[int]:
    slab = SLAB * SHAPE[1] * SHAPE[2] * 2
    return [OFFSET + k * slab for k in range(SHAPE[0] // SLAB)]


def _index_into(manifest: str, source: str, name: str = "img", storage_options: dict | None = None) -> str:
    """Index ``source`` and write its sidecar under ``<manifest>/gzindex``; returns the gzidx:// URL."""
    index = gzindex.build_index(source, _chunk_offsets(), storage_options)
    fs, folder = fsspec.core.url_to_fs(manifest, **(storage_options or {}))
    descriptor = gzindex.write_sidecar(index, fs, f"{folder}/gzindex", name)
    return f"gzidx://gzindex/{descriptor}"


@pytest.fixture
def indexed(tmp_path: Path) -> dict[str, Any]:
    """A gzip 'NIfTI' (352 header bytes + int16 voxels) in tmp_path, indexed into tmp_path/manifest."""
    plain = b"\x5c\x01" + bytes(OFFSET - 2) + _volume().tobytes()
    source = tmp_path / "img.nii.gz"
    source.write_bytes(gzip.compress(plain, compresslevel=6))
    manifest = tmp_path / "manifest"
    url = _index_into(str(manifest), str(source))
    return {"plain": plain, "source": source, "root": str(manifest), "url": url}


def test_cat_file_info_and_open(indexed: dict[str, Any]) -> None:
    fs = fsspec.filesystem("gzidx", root=indexed["root"])  # found through the fsspec.specs entry point
    assert isinstance(fs, GzipIndexFileSystem)
    plain, url = indexed["plain"], indexed["url"]
    info = fs.info(url)
    assert info["size"] == len(plain) and info["type"] == "file"
    assert info["source"] == f"file://{indexed['source']}"
    assert fs.cat_file(url) == plain
    for start, end in [(0, 348), (OFFSET, OFFSET + 5000), (100_000, 200_001), (-10, None), (5, 5)]:
        assert fs.cat_file(url, start, end) == plain[start:end]
    with fs.open(url) as f:
        f.seek(60_000)
        assert f.read(70_000) == plain[60_000:130_000]


def test_cat_ranges_merges_touching_ranges_into_one_fetch(indexed: dict[str, Any],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    fs = GzipIndexFileSystem(root=indexed["root"], skip_instance_cache=True)
    fetches: list[tuple[int, int]] = []
    original = GzipIndexFileSystem._fetch

    async def counting(self: GzipIndexFileSystem, source: Any, start: int, end: int) -> bytes:
        fetches.append((start, end))
        return await original(self, source, start, end)

    monkeypatch.setattr(GzipIndexFileSystem, "_fetch", counting)
    plain, url = indexed["plain"], indexed["url"]
    offsets = _chunk_offsets()
    ends = [*offsets[1:], len(plain)]
    # all chunks (adjacent: one fetch), plus an overlapping read and a separate small one
    starts = [*offsets, offsets[1] + 10, 5]
    stops = [*ends, offsets[2] + 10, 50]
    out = fs.cat_ranges([url] * len(starts), starts, stops)
    assert out == [plain[s:e] for s, e in zip(starts, stops)]
    assert len(fetches) == 2
    assert fetches[1][1] - fetches[1][0] <= os.path.getsize(indexed["source"])
    fetches.clear()
    assert fs.cat_file(url, offsets[2], ends[2]) == plain[offsets[2]:ends[2]]
    (start, end), = fetches
    assert end - start < os.path.getsize(indexed["source"]) / 3  # only the chunk's compressed span


def test_long_runs_are_split_into_several_fetches(indexed: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from virtnii import gzipfs

    slab = SLAB * SHAPE[1] * SHAPE[2] * 2
    monkeypatch.setattr(gzipfs, "_MAX_RUN", 2 * slab)
    fetches: list[int] = []
    original = GzipIndexFileSystem._fetch

    async def counting(self: GzipIndexFileSystem, source: Any, start: int, end: int) -> bytes:
        fetches.append(start)
        return await original(self, source, start, end)

    monkeypatch.setattr(GzipIndexFileSystem, "_fetch", counting)
    fs = GzipIndexFileSystem(root=indexed["root"], skip_instance_cache=True)
    offsets = _chunk_offsets()
    ends = [*offsets[1:], len(indexed["plain"])]
    out = fs.cat_ranges([indexed["url"]] * len(offsets), offsets, ends)
    assert out == [indexed["plain"][s:e] for s, e in zip(offsets, ends)]
    assert len(fetches) == len(offsets) // 2


def test_cat_ranges_reports_errors_per_range(indexed: dict[str, Any], tmp_path: Path) -> None:
    fs = GzipIndexFileSystem(root=indexed["root"], skip_instance_cache=True)
    out = fs.cat_ranges([indexed["url"], "gzindex/missing.gzidx.json"], [0, 0], [10, 10])
    assert out[0] == indexed["plain"][:10]
    assert isinstance(out[1], ManifestError) and "missing.gzidx.json" in str(out[1])
    with pytest.raises(ManifestError):
        fs.cat_ranges([indexed["url"], "gzindex/missing.gzidx.json"], [0, 0], [10, 10], on_error="raise")


def test_root_is_required() -> None:
    with pytest.raises(ValueError, match="root="):
        GzipIndexFileSystem(skip_instance_cache=True)


def test_memory_root_and_source() -> None:
    plain = bytes(OFFSET) + _volume().tobytes()
    memfs = fsspec.filesystem("memory")
    memfs.pipe_file("/gzipfs-test/data/img.nii.gz", gzip.compress(plain))
    url = _index_into("memory://gzipfs-test/manifest", "memory://gzipfs-test/data/img.nii.gz")
    fs = GzipIndexFileSystem(root="memory://gzipfs-test/manifest", skip_instance_cache=True)
    offsets = _chunk_offsets()
    assert fs.cat_file(url, offsets[3], offsets[4]) == plain[offsets[3]:offsets[4]]
    descriptor = json.loads(memfs.cat_file("/gzipfs-test/manifest/gzindex/img.gzidx.json"))
    assert descriptor["source"] == "memory:///gzipfs-test/data/img.nii.gz"
    assert descriptor["index"] == "img.gzidx.gz" and descriptor["virtnii_gzip_index"] == 1


def test_changed_source_raises_stale_source(indexed: dict[str, Any]) -> None:
    source: Path = indexed["source"]
    source.write_bytes(gzip.compress(indexed["plain"][:-2]))
    fs = GzipIndexFileSystem(root=indexed["root"], skip_instance_cache=True)
    with pytest.raises(StaleSource, match="img.nii.gz") as info:
        fs.cat_file(indexed["url"], 0, 10)
    assert info.value.source == f"file://{source}"


def test_deleted_source_and_missing_descriptor(indexed: dict[str, Any]) -> None:
    indexed["source"].unlink()
    fs = GzipIndexFileSystem(root=indexed["root"], skip_instance_cache=True)
    with pytest.raises(SourceNotFound, match="img.nii.gz"):
        fs.cat_file(indexed["url"], 0, 10)
    with pytest.raises(ManifestError, match="nothere.gzidx.json"):
        fs.cat_file("gzidx://gzindex/nothere.gzidx.json", 0, 10)


def test_rewritten_manifest_is_reread(indexed: dict[str, Any], tmp_path: Path) -> None:
    """A manifest re-scanned in place (same descriptor URL, new source) is not served from the cache."""
    fs = GzipIndexFileSystem(root=indexed["root"], skip_instance_cache=True)
    assert fs.cat_file(indexed["url"], 0, 10) == indexed["plain"][:10]
    other = tmp_path / "other.nii.gz"
    other_plain = b"other" + indexed["plain"][5:]
    other.write_bytes(gzip.compress(other_plain))
    descriptor = Path(indexed["root"]) / "gzindex" / "img.gzidx.json"
    os.utime(descriptor, (0, 0))  # make sure its mtime changes on rewrite, whatever the clock resolution
    _index_into(indexed["root"], str(other))
    fresh = GzipIndexFileSystem(root=indexed["root"], skip_instance_cache=True)
    assert fresh.cat_file(indexed["url"], 0, 10) == other_plain[:10]


def _refs(url: str, nii: str) -> dict[str, Any]:
    """Hand-made kerchunk refs: the gzip volume through gzidx://, and a plain .nii through file://."""
    zarray = {"zarr_format": 2, "shape": list(SHAPE), "chunks": [SLAB, SHAPE[1], SHAPE[2]], "dtype": "<i2",
              "compressor": None, "filters": None, "fill_value": 0, "order": "C"}
    slab = SLAB * SHAPE[1] * SHAPE[2] * 2
    refs: dict[str, Any] = {".zgroup": json.dumps({"zarr_format": 2}), "gz/.zarray": json.dumps(zarray),
                            "nii/.zarray": json.dumps(zarray)}
    for k, offset in enumerate(_chunk_offsets()):
        refs[f"gz/{k}.0.0"] = [url, offset, slab]
        refs[f"nii/{k}.0.0"] = [nii, offset, slab]
    return {"version": 1, "refs": refs}


@pytest.mark.parametrize("form", ["options", "instance", "async instance"])
def test_zarr_through_reference_filesystem(indexed: dict[str, Any], tmp_path: Path, form: str) -> None:
    nii = tmp_path / "img.nii"
    nii.write_bytes(indexed["plain"])
    gzidx: Any = {"root": indexed["root"]}
    if form == "instance":
        gzidx = GzipIndexFileSystem(root=indexed["root"], skip_instance_cache=True)
    elif form == "async instance":
        gzidx = GzipIndexFileSystem(root=indexed["root"], asynchronous=True, skip_instance_cache=True)
    # a sync filesystem given as an instance in fs= is not wrapped by ReferenceFileSystem: wrap it
    local = AsyncFileSystemWrapper(fsspec.filesystem("file"), asynchronous=True)
    group = zarr.open_group("reference://", mode="r", storage_options={
        "fo": _refs(indexed["url"], f"file://{nii}"), "fs": {"gzidx": gzidx, "file": local}})
    expected = _volume()
    np.testing.assert_array_equal(group["gz"][:], expected)
    np.testing.assert_array_equal(group["gz"][9], expected[9])
    np.testing.assert_array_equal(group["nii"][:], expected)


def test_errors_through_zarr_name_the_source(indexed: dict[str, Any]) -> None:
    indexed["source"].write_bytes(b"replaced")
    group = zarr.open_group("reference://", mode="r", storage_options={
        "fo": _refs(indexed["url"], "file:///unused"), "fs": {"gzidx": {"root": indexed["root"]}}})
    with pytest.raises(ReferenceNotReachable) as info:
        group["gz"][0]
    assert isinstance(info.value.__cause__, StaleSource)
    assert str(indexed["source"]) in str(info.value.__cause__)


def test_s3_source_and_manifest(s3: Any) -> None:
    bucket = s3.create_bucket("gzipfs")
    plain = bytes(OFFSET) + _volume().tobytes()
    s3.filesystem().pipe_file(f"{bucket}/data/img.nii.gz", gzip.compress(plain))
    manifest = f"s3://{bucket}/manifest"
    url = _index_into(manifest, f"s3://{bucket}/data/img.nii.gz", storage_options=s3.storage_options)
    options = {"root": manifest, "root_options": s3.storage_options, "target_options": s3.storage_options}
    fs = GzipIndexFileSystem(skip_instance_cache=True, **options)
    offsets = _chunk_offsets()
    assert fs.cat_file(url, offsets[1], offsets[3]) == plain[offsets[1]:offsets[3]]
    group = zarr.open_group("reference://", mode="r", storage_options={
        "fo": _refs(url, "file:///unused"), "fs": {"gzidx": options}})
    np.testing.assert_array_equal(group["gz"][:], _volume())


def test_docs_example_runs() -> None:
    text = (Path(__file__).parent.parent / "docs" / "gzip.md").read_text()
    example = text.split("## Example", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(example, "docs/gzip.md", "exec"), {})


def test_parsed_indexes_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long-lived reader of many .nii.gz keeps at most _MAX_INDEXES indexes (each ~8 MB per GiB of data)."""
    monkeypatch.setattr(gzipfs, "_MAX_INDEXES", 2)
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"img{i}.nii.gz")
        paths[-1].write_bytes((Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz").read_bytes())
    virtnii.scan([str(p) for p in paths], str(tmp_path / "out"))
    group = virtnii.open(str(tmp_path / "out"))
    for i in range(4):
        group[f"img{i}"]["0"][0]
    assert len(gzipfs._INDEXES) <= 2
    [gzidx] = [fs for fs in group.store.fs.fss.values() if isinstance(fs, gzipfs.GzipIndexFileSystem)]
    assert len(gzidx._sources) == 2


def _index_every_slice(manifest: str, source: str, storage_options: dict | None = None) -> tuple[str, list[int]]:
    """Index ``source`` (the test volume, gzipped) at every z-slice: 24 chunks, a window at each deflate block
    boundary before one (7 here).  Returns the gzidx:// URL and the chunk starts."""
    slice_bytes = SHAPE[1] * SHAPE[2] * 2
    offsets = [OFFSET + z * slice_bytes for z in range(SHAPE[0])]
    index = gzindex.build_index(source, offsets, storage_options)
    fs, folder = fsspec.core.url_to_fs(manifest, **(storage_options or {}))
    return f"gzidx://gzindex/{gzindex.write_sidecar(index, fs, f'{folder}/gzindex', 'img')}", offsets


def test_first_read_over_s3_fetches_the_point_table_and_one_window(s3: Any) -> None:
    """A file nobody has read yet: its first chunk costs the descriptor, the sidecar's point table and the one
    window it decodes from (small ranged reads), not the whole sidecar."""
    bucket = s3.create_bucket("gzipfs-lazy")
    plain = bytes(OFFSET) + _volume().tobytes()
    s3.filesystem().pipe_file(f"{bucket}/data/img.nii.gz", gzip.compress(plain))
    manifest = f"s3://{bucket}/manifest"
    url, offsets = _index_every_slice(manifest, f"s3://{bucket}/data/img.nii.gz", s3.storage_options)
    meta = json.loads(s3.filesystem().cat_file(f"{bucket}/manifest/gzindex/img.gzidx.json"))
    members = np.diff(meta["index_members"])
    descriptor_size = s3.filesystem().size(f"{bucket}/manifest/gzindex/img.gzidx.json")
    sidecar_size = int(meta["index_members"][-1])
    assert len(members) >= 6  # the table, then the windows

    fs = GzipIndexFileSystem(root=manifest, root_options=s3.storage_options, target_options=s3.storage_options,
                             skip_instance_cache=True)
    start, end = offsets[13], offsets[14]
    s3.reset_counters()
    assert fs.cat_file(url, start, end) == plain[start:end]
    meter = s3.meter()
    [(_, index)] = [v for k, v in gzipfs._INDEXES.items() if k.endswith(f"{bucket}/manifest/gzindex/img.gzidx.json")]
    span = index.span(start, end)
    assert index.windows.read_count == 1
    sidecar_read = meter.bytes_out - descriptor_size - (span.cmp_end - span.cmp_start)
    assert sidecar_read <= members[0] + members[1:].max()
    assert sidecar_read < sidecar_size / 3
    assert meter.requests["GET"] == 4, meter.requests  # descriptor, point table, window, compressed span


def test_concurrent_first_reads_from_threads_are_exact_and_read_each_window_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = bytes(OFFSET) + _volume().tobytes()
    source = tmp_path / "img.nii.gz"
    source.write_bytes(gzip.compress(plain))
    url, offsets = _index_every_slice(str(tmp_path / "manifest"), str(source))
    reads: list[tuple[int, int]] = []
    original = gzindex.SidecarWindows._read

    def counting(self: gzindex.SidecarWindows, first: int, stop: int) -> dict[int, np.ndarray]:
        reads.append((first, stop))
        return original(self, first, stop)

    monkeypatch.setattr(gzindex.SidecarWindows, "_read", counting)
    gzipfs.clear_caches()
    fs = GzipIndexFileSystem(root=str(tmp_path / "manifest"), skip_instance_cache=True)
    ranges = [(a, b) for a, b in zip(offsets, [*offsets[1:], len(plain)])] * 3
    order = np.random.default_rng(11).permutation(len(ranges)).tolist()
    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(lambda k: fs.cat_file(url, *ranges[k]), order))
    assert out == [plain[slice(*ranges[k])] for k in order]
    read = sorted(k for first, stop in reads for k in range(first, stop))
    [(_, index)] = [v for k, v in gzipfs._INDEXES.items() if str(tmp_path) in k]
    assert read == list(range(int(index.points["has_window"].sum())))  # each window once

    # cat_ranges reads the windows of a run of chunks in one ranged read, alongside the data
    gzipfs.clear_caches()
    reads.clear()
    fresh = GzipIndexFileSystem(root=str(tmp_path / "manifest"), skip_instance_cache=True)
    starts, ends = offsets[4:12], offsets[5:13]
    assert fresh.cat_ranges([url] * len(starts), starts, ends) == [plain[a:b] for a, b in zip(starts, ends)]
    assert len(reads) == 1


def test_load_locks_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """One lock per descriptor met would grow without end in a long-running server: unheld ones are dropped."""
    monkeypatch.setattr(gzipfs, "_LOCKS", {})
    monkeypatch.setattr(gzipfs, "_MAX_LOCKS", 8)
    held = gzipfs._lock("held")
    with held:
        for n in range(100):
            gzipfs._lock(f"d{n}")
        assert len(gzipfs._LOCKS) <= 8 and gzipfs._LOCKS["held"] is held
        assert gzipfs._lock("held") is held
