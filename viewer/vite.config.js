// Builds the page into the Python package: index.html and flat assets in virtnii/server/static/, referenced
// under /static/ (where `virtnii serve` serves that folder's other files).
import { defineConfig } from "vite"

export default defineConfig({
  base: "/static/",
  build: {
    outDir: "../virtnii/server/static",
    emptyOutDir: true,
    assetsDir: "",
    sourcemap: false,
    chunkSizeWarningLimit: 4096,
  },
  worker: { format: "es" },
})
