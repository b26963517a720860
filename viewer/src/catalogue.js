// The image list from /api/images and its search box.

/** Every image the server lists (see docs/serve.md for the entries' fields). */
export async function fetchImages(url = "/api/images") {
  const response = await fetch(url)
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`)
  const listing = await response.json()
  return listing.images
}

/**
 * Does `image` match the search `query`?
 *
 * Every whitespace-separated term must match: `key=value` an entity exactly (`sub=01`, `suffix=T1w`),
 * anything else a part of the path or of an entity's value — so `01 T1w` finds sub-01's T1w images.
 * Case is ignored.
 */
export function matches(image, query) {
  const entities = Object.entries(image.bids ?? {}).map(([key, value]) => [key.toLowerCase(), String(value).toLowerCase()])
  const path = image.path.toLowerCase()
  return query.toLowerCase().split(/\s+/).filter(Boolean).every((term) => {
    const equals = term.indexOf("=")
    if (equals > 0) {
      const [key, value] = [term.slice(0, equals), term.slice(equals + 1)]
      return entities.some(([k, v]) => k === key && v === value)
    }
    return path.includes(term) || entities.some(([, v]) => v.includes(term))
  })
}
