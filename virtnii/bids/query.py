"""Questions about an indexed dataset answered from its index file alone: no source, no reference is read.

``virtnii index`` records each image's BIDS path and entities in ``virtnii.json`` beside its shape, dtype, voxel
size and source, so a table of a 10,000-image manifest is one small JSON read.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import ManifestError
from ..manifest.index import INDEX_FILE, manifest_options_for, read_index_document

#: Columns that come before the entities, and after them (bids2table's names for the BIDS part).
_FIRST = ("name",)
_LAST = ("datatype", "suffix", "ext", "path", "dataset", "source", "shape", "axes", "dtype", "zooms", "nbytes",
         "gzip", "levels")


def rows(manifest: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One dict per image: its group name, BIDS entities, and the virtual array's facts."""
    index = read_index_document(manifest, manifest_options_for(manifest, None, storage_options or {}))
    out = []
    try:
        for doc in index["images"]:
            bids = doc.get("bids") or {}
            dtype = doc["dtype"]
            out.append({"name": doc["name"], **bids.get("entities", {}), "path": bids.get("path"),
                        "dataset": bids.get("dataset", ""), "source": doc["source"], "shape": doc["shape"],
                        "axes": doc["axes"], "dtype": dtype if isinstance(dtype, str) else _record_dtype(dtype),
                        "zooms": doc.get("zooms") or [], "nbytes": doc["nbytes"],
                        "gzip": doc.get("gzip_index") is not None,
                        "levels": len((doc.get("pyramid") or {}).get("levels", []))})
    except (KeyError, TypeError, AttributeError) as err:
        raise ManifestError(manifest, f"{INDEX_FILE} has a damaged entry ({type(err).__name__}: {err})") from err
    return out


def _record_dtype(descr: list[list[str]]) -> str:
    return str(np.dtype([tuple(field) for field in descr]))


def table(manifest: str | Sequence[str], storage_options: dict[str, Any] | None = None) -> Any:
    """The images of a manifest as a pandas DataFrame, one row per image: ``name``, the BIDS entity columns
    (``sub``, ``ses``, ``task``, ``run``, …, ``datatype``, ``suffix``, ``ext`` as bids2table names them), then
    ``path``, ``dataset``, ``source``, ``shape``, ``axes``, ``dtype``, ``zooms``, ``nbytes``, ``gzip``, ``levels``.

    Given several manifests (one per dataset of an archive), the rows of all of them, with a ``manifest``
    column first: the archive's catalogue (``table([...]).to_parquet("catalogue.parquet")``).
    """
    import pandas as pd

    many = not isinstance(manifest, str)
    found = [{"manifest": m, **row} for m in manifest for row in rows(m, storage_options)] if many else \
        rows(manifest, storage_options)
    first = ("manifest", *_FIRST) if many else _FIRST
    entities = sorted({k for row in found for k in row} - set(first) - set(_LAST))
    return pd.DataFrame(found, columns=[*first, *entities, *_LAST])


def find(manifest: str, storage_options: dict[str, Any] | None = None, **entities: Any) -> list[str]:
    """Names of the images whose entities (or ``datatype``/``suffix``/``ext``/``dataset``) equal every one given;
    a list or tuple value matches any of its items.  ``find(m, sub="01", suffix="T1w")``."""
    return [row["name"] for row in matching(manifest, storage_options, **entities)]


def matching(manifest: str, storage_options: dict[str, Any] | None = None, **entities: Any) -> list[dict[str, Any]]:
    """The :func:`rows` of the images :func:`find` names."""
    wanted = {k: {str(x) for x in v} if isinstance(v, (list, tuple, set)) else {str(v)} for k, v in entities.items()}
    return [row for row in rows(manifest, storage_options)
            if all(str(row.get(k)) in values for k, values in wanted.items())]
