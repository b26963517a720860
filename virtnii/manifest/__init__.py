"""The manifest folder: its index file, its references, and the writing, recovering, combining and checking of it.

Layout (documented for users in ``docs/manifest.md``)::

    OUT/
      virtnii.json        index file (:mod:`.index`, entries in :mod:`.entry`), written last
      refs.json           kerchunk references of the whole hierarchy (:mod:`.refs` reads, :mod:`.writer` writes)
      gzindex/            gzip seek-point sidecars of .nii.gz sources (see docs/gzip.md)
      levels/             pyramid level stores (see docs/pyramid.md)

:mod:`.recovery` finishes what a killed writer left, :mod:`.combine` merges manifests, :mod:`.integrity` is
what ``virtnii verify`` checks of the manifest's own files.
"""

from .entry import GZIP_INDEX_FOLDER, LEVELS_FOLDER, ImageEntry, Level, Pyramid
from .index import (INDEX_FILE, MANIFEST_VERSION, READABLE_VERSIONS, RELATIVE_SOURCES_VERSION, Index,
                    manifest_options_for, manifest_url, read_index)
from .refs import METADATA_KEYS, load_refs
from .writer import REF_FILES, ManifestWriter, build_refs, update_manifest, write_references

__all__ = [
    "GZIP_INDEX_FOLDER", "LEVELS_FOLDER", "ImageEntry", "Level", "Pyramid", "INDEX_FILE", "MANIFEST_VERSION",
    "READABLE_VERSIONS", "RELATIVE_SOURCES_VERSION", "Index", "manifest_options_for", "manifest_url", "read_index",
    "METADATA_KEYS", "load_refs", "REF_FILES", "ManifestWriter", "build_refs", "update_manifest", "write_references",
]
