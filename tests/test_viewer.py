"""The viewer page (``virtnii/server/static/``, built from ``viewer/``) in a real browser against ``virtnii serve``.

Debian's headless Chromium, driven by Playwright, with software WebGL (SwiftShader): the page lists the
images, renders the one chosen, changes with the slice and the image, places it in world space by its NIfTI
affine (voxel values read back through niivue at world positions), and fetches a small part of level 0.
Skipped only where ``/usr/bin/chromium`` is missing (``.ci/run`` installs it).  The screenshots are kept in
``test-artifacts/`` (git-ignored).
"""

from __future__ import annotations

import io
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, sync_playwright

import virtnii
from virtnii.server.app import default_view, running

from nifti_samples import AFFINE, write_nifti

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="Debian's chromium is not installed (apt-get install chromium; .ci/run does)")

#: Chromium's flags here: software WebGL (no GPU), and none of its own network traffic (the network is closed).
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
#: Small enough that the MNI template's level 0 (233 voxels across) is more than a multiplanar tile shows.
VIEWPORT = {"width": 560, "height": 420}
MNI = Path(__import__("nilearn").__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
#: The oblique sample's bright ball: its centre voxel, and radius in voxels.
BALL, RADIUS = (40, 20, 25), 6


def oblique_voxels() -> np.ndarray:
    """A gradient (2i + j) with a ball of 500s: values that tell every voxel's place apart."""
    i, j, k = np.indices((60, 80, 50))
    data = (2 * i + j).astype(np.int16)
    data[(i - BALL[0]) ** 2 + (j - BALL[1]) ** 2 + (k - BALL[2]) ** 2 <= RADIUS ** 2] = 500
    return data


#: The images of the served BIDS dataset, by the name the tests use.
IMAGES = {"mni": "sub-mni/anat/sub-mni_T1w", "oblique": "sub-oblique/anat/sub-oblique_T1w",
          "qform_only": "sub-qform/anat/sub-qform_T2w", "no_form": "sub-noform/anat/sub-noform_T2w",
          "fmri": "sub-fmri/func/sub-fmri_task-rest_bold"}


def no_view(image: Any, key: str) -> None:
    """A server without ``/view/`` (every key absent): the page falls back to the plain ``/zarr/`` store."""
    return None


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A BIDS dataset indexed with pyramids: the MNI template (.nii.gz), an oblique .nii (sform), one placed by
    its qform only, one with neither (nibabel's fallback), and a 4-D one (not viewable).  Returns the dataset
    and the manifest folders."""
    folder = tmp_path_factory.mktemp("viewer")
    root = folder / "bids"
    for image in IMAGES.values():
        (root / image).parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "viewer test", "BIDSVersion": "1.9.0"}')
    shutil.copy(MNI, root / f"{IMAGES['mni']}.nii.gz")
    write_nifti(root / f"{IMAGES['oblique']}.nii", oblique_voxels())
    for name, qform in (("qform_only", 1), ("no_form", 0)):
        image = nib.Nifti1Image(oblique_voxels()[::2, ::2, ::2].copy(), AFFINE)
        image.set_sform(AFFINE, code=0)
        image.set_qform(AFFINE @ np.diag([1.0, 1.0, -1.0, 1.0]), code=qform)  # qfac −1 once the k axis flips
        image.to_filename(root / f"{IMAGES[name]}.nii")
    write_nifti(root / f"{IMAGES['fmri']}.nii", np.zeros((6, 5, 4, 3), np.float32))
    manifest = folder / "manifest"
    virtnii.index(str(root), str(manifest), pyramid=True)
    return root, manifest


@pytest.fixture(scope="module")
def servers(dataset: tuple[Path, Path]) -> Iterator[dict[str, tuple[str, str]]]:
    """``virtnii serve`` on the dataset, twice: as it is by default (with ``/view/`` where the server has it),
    and without ``/view/``.  Maps each to its URL and the tree the page should read from it."""
    manifest = str(dataset[1])
    with running([manifest]) as default, running([manifest], view=no_view) as plain:
        yield {"default": (default, "view" if default_view() is not None else "zarr"), "zarr": (plain, "zarr")}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@contextmanager
def open_page(browser: Any, url: str) -> Iterator[Page]:
    """The page at ``url`` in a fresh profile (nothing cached), its image list shown; no script error allowed."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    page.wait_for_selector("#images button")
    yield page
    context.close()
    assert not errors, errors


@pytest.fixture
def page(browser: Any, servers: dict[str, tuple[str, str]]) -> Iterator[Page]:
    with open_page(browser, servers["default"][0]) as page:
        yield page


def choose(page: Page, name: str, state: str = "ready") -> None:
    page.click(f"#images button[data-path='{IMAGES[name]}']")
    page.wait_for_selector(f"#status[data-state={state}]", timeout=30_000)
    page.wait_for_timeout(300)  # niivue draws on the next animation frames


def canvas_pixels(page: Page, name: str) -> np.ndarray:
    """The canvas as a grey-level array, saved under test-artifacts/ as ``name``.png."""
    png = page.locator("#canvas").screenshot()
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"{name}.png").write_bytes(png)
    print(f"screenshot: {ARTIFACTS / name}.png")
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)


def viewer_state(page: Page) -> dict[str, Any]:
    return page.evaluate("() => { const { nv, ...state } = window.virtniiViewer; return state }")


def test_renders_the_level_that_fits_and_fetches_a_fraction_of_level_0(page: Page,
                                                                      servers: dict[str, tuple[str, str]]) -> None:
    fetched: list[tuple[str, int]] = []
    page.on("requestfinished", lambda request: fetched.append((request.url, request.sizes()["responseBodySize"])))
    choose(page, "mni")
    state = viewer_state(page)
    assert state["source"] == servers["default"][1]
    # 233 voxels across at level 0, a ~130-pixel tile: level 1 (117 across) fits, preceded by level 2
    assert state["levels"] == 3 and state["targetLevel"] == state["level"] == 1
    assert state["timings"]["firstRender"] <= state["timings"]["ready"]
    pixels = canvas_pixels(page, "viewer-mni-multiplanar")
    assert pixels.std() > 20  # a brain, not a blank (or uniform) canvas

    voxel_bytes = sum(size for url, size in fetched if "/zarr/" in url or "/view/" in url)
    level0_bytes = int(np.prod(nib.load(MNI).shape))  # uint8
    assert 0 < voxel_bytes < 0.25 * level0_bytes, (voxel_bytes, level0_bytes)
    assert not any("/0/c/" in url for url, _ in fetched)  # no chunk of level 0 at all


def test_the_picture_changes_with_the_slice_and_the_image(page: Page) -> None:
    choose(page, "mni")
    page.click("[data-view=axial]")  # a bigger tile: level 0 now fits, and is loaded
    page.wait_for_selector("#status[data-state=ready][data-level='0']")
    page.wait_for_timeout(300)
    middle = canvas_pixels(page, "viewer-mni-axial-middle")
    assert middle.std() > 20
    page.locator("#slice").fill("250")
    page.wait_for_timeout(300)
    lower = canvas_pixels(page, "viewer-mni-axial-lower")
    assert lower.std() > 5 and np.abs(lower - middle).mean() > 2
    choose(page, "oblique")
    other = canvas_pixels(page, "viewer-oblique-axial")
    assert other.std() > 5 and np.abs(other - lower).mean() > 2


@pytest.mark.parametrize(("query", "found"), [
    ("suffix=T2w", {"qform_only", "no_form"}),  # an entity, exactly
    ("SUB=MNI", {"mni"}),                        # case ignored
    ("rest", {"fmri"}),                          # part of an entity's value (task)
    ("form t2w", {"qform_only", "no_form"}),     # every term must match
    ("anat/sub-o", {"oblique"}),                 # part of the path
    ("sub=mn", set()),                           # key=value is exact
])
def test_search_by_name_and_entities(page: Page, query: str, found: set[str]) -> None:
    page.fill("#search", query)
    shown = page.locator("#images button").evaluate_all("buttons => buttons.map(b => b.dataset.path)")
    assert set(shown) == {IMAGES[name] for name in found}
    page.fill("#search", "")
    assert page.locator("#images button").count() == len(IMAGES)


# from /zarr/ the page reads the header itself (nibabel's rules, ported): each kind of header; from /view/ the
# server gives nibabel's affine
@pytest.mark.parametrize(("tree", "name"), [("zarr", "oblique"), ("zarr", "qform_only"), ("zarr", "no_form"),
                                            ("default", "oblique")])
def test_world_placement_is_the_nifti_affine(browser: Any, servers: dict[str, tuple[str, str]],
                                             dataset: tuple[Path, Path], tree: str, name: str) -> None:
    """The page's affine is nibabel's best affine, and niivue finds each voxel's value at its world position,
    from ``/view/`` (its attributes) as from ``/zarr/`` (the raw header, read by the page)."""
    url, source_tree = servers[tree]
    source = nib.load(dataset[0] / f"{IMAGES[name]}.nii")
    data = np.asarray(source.dataobj)
    with open_page(browser, url) as page:
        choose(page, name)
        state = viewer_state(page)
        assert state["source"] == source_tree
        assert np.allclose(state["affine"], source.header.get_best_affine(), atol=1e-5)
        assert state["level"] == 0  # small enough for level 0 to fit: values are the source's own
        for voxel in [(0, 0, 0), (5, 10, 3), tuple(np.array(data.shape) - 1),
                      tuple(np.array(BALL) // (60 // data.shape[0]))]:
            world = nib.affines.apply_affine(source.header.get_best_affine(), voxel).tolist()
            value = page.evaluate("""(mm) => {
                const volume = window.virtniiViewer.nv.volumes[0]
                const voxel = volume.mm2vox(mm)
                return volume.getValue(voxel[0], voxel[1], voxel[2])
            }""", world)
            assert value == data[voxel], (voxel, world)


def test_an_image_the_viewer_cannot_show_gets_a_message(page: Page) -> None:
    choose(page, "fmri", state="error")
    message = page.inner_text("#status")
    assert IMAGES["fmri"] in message and "4 dimensions" in message
