"""A manifest's references, read back as one kerchunk v1 mapping whatever their format (JSON or Parquet).

Rewriting references (adding pyramid levels, combining manifests) and checking them (``verify``) work on that one
shape: JSON text for metadata documents, ``base64:`` for inlined bytes, ``[url, offset, length]`` lists.
"""

from __future__ import annotations

import base64
import itertools
import json
from typing import Any

import fsspec

from ..errors import ManifestError, is_missing, storage_errors
from .index import Index

#: Store keys of zarr metadata documents (the rest of a reference set is chunks and inlined bytes).
METADATA_KEYS = ("zarr.json", ".zarray", ".zattrs", ".zgroup")


def load_refs(manifest: str, index: Index, options: dict[str, Any]) -> dict[str, Any]:
    """Every reference of a manifest as one kerchunk v1 ``refs`` mapping (JSON text, ``base64:`` or lists).

    Parquet references are read through fsspec's lazy mapper and brought to the JSON form, so code that
    rewrites references (pyramid levels, combining) handles one shape.
    """
    fs, path = fsspec.core.url_to_fs(manifest, **options)
    target = f"{path.rstrip('/')}/{index.references}"
    try:
        if index.ref_format == "json":
            refs = json.loads(fs.cat_file(target))["refs"]
        else:
            from fsspec.implementations.reference import LazyReferenceMapper

            mapper = LazyReferenceMapper(fs.unstrip_protocol(target), fs=fs)
            refs = {key: _json_value(key, mapper[key]) for key in _parquet_keys(mapper)}
    except (*storage_errors(), ValueError, KeyError, TypeError) as err:
        if isinstance(err, FileNotFoundError) and is_missing(err):
            raise ManifestError(f"{manifest}/{index.references}", "the references file is missing; re-run "
                                                                   "`virtnii scan`") from err
        raise ManifestError(f"{manifest}/{index.references}", f"cannot read the references ({err}); re-run "
                                                               "`virtnii scan`") from err
    if not isinstance(refs, dict):
        raise ManifestError(f"{manifest}/{index.references}", "is not kerchunk references (no 'refs' mapping); "
                                                               "re-run `virtnii scan`")
    return refs


def _parquet_keys(mapper: Any) -> list[str]:
    """Every key of a Parquet reference set: its metadata documents, and each array's referenced chunks.

    (The mapper's own iteration takes every folder for an array, and fails on nested groups.)
    """
    metadata = [key for key in mapper.zmetadata]
    keys = list(metadata)
    for key in metadata:
        if key.endswith("/.zarray"):
            array = key[: -len("/.zarray")]
            doc = json.loads(mapper[key])
            grid = [-(-n // c) for n, c in zip(doc["shape"], doc["chunks"])]
            for index in itertools.product(*map(range, grid)):
                chunk = f"{array}/{'.'.join(map(str, index)) or '0'}"
                if _is_reference(mapper.get(chunk)):
                    keys.append(chunk)
    return keys


def _is_reference(value: Any) -> bool:
    """Whether a Parquet mapper's value is a reference: rows of chunks never written hold a NaN path."""
    return isinstance(value, (bytes, bytearray, str)) or (isinstance(value, (list, tuple)) and isinstance(value[0], str))


def _json_value(key: str, value: Any) -> Any:
    """A Parquet reference value as kerchunk JSON has it: text documents, ``base64:`` bytes, plain-int lists."""
    if isinstance(value, (bytes, bytearray)):
        if key.rsplit("/", 1)[-1] in METADATA_KEYS:
            return bytes(value).decode()
        return "base64:" + base64.b64encode(bytes(value)).decode()
    if isinstance(value, (list, tuple)):
        return [value[0], *map(int, value[1:])]
    return value
