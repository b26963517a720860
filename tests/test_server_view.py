"""The viewer view of an image (virtnii.server.view): every voxel of every level, read back by zarr-python from
the bytes ``get`` returns, equals nibabel's raw voxels (level 0) or the exact store's written level (levels >= 1,
which test_pyramid checks against nibabel), cast as the view documents; the slab cache stays bounded; only the
view's keys answer."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

import virtnii
from nifti_samples import DATA, RGB24, file_to_zarr_order, nibabel_raw, write_nifti, write_samples
from virtnii.pyramid import build_pyramids
from virtnii.server.view import CODEC, ImageView, SlabCache, adaptation

NILEARN = Path(__import__("nilearn").__file__).parent / "datasets" / "data"
REAL = {
    "anatomical": DATA / "anatomical.nii",  # big-endian int16
    "functional": DATA / "functional.nii",  # 4-D, slope/inter
    "example4d": DATA / "example4d.nii.gz",  # gzip
    "example_nifti2": DATA / "example_nifti2.nii.gz",
    "mni_gm": NILEARN / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
}
#: Every dtype and rank of nifti_samples (but vox_offset 0, where nibabel deliberately reads other bytes).
SYNTHETIC = [name for name in __import__("nifti_samples").SAMPLES if not name.startswith("vox_offset_zero")]


def view_store(view: ImageView, concurrent: bool = True) -> dict[str, bytes]:
    """Every key of the view: its documents, and each chunk of each level's grid that ``get`` answers (all
    chunks of a level requested at once, or one after the other)."""
    async def collect() -> dict[str, bytes]:
        keys = {"zarr.json": await view.get("zarr.json")}
        group = json.loads(keys["zarr.json"])
        for dataset in group["attributes"]["ome"]["multiscales"][0]["datasets"]:
            doc_key = f"{dataset['path']}/zarr.json"
            keys[doc_key] = await view.get(doc_key)
            doc = json.loads(keys[doc_key])
            grid = [-(-n // c) for n, c in zip(doc["shape"], doc["chunk_grid"]["configuration"]["chunk_shape"])]
            chunk_keys = [f"{dataset['path']}/c/" + "/".join(map(str, q)) for q in itertools.product(*map(range, grid))]
            if concurrent:
                answers = await asyncio.gather(*map(view.get, chunk_keys))
            else:
                answers = [await view.get(key) for key in chunk_keys]
            for key, data in zip(chunk_keys, answers):
                if data is not None:
                    keys[key] = data
        return keys
    return asyncio.run(collect())


def open_view(view: ImageView, concurrent: bool = True) -> zarr.Group:
    """The view as zarr-python reads it, from an in-memory store holding exactly what ``get`` returned."""
    buffer = default_buffer_prototype().buffer
    store = MemoryStore({key: buffer.from_bytes(data) for key, data in view_store(view, concurrent).items()})
    return zarr.open_group(store=store, mode="r")


def expected_view(data: np.ndarray, view: ImageView) -> np.ndarray:
    """Source voxels (zarr axis order, source dtype) as the view documents it: components before z, cast."""
    how = view.adaptation
    if how.components:
        parts = [data[name] for name in data.dtype.names] if data.dtype.names else [data.real, data.imag]
        z = view.axes.index("z")
        data = np.stack(parts, axis=z)
        if "c" in view.axes:
            data = data.reshape(data.shape[:z - 1] + (-1,) + data.shape[z + 1:])
    return data.astype(how.dtype)


def assert_same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    np.testing.assert_array_equal(actual.view(np.uint8), np.ascontiguousarray(expected).view(np.uint8))


def check_every_level(manifest: Path, names: dict[str, Path], **view_options) -> dict[str, ImageView]:
    group = virtnii.open(str(manifest))
    views = {}
    for name, path in names.items():
        view = ImageView(group[name], **view_options)
        opened = open_view(view)
        raw = file_to_zarr_order(nibabel_raw(path))
        assert_same(opened["0"][...], expected_view(raw, view))
        for dataset in opened.attrs["ome"]["multiscales"][0]["datasets"][1:]:
            exact = group[name][dataset["path"]][...]
            assert_same(opened[dataset["path"]][...], expected_view(exact, view))
        views[name] = view
    return views


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_samples(tmp_path_factory.mktemp("samples"), SYNTHETIC)


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_every_level_of_real_files_equals_nibabel(tmp_path: Path, zarr_format: int) -> None:
    manifest = tmp_path / "m"
    result = virtnii.scan([str(p) for p in REAL.values()], str(manifest), zarr_format=zarr_format)
    assert not result.failures
    assert not build_pyramids(str(manifest), chunks=16).failures
    names = {entry.name: Path(entry.source.removeprefix("file://")) for entry in result.images}
    views = check_every_level(manifest, names, chunk=24)
    for view in views.values():
        levels = asyncio.run(view.attributes())["ome"]["multiscales"][0]["datasets"]
        assert len(levels) > 1  # pyramids were built and are in the view


def test_every_dtype_and_rank_equals_nibabel_cast_as_documented(tmp_path: Path, samples: dict[str, Path]) -> None:
    manifest = tmp_path / "m"
    result = virtnii.scan([str(p) for p in samples.values()], str(manifest))
    assert not result.failures
    assert not build_pyramids(str(manifest), chunks=4).failures
    names = {entry.name: Path(entry.source.removeprefix("file://")) for entry in result.images}
    views = check_every_level(manifest, names, chunk=3)
    exact = {name for name, view in views.items() if view.adaptation.exact}
    assert {"uint8", "int8", "int16_be", "uint16", "int32_be", "uint32", "float32_nan", "4d"} <= exact
    assert not exact & {"int64", "uint64", "float64", "complex64", "rgb24", "rgba32", "nifti2"}


def test_each_adaptation_is_named_in_the_attributes() -> None:
    cases = {
        "<f8": ("float32", 0, "float64 cast to float32"),
        ">f8": ("float32", 0, "float64 cast to float32"),
        "<c8": ("float32", 2, "complex64 as channel axis c of 2 float32 components (real, imaginary)"),
        "<c16": ("float32", 2, "rounded from float64"),
    }
    for source, (dtype, components, words) in cases.items():
        how = adaptation(np.dtype(source))
        assert (str(how.dtype), how.components) == (dtype, components) and words in how.description
    rgb = adaptation(RGB24)
    assert (rgb.dtype, rgb.components) == (np.dtype("u1"), 3) and "(R, G, B)" in rgb.description
    assert adaptation(np.dtype("<i8"), (-5, 2**31 - 1)).dtype == np.dtype("<i4")
    assert adaptation(np.dtype(">u8"), (0, 2**31)).dtype == np.dtype("<f4")
    assert adaptation(np.dtype("<i8"), (-2**31 - 1, 0)).dtype == np.dtype("<f4")
    assert adaptation(np.dtype(">i2")).exact and adaptation(np.dtype(">i2")).dtype == np.dtype("<i2")
    with pytest.raises(ValueError):
        adaptation(np.dtype("<i8"))  # needs the range


@pytest.mark.parametrize("values, expected", [((-7, 2**31 - 1), "int32"), ((0, 2**40), "float32")])
def test_int64_becomes_int32_only_when_every_value_fits(tmp_path: Path, values: tuple[int, int],
                                                        expected: str) -> None:
    data = np.zeros((9, 8, 7), dtype="<i8")
    data[1, 2, 3], data[8, 7, 6] = values
    path = write_nifti(tmp_path / "labels.nii.gz", data)
    virtnii.scan([str(path)], str(tmp_path / "m"))
    view = check_every_level(tmp_path / "m", {"labels": path}, chunk=4)["labels"]
    attributes = json.loads(asyncio.run(view.get("zarr.json")))["attributes"]["virtnii_view"]
    assert attributes["dtype"] == expected and attributes["source_dtype"] == "int64" and not attributes["exact"]
    assert f"{values[0]}..{values[1]}" in attributes["adaptation"]


def test_rgb_and_complex_get_a_channel_axis(tmp_path: Path, samples: dict[str, Path]) -> None:
    virtnii.scan([str(samples["rgb24"]), str(samples["complex64"]), str(samples["5d_c_only"])], str(tmp_path / "m"))
    group = virtnii.open(str(tmp_path / "m"))
    rgb = open_view(ImageView(group["rgb24"]))
    assert rgb["0"].shape == (3, 4, 5, 6) and rgb["0"].dtype == np.uint8
    assert [a["name"] for a in rgb.attrs["ome"]["multiscales"][0]["axes"]] == ["c", "z", "y", "x"]
    assert rgb.attrs["virtnii_view"]["channels"] == ["R", "G", "B"]
    raw = nibabel_raw(samples["rgb24"])
    np.testing.assert_array_equal(rgb["0"][1, 2, 3, 4], raw[4, 3, 2]["G"])
    complex_view = open_view(ImageView(group["complex64"]))
    value = nibabel_raw(samples["complex64"])[4, 3, 2]
    assert complex_view["0"][:, 2, 3, 4].tolist() == [np.float32(value.real), np.float32(value.imag)]
    assert open_view(ImageView(group["5d_c_only"]))["0"].dtype == np.uint16  # exact: c stays as it is


def test_placement_comes_from_the_header_affine(tmp_path: Path) -> None:
    virtnii.scan([str(REAL["anatomical"]), str(REAL["mni_gm"])], str(tmp_path / "m"))
    group = virtnii.open(str(tmp_path / "m"))
    for name, path in (("anatomical", REAL["anatomical"]),
                       ("mni_icbm152_gm_tal_nlin_sym_09a_converted", REAL["mni_gm"])):
        attributes = asyncio.run(ImageView(group[name]).attributes())
        affine = nib.load(path).header.get_best_affine()
        np.testing.assert_allclose(attributes["virtnii_view"]["affine"], affine)
        scale, translation = (t[k] for t, k in zip(
            attributes["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"],
            ("scale", "translation")))
        np.testing.assert_allclose(scale, np.linalg.norm(affine[:3, :3], axis=0)[::-1])
        np.testing.assert_allclose(translation, affine[:3, 3][::-1])
    # the MNI template is diagonal and positive: OME scale/translation alone place every voxel right
    attributes = asyncio.run(ImageView(group["mni_icbm152_gm_tal_nlin_sym_09a_converted"]).attributes())
    affine = np.array(attributes["virtnii_view"]["affine"])
    transforms = attributes["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
    zyx = np.array([[5, 7, 11]])
    world = zyx * transforms[0]["scale"] + transforms[1]["translation"]
    np.testing.assert_allclose(world[0][::-1], (affine @ [11, 7, 5, 1])[:3])


def test_slope_and_inter_are_documented_not_applied(tmp_path: Path, samples: dict[str, Path]) -> None:
    virtnii.scan([str(samples["slope_inter"])], str(tmp_path / "m"))
    view = ImageView(virtnii.open(str(tmp_path / "m"))["slope_inter"])
    attributes = asyncio.run(view.attributes())["virtnii_view"]
    assert (attributes["scl_slope"], attributes["scl_inter"]) == (0.5, -20.0)
    assert open_view(view)["0"].dtype == np.int16  # raw


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A .nii.gz and a .nii of 203 x 181 x 210 int16 (15 MB: several in-place slabs, edge chunks on x and y)."""
    folder = tmp_path_factory.mktemp("large")
    rng = np.random.default_rng(5)
    data = (rng.normal(0, 300, (203, 181, 210))).astype("<i2")
    paths = {"big_gz": write_nifti(folder / "big_gz.nii.gz", data), "big": write_nifti(folder / "big.nii", data)}
    manifest = folder / "m"
    virtnii.scan([str(p) for p in paths.values()], str(manifest))
    return manifest, paths


def test_a_large_file_reads_through_many_slabs_and_edge_chunks(large) -> None:
    manifest, paths = large
    group = virtnii.open(str(manifest))
    assert group["big_gz"]["0"].chunks[-3] * 3 <= 210  # several slabs
    read = {}
    for merge_gap in (350, 1 << 20):  # one run per plane (rows are 406 bytes), runs merged across planes
        views = check_every_level(manifest, paths, chunk=32, merge_gap=merge_gap)
        assert views["big_gz"].decoded_bytes == group["big_gz"]["0"].nbytes  # each slab once
        read[merge_gap] = views["big"].source_bytes
    assert group["big"]["0"].nbytes < read[350] < read[1 << 20]


def test_rows_are_read_for_exactly_the_voxels_a_chunk_needs_without_merging(large) -> None:
    manifest, paths = large
    view = ImageView(virtnii.open(str(manifest))["big"], chunk=32, merge_gap=0)
    raw = file_to_zarr_order(nibabel_raw(paths["big"]))
    for coords, extent in (((1, 2, 3), (32, 32, 32)), ((6, 5, 6), (18, 21, 11))):  # inside, and the far corner
        before = view.source_bytes
        data = asyncio.run(view.get("0/c/" + "/".join(map(str, coords))))
        assert view.source_bytes - before == int(np.prod(extent)) * 2
        chunk = np.frombuffer(__import__("numcodecs").Blosc().decode(data), "<i2").reshape(32, 32, 32)
        box = tuple(slice(c * 32, c * 32 + n) for c, n in zip(coords, extent))
        assert_same(chunk[tuple(slice(0, n) for n in extent)], raw[box].astype("<i2"))
        assert not chunk[extent[0]:].any() and not chunk[:, extent[1]:].any() and not chunk[..., extent[2]:].any()


def test_the_slab_cache_never_exceeds_its_limit(large) -> None:
    manifest, paths = large
    group = virtnii.open(str(manifest))
    slab = int(np.prod(group["big_gz"]["0"].chunks)) * 2
    cache = SlabCache(limit=slab + slab // 2)  # less than a z-band straddling two slabs needs
    view = ImageView(group["big_gz"], chunk=32, cache=cache)
    opened = open_view(view, concurrent=False)  # in order: z-bands straddling two slabs evict each other
    assert_same(opened["0"][...], file_to_zarr_order(nibabel_raw(paths["big_gz"])).astype("<i2"))
    assert 0 < cache.peak <= cache.limit and cache.nbytes <= cache.limit
    assert view.decoded_bytes > group["big_gz"]["0"].nbytes  # it had to decode some slabs again
    roomy = ImageView(group["big_gz"], chunk=32, cache=SlabCache(limit=1 << 30))
    open_view(roomy)
    assert roomy.decoded_bytes == group["big_gz"]["0"].nbytes  # each slab once


def test_concurrent_requests_for_one_slab_decode_it_once(large) -> None:
    manifest, _ = large
    group = virtnii.open(str(manifest))
    view = ImageView(group["big_gz"], chunk=16)
    keys = [f"0/c/0/{y}/{x}" for y in range(12) for x in range(13)]  # one z-band: the same slabs

    async def fetch():
        return await asyncio.gather(*map(view.get, keys))
    assert all(asyncio.run(fetch()))
    slab = int(np.prod(group["big_gz"]["0"].chunks)) * 2
    z_band_slabs = -(-16 // group["big_gz"]["0"].chunks[-3])
    assert view.decoded_bytes == z_band_slabs * slab and view.cache.misses == z_band_slabs


def test_a_slab_larger_than_the_cache_is_decoded_not_kept() -> None:
    cache = SlabCache(limit=10)

    async def run():
        calls = []

        async def load():
            calls.append(1)
            await asyncio.sleep(0.01)
            return b"x" * 11
        results = await asyncio.gather(*(cache.get("k", load) for _ in range(5)))
        return results, calls
    results, calls = asyncio.run(run())
    assert results == [b"x" * 11] * 5 and len(calls) == 1 and cache.nbytes == 0
    with pytest.raises(ValueError):
        SlabCache(limit=-1)


def test_a_failed_decode_reaches_every_waiter_and_is_retried_next_time() -> None:
    cache = SlabCache(limit=100)

    async def run():
        async def fail():
            await asyncio.sleep(0.01)
            raise OSError("boom")
        results = await asyncio.gather(*(cache.get("k", fail) for _ in range(3)), return_exceptions=True)

        async def succeed():
            return b"ok"
        return results, await cache.get("k", succeed)
    results, again = asyncio.run(run())
    assert all(isinstance(r, OSError) for r in results) and again == b"ok"


def test_only_the_views_keys_answer(large) -> None:
    manifest, _ = large
    view = ImageView(virtnii.open(str(manifest))["big"], chunk=32)

    async def ask(keys):
        return await asyncio.gather(*map(view.get, keys))
    good = ["zarr.json", "0/zarr.json", "0/c/0/0/0", "0/c/6/5/6"]
    bad = ["", "/zarr.json", "0", "0/", "0/c", "0/c/0/0", "0/c/0/0/0/0", "0/c/7/0/0", "0/c/0/6/0", "0/c/0/0/7",
           "0/c/0/0/-1", "0/c/0/0/01", "0/c/0/0/+1", "0/c/0/0/１", "0/c/0/0/1e3", "../zarr.json",
           "0/../zarr.json", "0/c/../../zarr.json", "1/zarr.json", "nifti/zarr.json", "nifti/c/0", ".zgroup",
           "0/.zarray", "0/0.0.0", "0/c/0/0/99999999999999999999999", "0//c/0/0/0", "0/zarr.json/",
           "0/c/0/0/0/", "%2e%2e/zarr.json", "0\\c\\0\\0\\0", "0/c/0/0/0\x00", "zarr.json/..", "./zarr.json"]
    assert all(asyncio.run(ask(good)))
    assert asyncio.run(ask(bad)) == [None] * len(bad)


def test_chunks_use_the_documented_codec(large) -> None:
    manifest, _ = large
    view = ImageView(virtnii.open(str(manifest))["big"], chunk=32)
    doc = json.loads(asyncio.run(view.get("0/zarr.json")))
    assert doc["codecs"][-1] == {"name": "blosc", "configuration": {**CODEC, "typesize": 2, "blocksize": 0}}
    assert doc["chunk_grid"]["configuration"]["chunk_shape"] == [32, 32, 32]
    assert doc["dimension_names"] == ["z", "y", "x"] and doc["shape"] == [210, 181, 203]
