"""Flaky networks: every request virtnii makes to a remote source goes through one retry layer.

Object stores and web servers fail some requests for reasons that pass: a dropped connection, a timeout, HTTP
429/500/502/503/504, S3 ``SlowDown``/``InternalError``/``RequestTimeout``.  Such a failure is retried with
bounded exponential backoff and full jitter (a random wait in ``[0, min(max_delay, base_delay * 2**k)]``, which
spreads a burst of concurrent retries instead of sending them back together); a permanent one (403, 404,
``NoSuchKey``, ``AccessDenied``, a bad certificate) is raised at once, as it was.  After the last attempt, or
when the next wait would pass the operation's deadline, the failure is a
:class:`~virtnii.errors.SourceUnavailable` naming the source, the request (``read bytes 0-352``, ``stat``,
``list``), the attempts and the last cause.

The layer is :class:`RetryingFileSystem`, a wrapper around the fsspec filesystem of the sources (``cat_file``,
``cat_ranges``, ``info``, ``find``, ``glob``, ``open`` for streaming), so that scans, gzip index passes, reads
through a manifest, fingerprint checks and ``verify`` are retried alike, and no call site has a loop of its own.
:func:`open_fs` makes it; local and in-memory filesystems are not wrapped (nothing there to retry).

The backends' own retries are turned off where virtnii opens them, so that attempts do not multiply: s3fs retries
each call up to 5 times (``retries``) around botocore, which retries up to 5 times itself (its legacy mode), and
``cat_file`` nests two such loops — 125 requests for one persistent ``SlowDown``.  virtnii sets s3fs
``retries=1`` (always) and botocore ``total_max_attempts=1`` (unless the caller set botocore's retries).  aiohttp (fsspec's HTTP) never
retries.  Every request is bounded in time: ``timeout`` is given to botocore (``connect_timeout``,
``read_timeout``) and aiohttp (``sock_connect``, ``sock_read``), so a stalled connection fails and is retried, and
each operation as a whole ends at its ``deadline``.

Settings come from the storage option ``retry`` (a dict of :class:`RetryPolicy` fields, or a RetryPolicy), which
virtnii takes out before the options reach fsspec: ``virtnii.open(m, retry={"attempts": 8})``,
``virtnii.scan(…, storage_options={"retry": {"deadline": 600}})``, ``virtnii scan … --retries 8 --timeout 60``.
See docs/network.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import http.client
import random
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

import fsspec
import fsspec.exceptions
from fsspec.asyn import AsyncFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.spec import AbstractBufferedFile

from .errors import SourceUnavailable, VirtniiError

_T = TypeVar("_T")

#: The storage option holding the retry settings (taken out before the options reach fsspec).
OPTION = "retry"
#: HTTP statuses that mean "try again": request timeout, too many requests, and server-side failures.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: S3 (and S3-compatible) error codes that mean the same; HEAD answers carry only the status as their code.
TRANSIENT_CODES = frozenset({"SlowDown", "InternalError", "RequestTimeout", "ServiceUnavailable", "Throttling",
                             "ThrottlingException", "ThrottledException", "RequestLimitExceeded",
                             "TooManyRequestsException", "RequestThrottled", "BandwidthLimitExceeded",
                             "OperationAborted", *map(str, TRANSIENT_STATUS)})
#: Socket errors worth another try: the connection went away, or could not be made just now.
TRANSIENT_ERRNOS = frozenset({errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.ETIMEDOUT,
                              errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN})


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long a failing request is tried again.

    Attributes
    ----------
    attempts
        Tries per request in all, the first included (1: no retry).
    base_delay, max_delay
        Seconds: before retry ``k`` (1, 2, …) a random wait in ``[0, min(max_delay, base_delay * 2**(k-1))]``.
    deadline
        Seconds one operation (a read, a stat, a listing) may take over all its attempts: the attempt running
        then is cut off, and no retry starts whose wait would end after it.
    timeout
        Seconds a request may wait for a connection or for its next bytes before it counts as failed (and is
        retried): a stalled connection ends here, not at the deadline.
    """

    attempts: int = 5
    base_delay: float = 0.25
    max_delay: float = 10.0
    deadline: float = 120.0
    timeout: float = 15.0

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise VirtniiError(OPTION, f"attempts must be a whole number >= 1, not {self.attempts!r}")
        for name in ("base_delay", "max_delay", "deadline", "timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
                    (value == 0 and name in ("deadline", "timeout")):
                raise VirtniiError(OPTION, f"{name} must be a number of seconds (> 0), not {value!r}")

    def delay(self, retry: int) -> float:
        """The wait before retry number ``retry`` (1 for the second attempt): full jitter."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (retry - 1)))


def policy_of(options: dict[str, Any]) -> RetryPolicy:
    """The :class:`RetryPolicy` storage ``options`` ask for (their ``retry`` entry), or the default one."""
    value = options.get(OPTION)
    if value is None:
        return RetryPolicy()
    if isinstance(value, RetryPolicy):
        return value
    if not isinstance(value, dict):
        raise VirtniiError(OPTION, f"the storage option {OPTION!r} is a dict of settings "
                                   f"({', '.join(_FIELDS)}), not {value!r}")
    unknown = sorted(set(value) - set(_FIELDS))
    if unknown:
        raise VirtniiError(OPTION, f"unknown setting(s) {', '.join(unknown)} (known: {', '.join(_FIELDS)})")
    return RetryPolicy(**value)


_FIELDS = tuple(field.name for field in dataclasses.fields(RetryPolicy))


def without_policy(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` without virtnii's ``retry`` entry: what fsspec itself is given."""
    return {key: value for key, value in options.items() if key != OPTION} if OPTION in options else options


def open_fs(url: str, options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs(url, **options)`` for a source: the backend's own retries off and its timeouts set
    (:func:`backend_options`), wrapped in :class:`RetryingFileSystem` unless it is local or in memory."""
    policy = policy_of(options)
    fs, path = fsspec.core.url_to_fs(url, **backend_options(fsspec.core.split_protocol(url)[0] or "file",
                                                            without_policy(options), policy))
    return wrap(one_attempt(fs), policy), path


def filesystem(protocol: str, options: dict[str, Any]) -> fsspec.AbstractFileSystem:
    """``fsspec.filesystem(protocol, **options)`` for sources, as :func:`open_fs` makes them."""
    policy = policy_of(options)
    return wrap(one_attempt(fsspec.filesystem(protocol, **backend_options(protocol, without_policy(options),
                                                                           policy))), policy)


def one_attempt(fs: fsspec.AbstractFileSystem) -> fsspec.AbstractFileSystem:
    """``fs`` set to one attempt per call if it is an s3fs instance (its ``retries``, a class attribute no option
    sets): the wrapper retries instead.  Only for instances made with :func:`backend_options`: their botocore
    settings keep them apart, in fsspec's cache of instances, from those made with the caller's options alone
    (a manifest folder being written, say), which keep s3fs's retries."""
    if type(fs).__module__.startswith("s3fs."):
        fs.retries = 1
    return fs


def backend_options(protocol: str, options: dict[str, Any], policy: RetryPolicy) -> dict[str, Any]:
    """``options`` with the backend's own retries turned off and its per-request timeouts set to
    ``policy.timeout``, where the caller did not set them (botocore for s3fs, aiohttp for HTTP)."""
    if protocol in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", {"total_max_attempts": 1})
        config.setdefault("connect_timeout", policy.timeout)
        config.setdefault("read_timeout", policy.timeout)
        return {**options, "config_kwargs": config}
    if protocol in ("http", "https"):
        import aiohttp

        client = dict(options.get("client_kwargs") or {})
        client.setdefault("timeout", aiohttp.ClientTimeout(total=None, sock_connect=policy.timeout,
                                                           sock_read=policy.timeout))
        return {**options, "client_kwargs": client}
    return options


def wrap(fs: fsspec.AbstractFileSystem, policy: RetryPolicy) -> fsspec.AbstractFileSystem:
    """``fs`` behind :class:`RetryingFileSystem`, unless it is local or in memory (no network to retry).  ``fs``
    itself is left as it is (it may be shared): make sources with :func:`open_fs` or :func:`filesystem`."""
    if getattr(fs, "local_file", False) or isinstance(fs, (MemoryFileSystem, RetryingFileSystem)):
        return fs
    return RetryingFileSystem(fs, policy)


# ------------------------------------------------------------------------------------------ classification

def classify(err: BaseException) -> tuple[bool, BaseException]:
    """``(transient, cause)``: whether ``err`` is worth another attempt, and the error in its chain that says so
    (what the final message quotes).

    The chain (``__cause__``, then ``__context__``) is followed because backends wrap what happened: fsspec's
    HTTP ``info`` raises ``FileNotFoundError`` from the 503 it got, s3fs an ``OSError`` from botocore's
    ``ClientError``.  The first link that decides wins; nothing deciding means permanent.
    """
    seen: set[int] = set()
    link: BaseException | None = err
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        verdict = _verdict(link)
        if verdict is not None:
            return verdict, link
        link = link.__cause__ or link.__context__
    return False, err


def _verdict(err: BaseException) -> bool | None:
    """True (transient), False (permanent) or None (this link does not say: look at its cause)."""
    kinds = _kinds()
    if isinstance(err, VirtniiError):
        return False
    if isinstance(err, kinds.response):
        return err.status in TRANSIENT_STATUS
    if isinstance(err, kinds.client_error):
        response = err.response if isinstance(err.response, dict) else {}
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return response.get("Error", {}).get("Code") in TRANSIENT_CODES or status in TRANSIENT_STATUS
    if isinstance(err, kinds.certificate):  # certificates do not fix themselves
        return False
    if isinstance(err, kinds.transient) or (isinstance(err, OSError) and err.errno in TRANSIENT_ERRNOS):
        return True
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return None if err.__cause__ is not None else False
    return None


@dataclass(frozen=True)
class _Kinds:
    response: type[BaseException]
    client_error: type[BaseException]
    certificate: tuple[type[BaseException], ...]
    transient: tuple[type[BaseException], ...]


@functools.lru_cache(maxsize=None)
def _kinds() -> _Kinds:
    """The client libraries' error types, imported on first use (as :func:`~virtnii.errors.storage_errors`)."""
    import aiohttp
    import botocore.exceptions as boto
    from botocore.parsers import ResponseParserError  # S3 throttling sometimes answers with broken XML

    return _Kinds(aiohttp.ClientResponseError, boto.ClientError, (aiohttp.ClientSSLError, boto.SSLError),
                  (asyncio.TimeoutError, TimeoutError, fsspec.exceptions.FSTimeoutError, ConnectionError,
                   aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, http.client.IncompleteRead,
                   boto.ConnectionError, boto.HTTPClientError, boto.IncompleteReadError, ResponseParserError))


def describe(err: BaseException) -> str:
    """A short text for the cause of a failure: the HTTP status or S3 code when there is one."""
    kinds = _kinds()
    if isinstance(err, kinds.response):
        return f"HTTP {err.status} {err.message}".strip()
    if isinstance(err, kinds.client_error) and isinstance(err.response, dict):
        error = err.response.get("Error", {})
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return f"{error.get('Code', '?')} (HTTP {status}): {error.get('Message', '')}".rstrip(": ")
    if isinstance(err, (asyncio.TimeoutError, TimeoutError)) and not str(err):
        return "timed out"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


async def retried(policy: RetryPolicy, url: str, what: str, attempt: Callable[[], Awaitable[_T]]) -> _T:
    """``await attempt()``, made again as ``policy`` says while it fails transiently (:func:`classify`); giving up
    is a :class:`~virtnii.errors.SourceUnavailable` naming ``url``, ``what`` was asked of it and the attempts."""
    start = time.monotonic()
    deadline = start + policy.deadline
    tries = 0
    while True:
        tries += 1
        try:
            return await asyncio.wait_for(attempt(), deadline - time.monotonic())
        except Exception as err:  # never CancelledError: an abandoned read stops at once
            transient, cause = classify(err)
            if not transient:
                raise
            now = time.monotonic()
            wait = policy.delay(tries)
            if tries >= policy.attempts or now + wait >= deadline:
                ended = "" if tries >= policy.attempts else f", stopped by the deadline of {policy.deadline:g} s"
                raise SourceUnavailable(url, f"cannot {what}: {tries} attempt(s) failed in {now - start:.1f} s"
                                             f"{ended}; the last: {describe(cause)}") from err
        await asyncio.sleep(wait)


# ------------------------------------------------------------------------------------------------ the layer

class RetryingFileSystem(AsyncFileSystem):
    """``fs`` (any fsspec filesystem) with each read, stat and listing retried as ``policy`` says.

    Paths, protocol and URLs are ``fs``'s own, so sources opened through it name the same files.  It runs on
    ``fs``'s event loop (an async backend's session lives there); a synchronous backend's calls run in worker
    threads.  ``cat_ranges`` and ``cat`` retry each range or file on its own (fsspec builds them on
    ``cat_file``), and files opened for reading fetch each piece through a retried ``cat_file``.  Read-only.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, policy: RetryPolicy, **kwargs: Any) -> None:
        asynchronous = bool(fs.async_impl and getattr(fs, "asynchronous", False))
        super().__init__(asynchronous=asynchronous, loop=fs.loop if fs.async_impl and not asynchronous else None,
                         **kwargs)
        self.fs = fs
        self.policy = policy
        self.protocol = fs.protocol
        self.sep = fs.sep
        self.root_marker = fs.root_marker
        self._strip_protocol = fs._strip_protocol  # type: ignore[method-assign]  # the backend's rules, per instance

    @property
    def version_aware(self) -> bool:
        """Whether the backend reads the object versions named in paths (see :mod:`virtnii.versions`)."""
        return bool(getattr(self.fs, "version_aware", False))

    def unstrip_protocol(self, name: str) -> str:
        return self.fs.unstrip_protocol(name)

    def invalidate_cache(self, path: str | None = None) -> None:
        self.fs.invalidate_cache(path)

    async def _retried(self, what: str, path: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """``fs.<method>(*args, **kwargs)``, tried again on transient failures (see the module docstring)."""
        from .verified import call

        return await retried(self.policy, self.unstrip_protocol(path), what,
                             lambda: call(self.fs, method, *args, **kwargs))

    async def _cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        what = "read" if start is None and end is None else f"read bytes {start or 0}-{'' if end is None else end}"
        return await self._retried(what, path, "cat_file", path, start=start, end=end, **kwargs)

    async def _info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return await self._retried("stat", path, "info", path, **kwargs)

    async def _ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        return await self._retried("list", path, "ls", path, detail=detail, **kwargs)

    async def _find(self, path: str, *args: Any, **kwargs: Any) -> Any:
        return await self._retried("list", path, "find", path, *args, **kwargs)

    async def _glob(self, path: str, **kwargs: Any) -> Any:
        return await self._retried("list", path, "glob", path, **kwargs)

    async def _exists(self, path: str, **kwargs: Any) -> bool:
        return await self._retried("stat", path, "exists", path, **kwargs)

    async def _isdir(self, path: str) -> bool:
        return await self._retried("stat", path, "isdir", path)

    async def _isfile(self, path: str) -> bool:
        return await self._retried("stat", path, "isfile", path)

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None, autocommit: bool = True,
              cache_options: dict[str, Any] | None = None, **kwargs: Any) -> _RetryingFile:
        if mode != "rb":
            raise NotImplementedError(f"sources are opened read-only, not with mode {mode!r}")
        return _RetryingFile(self, path, mode, block_size=block_size or "default", cache_options=cache_options,
                             **kwargs)


class _RetryingFile(AbstractBufferedFile):
    """A source opened for reading (``fs.open``): each piece is one retried ``cat_file`` of its range."""

    def _fetch_range(self, start: int, end: int) -> bytes:
        return self.fs.cat_file(self.path, start=start, end=end, **self.kwargs)
