// Which pyramid level "fits the screen".

/** Voxels the page will hold for one image at most: a larger level is never loaded (memory, texture size). */
export const MAX_VOXELS = 2 ** 26

/** An image level's spatial shape [z, y, x] (fidnii's order). */
export function spatialShape(ngffImage) {
  return ["z", "y", "x"].map((axis) => ngffImage.data.shape[ngffImage.dims.indexOf(axis)])
}

/**
 * The level that fits a view `tilePixels` device pixels across: the finest level no larger than that along
 * any axis (a finer one has more voxels than the screen has pixels to show them) and within MAX_VOXELS; the
 * coarsest level when none is that small.  Levels are ordered finest first, as in OME multiscales.
 */
export function fittingLevel(images, tilePixels) {
  for (let level = 0; level < images.length; level++) {
    const shape = spatialShape(images[level])
    if (Math.max(...shape) <= tilePixels && shape.reduce((a, b) => a * b, 1) <= MAX_VOXELS) return level
  }
  return images.length - 1
}
