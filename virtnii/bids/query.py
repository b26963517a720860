"""Questions about an indexed dataset answered from its index file alone: no source, no reference is read.

``virtnii index`` records each image's BIDS path and entities in ``virtnii.json`` beside its shape, dtype, voxel
size and source, so a table of a 10,000-image manifest is one small JSON read.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..manifest import read_index
from ..manifest.index import manifest_options_for

#: Columns that come before the entities, and after them (bids2table's names for the BIDS part).
_FIRST = ("name",)
_LAST = ("datatype", "suffix", "ext", "path", "dataset", "source", "shape", "axes", "dtype", "zooms", "nbytes",
         "gzip", "levels")


def rows(manifest: str, storage_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One dict per image: its group name, BIDS entities, and the virtual array's facts."""
    index = read_index(manifest, manifest_options_for(manifest, None, storage_options or {}))
    out = []
    for entry in index.images:
        bids = entry.bids or {}
        row: dict[str, Any] = {"name": entry.name, **bids.get("entities", {}), "path": bids.get("path"),
                               "dataset": bids.get("dataset", ""), "source": entry.source, "shape": list(entry.shape),
                               "axes": entry.axes,
                               "dtype": entry.dtype if isinstance(entry.dtype, str) else str(entry.numpy_dtype), "zooms": list(entry.zooms or ()),
                               "nbytes": entry.nbytes, "gzip": entry.gzip_index is not None,
                               "levels": len(entry.levels)}
        out.append(row)
    return out


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
    wanted = {k: {str(x) for x in v} if isinstance(v, (list, tuple, set)) else {str(v)} for k, v in entities.items()}
    return [row["name"] for row in rows(manifest, storage_options)
            if all(str(row.get(k)) in values for k, values in wanted.items())]
