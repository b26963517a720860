"""``virtnii serve``: manifests over HTTP as plain Zarr, a viewer-compatible view of each image, a viewer page.

:mod:`virtnii.server.view` is the viewer view of one image (framework-independent); the HTTP app routes to it.
The server's heavy dependencies are imported only when serving.
"""
