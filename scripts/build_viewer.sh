#!/usr/bin/env bash
# Rebuild the viewer page (viewer/) into virtnii/server/static/, from the committed package-lock.json.
# Needs Node.js >= 20 and npm; the result is committed, so installing virtnii never needs either.
set -euo pipefail
cd "$(dirname "$0")/../viewer"
npm ci --no-audit --no-fund --loglevel=error
npx vite build --logLevel warn
echo "viewer built into virtnii/server/static/:"
ls -1 ../virtnii/server/static
