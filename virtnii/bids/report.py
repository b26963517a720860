"""The summary every index run ends with: what was indexed, what was skipped and why, bytes, time.

It is printed and written next to the manifest as ``index-report.json``.  Skipped files get a short reason code
that BIDS archives make common (bids-standard/bids-examples ships zero-byte and header-only NIfTI files; DataLad
datasets hold annex links not fetched yet), and the full message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import (InvalidGzip, InvalidNifti, ManifestError, SourceAccessError, SourceNotFound, UnsupportedNifti,
                      VirtniiError)

REPORT_FILE = "index-report.json"

#: Reason codes, and what each means for the user.
REASONS = {
    "zero-byte": "an empty placeholder file (as in bids-examples): nothing to index",
    "header-only": "a header without its voxel data (a placeholder, or a truncated copy)",
    "not-nifti": "not a NIfTI file (an HTML error page or another format saved under a NIfTI name?)",
    "broken-symlink": "a symbolic link to nothing (a DataLad/git-annex file not fetched: `datalad get` it)",
    "permission": "the file cannot be read with these permissions or credentials",
    "unsupported": "a NIfTI variant virtnii cannot reference in place",
    "missing-data": "a .hdr whose .img is not beside it",
    "unreadable": "could not be read (storage or network error)",
    "bad-metadata": "a sidecar or dataset file that is not valid JSON/TSV (the image is still indexed)",
}


def reason(err: VirtniiError) -> str:
    """The reason code of a skipped source's error."""
    text = err.problem
    if isinstance(err, SourceNotFound):
        if "symbolic link" in text:
            return "broken-symlink"
        return "missing-data" if "data file" in text else "unreadable"
    if isinstance(err, SourceAccessError):
        return "permission" if "permission denied" in text else "unreadable"
    if isinstance(err, UnsupportedNifti):
        return "unsupported"
    if isinstance(err, (InvalidNifti, InvalidGzip)):
        if text.startswith("empty file") or text == "empty file":
            return "zero-byte"
        if text.startswith("data truncated"):
            return "header-only"
        return "not-nifti"
    if isinstance(err, ManifestError):
        return "bad-name"
    return "unreadable"


@dataclass
class Report:
    """Counts and lists of one run (JSON form: :meth:`to_json`)."""

    root: str
    manifest: str
    images: int = 0
    indexed: int = 0  # read this run
    reused: int = 0  # unchanged since the last run (or finished by a killed one): taken as they were
    removed: int = 0  # in the last manifest, gone from the dataset
    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)
    bytes_referenced: int = 0
    bytes_written: int = 0
    pyramids_built: int = 0
    pyramids_reused: int = 0
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    metadata_files: dict[str, Any] = field(default_factory=dict)  # JSON/TSV fingerprints: was metadata changed?

    def skip(self, err: VirtniiError) -> None:
        code = reason(err)
        self.skipped.append({"source": err.source, "reason": code, "message": err.problem})

    def warn(self, err: VirtniiError) -> None:
        self.warnings.append({"source": err.source, "reason": "bad-metadata", "message": err.problem})

    def to_json(self) -> dict[str, Any]:
        return {"virtnii_index_report": 1, "root": self.root, "manifest": self.manifest, "images": self.images,
                "indexed": self.indexed, "reused": self.reused, "removed": self.removed,
                "skipped": self.skipped, "warnings": self.warnings, "bytes_referenced": self.bytes_referenced,
                "bytes_written": self.bytes_written, "pyramids_built": self.pyramids_built,
                "pyramids_reused": self.pyramids_reused, "seconds": round(self.seconds, 3),
                "settings": self.settings, "metadata_files": self.metadata_files}

    def summary(self) -> str:
        """A few lines for the terminal."""
        lines = [f"index: {self.images} image(s) in {self.manifest} ({self.indexed} read, {self.reused} unchanged, "
                 f"{self.removed} removed) in {self.seconds:.2f} s; {_size(self.bytes_referenced)} referenced in "
                 f"place, {_size(self.bytes_written)} written"]
        if self.pyramids_built or self.pyramids_reused:
            lines.append(f"  pyramids: {self.pyramids_built} built, {self.pyramids_reused} unchanged")
        counts: dict[str, int] = {}
        for item in self.skipped:
            counts[item["reason"]] = counts.get(item["reason"], 0) + 1
        for code, n in sorted(counts.items()):
            lines.append(f"  skipped {n} × {code}: {REASONS[code]}")
        if self.warnings:
            lines.append(f"  {len(self.warnings)} metadata file(s) could not be read (see the report)")
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
