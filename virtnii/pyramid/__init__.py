"""The pyramid builder: write the downsampled OME levels of a manifest's images and combine them into it.

:func:`build_pyramids` streams each image's virtual level 0 once (:mod:`virtnii.pyramid.build`), writes levels
1..N as real compressed zarr arrays (by default into the manifest folder, ``levels/``), and then updates the
manifest in place so that each image group is one virtual NIfTI-Zarr dataset: level 0 by reference into the
source, levels 1..N by reference to the written chunk objects (URLs relative to the manifest folder), OME
multiscales naming how each level was made.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
from tqdm.auto import tqdm

from .. import __version__, ome
from ..cluster import dask_map
from ..references import edit_group_attributes
from ..manifest.entry import LEVELS_FOLDER, ImageEntry, Pyramid, is_url as _is_url
from ..errors import ManifestError, VirtniiError, storage_errors
from ..manifest import (METADATA_KEYS, Index, load_refs, manifest_options_for, manifest_url, read_index,
                        update_manifest)
from .build import CODECS, DEFAULT_CODEC, MARKER, Settings, build_image, method_for, plan_levels, tag
from .downsample import METHODS

__all__ = ["build_pyramids", "PyramidResult", "Settings", "METHODS", "CODECS", "DEFAULT_CODEC"]


@dataclass
class PyramidResult:
    """What a pyramid run did: the updated entries, which images were built or found complete, and failures."""

    images: list[ImageEntry]
    built: list[str]
    reused: list[str]
    failures: list[VirtniiError]


def build_pyramids(manifest: str, images: Sequence[str] | None = None, *, method: str | None = None,
                   levels: int | None = None, chunks: int = 64, shards: int | None = None,
                   codec: str = DEFAULT_CODEC, out: str | None = None,
                   manifest_options: dict[str, Any] | None = None, out_options: dict[str, Any] | None = None,
                   progress: bool = False, allow_local_sources: bool = False, dask: Any = None,
                   **storage_options: Any) -> PyramidResult:
    """Build (or reuse) the pyramid levels of ``images`` (default: all) of a manifest, and add them to it.

    Parameters
    ----------
    method
        ``"mean"``, ``"gaussian"`` or ``"mode"``; default ``mode`` for label images (NIfTI intent label or
        neuronames), ``mean`` otherwise.  See :mod:`virtnii.pyramid.downsample` for the exact rules.
    levels
        Levels to write; default: until the coarsest level fits one chunk.
    chunks, shards
        Chunk edge (isotropic, clipped to the level) and, for Zarr v3 sharding, chunks per shard edge.
    codec
        One of :data:`CODECS` (default blosc-zstd, level 3, byte shuffle).
    out
        Where level stores go (any fsspec URL; ``out_options`` for it); default ``MANIFEST/levels``, referenced
        by paths relative to the manifest so that it can be moved or uploaded whole.
    storage_options, allow_local_sources
        For reading the sources, as for :func:`virtnii.open`.
    dask
        A ``distributed.Client`` or a scheduler address: the images are built as Dask tasks, in batches
        (:func:`build_batch`), with the same results; the manifest is updated here once they are all done.
        The workers must reach the manifest, the sources and the level stores at the same URLs.

    A level store that is complete and was made from the same inputs (source fingerprint, settings) is reused;
    one left by an interrupted run is deleted and rebuilt.  The manifest is updated once, at the end, atomically.
    """
    try:
        settings = Settings(method, levels, chunks, shards, codec)
    except ValueError as err:
        raise ManifestError(manifest, str(err)) from err
    manifest = manifest.rstrip("/")
    options = manifest_options_for(manifest, manifest_options, storage_options)
    index = read_index(manifest, options)
    if shards and index.zarr_format != 3:
        raise ManifestError(manifest, "sharding (--shards) needs a Zarr v3 manifest (scan with --zarr-format 3)")
    chosen = [entry for entry in _choose(manifest, index, images) if plan_levels(entry.shape, entry.axes, settings)]
    base = manifest_url(manifest, options)
    store_options = dict(out_options if out_options is not None else options) if out else options
    job = _Job(base if dask is not None else manifest, manifest_options, dict(storage_options), allow_local_sources,
               settings, index.zarr_format, _absolute_url(out, store_options) if out else None, store_options)
    outcomes: dict[str, tuple[Pyramid | VirtniiError, bool]] = {}
    total = sum(entry.nbytes for entry in chosen)
    with tqdm(total=total, unit="B", unit_scale=True, desc="pyramid", disable=not progress) as bar:
        if dask is not None:  # batches as tasks, each opening the manifest once on its worker
            for batch, results in dask_map(dask, build_batch, _batches(chosen), manifest, job=job):
                outcomes.update(zip((entry.name for entry in batch), results))
                bar.update(sum(entry.nbytes for entry in batch))
        elif chosen:
            outcomes.update(zip((entry.name for entry in chosen), build_batch(chosen, job, bar.update, progress)))
    updated: dict[str, ImageEntry] = {}
    built, reused, failures = [], [], []
    for entry in chosen:  # in the manifest's order, however the batches finished
        outcome, was_built = outcomes[entry.name]
        if isinstance(outcome, VirtniiError):
            failures.append(outcome)
            continue
        (built if was_built else reused).append(entry.name)
        updated[entry.name] = entry.with_pyramid(outcome)
    entries = [updated.get(entry.name, entry) for entry in index.images]
    if updated:
        refs = load_refs(manifest, index, options)
        for name, entry in updated.items():
            _replace_levels(refs, index.image(name), entry, entry.pyramid.url(manifest),
                            options if entry.pyramid.is_relative else store_options, index.zarr_format)
        update_manifest(manifest, index, entries, refs, options)
        _remove_unreferenced_stores(manifest, options, entries, {e.pyramid.store for e in index.images if e.pyramid})
    return PyramidResult(entries, built, reused, failures)


#: A pyramid task on Dask holds images totalling up to this many level-0 bytes, or :data:`BATCH_IMAGES` images:
#: each task opens the manifest (reads its index and references) once, which for small images costs more than
#: building them.
BATCH_BYTES = 256 * 2**20
BATCH_IMAGES = 64


@dataclass(frozen=True)
class _Job:
    """What every image of a pyramid run shares, picklable for Dask workers: the manifest and how to read it,
    the settings, and where level stores go (``out``: an absolute URL, or None for ``MANIFEST/levels``)."""

    manifest: str
    manifest_options: dict[str, Any] | None
    storage_options: dict[str, Any]
    allow_local_sources: bool
    settings: Settings
    zarr_format: int
    out: str | None
    store_options: dict[str, Any]


def build_batch(entries: Sequence[ImageEntry], job: _Job, advance: Callable[[int], Any] = lambda n: None,
                progress: bool = False) -> list[tuple[Pyramid | VirtniiError, bool]]:
    """Build (or reuse) the levels of ``entries``, one image at a time: the unit of a pyramid run, here or on a
    Dask worker.  Returns per image its :class:`Pyramid` and whether it was built, or the error that stopped
    it (a source that changed or cannot be read); a level store that cannot be written stops the batch.
    ``advance(n)`` hears of every ``n`` level-0 bytes consumed (a failed image's are counted too).
    """
    from ..reader import open as open_manifest

    manifest = job.manifest
    group = open_manifest(manifest, job.manifest_options, allow_local_sources=job.allow_local_sources,
                          **job.storage_options)
    options = manifest_options_for(manifest, job.manifest_options, job.storage_options)
    base = manifest_url(manifest, options)
    root = job.out or f"{manifest}/{LEVELS_FOLDER}"
    results: list[tuple[Pyramid | VirtniiError, bool]] = []
    with tqdm(unit="B", unit_scale=True, disable=not progress, position=1, leave=False) as image_bar:
        def consumed(n: int) -> None:
            advance(n)
            image_bar.update(n)

        for entry in entries:
            image_bar.reset(total=entry.nbytes)
            image_bar.set_description_str(entry.name[-40:])
            image = group[entry.name]
            chosen_method = method_for(image["nifti"].attrs.get("Intent", ""), job.settings)
            store_tag = tag(entry, chosen_method, job.settings, job.zarr_format)
            store_url = f"{root}/{entry.name}.{store_tag}"
            store_ref = store_url if job.out else f"{LEVELS_FOLDER}/{entry.name}.{store_tag}"
            done = 0

            def counted(n: int) -> None:
                nonlocal done
                done += n
                consumed(n)

            try:
                results.append(build_image(entry, image["0"], store_url, store_ref, store_tag, chosen_method,
                                           job.settings, job.zarr_format, job.store_options,
                                           entry.files_to_check(base, options, job.storage_options), counted))
            except VirtniiError as err:
                results.append((err, False))
                consumed(entry.nbytes - done)
            except storage_errors() as err:
                raise ManifestError(store_url, f"cannot write pyramid levels here: {err}") from err
    return results


def _batches(entries: Sequence[ImageEntry]) -> list[list[ImageEntry]]:
    """``entries`` in order, cut into Dask tasks of up to :data:`BATCH_BYTES` or :data:`BATCH_IMAGES`."""
    batches: list[list[ImageEntry]] = []
    size = 0
    for entry in entries:
        if not batches or len(batches[-1]) >= BATCH_IMAGES or size + entry.nbytes > BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(entry)
        size += entry.nbytes
    return batches


def _absolute_url(url: str, options: dict[str, Any]) -> str:
    """``url`` with its protocol and an absolute path (``file:///…`` for a local folder): references to it must
    not depend on the reader's working directory."""
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs.unstrip_protocol(path.rstrip("/"))


def _choose(manifest: str, index: Index, names: Sequence[str] | None) -> list[ImageEntry]:
    if not names:
        return list(index.images)
    known = {entry.name: entry for entry in index.images}
    missing = [name for name in names if name not in known]
    if missing:
        raise ManifestError(manifest, f"no image named {', '.join(missing)} (see `virtnii info {manifest}`)")
    return [known[name] for name in dict.fromkeys(names)]


def _replace_levels(refs: dict[str, Any], old: ImageEntry, new: ImageEntry, store_url: str,
                    store_options: dict[str, Any], zarr_format: int) -> None:
    """Swap an image's level references (and its multiscales) for those of ``new.pyramid``."""
    assert new.pyramid is not None
    name = new.name
    for level in old.levels:
        prefix = f"{name}/{level.path}/"
        for key in [k for k in refs if k.startswith(prefix)]:
            del refs[key]
    factors = [[1] * len(new.shape)] + [list(level.factors) for level in new.levels]
    edit_group_attributes(refs, name, zarr_format,
                          lambda attributes: ome.with_levels(attributes, factors, new.pyramid.method, __version__))
    fs, path = fsspec.core.url_to_fs(store_url, **store_options)
    for level in new.levels:
        level_path = f"{path}/{level.path}"
        for file in sorted(fs.find(level_path)):
            relative = file[len(level_path) + 1:]
            key = f"{name}/{level.path}/{relative}"
            if relative.rsplit("/", 1)[-1] in METADATA_KEYS:
                refs[key] = fs.cat_file(file).decode()
            else:
                refs[key] = [f"{new.pyramid.store}/{level.path}/{relative}"]


def _remove_unreferenced_stores(manifest: str, options: dict[str, Any], entries: list[ImageEntry],
                                before: set[str]) -> None:
    """Delete level stores the manifest referenced before this run and no longer does (inside it only)."""
    now = {entry.pyramid.store for entry in entries if entry.pyramid}
    fs, path = fsspec.core.url_to_fs(manifest, **options)
    for store in sorted(before - now):
        if not _is_url(store):  # inside the manifest (index entries are checked to stay in levels/)
            target = f"{path.rstrip('/')}/{store}"
            if fs.exists(f"{target}/{MARKER}"):
                fs.rm(target, recursive=True)
