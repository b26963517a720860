"""Open a manifest as a read-only ``zarr.Group``, and turn an image group back into a nibabel image.

Nothing is copied: ``open`` builds fsspec's ReferenceFileSystem over the manifest's references, with one
filesystem per source protocol (sources read through :class:`~virtnii.verified.VerifiedFileSystem`, ``.nii.gz``
data through the ``gzidx`` protocol), and zarr reads chunks straight from the sources.
"""

from __future__ import annotations

import bisect
import io
import ipaddress
import urllib.parse
from typing import Any

import fsspec
import nibabel as nib
import numpy as np
import zarr
from nibabel.arrayproxy import ArrayProxy
from fsspec.implementations.reference import LazyReferenceMapper, ReferenceFileSystem, ReferenceNotReachable
from nibabel.fileslice import canonical_slicers
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError, HeaderTypeError
from zarr.storage import FsspecStore

from .errors import InvalidNifti, ManifestError, VirtniiError, is_missing, redact, storage_errors
from .header import MAGICS, header_size
from . import retry
from .layout import ZARR_TO_FILE
from .manifest import Index, manifest_options_for, read_index
from .verified import VerifiedFileSystem

#: nibabel's header and image classes by 4-byte magic, as :data:`virtnii.header.MAGICS` names them.
_IMAGE_CLASSES = {
    MAGICS[348, False]: (nib.Nifti1Header, nib.Nifti1Image), MAGICS[348, True]: (nib.nifti1.Nifti1PairHeader, nib.Nifti1Pair),
    MAGICS[540, False]: (nib.Nifti2Header, nib.Nifti2Image), MAGICS[540, True]: (nib.nifti2.Nifti2PairHeader, nib.Nifti2Pair),
}
#: What nibabel raises for a header it will not load (ValueError: e.g. a quaternion that is no rotation).
_NIBABEL_REFUSALS = (HeaderDataError, HeaderTypeError, ImageFileError, ValueError)


def reference_options(manifest: str, manifest_options: dict[str, Any] | None = None, *,
                      allow_local_sources: bool = False, **storage_options: Any) -> dict[str, Any]:
    """``storage_options`` for ``zarr.open_group("reference://", mode="r", storage_options=…)`` on a manifest.

    ``storage_options`` are for the sources (e.g. ``anon=True``); ``manifest_options`` for the manifest folder
    (default: the sources' options when the manifest is remote — typically the same bucket or store — and none
    when it is local; pass ``manifest_options`` when a remote manifest needs other options than its sources).
    The default cannot depend on the sources' protocols: they are only known after reading the index file, which
    already needs the manifest's options.

    A manifest fetched from elsewhere (any remote URL) may not point its reader at local files or at
    loopback, private or link-local network addresses — data that is the reader's, not the manifest's — unless
    ``allow_local_sources`` (see docs/manifest.md, "What a manifest can make its reader read").
    """
    manifest = manifest.rstrip("/")
    manifest_options = manifest_options_for(manifest, manifest_options, storage_options)
    index = read_index(manifest, manifest_options)
    if not allow_local_sources and _protocol(manifest) not in ("file", "local"):
        _refuse_local_sources(manifest, index)
    expected: dict[str, dict[str, dict[str, Any]]] = {}  # protocol -> {data url: fingerprint}
    inside: dict[str, dict[str, Any]] = {}  # data files named relative to the manifest -> fingerprint
    trusted: dict[str, list[str]] = {}  # protocol -> level stores given by URL
    relative: list[str] = []  # level stores inside the manifest folder
    for image in index.images:
        if image.pyramid:
            if image.pyramid.is_relative:
                relative.append(image.pyramid.store)
            else:
                trusted.setdefault(_protocol(image.pyramid.store), []).append(image.pyramid.store)
        if image.gzip_index:
            continue  # read through gzidx://, which checks its source itself
        if image.has_relative_sources:
            inside[image.data_url] = image.data_fp
        else:
            expected.setdefault(_protocol(image.data_url), {})[image.data_url] = image.data_fp
    fss: dict[str | None, Any] = {
        protocol: VerifiedFileSystem(retry.filesystem(protocol, storage_options), expected.get(protocol, {}),
                                     trusted.get(protocol, ()))
        for protocol in {**expected, **trusted}}
    # references without a protocol are files of the manifest folder (pyramid levels) or sources on its
    # filesystem named relative to it: only those it lists
    # its options, with the sources' retry settings (sources named relative to the folder are read through it)
    manifest_fs, manifest_path = retry.open_fs(manifest, {**manifest_options,
                                                          retry.OPTION: retry.policy_of(storage_options)})
    fss[None] = VerifiedFileSystem(manifest_fs, inside, relative, root=manifest_path)
    # always, even with no .nii.gz listed: references may outlive an interrupted replacement of the index file
    fss["gzidx"] = fsspec.filesystem("gzidx", root=manifest, root_options=manifest_options,
                                     target_options=storage_options, asynchronous=True, skip_instance_cache=True)
    refs = f"{manifest}/{index.references}"
    return {"fo": refs, "fs": fss, "target_options": manifest_options, "asynchronous": True}


def _protocol(url: str) -> str:
    return fsspec.core.split_protocol(url)[0] or "file"


def _refuse_local_sources(manifest: str, index: Index) -> None:
    """A remote manifest naming local files, or hosts of the reader's own network, is refused (sources named
    relative to it are on its own filesystem: never the reader's)."""
    for image in index.images:
        urls = [] if image.has_relative_sources else [url for url, _ in image.checked_files]
        if image.pyramid and not image.pyramid.is_relative:
            urls.append(image.pyramid.store)
        for url in urls:
            why = _local_target(url)
            if why:
                raise ManifestError(manifest, f"image {image.name!r} points at {why} ({redact(url)}), which a "
                                              "manifest read from elsewhere may not do; open it with "
                                              "allow_local_sources=True (CLI: --allow-local-sources) if you trust it")


def _local_target(url: str) -> str | None:
    """What makes ``url`` the reader's own data (a local file, a loopback or private address), or None."""
    protocol = _protocol(url)
    if protocol in ("file", "local"):
        return "a local file"
    host = urllib.parse.urlsplit(url).hostname if protocol in ("http", "https") else None
    if host is None:
        return None
    if host == "localhost" or host.endswith(".localhost"):
        return "this machine"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None  # a name: where it resolves is the network's business, not the manifest's
    if address.is_loopback or address.is_private or address.is_link_local or address.is_unspecified:
        return "an address of the reader's own network"
    return None


def open(manifest: str, manifest_options: dict[str, Any] | None = None, *, allow_local_sources: bool = False,
         **storage_options: Any) -> zarr.Group:
    """Open a manifest folder (local path or fsspec URL) as a read-only zarr group, one subgroup per image.

    Every source is checked against the size and ETag/mtime recorded at scan time before it is read (see
    :class:`virtnii.fingerprint.Checker`); a changed source raises :class:`~virtnii.errors.StaleSource`
    instead of returning wrong voxels.
    """
    references = reference_filesystem(manifest, manifest_options, allow_local_sources=allow_local_sources,
                                      **storage_options)
    return zarr.open_group(store=FsspecStore(references, read_only=True, path=""), mode="r")


def reference_filesystem(manifest: str, manifest_options: dict[str, Any] | None = None, *,
                         allow_local_sources: bool = False, **storage_options: Any) -> ReferenceFileSystem:
    """The asynchronous ReferenceFileSystem :func:`open` reads a manifest through (arguments as for
    :func:`open`): its keys are the manifest's zarr keys, each read from its source with every check of
    :func:`reference_options`, and a source's own error raised as itself (e.g. ``StaleSource``).  For code
    that serves or copies keys rather than arrays (``virtnii serve``).
    """
    options = reference_options(manifest, manifest_options, allow_local_sources=allow_local_sources,
                                **storage_options)
    try:
        return _ReferenceFileSystem(**options)
    except (*storage_errors(), ValueError) as err:  # ValueError: not JSON / not Parquet
        if is_missing(err):
            raise ManifestError(manifest, f"references {options['fo']} are missing; re-run `virtnii scan`") from err
        raise ManifestError(manifest, f"cannot read references {options['fo']}: {err.__cause__ or err}") from err


class _ReferenceFileSystem(ReferenceFileSystem):
    """fsspec's ReferenceFileSystem, answering the ``/group`` listings zarr asks for quickly, and raising our
    errors.

    zarr's FsspecStore with an empty root lists ``"/" + prefix``, which ReferenceFileSystem (keys have no
    leading slash) answers with nothing, so subgroups looked empty when walking a manifest.  fsspec answers
    the first listing by building a folder tree of every key (0.4-0.7 s for the 56,000 keys of 10,000
    images); listings here bisect the sorted keys instead, so one costs its own entries, not the manifest's.
    And a :class:`~virtnii.errors.VirtniiError` from a source (e.g. ``StaleSource``) surfaces as itself rather
    than behind fsspec's generic ``ReferenceNotReachable``.
    """

    _sorted: list[str] | None = None

    def _keys(self) -> list[str]:
        """Every key, sorted (once: the references of an opened manifest are not written to)."""
        if self._sorted is None or len(self._sorted) != len(self.references):
            self._sorted = sorted(self.references)
        return self._sorted

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        if isinstance(self.references, LazyReferenceMapper):  # Parquet: the mapper lists itself
            return super().ls(path, detail=detail, **kwargs)
        path = self._strip_protocol(path)
        if path in self.references:  # a file lists as itself, as in fsspec
            entries = [self._file_entry(path)]
            return entries if detail else [path]
        keys, prefix = self._keys(), f"{path}/" if path else ""
        entries, i = [], bisect.bisect_left(keys, prefix)
        while i < len(keys) and keys[i].startswith(prefix):
            slash = keys[i].find("/", len(prefix))
            if slash < 0:
                entries.append(self._file_entry(keys[i]))
                i += 1
            else:  # a folder: its keys are the run up to the next name past "<folder>/" ("0" follows "/")
                entries.append({"name": keys[i][:slash], "type": "directory", "size": 0})
                i = bisect.bisect_left(keys, keys[i][:slash] + "0", i)
        if not entries and path:
            raise FileNotFoundError(path)
        return entries if detail else [entry["name"] for entry in entries]

    def isdir(self, path: str) -> bool:
        if isinstance(self.references, LazyReferenceMapper):
            return super().isdir(path)
        keys, prefix = self._keys(), f"{self._strip_protocol(path)}/"
        i = bisect.bisect_left(keys, prefix)
        return i < len(keys) and keys[i].startswith(prefix)

    def _file_entry(self, key: str) -> dict[str, Any]:
        """fsspec's listing entry of a key: inlined bytes have their length, ``[url]`` none, ranges theirs."""
        part = self.references[key]
        size = len(part) if isinstance(part, (bytes, str)) else None if len(part) == 1 else part[2]
        return {"name": key, "type": "file", "size": size}

    async def _cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        try:
            return await super()._cat_file(path, start=start, end=end, **kwargs)
        except ReferenceNotReachable as err:
            cause = err.__cause__
            if isinstance(cause, KeyError):  # no filesystem for the reference's protocol
                cause = ManifestError(path, f"is referenced through {cause} storage, which the manifest's index "
                                            "file does not list (was replacing the manifest interrupted?); "
                                            "re-run `virtnii scan`")
            elif not isinstance(cause, VirtniiError):
                raise
        raise cause  # outside the handler, so the two errors do not become each other's context (a cycle)

    def _cat_common(self, path: str, start: int | None = None, end: int | None = None) -> tuple[Any, Any, Any]:
        # A Parquet record holds a row for every chunk slot of its array; the rows of chunks never written (all
        # fill value in a pyramid level) come back from pandas with a NaN path: absent, like a missing key.
        part_or_url, start, end = super()._cat_common(path, start, end)
        if not isinstance(part_or_url, (str, bytes)):
            raise FileNotFoundError(path)
        return part_or_url, start, end

    async def _ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        if not path.startswith("/"):
            return await super()._ls(path, detail=detail, **kwargs)
        entries = await super()._ls(path.lstrip("/"), detail=detail, **kwargs)
        if detail:
            return [{**entry, "name": "/" + entry["name"]} for entry in entries]
        return ["/" + entry for entry in entries]


class ZarrArrayProxy(ArrayProxy):
    """nibabel's ArrayProxy with voxels from a NIfTI-Zarr array instead of a file.

    Subclassing keeps nibabel's own scaling (``get_scaled``, slope/inter casting rules) and slicing semantics;
    only the raw read is replaced.
    """

    def __init__(self, array: zarr.Array, header: nib.Nifti1Header) -> None:
        super().__init__(array.store_path.path or "<zarr>", header, mmap=False)
        self._array = array

    def _get_unscaled(self, slicer: Any) -> np.ndarray:
        nd = len(self._shape)
        canonical = canonical_slicers(slicer, self._shape, False)
        if any(s is None for s in canonical) or len(canonical) != nd:
            return np.asarray(self._get_unscaled(()))[slicer]
        reversed_axes = [isinstance(s, slice) and s.step is not None and s.step < 0 for s in canonical]
        canonical = tuple(_ascending(s, n) if rev else s for s, n, rev in zip(canonical, self._shape, reversed_axes))
        file_axes = ZARR_TO_FILE[self._array.ndim]
        zarr_index = tuple(canonical[a] if a < nd else 0 for a in file_axes)
        block = np.asarray(self._array[zarr_index])
        kept = [a for a in file_axes if a < nd and not isinstance(canonical[a], (int, np.integer))]
        block = block.transpose(np.argsort(kept))
        block = block[tuple(slice(None, None, -1) if reversed_axes[a] else slice(None) for a in sorted(kept))]
        for axis in range(5, nd):  # singleton axes past the fifth (e.g. 6-D CIFTI-like shapes)
            if not isinstance(canonical[axis], (int, np.integer)):
                block = np.expand_dims(block, -1)[..., canonical[axis]]
        return block.view(self._dtype) if self._dtype.fields else block


def _ascending(index: slice, length: int) -> slice:
    """The elements of a negative-step slice in increasing order (zarr reads only steps >= 1; flipped after)."""
    picked = range(*index.indices(length))
    return slice(picked[-1], picked[0] + 1, -index.step) if picked else slice(0, 0)


def header_classes(source: str, raw: bytes) -> tuple[type[nib.Nifti1Header], type[nib.Nifti1Image]]:
    """nibabel's header and image classes for the raw header a ``nifti`` array holds, by its size and magic."""
    try:
        size, _ = header_size(source, raw)
    except InvalidNifti as err:
        raise InvalidNifti(source, f"the nifti array holds no NIfTI header ({err.problem})") from err
    magic = raw[344:348] if size == 348 else raw[4:8]
    if magic not in _IMAGE_CLASSES:
        raise InvalidNifti(source, f"the nifti array holds no NIfTI header (magic {magic!r})")
    return _IMAGE_CLASSES[magic]


def to_nibabel(group: zarr.Group) -> nib.Nifti1Image:
    """A nibabel image over a NIfTI-Zarr image group, reading voxels lazily through zarr.

    The header (so the affine and scl_slope/inter) is the group's binary ``nifti`` array, read by nibabel as
    ``nib.load`` reads a file's (same checks and fixes, affine from the header); ``img.dataobj`` is a proxy:
    ``np.asarray(img.dataobj)`` is scaled like nibabel's, ``img.dataobj.get_unscaled()`` raw.  A header nibabel
    refuses is an :class:`~virtnii.errors.InvalidNifti` (a scan refuses those; a manifest written otherwise may
    hold one).
    """
    source = str(group.store_path)
    if "nifti" not in group or "0" not in group:
        raise ManifestError(source, "not a NIfTI-Zarr image group (needs arrays 'nifti' and '0')")
    raw = np.asarray(group["nifti"][:]).tobytes()
    header_class, image_class = header_classes(source, raw)
    try:
        header = header_class.from_fileobj(io.BytesIO(raw), check=True)
        # as nibabel's own from_file_map: no affine given (one given is written back into the header's qform,
        # which fails for affines a header can hold, e.g. with NaN), then the header's best affine set
        image = image_class(ZarrArrayProxy(group["0"], header.copy()), None, header)
        image._affine = header.get_best_affine()
    except _NIBABEL_REFUSALS as err:
        raise InvalidNifti(source, f"nibabel refuses the header: {err}") from err
    return image
