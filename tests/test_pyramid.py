"""Pyramid levels of real and synthetic files: read by niizarr, equal to an independent downsampling of nibabel's
voxels, OME-valid, placed where level 0 is, rebuilt only when needed, and never half-visible."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import zarr

import virtnii
from nifti_samples import DATA, file_to_zarr_order, nibabel_raw, write_nifti, write_samples
from test_conformance import _schema_validator, _nifti_attributes, SCHEMA
from test_downsample import assert_close, reference_gaussian, reference_mean, reference_mode
from virtnii.pyramid import build_pyramids

NILEARN = Path(__import__("nilearn").__file__).parent / "datasets" / "data"
DIPY = Path(__import__("dipy").__file__).parent / "data" / "files"
REAL = {
    "anatomical": DATA / "anatomical.nii",  # big-endian int16
    "functional": DATA / "functional.nii",  # 4-D, slope/inter
    "example4d": DATA / "example4d.nii.gz",  # gzip, extensions
    "example_nifti2": DATA / "example_nifti2.nii.gz",
    "reoriented_anat_moved": DATA / "reoriented_anat_moved.nii",  # big-endian float32
    "mni_gm": NILEARN / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "small_101D": DIPY / "small_101D.nii.gz",  # uint16 4-D gzip
}
SYNTHETIC = ["int16_be", "uint64", "float32_nan", "complex64", "rgb24", "rgba32", "2d", "4d", "5d_t_and_c",
             "prime_nz", "slope_inter", "nifti2", "pair_nifti1_be"]
REFERENCES = {"mean": reference_mean, "gaussian": reference_gaussian, "mode": reference_mode}


def expected_levels(path: Path, count: int, method: str) -> list[np.ndarray]:
    """Levels 1..count of ``path`` computed from nibabel's raw voxels by the independent references, volume by
    volume ([t, c] untouched), channel by channel for RGB."""
    data = file_to_zarr_order(nibabel_raw(path))
    lead = data.shape[:-3]
    native = data.dtype if data.dtype.names else data.dtype.newbyteorder("=")
    volumes = {index: data[index].astype(native) for index in np.ndindex(*lead)} if lead else {(): data.astype(native)}
    levels = []
    for _ in range(count):
        volumes = {index: _reference(volume, method) for index, volume in volumes.items()}
        first = next(iter(volumes.values()))
        level = np.empty(lead + first.shape, first.dtype)
        for index, volume in volumes.items():
            level[index] = volume
        levels.append(level)
    return levels


def _reference(volume: np.ndarray, method: str) -> np.ndarray:
    if volume.dtype.names:
        channels = [_reference(np.ascontiguousarray(volume[name]), method) for name in volume.dtype.names]
        return np.stack(channels, axis=-1).view(volume.dtype)[..., 0]
    return REFERENCES[method](volume)


def assert_level_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    if expected.dtype.names:
        np.testing.assert_array_equal(actual.view(np.uint8), np.ascontiguousarray(expected).view(np.uint8))
    elif expected.dtype.kind in "fc":
        single = expected.dtype in (np.float32, np.complex64)
        assert_close(actual.astype(expected.dtype), expected, rtol=1e-5 if single else 1e-12)
    else:
        np.testing.assert_array_equal(actual, expected)


def level_affine(affine: np.ndarray, factors_zyx: tuple[int, ...]) -> np.ndarray:
    """Where level-k voxel (i, j, k) lies in world space: level-0 index f*i + (f-1)/2."""
    fx, fy, fz = reversed(factors_zyx)
    step = np.diag([fx, fy, fz, 1.0])
    step[:3, 3] = [(fx - 1) / 2, (fy - 1) / 2, (fz - 1) / 2]
    return affine @ step


@pytest.fixture(scope="module", params=[3, 2], ids=["zarr3", "zarr2"])
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Real files (chunks of 16) and synthetic samples (chunks of 4, so that tiny images get levels) scanned and
    given pyramids, both zarr formats."""
    zarr_format = request.param
    samples = write_samples(tmp_path_factory.mktemp("samples"), SYNTHETIC)
    out = {}
    for label, paths, chunks in (("real", REAL, 16), ("synthetic", samples, 4)):
        manifest = tmp_path_factory.mktemp(label) / "manifest"
        result = virtnii.scan([str(p) for p in paths.values()], str(manifest), zarr_format=zarr_format)
        assert not result.failures
        names = {entry.name: Path(entry.source.removeprefix("file://")) for entry in result.images}
        pyramid = build_pyramids(str(manifest), chunks=chunks)
        assert not pyramid.failures and pyramid.built
        out[label] = (manifest, names)
    return zarr_format, out


@pytest.mark.parametrize("label", ["real", "synthetic"])
def test_every_level_equals_an_independent_downsampling_of_nibabels_voxels(built, label) -> None:
    zarr_format, out = built
    manifest, names = out[label]
    group = virtnii.open(str(manifest))
    index = virtnii.manifest.read_index(str(manifest))
    checked = 0
    chunk = 16 if label == "real" else 4
    for name, path in names.items():
        entry = index.image(name)
        count = len(entry.levels)
        spatial = [n for n, a in zip(entry.shape, entry.axes) if a in "zyx"]
        assert (count > 0) == (max(spatial) > chunk), name  # levels until the coarsest fits one chunk
        if count == 0:
            continue
        assert entry.pyramid.method == "mean"
        for level, expected in zip(entry.levels, expected_levels(path, count, "mean")):
            assert_level_equal(group[name][level.path][...], expected)
            checked += 1
    assert checked == sum(len(index.image(name).levels) for name in names) > len(names)


def test_niizarr_reads_every_level_with_the_same_world_placement(built) -> None:
    niizarr = pytest.importorskip("niizarr")
    zarr_format, out = built
    for label in ("real", "synthetic"):
        manifest, names = out[label]
        group = virtnii.open(str(manifest))
        index = virtnii.manifest.read_index(str(manifest))
        for name, path in names.items():
            entry = index.image(name)
            header = nib.load(path).header
            qcode, scode = int(header["qform_code"]), int(header["sform_code"])
            levels = expected_levels(path, len(entry.levels), "mean")
            for level, expected in zip(entry.levels, levels):
                if not (qcode and scode):  # niizarr bug: zarr2nii(level>0) multiplies a None qform/sform
                    continue
                image = niizarr.zarr2nii(group[name], level=int(level.path))
                data = np.asarray(image.dataobj)
                nifti_order = file_to_zarr_order(data) if data.ndim > 3 else data.transpose(2, 1, 0)
                assert_level_equal(nifti_order if data.ndim > 3 else data.transpose(2, 1, 0), expected)
                zyx = [f for f, a in zip(level.factors, entry.axes) if a in "zyx"]
                np.testing.assert_allclose(image.header.get_best_affine(),
                                           level_affine(header.get_best_affine(), zyx), atol=1e-4)


def test_ome_metadata_and_json_header_validate_with_levels(built) -> None:
    import ome_zarr_models
    from ome_zarr_models.v04.image import Image as ImageV04
    from ome_zarr_models.v05.image import Image as ImageV05

    zarr_format, out = built
    model_class = ImageV05 if zarr_format == 3 else ImageV04
    for label in ("real", "synthetic"):
        manifest, names = out[label]
        group = virtnii.open(str(manifest))
        index = virtnii.manifest.read_index(str(manifest))
        for name in names:
            model = model_class.from_zarr(group[name])
            assert isinstance(ome_zarr_models.open_ome_zarr(group[name]), model_class)
            [multiscale] = model.attributes.ome.multiscales if zarr_format == 3 else model.attributes.multiscales
            entry = index.image(name)
            assert [d.path for d in multiscale.datasets] == ["0"] + [level.path for level in entry.levels]
            attrs = group[name].attrs.asdict()
            image = (attrs["ome"] if zarr_format == 3 else attrs)["multiscales"][0]
            base = image["datasets"][0]["coordinateTransformations"][0]["scale"]
            for dataset, level in zip(image["datasets"][1:], entry.levels):
                scale, translation = (t[t["type"]] for t in dataset["coordinateTransformations"])
                assert scale == [b * f for b, f in zip(base, level.factors)]
                assert translation == [(f - 1) / 2 * b for b, f in zip(base, level.factors)]
                assert image["type"] == "mean" and "mean" in image["metadata"]["description"]
            if SCHEMA.exists():
                assert not list(_schema_validator().iter_errors(_nifti_attributes(group[name])))


def test_levels_are_compressed_isotropic_chunks_and_t_c_stay_whole(built) -> None:
    zarr_format, out = built
    manifest, names = out["synthetic"]
    group = virtnii.open(str(manifest))
    five = group["5d_t_and_c"]
    assert five["0"].shape[:2] == five["1"].shape[:2] == (3, 2)  # t = 3, c = 2, untouched
    assert five["1"].chunks == (1, 1, 2, 2, 3)  # 4³ clipped to the level's (2, 2, 3)
    entry = virtnii.manifest.read_index(str(manifest)).image("int16_be")
    assert entry.levels[0].stored_bytes > 0
    store = zarr.open_array(str(manifest / entry.pyramid.store / "1"), mode="r")
    assert store.dtype == np.dtype("<i2")  # big-endian sources are written little-endian
    compressors = store.compressors
    assert compressors and "zstd" in str(compressors[0]).lower()


def test_label_images_get_the_mode_and_keep_their_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    labels = np.array([0, 3, 17, 42], dtype=np.int16)
    data = labels[rng.integers(0, 4, size=(19, 17, 15))]
    path = write_nifti(tmp_path / "seg.nii", data)
    image = nib.load(path, mmap=False)  # saved over its own file: a mapped one would be truncated under it
    image.header.set_intent("label")
    nib.save(image, path)
    virtnii.scan([str(path)], str(tmp_path / "m"))
    result = build_pyramids(str(tmp_path / "m"), chunks=4)
    entry = result.images[0]
    assert entry.pyramid.method == "mode"
    group = virtnii.open(str(tmp_path / "m"))
    for level, expected in zip(entry.levels, expected_levels(path, len(entry.levels), "mode")):
        got = group["seg"][level.path][...]
        np.testing.assert_array_equal(got, expected)
        assert set(np.unique(got)) <= set(labels.tolist())
    gaussian = build_pyramids(str(tmp_path / "m"), chunks=4, method="gaussian").images[0]
    assert gaussian.pyramid.method == "gaussian"
    group = virtnii.open(str(tmp_path / "m"))
    level = gaussian.levels[0]
    np.testing.assert_array_equal(group["seg"][level.path][...], expected_levels(path, 1, "gaussian")[0])
    # the mode store was replaced, not left behind
    stores = [p for p in (tmp_path / "m" / "levels").iterdir()]
    assert [p.name for p in stores] == [Path(gaussian.pyramid.store).name]


def test_rerun_reuses_complete_levels_and_a_changed_setting_rebuilds(tmp_path: Path) -> None:
    virtnii.scan([str(REAL["anatomical"])], str(tmp_path / "m"))
    first = build_pyramids(str(tmp_path / "m"), chunks=8)
    assert first.built == ["anatomical"]
    marker = next((tmp_path / "m" / "levels").glob("*/virtnii-pyramid.json"))
    stamp = marker.stat().st_mtime_ns
    again = build_pyramids(str(tmp_path / "m"), chunks=8)
    assert again.reused == ["anatomical"] and not again.built and marker.stat().st_mtime_ns == stamp
    other = build_pyramids(str(tmp_path / "m"), chunks=16)
    assert other.built == ["anatomical"] and not marker.exists()


def test_a_deleted_level_store_is_rebuilt_and_reported_as_built(tmp_path: Path) -> None:
    virtnii.scan([str(REAL["anatomical"])], str(tmp_path / "m"))
    build_pyramids(str(tmp_path / "m"), chunks=8)
    shutil.rmtree(tmp_path / "m" / "levels")
    again = build_pyramids(str(tmp_path / "m"), chunks=8)
    assert again.built == ["anatomical"] and not again.reused
    expected = expected_levels(REAL["anatomical"], 1, "mean")[0]
    assert_level_equal(virtnii.open(str(tmp_path / "m"))["anatomical"]["1"][...], expected)


def test_manifest_with_levels_opens_after_being_moved(tmp_path: Path) -> None:
    virtnii.scan([str(REAL["example4d"])], str(tmp_path / "m"))
    build_pyramids(str(tmp_path / "m"), chunks=8)
    shutil.move(tmp_path / "m", tmp_path / "moved")
    group = virtnii.open(str(tmp_path / "moved"))
    expected = expected_levels(REAL["example4d"], 1, "mean")[0]
    assert_level_equal(group["example4d"]["1"][...], expected)


def test_a_source_changed_since_the_scan_writes_no_levels(tmp_path: Path) -> None:
    source = tmp_path / "a.nii"
    shutil.copy(REAL["anatomical"], source)
    virtnii.scan([str(source)], str(tmp_path / "m"))
    os.utime(source, ns=(0, 0))
    result = build_pyramids(str(tmp_path / "m"), chunks=8)
    assert [type(f) for f in result.failures] == [virtnii.StaleSource]
    assert not result.built
    index = virtnii.manifest.read_index(str(tmp_path / "m"))
    assert index.image("a").pyramid is None
    assert not any(p.name == "virtnii-pyramid.json" for p in (tmp_path / "m").rglob("*"))


def test_unwritable_output_is_a_clear_error_and_nothing_changes(tmp_path: Path) -> None:
    virtnii.scan([str(REAL["anatomical"])], str(tmp_path / "m"))
    before = (tmp_path / "m" / "virtnii.json").read_text()
    (tmp_path / "blocked").write_text("a file where a folder should be")
    with pytest.raises(virtnii.ManifestError, match="cannot write pyramid levels"):
        build_pyramids(str(tmp_path / "m"), chunks=8, out=str(tmp_path / "blocked" / "levels"))
    assert (tmp_path / "m" / "virtnii.json").read_text() == before


def test_dask_scheduler_address_builds_what_a_local_run_builds(tmp_path: Path, capsys) -> None:
    """`virtnii pyramid --dask ADDRESS`: the images are built on the cluster's workers, a source that changed
    comes back as that image's error line (exit status 1), and the others' levels and manifest entries are the
    local run's."""
    distributed = pytest.importorskip("distributed")
    from virtnii.cli import main

    for name in ("local", "dask"):
        (tmp_path / name).mkdir()
        for image in ("anatomical", "functional", "reoriented_anat_moved"):
            shutil.copy2(REAL[image], tmp_path / name / f"{image}.nii")
        virtnii.scan([str(tmp_path / name)], str(tmp_path / name / "m"))
        os.utime(tmp_path / name / "functional.nii", ns=(0, 0))
    local = build_pyramids(str(tmp_path / "local" / "m"), chunks=8)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as c:
        status = main(["pyramid", str(tmp_path / "dask" / "m"), "--chunks", "8", "--dask", c.scheduler_address,
                       "-q"])
        assert "build_batch" in c.scheduler.task_prefixes  # the images were built there
    assert status == 1 and "functional.nii" in capsys.readouterr().err
    assert [type(f) for f in local.failures] == [virtnii.StaleSource]
    def entries(name: str) -> list[dict[str, Any]]:  # all but what names the copy (sources, so store tags)
        images = json.loads((tmp_path / name / "m" / "virtnii.json").read_text())["images"]
        return [{**{k: v for k, v in e.items() if k not in ("source", "fingerprint")},
                 **({"pyramid": {k: v for k, v in e["pyramid"].items() if k not in ("store", "tag")}}
                    if "pyramid" in e else {})} for e in images]

    assert entries("dask") == entries("local") and sum("pyramid" in e for e in entries("dask")) == 2


def test_level_stores_elsewhere_are_referenced_by_url(tmp_path: Path) -> None:
    virtnii.scan([str(REAL["anatomical"])], str(tmp_path / "m"))
    result = build_pyramids(str(tmp_path / "m"), chunks=8, out=str(tmp_path / "elsewhere"))
    store = result.images[0].pyramid.store
    assert store.startswith("file://") and "elsewhere" in store
    group = virtnii.open(str(tmp_path / "m"))
    assert_level_equal(group["anatomical"]["1"][...], expected_levels(REAL["anatomical"], 1, "mean")[0])


def test_sharded_levels_read_back(tmp_path: Path) -> None:
    virtnii.scan([str(REAL["anatomical"])], str(tmp_path / "m"))
    result = build_pyramids(str(tmp_path / "m"), chunks=4, shards=2)
    level = result.images[0].levels[0]
    assert level.shards == (8, 8, 8) and level.chunks == (4, 4, 4)
    group = virtnii.open(str(tmp_path / "m"))
    for lvl, expected in zip(result.images[0].levels, expected_levels(REAL["anatomical"], 2, "mean")):
        assert_level_equal(group["anatomical"][lvl.path][...], expected)


def test_killed_build_then_rerun_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    """SIGKILL in the middle of writing levels: the manifest is untouched, and a re-run completes the job with
    the same bytes as a run that was never interrupted."""
    data = (np.arange(96 * 80 * 72, dtype=np.int32).reshape(72, 80, 96) % 5003).astype(np.int16)
    source = write_nifti(tmp_path / "big.nii", data.transpose(2, 1, 0))
    for name in ("killed", "clean"):
        virtnii.scan([str(source)], str(tmp_path / name))
    before = (tmp_path / "killed" / "virtnii.json").read_text()
    script = textwrap.dedent(f"""
        import os, signal, zarr
        import virtnii.pyramid.build as build
        writes = [0]
        original = zarr.Array.__setitem__
        def setitem(self, index, value):
            writes[0] += 1
            if writes[0] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, index, value)
        zarr.Array.__setitem__ = setitem
        from virtnii.pyramid import build_pyramids
        build_pyramids({str(tmp_path / 'killed')!r}, chunks=8)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()
    assert (tmp_path / "killed" / "virtnii.json").read_text() == before
    stores = list((tmp_path / "killed" / "levels").glob("big.*"))
    assert stores and not (stores[0] / "virtnii-pyramid.json").exists()  # half-written, and invisible
    assert virtnii.open(str(tmp_path / "killed"))["big"].keys() is not None
    assert sorted(virtnii.open(str(tmp_path / "killed"))["big"].keys()) == ["0", "nifti"]
    resumed = build_pyramids(str(tmp_path / "killed"), chunks=8)
    clean = build_pyramids(str(tmp_path / "clean"), chunks=8)
    assert resumed.built == ["big"]
    a, b = virtnii.open(str(tmp_path / "killed"))["big"], virtnii.open(str(tmp_path / "clean"))["big"]
    for level in clean.images[0].levels:
        np.testing.assert_array_equal(a[level.path][...], b[level.path][...])
    files = lambda root: sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    store_a = tmp_path / "killed" / resumed.images[0].pyramid.store
    store_b = tmp_path / "clean" / clean.images[0].pyramid.store
    assert files(store_a) == files(store_b)
    for name in files(store_b):
        if not name.endswith(".json"):
            assert (store_a / name).read_bytes() == (store_b / name).read_bytes()


def test_unknown_image_and_bad_settings_are_manifest_errors(tmp_path: Path) -> None:
    virtnii.scan([str(REAL["anatomical"])], str(tmp_path / "m"))
    with pytest.raises(virtnii.ManifestError, match="no image named nope"):
        build_pyramids(str(tmp_path / "m"), ["nope"])
    with pytest.raises(virtnii.ManifestError, match="unknown method"):
        build_pyramids(str(tmp_path / "m"), method="median")
    virtnii.scan([str(REAL["anatomical"])], str(tmp_path / "v2"), zarr_format=2)
    with pytest.raises(virtnii.ManifestError, match="Zarr v3"):
        build_pyramids(str(tmp_path / "v2"), shards=2)


MAKE_VOLUME = textwrap.dedent("""
    import sys
    import numpy as np, nibabel as nib
    import virtnii
    folder, nz = sys.argv[1], int(sys.argv[2])
    data = (np.arange(256 * 256 * nz, dtype=np.int32).reshape(256, 256, nz) % 997).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.eye(4)), f"{folder}/v.nii")
    virtnii.scan([f"{folder}/v.nii"], f"{folder}/m")
""")
#: Run in a fresh process of its own, so that its peak memory is the build's.  The peak is the kernel's VmHWM,
#: which a new program starts afresh (getrusage's ru_maxrss carries the forking parent's peak across exec).
MEMORY_PROBE = textwrap.dedent("""
    import re, sys
    import virtnii, virtnii.slabs
    from virtnii.pyramid import build_pyramids

    def peak():
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1))

    virtnii.slabs.SLAB_BYTES = 4 * 2**20
    before = peak()
    result = build_pyramids(sys.argv[1] + "/m", chunks=32)
    assert result.built == ["v"], result
    print(before, peak())
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from Linux's /proc")
def test_peak_memory_does_not_grow_with_the_number_of_slices(tmp_path: Path) -> None:
    """Measured, not assumed: building the pyramid of a volume 4x deeper (32 MB → 128 MB of voxels) costs
    about the same peak memory above the process's own (a slab and a chunk height per level)."""
    growth = {}
    for nz in (256, 1024):
        folder = tmp_path / str(nz)
        folder.mkdir()
        subprocess.run([sys.executable, "-c", MAKE_VOLUME, str(folder), str(nz)], timeout=300, check=True)
        run = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(folder)], capture_output=True,
                             text=True, timeout=300, check=True)
        before, after = map(int, run.stdout.split())
        growth[nz] = (after - before) * 1024
    assert growth[256] > 0, growth  # the probe sees the build at all
    assert growth[1024] < 1.5 * growth[256], growth
    # 96 MB more voxels streamed cost less than a quarter of that (a whole-volume read costs all of it)
    assert growth[1024] - growth[256] < 96 * 2**20 / 4, growth


def test_verify_checks_pyramid_levels(tmp_path: Path) -> None:
    virtnii.scan([str(REAL["anatomical"])], str(tmp_path / "m"))
    entry = build_pyramids(str(tmp_path / "m"), chunks=8).images[0]
    assert virtnii.verify(str(tmp_path / "m")) == (1, [])
    store = tmp_path / "m" / entry.pyramid.store
    victim = next(p for p in (store / "2").rglob("*") if p.is_file() and p.name != "zarr.json")
    victim.unlink()
    [problem] = virtnii.verify(str(tmp_path / "m"))[1]
    assert isinstance(problem, virtnii.ManifestError) and f"holds no 2/{victim.relative_to(store / '2')}" in str(problem)
