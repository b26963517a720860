// World placement of a served image: the NIfTI header's affine, not only the OME scale.
//
// fidnii places each loaded block by OME scale/translation alone (an axis-aligned box), which is wrong for
// any image whose affine rotates, flips or permutes axes.  The page therefore rewrites the affine fidnii puts
// in niivue's header after each load: world = A · P · F, where F is fidnii's affine (buffer index → OME
// coordinates, the block's offset and level included), P maps OME coordinates back to level-0 voxel indices
// (from level 0's scale/translation) and A is the NIfTI affine of level 0.

/** 4×4 row-major matrix product. */
export function multiply(a, b) {
  return a.map((row) => [0, 1, 2, 3].map((j) => row.reduce((sum, value, k) => sum + value * b[k][j], 0)))
}

/** The OME scale and translation of one multiscale image, by axis name (`x`, `y`, `z`). */
function omeTransform(ngffImage) {
  const scale = (axis) => ngffImage.scale[axis] ?? 1
  const translation = (axis) => ngffImage.translation?.[axis] ?? 0
  return { scale, translation }
}

/**
 * The matrix taking fidnii's OME coordinates to world (NIfTI) coordinates.
 *
 * OME axis x is NIfTI's i (the array's last, fastest axis), y is j and z is k, so level-0 voxel index
 * i = (x − tₓ) / sₓ, and likewise for j and k.
 */
export function worldFromOme(niftiAffine, level0) {
  const { scale, translation } = omeTransform(level0)
  const toIndex = ["x", "y", "z"].map((axis, row) => {
    const line = [0, 0, 0, -translation(axis) / scale(axis)]
    line[row] = 1 / scale(axis)
    return line
  })
  toIndex.push([0, 0, 0, 1])
  return multiply(niftiAffine, toIndex)
}

/**
 * Make `nvImage` place itself in world space from now on: each affine fidnii gives it (OME coordinates, set
 * just before fidnii calls calculateRAS and uploads the block) is replaced by the world one, once.
 *
 * Hooking calculateRAS rather than fixing the header after fidnii's upload saves a second upload of every
 * level and never shows a frame placed by OME axes.
 */
export function placeInWorld(nvImage, worldFromOmeMatrix) {
  const calculateRAS = nvImage.calculateRAS.bind(nvImage)
  let placed = null // the affine array last placed: niivue may call calculateRAS again on it
  nvImage.calculateRAS = () => {
    if (nvImage.hdr.affine !== placed) {
      nvImage.hdr.affine = multiply(worldFromOmeMatrix, nvImage.hdr.affine)
      nvImage.hdr.sform_code = 1
      placed = nvImage.hdr.affine
    }
    return calculateRAS()
  }
}

// ---- The NIfTI affine from the raw header, by nibabel's rules (Nifti1Header.get_best_affine) ----
//
// Used only when the served view does not carry the affine in its attributes.  nifti-reader-js is not used
// for this: it prefers the qform whenever sform_code < qform_code and ignores the qform of NIfTI-2 headers,
// so it disagrees with nibabel, the reference virtnii is tested against.

const LAYOUTS = {
  // byte offsets of the fields used here, and the reader of each numeric field
  1: { size: 348, dim: 40, pixdim: 76, qformCode: 252, sformCode: 254, quatern: 256, qoffset: 268, srow: 280,
    int: "getInt16", float: "getFloat32", floatSize: 4, dimSize: 2, codeSize: 2 },
  2: { size: 540, dim: 16, pixdim: 104, qformCode: 344, sformCode: 348, quatern: 352, qoffset: 376, srow: 400,
    int: "getBigInt64", float: "getFloat64", floatSize: 8, dimSize: 8, codeSize: 4 },
}

/** The fields of a NIfTI-1 or NIfTI-2 header (either byte order) that its affine depends on. */
export function readHeaderFields(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  for (const [version, layout] of Object.entries(LAYOUTS)) {
    for (const little of [true, false]) {
      if (bytes.byteLength >= layout.size && view.getInt32(0, little) === layout.size) {
        const float = (offset) => view[layout.float](offset, little)
        const floats = (offset, n) => Array.from({ length: n }, (_, i) => float(offset + i * layout.floatSize))
        const code = (offset) => (layout.codeSize === 2 ? view.getInt16(offset, little) : view.getInt32(offset, little))
        const dim = Array.from({ length: 8 }, (_, i) => Number(view[layout.int](layout.dim + i * layout.dimSize, little)))
        return {
          version: Number(version),
          dim,
          pixdim: floats(layout.pixdim, 8),
          qformCode: code(layout.qformCode),
          sformCode: code(layout.sformCode),
          quatern: floats(layout.quatern, 3),
          qoffset: floats(layout.qoffset, 3),
          srow: [0, 1, 2].map((row) => floats(layout.srow + row * 4 * layout.floatSize, 4)),
        }
      }
    }
  }
  throw new Error("the image's header is neither NIfTI-1 nor NIfTI-2")
}

/** nibabel's quaternions.fillpositive + quat2mat: the rotation of a qform. */
function qformRotation([b, c, d]) {
  const w2 = 1 - (b * b + c * c + d * d)
  // nibabel: a negative w2 within 3×float32 eps of 0 is rounding (w = 0); below that, not a unit quaternion
  if (w2 < -3 * 1.1920929e-7) throw new Error("the header's qform quaternion is not a unit quaternion")
  const w = w2 < 0 ? 0 : Math.sqrt(w2)
  const n = w * w + b * b + c * c + d * d
  if (n < Number.EPSILON) return [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
  const s = 2 / n
  const [X, Y, Z] = [b * s, c * s, d * s]
  const [wX, wY, wZ, xX, xY, xZ, yY, yZ, zZ] = [w * X, w * Y, w * Z, b * X, b * Y, b * Z, c * Y, c * Z, d * Z]
  return [
    [1 - (yY + zZ), xY - wZ, xZ + wY],
    [xY + wZ, 1 - (xX + zZ), yZ - wX],
    [xZ - wY, yZ + wX, 1 - (xX + yY)],
  ]
}

/** nibabel's Nifti1Header.get_best_affine: the sform if coded, else the qform if coded, else the base affine. */
export function bestAffine(fields) {
  const last = [0, 0, 0, 1]
  if (fields.sformCode !== 0) return [...fields.srow.map((row) => [...row]), last]
  const zooms = fields.pixdim.slice(1, 4)
  if (fields.qformCode !== 0) {
    const qfac = fields.pixdim[0] === -1 ? -1 : 1 // nibabel reads qfac 0 (old writers) as 1
    const rotation = qformRotation(fields.quatern)
    const voxel = [zooms[0], zooms[1], zooms[2] * qfac]
    return [...rotation.map((row, i) => [...row.map((value, j) => value * voxel[j]), fields.qoffset[i]]), last]
  }
  // Analyze-style: x flipped, origin at the centre of the volume (nibabel's shape_zoom_affine)
  const ndim = fields.dim[0]
  const shape = [1, 2, 3].map((axis) => (axis <= ndim ? fields.dim[axis] : 1))
  const zoom = [1, 2, 3].map((axis) => (axis <= ndim ? fields.pixdim[axis] : 1))
  const sign = [-1, 1, 1]
  return [0, 1, 2].map((i) => {
    const row = [0, 0, 0, -((shape[i] - 1) / 2) * zoom[i] * sign[i]]
    row[i] = zoom[i] * sign[i]
    return row
  }).concat([last])
}
