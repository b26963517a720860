// The page `virtnii serve` shows at /: the image list, and niivue + fidnii on the image chosen.
//
// Loading is fidnii's progressive one (coarsest level first, then the level that fits the view); slicing is
// niivue's own, on the loaded volume, so every orientation an affine can give is shown right: the page
// detaches fidnii from niivue's slice-type changes, whose per-view slabs assume OME axes are world axes.

import { Niivue, SLICE_TYPE } from "@niivue/niivue"
import { fromNgffZarr } from "@fideus-labs/ngff-zarr"
import { OMEZarrNVImage } from "@fideus-labs/fidnii"
import * as zarr from "zarrita"

import { fetchImages, matches } from "./catalogue.js"
import { fittingLevel, spatialShape } from "./levels.js"
import { bestAffine, placeInWorld, readHeaderFields, worldFromOme } from "./placement.js"

const VIEWS = {
  axial: SLICE_TYPE.AXIAL,
  coronal: SLICE_TYPE.CORONAL,
  sagittal: SLICE_TYPE.SAGITTAL,
  multiplanar: SLICE_TYPE.MULTIPLANAR,
  render: SLICE_TYPE.RENDER,
}
// the crosshair coordinate (niivue's RAS fractions) the slice slider moves in each view
const SLICE_AXIS = { axial: 2, coronal: 1, sagittal: 0, multiplanar: 2, render: 2 }

const elements = Object.fromEntries(
  ["search", "count", "images", "slice", "position", "status", "canvas"].map((id) => [id, document.getElementById(id)]))

/** What tests and benchmarks read: the state of the page, and timings (ms since the image was chosen, at
 * `chosenAt` on the page's performance.now() clock). */
const state = {
  nv: null, // the Niivue instance (tests read voxel values at world positions through it)
  images: [],
  path: null, // the image shown
  source: null, // "view" or "zarr": which of the server's trees it is read from
  affine: null, // its NIfTI affine (level 0 voxel → world)
  view: "multiplanar",
  level: null, // the level on screen
  targetLevel: null,
  levels: null,
  timings: {},
}
window.virtniiViewer = state

const nv = new Niivue({ backColor: [0, 0, 0, 1], show3Dcrosshair: true, dragAndDropEnabled: false })
state.nv = nv
let current = null // { image, token }: the OMEZarrNVImage on screen
let opening = 0 // increases with each image chosen, so that a slow earlier load cannot overwrite a later one

function setStatus(kind, text, detail = {}) {
  elements.status.dataset.state = kind
  for (const [key, value] of Object.entries(detail)) elements.status.dataset[key] = String(value)
  elements.status.textContent = text
}

/** Device pixels across one view tile: the whole canvas for one view, about half of it for four. */
function tilePixels() {
  const side = Math.min(elements.canvas.width, elements.canvas.height)
  return state.view === "multiplanar" ? side / 2 : side
}

/**
 * The tree of `entry` to load: `/view/` (isotropic chunks, viewer dtypes, its affine in the attributes) when
 * the server offers it, else the plain `/zarr/` store, whose affine the page reads from the NIfTI header.
 */
async function chooseTree(entry) {
  if (entry.view) {
    const url = new URL(entry.view, location.href).href
    const probe = await fetch(new URL("zarr.json", url))
    if (probe.ok) {
      const affine = (await probe.json()).attributes?.virtnii_view?.affine
      // null entries: an affine with non-finite values (a broken header), which the page cannot place
      if (affine?.flat().every(Number.isFinite)) return { source: "view", url, affine }
    }
  }
  return { source: "zarr", url: new URL(entry.zarr, location.href).href, affine: await niftiAffine(entry) }
}

/** The image's NIfTI affine, from the raw header the plain store serves at `<image>/nifti`. */
async function niftiAffine(entry) {
  const store = new zarr.FetchStore(new URL(entry.zarr, location.href).href)
  const header = await zarr.open(zarr.root(store).resolve("nifti"), { kind: "array" })
  const { data } = await zarr.get(header)
  return bestAffine(readHeaderFields(data))
}

function explain(entry, error) {
  const message = error instanceof Error ? error.message : String(error)
  if (/Unsupported (zarrita )?dtype/i.test(message)) {
    return `Cannot show ${entry.path}: its voxels are ${entry.dtype}, which the viewer cannot display.`
  }
  return `Cannot show ${entry.path}: ${message}`
}

async function open(entry) {
  const token = ++opening
  const started = performance.now()
  Object.assign(state, { path: entry.path, source: null, affine: null, level: null, targetLevel: null, levels: null,
    timings: { chosenAt: started } })
  for (const button of elements.images.querySelectorAll("button")) {
    button.setAttribute("aria-current", String(button.dataset.path === entry.path))
  }
  history.replaceState(null, "", `#${encodeURIComponent(entry.path)}`)
  for (const volume of [...nv.volumes]) nv.removeVolume(volume)
  current = null
  setStatus("loading", `Opening ${entry.path}…`, { level: "", targetLevel: "" })
  try {
    if (entry.shape.length !== 3) {
      throw new Error(`it has ${entry.shape.length} dimensions (${entry.shape.join("×")}); the viewer shows 3-D images`)
    }
    const { source, url, affine } = await chooseTree(entry)
    const multiscales = await fromNgffZarr(url)
    if (token !== opening) return
    const levels = multiscales.images
    // An OMERO entry without a window: fidnii would otherwise compute one (quantiles, re-reading each level it
    // loads, in one more worker), which it then widens to the data's range after every load anyway; without
    // one, niivue's own range is used and widened the same way
    multiscales.metadata.omero ??= { channels: [{}] }
    const toWorld = worldFromOme(affine, levels[0])
    const target = fittingLevel(levels, tilePixels())
    Object.assign(state, { source, affine, levels: levels.length, targetLevel: target })

    // fidnii follows niivue's slice type and swaps in per-view slabs placed by OME axes: create it while
    // niivue is in a 3-D mode, then detach it, so that niivue slices the (correctly placed) volume itself
    const sliceType = nv.opts.sliceType
    nv.opts.sliceType = SLICE_TYPE.MULTIPLANAR
    const image = await OMEZarrNVImage.create({
      multiscales, niivue: nv, autoLoad: false, viewportAware: false,
      maxPixels: spatialShape(levels[target]).reduce((a, b) => a * b, 1),
    })
    image.detachNiivue(nv)
    nv.opts.sliceType = sliceType
    current = { image, token }

    placeInWorld(image, toWorld)
    image.addEventListener("loadingComplete", (event) => {
      if (token !== opening) return
      state.level = event.detail.levelIndex
      requestAnimationFrame(() => {
        if (token !== opening) return
        state.timings.firstRender ??= performance.now() - started
        setStatus(state.level === state.targetLevel ? "ready" : "loading",
          `${entry.path}: level ${state.level} of ${levels.length - 1} (${spatialShape(levels[state.level]).join("×")}` +
          `, from /${source}/)`, { level: state.level, targetLevel: state.targetLevel })
        if (state.level === state.targetLevel) state.timings.ready ??= performance.now() - started
        showPosition()
      })
    })
    nv.addVolume(image)
    await image.populateVolume()
  } catch (error) {
    if (token !== opening) return
    console.error(error)
    for (const volume of [...nv.volumes]) nv.removeVolume(volume)
    current = null
    setStatus("error", explain(entry, error))
  }
}

/** Load a finer level when the view got bigger than the loaded level fits (never a coarser one). */
function refit() {
  if (!current || state.level === null || state.levels === null) return
  const finer = fittingLevel(current.image.multiscales.images, tilePixels())
  if (finer < state.targetLevel) {
    state.targetLevel = finer
    setStatus("loading", `${state.path}: loading level ${finer}…`, { targetLevel: finer })
    current.image.loadLevel(finer).catch((error) => setStatus("error", `Cannot show ${state.path}: ${error.message}`))
  }
}

function setView(name) {
  state.view = name
  for (const button of document.querySelectorAll("[data-view]")) {
    button.setAttribute("aria-pressed", String(button.dataset.view === name))
  }
  nv.setSliceType(VIEWS[name])
  elements.slice.value = String(Math.round(nv.scene.crosshairPos[SLICE_AXIS[name]] * 1000))
  refit()
}

function showPosition() {
  if (!nv.volumes.length) return
  const mm = nv.frac2mm(nv.scene.crosshairPos)
  elements.position.textContent = `${mm[0].toFixed(1)}, ${mm[1].toFixed(1)}, ${mm[2].toFixed(1)} mm`
}

function renderList() {
  const query = elements.search.value
  const shown = state.images.filter((image) => matches(image, query))
  elements.count.textContent = `${shown.length} of ${state.images.length} image(s)`
  elements.images.replaceChildren(...shown.map((image) => {
    const item = document.createElement("li")
    const button = document.createElement("button")
    button.type = "button"
    button.dataset.path = image.path
    button.setAttribute("aria-current", String(image.path === state.path))
    const meta = document.createElement("span")
    meta.className = "meta"
    const entities = Object.entries(image.bids ?? {}).map(([key, value]) => `${key}-${value}`).join(" ")
    meta.textContent = [image.shape.join("×"), image.dtype, entities].filter(Boolean).join(" · ")
    button.append(image.path, meta)
    button.addEventListener("click", () => open(image))
    item.append(button)
    return item
  }))
}

async function main() {
  await nv.attachToCanvas(elements.canvas)
  setView(state.view)
  elements.search.addEventListener("input", renderList)
  elements.slice.addEventListener("input", () => {
    const position = [...nv.scene.crosshairPos]
    position[SLICE_AXIS[state.view]] = Number(elements.slice.value) / 1000
    nv.scene.crosshairPos = position
    nv.drawScene()
    showPosition()
  })
  for (const button of document.querySelectorAll("[data-view]")) {
    button.addEventListener("click", () => setView(button.dataset.view))
  }
  nv.onLocationChange = () => {
    elements.slice.value = String(Math.round(nv.scene.crosshairPos[SLICE_AXIS[state.view]] * 1000))
    showPosition()
  }
  new ResizeObserver(refit).observe(elements.canvas)
  try {
    state.images = await fetchImages()
  } catch (error) {
    setStatus("error", `Cannot list the images: ${error.message}`)
    return
  }
  renderList()
  const wanted = decodeURIComponent(location.hash.slice(1))
  const entry = state.images.find((image) => image.path === wanted)
  if (entry) open(entry)
}

main()
