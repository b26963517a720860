"""``virtnii index``: a whole BIDS dataset into one manifest, in place, resumable, here or on a Dask cluster.

The run: list the dataset once (:mod:`.listing`); name every image after its BIDS path; take unchanged images
from the manifest already at OUT (same listing fingerprint) and finished ones from a killed run's journal; index
the rest in batches (:mod:`.units`) on local threads or Dask workers; attach entities and inherited sidecars
(:mod:`.metadata`); publish the new manifest atomically in place (references under a new name, then the index
file); delete what it no longer references; build pyramids if asked; write the report (:mod:`.report`).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import posixpath
import time
from dataclasses import dataclass, replace
from typing import Any, Iterable

import fsspec
from tqdm.auto import tqdm

from ..cluster import dask_map
from ..errors import InvalidNifti, ManifestError, error_class, storage_errors
from ..fingerprint import from_info
from ..versions import VERSION
from ..manifest import GZIP_INDEX_FOLDER, INDEX_FILE, LEVELS_FOLDER, ImageEntry, load_refs, read_index
from ..manifest.index import Index, manifest_options_for, manifest_url
from ..manifest.writer import REF_FILES, publish
from ..retry import without_policy
from ..references import ZARR_FORMATS, edit_group_attributes, hierarchy_docs
from ..sources import assign_names, is_local
from . import metadata, units
from .listing import Listing, list_dataset, nifti_sources
from .report import REPORT_FILE, Report

#: Batches run at once on this machine for remote datasets: each is mostly waiting on requests.
REMOTE_WORKERS = 8


@dataclass
class IndexResult:
    """What an index run made: the manifest, its image entries, the skipped files and the full report."""

    manifest: str
    images: list[ImageEntry]
    skipped: list[dict[str, str]]
    report: Report


def index(root: str, out: str, *, pyramid: bool = False, derivatives: bool = False, workers: int | None = None,
          dask: Any = None, zarr_format: int = 3, ref_format: str = "json", extensions: bool = True,
          storage_options: dict[str, Any] | None = None, manifest_options: dict[str, Any] | None = None,
          progress: bool = False, pin_versions: bool | None = None) -> IndexResult:
    """Index the BIDS dataset at ``root`` (a folder or fsspec URL) into the manifest folder ``out``.

    Every ``.nii``/``.nii.gz`` (``derivatives/`` too if ``derivatives``) becomes an image group named after its
    path (``sub-01/ses-1/anat/sub-01_ses-1_T1w``) whose attributes carry its BIDS entities and its sidecar
    metadata (inheritance principle); the root group carries dataset_description.json and participants.tsv.
    ``pyramid`` also builds the OME levels (mode for ``_dseg``/``_mask`` label images, mean otherwise).

    A re-run reads only sources that are new or changed (size and mtime/ETag, and object version where pinned),
    drops removed ones, and finishes what a killed run left.  ``pin_versions`` as for :func:`virtnii.scan`: on a
    versioned bucket each image reads the object versions it was indexed from, listed by the same one listing.
    ``workers`` batches run at once (default: one per core locally, :data:`REMOTE_WORKERS` for remote data);
    ``dask`` (a ``distributed.Client`` or a scheduler address) runs the batches, and the pyramids' batches, on
    a Dask cluster instead, whose workers must reach ``root`` and ``out``.
    """
    started = time.perf_counter()
    if zarr_format not in ZARR_FORMATS:
        raise ManifestError(out, f"zarr_format must be 2 or 3, not {zarr_format!r}")
    if ref_format not in REF_FILES or (ref_format == "parquet" and zarr_format != 2):
        raise ManifestError(out, "references are json, or parquet with zarr_format 2")
    options = dict(storage_options or {})
    out = str(out).rstrip("/")
    out_options = manifest_options_for(out, manifest_options, options)
    try:
        out_fs, out_path = fsspec.core.url_to_fs(out, **out_options)
    except (ValueError, ImportError, TypeError) as err:
        raise ManifestError(out, f"cannot open this URL: {err}") from err
    out_path = out_path.rstrip("/")
    out_url = out_fs.unstrip_protocol(out_path)  # absolute: Dask workers have their own working directory
    inside = _inside(out_fs, out_path, root, options)
    listing = list_dataset(root, options, derivatives=derivatives, exclude=inside, pin_versions=pin_versions)
    report = Report(listing.url, out_fs.unstrip_protocol(out_path))
    # a manifest inside its dataset names the sources relative to itself: the two move (clone, upload) together
    settings = units.Settings(listing.url, zarr_format, extensions, relative=bool(inside))
    report.settings = {**settings.to_json(), "ref_format": ref_format, "derivatives": derivatives}
    problem_folders = _unlisted_folders(listing)
    sources, problems = nifti_sources(listing, pin_versions)
    for err in listing.problems + problems:
        report.skip(err)
    empty = [s for s in sources if int(s.info["size"]) == 0]
    for source in empty:
        report.skip(InvalidNifti(source.listed_as or source.url, "empty file (zero bytes): a placeholder"))
    sources = [s for s in sources if int(s.info["size"]) > 0]
    for err in assign_names(sources):
        report.skip(err)
    relative = {s.name: listing.relative(s) for s in sources}

    previous = _previous(out_fs, out_path, out, out_options, settings.to_json())
    journal = units.read_journal(out_fs, out_path, settings)
    specs = [units.spec_of(s) for s in sources]
    records: dict[str, dict[str, Any]] = {}
    kept: dict[str, ImageEntry] = {}
    todo = []
    for source, spec in zip(sources, specs):
        old = previous.entries.get(source.url) if previous else None
        if spec.key in journal:
            records[spec.name] = journal[spec.key]
        elif old is not None and old.name == spec.name and _unchanged(old, source):
            kept[spec.name] = old
        else:
            todo.append(spec)
    batches = units.plan(todo)
    for name, rec in _run(batches, settings, out_url, out_options, options, workers, dask, listing, progress):
        records[name] = rec
    report.indexed = sum(len(b.specs) for b in batches)
    report.reused = len(kept) + sum("entry" in rec for rec in journal_used(records, journal))

    entries: dict[str, ImageEntry] = {}
    image_refs: dict[str, dict[str, Any]] = {}
    for name, rec in records.items():
        if "entry" in rec:
            entries[name] = ImageEntry.from_json(rec["entry"], out)
            image_refs[name] = rec["refs"]
        else:
            report.skip(error_class(rec["error"])(rec["source"], rec["message"]))
    entries.update(kept)
    if previous is not None and problem_folders:  # a folder that could not be listed now: keep what it held
        here = manifest_url(out, out_options)
        for entry in previous.index.images:
            if entry.name not in entries and entry.resolved(here).source.startswith(problem_folders):
                kept[entry.name] = entries[entry.name] = entry
                relative[entry.name] = (entry.bids or {}).get("path", entry.name)
    names = sorted(entries)
    report.images = len(names)
    report.removed = len({e.name for e in previous.index.images} - set(names)) if previous else 0

    report.metadata_files = {r: from_info(i) for r, i in listing.files.items() if r.endswith((".json", ".tsv"))}
    job = {"settings": settings.to_json(), "metadata_files": report.metadata_files}
    if previous is not None and previous.entries and len(kept) == len(names) and not report.removed \
            and previous.metadata_files == report.metadata_files and previous.index.ref_format == ref_format:
        # nothing changed: the listing and a comparison were the whole job
        final = [entries[name] for name in names]
        new_index = previous.index
    else:
        if kept:  # their references, as the last run wrote them
            old_refs = previous.refs()
            image_refs.update({name: old_refs[name] for name in kept})
        final, refs = _with_metadata(names, relative, entries, image_refs, listing, zarr_format, report)
        if not final and not previous:
            report.seconds = time.perf_counter() - started
            return IndexResult(report.manifest, [], report.skipped, report)
        if not final and previous.index.images:
            raise ManifestError(out, f"{listing.url} holds no image now, and the manifest here holds "
                                     f"{len(previous.index.images)}: refusing to empty it (is ROOT right? delete "
                                     "OUT to start over)")
        new_index = publish(out_fs, out_path, out, zarr_format, ref_format, final, refs,
                            previous.index.references if previous else None, job)
        _remove_unreferenced(out_fs, out_path, new_index)
        units.keep_lasting_failures(out_fs, out_path, settings, list(records.values()))
    report.bytes_referenced = sum(int(fp["size"]) for entry in final for _, fp in entry.checked_files)
    if pyramid:
        _pyramids(out, final, out_options, options, report, dask)
        new_index = read_index(out, out_options)
    report.bytes_written = _folder_bytes(out_fs, out_path)
    report.seconds = time.perf_counter() - started
    _write_report(out_fs, out_path, out, report)
    return IndexResult(report.manifest, list(new_index.images), report.skipped, report)


def _with_metadata(names: list[str], relative: dict[str, str], entries: dict[str, ImageEntry],
                   image_refs: dict[str, dict[str, Any]], listing: Listing, zarr_format: int,
                   report: Report) -> tuple[list[ImageEntry], dict[str, Any]]:
    """The entries with their BIDS path and entities, and the whole hierarchy's references with each image
    group's entities and inherited sidecars, and each (sub-)dataset's description and participants."""
    roots = {n: metadata.dataset_root(relative[n], listing) for n in names}
    chains = {n: metadata.sidecar_chain(relative[n], listing, roots[n]) for n in names}
    datasets = {""} | set(roots.values())
    dataset_files = [path for r in datasets for f in (metadata.DESCRIPTION, metadata.PARTICIPANTS)
                     if (path := f"{r}/{f}" if r else f) in listing.files]
    texts, bad = metadata.read_texts(listing, [p for chain in chains.values() for p in chain] + dataset_files)
    for err in bad:
        report.warn(err)
    refs = hierarchy_docs(names, zarr_format, metadata.dataset_attributes(texts))
    for ds in sorted(datasets - {""}):
        dataset_bids = metadata.dataset_attributes(texts, ds)
        edit_group_attributes(refs, ds, zarr_format, lambda a: {**a, "bids": dataset_bids})
    final = []
    for name in names:
        bids = {"path": relative[name], "entities": metadata.entities(relative[name]),
                **({"dataset": roots[name]} if roots[name] else {})}
        entry = replace(entries[name], bids=bids)
        refs.update(image_refs[name])
        group_bids = {**bids, "sidecars": chains[name], "metadata": metadata.merged(chains[name], texts)}
        edit_group_attributes(refs, name, zarr_format, lambda a: {**a, "bids": group_bids})
        final.append(entry)
    return final, refs


def journal_used(records: dict[str, dict[str, Any]], journal: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of this run that came from the journal (finished by an earlier, killed run)."""
    return [rec for rec in records.values() if journal.get(rec["key"]) is rec]


@dataclass
class _Previous:
    """The manifest an earlier run left at OUT, if its settings match this run's."""

    index: Index
    entries: dict[str, ImageEntry]  # by source URL
    load: Any
    metadata_files: dict[str, Any]  # fingerprints of the JSON/TSV files it was made with

    def refs(self) -> dict[str, dict[str, Any]]:
        """Its references, split by image group."""
        return _by_image(self.load(), {e.name for e in self.index.images})


def _previous(fs: fsspec.AbstractFileSystem, path: str, out: str, options: dict[str, Any],
              settings: dict[str, Any]) -> _Previous | None:
    """The earlier manifest at OUT (None if there is none).  Its entries are reused only if it was made with
    the same settings, as its index file records them (written with it, so the two never disagree).

    OUT may be missing, empty, an earlier index's manifest, or what a killed first run left (a journal and
    sidecars); anything else is someone's data, and refused.
    """
    try:
        if not fs.exists(path):
            return None
        if not fs.exists(f"{path}/{INDEX_FILE}"):
            names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
            if names - {units.JOURNAL, GZIP_INDEX_FOLDER, LEVELS_FOLDER, REPORT_FILE}:
                raise ManifestError(out, "exists and is not a virtnii manifest; refusing to write into it (choose "
                                         "an empty or new folder for -o)")
            return None
    except storage_errors() as err:
        raise ManifestError(out, f"cannot read what is there: {err}") from err
    index = read_index(out, options)
    job = index.job or {}
    if job.get("settings") != settings:
        return _Previous(index, {}, lambda: {}, {})
    here = manifest_url(out, options)
    return _Previous(index, {e.resolved(here).source: e for e in index.images}, lambda: load_refs(out, index, options),
                     job.get("metadata_files") or {})


def _unlisted_folders(listing: Listing) -> tuple[str, ...]:
    """URLs (with a trailing slash) of the folders the listing could not enter: their images are not gone."""
    return tuple(url.rstrip("/") + "/" for url in listing.unlisted)


def _unchanged(old: ImageEntry, source: Any) -> bool:
    """Whether a source still looks as listed when it was indexed (size and mtime/ETag, and its data file's), at
    the same object version if pinned — and pinned then only if pinned now."""
    files = [(old.fingerprint, source.fingerprint)]
    if source.is_pair:
        files.append((old.data_fp, source.data_fingerprint))
    return all(all(recorded.get(k) == v for k, v in current.items()) and recorded.get(VERSION) == current.get(VERSION)
               for recorded, current in files)


def _by_image(refs: dict[str, Any], names: set[str]) -> dict[str, dict[str, Any]]:
    """References split by the image group each key belongs to (intermediate groups and the root dropped)."""
    out: dict[str, dict[str, Any]] = {name: {} for name in names}
    for key, value in refs.items():
        cut = key.find("/")
        while cut != -1:
            if key[:cut] in names:
                out[key[:cut]][key] = value
                break
            cut = key.find("/", cut + 1)
    return out


def _run(batches: list[units.Batch], settings: units.Settings, out: str, out_options: dict[str, Any],
         options: dict[str, Any], workers: int | None, dask: Any, listing: Listing,
         progress: bool) -> Iterable[tuple[str, dict[str, Any]]]:
    """Run the batches (here, or on Dask) and yield ``(image name, record)`` as they finish."""
    total = sum(len(b.specs) for b in batches)
    size = sum(int(s.data_info["size"]) for b in batches for s in b.specs)
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"index {total} file(s)", disable=not progress) as bar:
        def done(batch: units.Batch, records: list[dict[str, Any]]) -> Iterable[tuple[str, dict[str, Any]]]:
            bar.update(sum(int(s.data_info["size"]) for s in batch.specs))
            return zip((s.name for s in batch.specs), records)

        if not batches:
            return
        if dask is not None:  # each worker writes its batch's sidecars and journal record itself
            for batch, records in dask_map(dask, units.run_batch, batches, out, settings=settings, out=out,
                                           out_options=out_options, storage_options=options):
                yield from done(batch, records)
            return
        count = workers or ((os.cpu_count() or 1) if getattr(listing.fs, "local_file", False) else REMOTE_WORKERS)
        with concurrent.futures.ThreadPoolExecutor(max(1, count), thread_name_prefix="virtnii-index") as pool:
            jobs = {pool.submit(units.run_batch, b, settings, out, out_options, options): b for b in batches}
            try:
                for job in concurrent.futures.as_completed(jobs):
                    yield from done(jobs[job], job.result())
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise


def _remove_unreferenced(fs: fsspec.AbstractFileSystem, path: str, index: Index) -> None:
    """Delete sidecars and level stores the new index does not name, and the journal (all is in the index now)."""
    sidecars = set()
    for entry in index.images:
        if entry.gzip_index:
            descriptor = f"{path}/{entry.gzip_index}"
            sidecars.add(descriptor)
            sidecars.add(descriptor.removesuffix(".gzidx.json") + ".gzidx.gz")
    stores = {f"{path}/{e.pyramid.store}" for e in index.images if e.pyramid and e.pyramid.is_relative}
    try:
        folder = f"{path}/{GZIP_INDEX_FOLDER}"
        stale = [f for f in (fs.find(folder) if fs.exists(folder) else []) if f not in sidecars]
        levels = f"{path}/{LEVELS_FOLDER}"
        for store in _level_stores(fs, levels) if fs.exists(levels) else []:
            if store not in stores:
                fs.rm(store, recursive=True)
        if stale:
            fs.rm(stale)
        if fs.exists(f"{path}/{units.JOURNAL}"):
            fs.rm(f"{path}/{units.JOURNAL}", recursive=True)
    except storage_errors():
        pass  # leftovers cost space, not correctness: the next run tries again


def _level_stores(fs: fsspec.AbstractFileSystem, levels: str) -> list[str]:
    """The level-store folders under ``levels/`` (named ``<image name>.<tag>``, nested like the names)."""
    from ..pyramid.build import MARKER

    stores = set()
    for file in fs.find(levels):
        parts = file[len(levels) + 1:].split("/")
        for depth in range(1, len(parts)):
            if "." in parts[depth - 1] and (parts[depth] == MARKER or parts[depth].isdigit()):
                stores.add(f"{levels}/{'/'.join(parts[:depth])}")
                break
    return sorted(stores)


def _pyramids(out: str, entries: list[ImageEntry], out_options: dict[str, Any], options: dict[str, Any],
              report: Report, dask: Any) -> None:
    """Levels for every image: label images (``_dseg``, ``_mask``) by mode, the rest by the default rule; on
    the Dask cluster too when the batches ran there."""
    from ..pyramid import build_pyramids

    labels = [e.name for e in entries if e.bids and e.bids["entities"].get("suffix") in metadata.LABEL_SUFFIXES]
    others = [e.name for e in entries if e.name not in set(labels)]
    for names, method in ((labels, "mode"), (others, None)):
        if names:
            # the sources are the ones this run was given and just listed, wherever the manifest is
            result = build_pyramids(out, names, method=method, manifest_options=out_options, allow_local_sources=True,
                                    dask=dask, **options)
            report.pyramids_built += len(result.built)
            report.pyramids_reused += len(result.reused)
            for err in result.failures:
                report.skip(err)


def _folder_bytes(fs: fsspec.AbstractFileSystem, path: str) -> int:
    """Bytes stored under ``path`` (a local walk where possible: fsspec's costs two stats per file)."""
    try:
        if is_local(fs):
            return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path)
                       for name in names)
        return sum(int(info.get("size") or 0) for info in fs.find(path, detail=True).values())
    except (*storage_errors(), OSError):
        return 0


def _write_report(fs: fsspec.AbstractFileSystem, path: str, out: str, report: Report) -> None:
    try:
        fs.pipe_file(f"{path}/{REPORT_FILE}", json.dumps(report.to_json()).encode())
    except storage_errors() as err:
        raise ManifestError(out, f"cannot write {REPORT_FILE}: {err}") from err


def _inside(out_fs: fsspec.AbstractFileSystem, out_path: str, root: str, options: dict[str, Any]) -> tuple[str, ...]:
    """OUT relative to the dataset root when it lies inside it (so it is not indexed), else nothing."""
    try:
        fs, path = fsspec.core.url_to_fs(root, **without_policy(options))
    except (ValueError, ImportError, TypeError):
        return ()
    if type(fs) is not type(out_fs):
        return ()
    if getattr(fs, "local_file", False):
        path, out_path = os.path.realpath(path), os.path.realpath(out_path)
    prefix = path.rstrip("/") + "/"
    return (out_path[len(prefix):],) if out_path.startswith(prefix) else ()

