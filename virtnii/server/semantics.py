"""HTTP semantics of ``virtnii serve``, framework-independent: request paths, byte ranges, conditional requests.

Pure functions over header text, so that the rules viewers and zarr clients rely on (RFC 9110) are unit-tested
without a server, and the HTTP framework is only a transport.  What is refused, and how, is documented in
``docs/serve.md`` ("HTTP semantics", "Security").
"""

from __future__ import annotations

import email.utils
import re
import urllib.parse
from dataclasses import dataclass

#: Longest request path accepted (bytes, percent-encoded): far above any image name plus chunk key, far below
#: what could cost the server anything.
MAX_PATH = 4096
#: Digits of a byte position accepted in a Range header: 2^64 has 20.  (Python refuses to parse ints of over
#: 4,300 digits, and nothing served is that large.)
MAX_DIGITS = 20

_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_FORBIDDEN_ESCAPES = re.compile(r"%(2[fF]|5[cC]|00)")  # encoded "/", "\" and NUL: never part of a key
_RANGE = re.compile(r"(\d*)-(\d*)")
_ETAG = re.compile(r'\s*(W/)?("[^"]*")\s*(?:,|$)')


@dataclass(frozen=True)
class HTTPError(Exception):
    """A request refused with ``status``; ``reason`` is the plain-text body (never a path of the server's)."""

    status: int
    reason: str
    #: ``Content-Range: bytes */size`` for a 416
    size: int | None = None


def request_path(raw: str) -> str:
    """The decoded path of a request, given its raw (still percent-encoded) path without the query.

    Refused with 400 (414 when too long) before anything else happens: malformed or forbidden escapes
    (``%2F``, ``%5C``, ``%00``), backslashes, control characters, ``.`` and ``..`` segments (encoded or not),
    empty segments (``//``), and text that is not UTF-8.  A trailing ``/`` is kept (``/zarr/``).  What is left
    can only name a key by an exact lookup: no path is ever joined to a folder of the server.
    """
    if len(raw) > MAX_PATH:
        raise HTTPError(414, f"request path longer than {MAX_PATH} bytes")
    if not raw.startswith("/"):
        raise HTTPError(400, "request path must start with /")
    if _PERCENT.search(raw):
        raise HTTPError(400, "malformed percent-escape in the request path")
    if _FORBIDDEN_ESCAPES.search(raw):
        raise HTTPError(400, "encoded '/', '\\' or NUL in the request path")
    try:
        path = urllib.parse.unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise HTTPError(400, "request path is not UTF-8") from None
    if "\\" in path or any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        raise HTTPError(400, "backslash or control character in the request path")
    segments = path[1:].split("/")
    if segments[-1] == "":
        segments.pop()  # "/zarr/" names the folder "zarr"
    if any(segment in ("", ".", "..") for segment in segments):
        raise HTTPError(400, "empty, '.' or '..' segment in the request path")
    return path


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The bytes ``[start, end)`` a ``Range`` header asks of a body of ``size`` bytes, or None for all of it.

    One range per request, as viewers and zarr clients send: ``bytes=a-b``, ``bytes=a-`` and suffix ranges
    ``bytes=-n``; a last position past the end is cut to the end (RFC 9110, 14.1.2).  Ignored, as the RFC
    allows (a 200 with the whole body): other units and several ranges (no multipart answers).  Refused:
    syntactically invalid ranges (400: a client bug, better seen than silently served whole) and ranges that
    start past the end, or empty suffixes (416, with the size).
    """
    if header is None:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    parts = [part.strip() for part in spec.split(",")]
    if len(parts) > 1:
        if any(not _valid_range(part) for part in parts):
            raise HTTPError(400, f"malformed Range header {header[:80]!r}")
        return None
    part = parts[0]
    if not _valid_range(part):
        raise HTTPError(400, f"malformed Range header {header[:80]!r}")
    first, last = _RANGE.fullmatch(part).groups()  # type: ignore[union-attr]
    if not first:  # suffix: the last n bytes
        length = int(last)
        if length == 0 or size == 0:
            raise HTTPError(416, "empty suffix range, or empty body", size)
        return max(size - length, 0), size
    start = int(first)
    if start >= size:
        raise HTTPError(416, f"range starts at {start}, past the {size}-byte body", size)
    return start, size if not last else min(int(last) + 1, size)


def _valid_range(part: str) -> bool:
    match = _RANGE.fullmatch(part)
    if match is None:
        return False
    first, last = match.groups()
    if not (first or last) or len(first) > MAX_DIGITS or len(last) > MAX_DIGITS:
        return False
    return not (first and last and int(last) < int(first))


def etag_matches(header: str, etag: str) -> bool:
    """Whether an ``If-None-Match`` (or ``If-Match``-style) list names ``etag``: ``*`` or any tag equal to it
    by the weak comparison (RFC 9110, 8.8.3.2: ``W/`` prefixes ignored)."""
    if header.strip() == "*":
        return True
    tag = etag.removeprefix("W/")
    position = 0
    while position < len(header):
        match = _ETAG.match(header, position)
        if match is None:
            return False  # malformed: matches nothing
        if match.group(2) == tag:
            return True
        position = match.end()
    return False


def http_date(timestamp: float) -> str:
    """An IMF-fixdate (``Last-Modified``): ``Sun, 06 Nov 1994 08:49:37 GMT``."""
    return email.utils.formatdate(timestamp, usegmt=True)


def _parse_date(text: str) -> float | None:
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def not_modified(if_none_match: str | None, if_modified_since: str | None, etag: str,
                 last_modified: float | None) -> bool:
    """Whether a GET/HEAD may be answered 304: ``If-None-Match`` names the ETag, or — only when there is no
    ``If-None-Match``, as RFC 9110 13.2.2 orders — nothing changed after ``If-Modified-Since``."""
    if if_none_match is not None:
        return etag_matches(if_none_match, etag)
    if if_modified_since is None or last_modified is None:
        return False
    since = _parse_date(if_modified_since)
    return since is not None and int(last_modified) <= since


def range_applies(if_range: str | None, etag: str, last_modified: float | None) -> bool:
    """Whether a ``Range`` is honoured under ``If-Range``: absent, or the strong ETag or exact date it names is
    still current (otherwise the client's partial copy is stale and gets the whole body)."""
    if if_range is None:
        return True
    text = if_range.strip()
    if text.startswith(('"', "W/")):
        return not text.startswith("W/") and text == etag
    since = _parse_date(text)
    return since is not None and last_modified is not None and int(last_modified) == since
