"""``virtnii serve``: manifests as a plain read-only Zarr store over HTTP, with an image listing and a viewer page.

:mod:`.store` maps the manifests' keys to bytes (framework-independent), :mod:`.semantics` holds the HTTP rules
(paths, ranges, conditional requests), :mod:`.app` is the aiohttp server; see docs/serve.md.  The HTTP
framework is imported only when serving.
"""

from __future__ import annotations

from typing import Any, Sequence

from .store import ServedImage, Store

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000


def serve(manifests: Sequence[str] | Store, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          **options: Any) -> None:
    """Serve manifest folders over HTTP until SIGINT/SIGTERM: see :func:`virtnii.server.app.serve`."""
    from .app import serve as run

    run(manifests, host, port, **options)


__all__ = ["serve", "Store", "ServedImage", "DEFAULT_HOST", "DEFAULT_PORT"]
