"""BIDS metadata of a listed dataset: each image's entities and its sidecar JSON, and the dataset's own files.

Entities come from bids2table's ``parse_bids_entities`` (the BIDS filename rules, ``ext`` for the extension as
in bids2table's tables).  Sidecars follow the inheritance principle as bids2table's ``load_bids_metadata``
applies it: every ``*_<suffix>.json`` in the image's folder or a parent folder, up to the dataset root, whose
entities are a subset of the image's (datatype aside) applies, the root's first and the nearest last.
``load_bids_metadata`` finds them by globbing each folder (a request per folder on object stores, through
cloudpathlib's own S3 client rather than fsspec); here the same rule runs over the one listing, and the
sidecars are fetched in one concurrent batch.  ``tests/test_bids.py`` holds the two equal.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import posixpath
from typing import Any, Iterable

from bids2table import parse_bids_entities

from ..errors import VirtniiError, from_os_error, storage_errors
from ..sources import is_local
from .listing import DERIVATIVES, Listing

DESCRIPTION = "dataset_description.json"
PARTICIPANTS = "participants.tsv"
#: Suffixes of label images (integer labels, where a mean would invent labels): the pyramid takes the mode.
#: ``probseg`` holds probabilities and is averaged like any continuous image.
LABEL_SUFFIXES = ("dseg", "mask")


def entities(relative: str) -> dict[str, str]:
    """The BIDS entities of a file at ``relative`` (to its dataset root), with datatype, suffix and ext."""
    return dict(_entities(relative))


@functools.lru_cache(maxsize=2**16)
def _entities(relative: str) -> tuple[tuple[str, str], ...]:
    # a dataset's sidecars are matched against every image below them: parse each name once
    return tuple((k, str(v)) for k, v in parse_bids_entities(relative).items())


def dataset_root(relative: str, listing: Listing) -> str:
    """The (sub-)dataset an image belongs to: ``""`` for the root, or a derivative such as
    ``derivatives/fmriprep`` (the nearest folder above it holding a dataset_description.json)."""
    folder = posixpath.dirname(relative)
    while folder:
        if f"{folder}/{DESCRIPTION}" in listing.files and folder.split("/")[0] == DERIVATIVES:
            return folder
        folder = posixpath.dirname(folder)
    return ""


def sidecar_chain(relative: str, listing: Listing, root: str) -> list[str]:
    """The sidecars that apply to the image at ``relative``, root first (the order they are merged in)."""
    query = dict(entities(relative), ext=".json")
    suffix = query.get("suffix")
    if not suffix:
        return []
    chain: list[list[str]] = []
    folder = posixpath.dirname(relative)
    while True:
        here = [name for name in listing.json_by_folder.get(folder, ()) if name.endswith(f"{suffix}.json")
                and _inherits(query, entities(f"{folder}/{name}" if folder else name))]
        # fewest entities first: a more specific sidecar at the same level wins
        chain.append([f"{folder}/{n}" if folder else n for n in sorted(here, key=lambda n: (n.count("_"), n))])
        if folder == root or not folder:
            break
        folder = posixpath.dirname(folder)
    return [path for level in reversed(chain) for path in level]


def _inherits(query: dict[str, str], found: dict[str, str]) -> bool:
    found = {k: v for k, v in found.items() if k != "datatype"}
    return set(found) <= set(query) and all(query[k] == v for k, v in found.items())


def read_texts(listing: Listing, relatives: Iterable[str]) -> tuple[dict[str, Any], list[VirtniiError]]:
    """The JSON (or TSV text) of small dataset files, all at once: local reads, or one concurrent batch of
    GETs.  Files that cannot be read or parsed are reported and left out (a bad sidecar never stops a run)."""
    wanted = sorted(set(relatives))
    if not wanted:
        return {}, []
    paths = [listing.path(r) for r in wanted]
    if is_local(listing.fs):
        raw: list[Any] = []
        for path in paths:
            try:
                with open(path, "rb") as f:
                    raw.append(f.read())
            except OSError as err:
                raw.append(err)
    else:
        fetched = listing.fs.cat(paths, on_error="return")
        raw = [fetched.get(p, FileNotFoundError(p)) for p in paths]
    texts: dict[str, Any] = {}
    problems: list[VirtniiError] = []
    for relative, data in zip(wanted, raw):
        url = f"{listing.url}/{relative}"
        if isinstance(data, Exception):
            problems.append(from_os_error(url, data, "read") if isinstance(data, storage_errors()) else
                            VirtniiError(url, f"cannot read: {data}"))
            continue
        try:
            texts[relative] = data.decode("utf-8-sig") if relative.endswith(".tsv") else json.loads(data)
        except (UnicodeDecodeError, ValueError) as err:
            problems.append(VirtniiError(url, f"is not valid {'UTF-8 text' if relative.endswith('.tsv') else 'JSON'}"
                                              f" ({err}); left out of the metadata"))
    return texts, problems


def merged(chain: list[str], texts: dict[str, Any]) -> dict[str, Any]:
    """The sidecars of ``chain`` merged in order (later keys win), skipping any that is not a JSON object."""
    metadata: dict[str, Any] = {}
    for path in chain:
        doc = texts.get(path)
        if isinstance(doc, dict):
            metadata.update(doc)
    return metadata


def participants(text: str) -> list[dict[str, str]]:
    """The rows of a participants.tsv (tab-separated, header row), as dicts of strings ("n/a" kept)."""
    return [dict(row) for row in csv.DictReader(io.StringIO(text), delimiter="\t")]


def dataset_attributes(texts: dict[str, Any], root: str = "") -> dict[str, Any]:
    """The attributes of a (sub-)dataset's group: its dataset_description.json and participants.tsv rows."""
    prefix = f"{root}/" if root else ""
    attributes: dict[str, Any] = {}
    if isinstance(texts.get(prefix + DESCRIPTION), dict):
        attributes["dataset_description"] = texts[prefix + DESCRIPTION]
    if isinstance(texts.get(prefix + PARTICIPANTS), str):
        attributes["participants"] = participants(texts[prefix + PARTICIPANTS])
    return attributes
