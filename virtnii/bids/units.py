"""The per-source work of an index job, in batches that run anywhere: a thread here or a Dask worker.

A :class:`Batch` names its sources by URL with their listing info, so it pickles small and needs nothing from
the process that planned it but the storage options.  :func:`run_batch` reads the headers (one concurrent
ranged read per uncompressed file, as ``virtnii scan`` does), indexes each ``.nii.gz`` in place (its seek-point
sidecar written straight into the manifest's ``gzindex/``, under a name that changes with the source), and
writes one journal file with every source's outcome into the manifest's ``.journal/`` before it returns.  A job
killed midway therefore keeps every finished batch, and its re-run does only the rest.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec

from .. import versions
from ..errors import InvalidGzip, InvalidNifti, ManifestError, UnsupportedNifti, VirtniiError, storage_errors
from ..fingerprint import from_info
from ..manifest.writer import SidecarFolder
from ..scan import _plain_images, index_gzip_source, named, read_plain_headers, relative_names
from ..retry import open_fs
from ..sources import Source, by_listed_name, is_local, with_s3_pool

JOURNAL = ".journal"
#: The journal file kept after a run: its lasting failures (see :func:`keep_lasting_failures`).
LASTING_FILE = "lasting-failures.json"
#: Uncompressed sources per batch: their headers are read in one concurrent round.
PLAIN_BATCH = 256
#: A ``.nii.gz`` is one streaming pass; small ones are grouped up to this many compressed bytes per batch.
GZIP_BATCH_BYTES = 64 * 2**20
#: ``.nii.gz`` files of one batch indexed at once from remote storage (each pass mostly waits on requests).
REMOTE_GZIP_THREADS = 8
#: Failures that stay true until the file changes, so a re-run takes them from the journal instead of reading
#: the file again; the others (network, permissions) are tried again.
LASTING = (InvalidNifti, InvalidGzip, UnsupportedNifti)


@dataclass(frozen=True)
class Spec:
    """One source of a batch: its header file and voxel file (the same but for ``.hdr/.img``), group name."""

    name: str
    path: str
    info: dict[str, Any]
    data_path: str
    data_info: dict[str, Any]
    gzip: bool  # the voxels are gzipped: indexed by a streaming pass, not a header read
    listed_as: str = ""  # a DANDI asset's dandi:// URL (path: its blob): see Source.listed_as
    pin: bool = False  # read at the object versions listed (virtnii.sources.pin)

    @property
    def key(self) -> str:
        """What a journal record is valid for: this file (and data file) as listed, by image name (so a dataset
        moved with its manifest keeps its records), pinned or not."""
        return json.dumps([self.name, from_info(self.info, version=self.pin), self.data_path != self.path,
                           from_info(self.data_info, version=self.pin)], sort_keys=True)


@dataclass(frozen=True)
class Settings:
    """What the outcome of a batch depends on besides its sources; recorded with the manifest."""

    root: str  # the dataset's URL: sources are opened with it and the storage options
    zarr_format: int = 3
    extensions: bool = True
    relative: bool = False  # sources named relative to the manifest (it lies inside the dataset)

    def to_json(self) -> dict[str, Any]:
        """What a journal record or an earlier manifest must have been made with to be reused.  Absolute
        source URLs name the dataset's location, so it is part of it unless sources are relative."""
        doc = {"zarr_format": self.zarr_format, "extensions": self.extensions, "relative_sources": self.relative}
        return doc if self.relative else {**doc, "root": self.root}


@dataclass(frozen=True)
class Batch:
    specs: tuple[Spec, ...]
    gzip: bool

    @property
    def key(self) -> str:
        """16 hex digits naming the batch's journal file."""
        return hashlib.blake2b("\n".join(s.key for s in self.specs).encode(), digest_size=8).hexdigest()


def spec_of(source: Source) -> Spec:
    return Spec(source.name, source.path, dict(source.info), source.data_path, dict(source.data_info), source.is_gzip,
                source.listed_as, source.pin)


def plan(specs: list[Spec]) -> list[Batch]:
    """Batches of at most :data:`PLAIN_BATCH` uncompressed sources, or of ``.nii.gz`` files up to
    :data:`GZIP_BATCH_BYTES` (a big one alone), biggest first so the long passes start early."""
    plain = [s for s in specs if not s.gzip]
    gz = sorted((s for s in specs if s.gzip), key=lambda s: -int(s.data_info["size"]))
    batches: list[Batch] = []
    current: list[Spec] = []
    size = 0
    for spec in gz:
        if current and size + int(spec.data_info["size"]) > GZIP_BATCH_BYTES:
            batches.append(Batch(tuple(current), True))
            current, size = [], 0
        current.append(spec)
        size += int(spec.data_info["size"])
    if current:
        batches.append(Batch(tuple(current), True))
    return batches + [Batch(tuple(plain[i:i + PLAIN_BATCH]), False) for i in range(0, len(plain), PLAIN_BATCH)]


def run_batch(batch: Batch, settings: Settings, out: str, out_options: dict[str, Any],
              storage_options: dict[str, Any]) -> list[dict[str, Any]]:
    """Index the sources of ``batch``; journal and return one record per source (see :func:`record`)."""
    where = batch.specs[0].path if batch.specs[0].listed_as else settings.root  # a DANDI blob is a URL itself
    fs, _ = open_fs(where, with_s3_pool(where, storage_options))
    if any(s.pin for s in batch.specs):
        fs = versions.aware(fs)  # pinned sources are read at the versions listed
    sources = [Source(fs, s.path, s.info, s.data_path, s.data_info, name=s.name, listed_as=s.listed_as, pin=s.pin)
               for s in batch.specs]
    out_fs, out_path = fsspec.core.url_to_fs(out, **out_options)
    out_path = out_path.rstrip("/")
    names = relative_names(out, out_options, sources) if settings.relative else {}
    if batch.gzip:
        sidecars = SidecarFolder(out_fs, out_path, out)

        def one(source: Source) -> Any:
            try:
                return index_gzip_source(source, sidecars, settings.zarr_format, extensions=settings.extensions,
                                         names=names)
            except ManifestError:
                raise  # the manifest cannot be written: every other batch would fail the same way
            except VirtniiError as err:
                return err

        # locally a pass is inflating (a core each, and batches run one per core); remotely it is mostly
        # waiting on requests, so a batch of small files runs them together
        threads = 1 if is_local(fs) else min(REMOTE_GZIP_THREADS, len(sources))
        with ThreadPoolExecutor(threads, thread_name_prefix="virtnii-gzip") as pool:
            outcomes: list[Any] = list(pool.map(one, sources))
    else:
        outcomes = _plain_images(sources, read_plain_headers(sources), settings.zarr_format, settings.extensions)
    errors = iter(by_listed_name([o for o in outcomes if isinstance(o, VirtniiError)], sources))
    records = [record(spec, next(errors) if isinstance(outcome, VirtniiError) else named(outcome, names))
               for spec, outcome in zip(batch.specs, outcomes)]
    try:
        out_fs.makedirs(f"{out_path}/{JOURNAL}", exist_ok=True)
        out_fs.pipe_file(f"{out_path}/{JOURNAL}/{batch.key}.json",
                         json.dumps({"settings": settings.to_json(), "records": records}).encode())
    except storage_errors() as err:
        raise ManifestError(out, f"cannot write the manifest here: {err}") from err
    return records


def record(spec: Spec, outcome: Any) -> dict[str, Any]:
    """A source's outcome as JSON: its entry and kerchunk references, or its error (type and message)."""
    if isinstance(outcome, VirtniiError):
        return {"key": spec.key, "error": type(outcome).__name__, "source": outcome.source,
                "message": outcome.problem}
    refs, entry = outcome
    return {"key": spec.key, "entry": entry.to_json(), "refs": refs.kerchunk()}


def keep_lasting_failures(out_fs: fsspec.AbstractFileSystem, out_path: str, settings: Settings,
                          records: list[dict[str, Any]]) -> None:
    """Journal this run's lasting failures (a placeholder stays one until it changes) so that the next run
    takes them as they are: a re-run with nothing changed then reads no file at all."""
    lasting = [r for r in records if r.get("error") in {e.__name__ for e in LASTING}]
    if not lasting:
        return
    try:
        out_fs.makedirs(f"{out_path}/{JOURNAL}", exist_ok=True)
        out_fs.pipe_file(f"{out_path}/{JOURNAL}/{LASTING_FILE}",
                         json.dumps({"settings": settings.to_json(), "records": lasting}).encode())
    except storage_errors():
        pass  # they are read again next time: slower, not wrong


def read_journal(out_fs: fsspec.AbstractFileSystem, out_path: str, settings: Settings) -> dict[str, dict[str, Any]]:
    """Records of the batches finished by earlier runs with the same settings, by source key (unreadable journal
    files are skipped: a batch killed while writing its record simply runs again)."""
    folder = f"{out_path}/{JOURNAL}"
    try:
        files = out_fs.find(folder) if out_fs.exists(folder) else []
    except storage_errors():
        return {}
    records: dict[str, dict[str, Any]] = {}
    contents = out_fs.cat(files, on_error="return") if files else {}
    for data in contents.values():
        if isinstance(data, Exception):
            continue
        try:
            doc = json.loads(data)
            if doc.get("settings") != settings.to_json():
                continue  # made for another zarr format, extension rule or naming of sources
            for rec in doc["records"]:
                if "entry" in rec or rec.get("error") in {e.__name__ for e in LASTING}:
                    records[rec["key"]] = rec
        except (ValueError, TypeError, KeyError, AttributeError):
            continue
    return records
