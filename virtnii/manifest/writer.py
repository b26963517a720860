"""Writing a manifest folder: all-or-nothing for a scan or a combination, atomically in place for an update.

Layout (documented for users in ``docs/manifest.md``)::

    OUT/
      virtnii.json        index file: format version, zarr format, one entry per image (written last)
      refs.json           kerchunk v1 references of the whole hierarchy   (or refs.parquet/ with --format parquet)
      gzindex/            gzip seek-point sidecars of .nii.gz sources (see docs/gzip.md)

Everything is written into a sibling ``OUT.partial-<id>`` folder first and moved into place only when complete,
so a failure or an interrupt never leaves a half-written manifest at ``OUT`` (on object stores, which cannot
rename, the files are copied over the old ones with the index file last; see ``ManifestWriter._commit``).
Nothing from the storage options used to read sources (credentials, endpoints) is ever written: references
carry only URLs.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import posixpath
import uuid
from typing import Any, Iterable, Iterator

import fsspec

from ..errors import ManifestError, storage_errors
from ..references import ImageRefs, hierarchy_docs
from . import recovery
from .entry import ImageEntry
from .index import INDEX_FILE, Index
from .refs import METADATA_KEYS

REF_FILES = {"json": "refs.json", "parquet": "refs.parquet"}


class SidecarFolder:
    """Where a scan writes gzip sidecars: ``tmp`` on ``fs``, for the manifest ``out_url`` (named in errors)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, tmp: str, out_url: str) -> None:
        self.fs, self.tmp, self.out_url = fs, tmp, out_url

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Storage errors while writing the manifest (disk full, no network, no permission) as ManifestError."""
        try:
            yield
        except storage_errors() as err:
            raise ManifestError(self.out_url, f"cannot write the manifest here: {err}") from err


class ManifestWriter(SidecarFolder):
    """Collects sidecars in a temporary folder, then :meth:`commit` writes references and moves it into place."""

    def __init__(self, out: str, storage_options: dict[str, Any] | None = None) -> None:
        fs, path = fsspec.core.url_to_fs(out, **(storage_options or {}))
        self.out = path.rstrip("/")
        super().__init__(fs, f"{self.out}{recovery.PARTIAL}{uuid.uuid4().hex[:8]}", out)
        with self.writing():
            recovery.recover(self.fs, self.out, INDEX_FILE)  # what a killed earlier run left here
            self._refuse_to_replace_other_data()
            if getattr(self.fs, "local_file", False):  # OUT's parent too (DATASET/derivatives/virtnii)
                self.fs.makedirs(posixpath.dirname(self.tmp), exist_ok=True)
            recovery.claim(self.fs, self.tmp)
            self.fs.makedirs(self.tmp, exist_ok=True)

    def _refuse_to_replace_other_data(self) -> None:
        """A scan replaces ``OUT`` wholesale: only ever an earlier manifest or an empty folder, never other data."""
        if not self.fs.exists(self.out):
            return
        if self.fs.isdir(self.out) and (self.fs.exists(f"{self.out}/{INDEX_FILE}") or not self.fs.ls(self.out)):
            return
        raise ManifestError(self.out_url, "exists and is not a virtnii manifest; refusing to replace it "
                                          "(choose an empty or new folder for -o)")

    def __enter__(self) -> "ManifestWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            with self.writing():
                if self.fs.exists(self.tmp):  # commit moved it away; anything left is an aborted write
                    self.fs.rm(self.tmp, recursive=True)
                recovery.release(self.fs, self.tmp)
        except ManifestError:  # what failed first is the error to report; OUT itself was never touched
            if exc is None:
                raise

    def commit(self, images: list[ImageRefs], entries: list[ImageEntry], zarr_format: int,
               ref_format: str) -> None:
        """Write references and the index file, then replace ``OUT`` with the finished folder."""
        with self.writing():
            self._commit(images, entries, zarr_format, ref_format)

    def _commit(self, images: list[ImageRefs], entries: list[ImageEntry], zarr_format: int,
                ref_format: str) -> None:
        ref_file = REF_FILES[ref_format]
        target, index_file = f"{self.tmp}/{ref_file}", f"{self.tmp}/{INDEX_FILE}"
        write_references(self.fs, target, build_refs(images, zarr_format), ref_format)
        with self.fs.open(index_file, "w") as f:
            f.write(Index(zarr_format, ref_file, tuple(entries)).text())
        if getattr(self.fs, "local_file", False):
            # renames: the old manifest stays whole at OUT until the new one is complete and renamed in
            old = f"{self.tmp}{recovery.OLD}"
            if self.fs.exists(self.out):
                self.fs.mv(self.out, old, recursive=True)
            self.fs.mv(self.tmp, self.out, recursive=True)
            if self.fs.exists(old):
                self.fs.rm(old, recursive=True)
            return
        # Object stores cannot rename (and fsspec's recursive mv also copies the "folder" key itself, which does
        # not exist there: NoSuchKey on S3).  Copy the new files over the old ones — sidecars, then references,
        # then the index file (one PUT: readers find the old manifest or the new one) — and only then delete what
        # only the old manifest had.  Old and new files never combine into wrong voxels: sidecar names carry a
        # version tag, and every source is checked against its fingerprint before it is read.
        old = set(self.fs.find(self.out)) if self.fs.exists(self.out) else set()
        new = [f for f in self.fs.find(self.tmp) if f != index_file]
        sidecars = [f for f in new if not f.startswith(target)]
        for batch in (sidecars, [f for f in new if f.startswith(target)], [index_file]):
            if batch:
                self.fs.copy(batch, [self.out + f[len(self.tmp):] for f in batch])
        stale = sorted(old - {self.out + f[len(self.tmp):] for f in new} - {f"{self.out}/{INDEX_FILE}"})
        if stale:
            self.fs.rm(stale)
        self.fs.rm(self.tmp, recursive=True)


#: kerchunk's default rows per Parquet reference file, and virtnii's cap.
MAX_RECORD_SIZE = 100_000


def _record_size(refs: dict[str, Any]) -> int:
    """Rows per Parquet reference file: enough for the array with the most chunks (one file per array), no more.

    fsspec writes every file padded to this many rows, so kerchunk's default of 100,000 made each 1-chunk array
    cost ~25 ms to write; sized to the data it is ~2-5 ms, fastparquet's per-file floor.
    """
    counts: collections.Counter[str] = collections.Counter()
    for key in refs:
        folder, _, leaf = key.rpartition("/")
        if leaf not in METADATA_KEYS:
            counts[folder.split("/c/")[0]] += 1  # v3 chunk keys nest under <array>/c/
    return min(MAX_RECORD_SIZE, max(counts.values(), default=1))


def write_references(fs: fsspec.AbstractFileSystem, target: str, refs: dict[str, Any], ref_format: str) -> None:
    """Write kerchunk v1 ``refs`` at ``target``: JSON text, or fsspec's Parquet reference folder."""
    if ref_format == "json":
        # one dumps + write: json.dump streams through the pure-Python encoder, ~10x slower on big manifests
        fs.pipe_file(target, json.dumps(refs, separators=(",", ":")).encode())
    else:
        import kerchunk.df  # imports pandas (~0.3 s): only Parquet manifests pay for it

        kerchunk.df.refs_to_dataframe(refs, fs.unstrip_protocol(target), record_size=_record_size(refs["refs"]),
                                      storage_options=fs.storage_options)


def build_refs(images: Iterable[ImageRefs], zarr_format: int) -> dict[str, Any]:
    """Kerchunk v1 references of a hierarchy holding ``images`` (one group each)."""
    images = list(images)
    refs: dict[str, Any] = hierarchy_docs([im.name for im in images], zarr_format, {})
    for image in images:
        refs.update(image.kerchunk())
    return {"version": 1, "refs": refs}


def update_manifest(manifest: str, current: Index, images: Iterable[ImageEntry], refs: dict[str, Any],
                    options: dict[str, Any]) -> Index:
    """Update a manifest folder in place to ``images`` and ``refs``: the references under a new name, then the
    index file, atomically; returns the new index (see :func:`publish`)."""
    fs, path = fsspec.core.url_to_fs(manifest, **options)
    return publish(fs, path, manifest, current.zarr_format, current.ref_format, images, refs, current.references,
                   current.job)


def publish(fs: fsspec.AbstractFileSystem, path: str, url: str, zarr_format: int, ref_format: str,
            images: Iterable[ImageEntry], refs: dict[str, Any], old_references: str | None,
            job: dict[str, Any] | None = None) -> Index:
    """Make the manifest folder ``path`` hold ``images`` and ``refs``, in place: the references under a new name,
    then the index file, atomically, then the old references (``old_references``) go; returns the new index.

    Readers that opened the old index keep reading the references it names until they are removed, last; a
    new reader sees the old manifest or the new one, never a mix: the index file is replaced by one rename
    (local) or one PUT (object stores), and it is what names the references.  Sidecars and level stores are
    named by what they were made from, so new ones can be written beside the old before this is called.
    """
    path = path.rstrip("/")
    name = f"refs.{uuid.uuid4().hex[:8]}.{'json' if ref_format == 'json' else 'parquet'}"
    new = Index(zarr_format, name, tuple(images), job)
    try:
        write_references(fs, f"{path}/{name}", {"version": 1, "refs": refs}, ref_format)
        text = new.text().encode()
        if getattr(fs, "local_file", False):
            staged = f"{path}/{INDEX_FILE}.partial-{uuid.uuid4().hex[:8]}"
            fs.pipe_file(staged, text)
            os.replace(staged, f"{path}/{INDEX_FILE}")
        else:
            fs.pipe_file(f"{path}/{INDEX_FILE}", text)
        old_refs = f"{path}/{old_references}" if old_references else None
        if old_refs and old_refs != f"{path}/{name}" and fs.exists(old_refs):
            fs.rm(old_refs, recursive=True)
    except storage_errors() as err:
        raise ManifestError(url, f"cannot update the manifest here: {err}") from err
    return new
