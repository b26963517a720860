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
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, sync_playwright

import virtnii
from virtnii.server.app import running

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


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``virtnii serve`` on a manifest with pyramids: the MNI template (.nii.gz), an oblique .nii (sform),
    one placed by its qform only, one with neither (nibabel's fallback), and a 4-D one (not viewable)."""
    folder = tmp_path_factory.mktemp("viewer")
    sources = folder / "sources"
    sources.mkdir()
    shutil.copy(MNI, sources / "mni.nii.gz")
    write_nifti(sources / "oblique.nii", oblique_voxels())
    for name, sform, qform in (("qform_only", 0, 1), ("no_form", 0, 0)):
        image = nib.Nifti1Image(oblique_voxels()[::2, ::2, ::2].copy(), AFFINE)
        image.set_sform(AFFINE, code=sform)
        image.set_qform(AFFINE @ np.diag([1.0, 1.0, -1.0, 1.0]), code=qform)  # qfac −1 once the k axis flips
        image.header.set_zooms((2.0, 1.5, 2.5))
        image.to_filename(sources / f"{name}.nii")
    write_nifti(sources / "fmri.nii", np.zeros((6, 5, 4, 3), np.float32))
    manifest = folder / "manifest"
    virtnii.scan([str(sources)], str(manifest))
    virtnii.build_pyramids(str(manifest))
    with running([str(manifest)]) as url:
        yield url, sources


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Any, served: tuple[str, Path]) -> Iterator[Page]:
    context = browser.new_context(viewport=VIEWPORT)  # a fresh profile: nothing cached from another test
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(served[0])
    page.wait_for_selector("#images button")
    yield page
    context.close()
    assert not errors, errors


def choose(page: Page, image: str, state: str = "ready") -> None:
    page.click(f"#images button[data-path='{image}']")
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


def test_renders_the_level_that_fits_and_fetches_a_fraction_of_level_0(page: Page) -> None:
    fetched: list[tuple[str, int]] = []
    page.on("requestfinished", lambda request: fetched.append((request.url, request.sizes()["responseBodySize"])))
    choose(page, "mni")
    state = viewer_state(page)
    # 233 voxels across at level 0, a ~200-pixel tile: level 1 (117 across) fits, preceded by level 2
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
    page.click("[data-view=axial]")
    page.wait_for_selector("#status[data-state=ready]")
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


def test_search_by_name(page: Page) -> None:
    page.fill("#search", "FORM")
    assert page.locator("#images button").evaluate_all("buttons => buttons.map(b => b.dataset.path)") == [
        "no_form", "qform_only"]
    page.fill("#search", "")
    assert page.locator("#images button").count() == 5


@pytest.mark.parametrize("name", ["oblique", "qform_only", "no_form"])
def test_world_placement_is_the_nifti_affine(page: Page, served: tuple[str, Path], name: str) -> None:
    """The page's affine is nibabel's best affine, and niivue finds each voxel's value at its world position."""
    choose(page, name)
    source = nib.load(served[1] / f"{name}.nii")
    state = viewer_state(page)
    assert np.allclose(state["affine"], source.header.get_best_affine(), atol=1e-5)
    assert state["level"] == 0  # small enough for level 0 to fit: values are the source's own
    data = np.asarray(source.dataobj)
    for voxel in [(0, 0, 0), (5, 10, 3), tuple(np.array(data.shape) - 1), tuple(np.array(BALL) // (60 // data.shape[0]))]:
        world = nib.affines.apply_affine(source.affine, voxel).tolist()
        value = page.evaluate("""(mm) => {
            const volume = window.virtniiViewer.nv.volumes[0]
            const voxel = volume.mm2vox(mm)
            return volume.getValue(voxel[0], voxel[1], voxel[2])
        }""", world)
        assert value == data[voxel], (voxel, world)


def test_an_image_the_viewer_cannot_show_gets_a_message(page: Page) -> None:
    choose(page, "fmri", state="error")
    message = page.inner_text("#status")
    assert "fmri" in message and "4 dimensions" in message
