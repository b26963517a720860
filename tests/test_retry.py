"""Flaky networks: transient failures are retried (bounded, with backoff), permanent ones are not, and giving up
names the source, the request and the attempts.

The end-to-end tests put :class:`faults.FaultProxy` between virtnii and the tests' own servers (the HTTP file
server and moto's S3), so resets, stalls, truncated bodies and 429/500/503/SlowDown answers reach the real
aiohttp/aiobotocore clients; every voxel read back is compared with nibabel reading the original file.  Every
test runs under a hard time limit (:func:`_time_limit`): a retry loop that never ends fails the test instead of
hanging the suite.
"""

from __future__ import annotations

import asyncio
import errno
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import botocore.exceptions
import nibabel as nib
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFileSystem

import virtnii
from conftest import LocalHTTP, LocalS3
from faults import FaultProxy
from virtnii.cli import main
from virtnii.retry import RetryingFileSystem, RetryPolicy, backend_options, classify, open_fs, policy_of

DATA = Path(nib.__file__).parent / "tests" / "data"
#: Served name → nibabel file: big-endian int16 3-D, 4-D with extensions (gzip), NIfTI-2 (gzip).
FILES = {"anat.nii": "anatomical.nii", "bold.nii.gz": "example4d.nii.gz", "n2.nii.gz": "example_nifti2.nii.gz"}
#: Quick retries for tests: faults never come more than twice in a row (FaultProxy.max_in_a_row), so 4 attempts
#: always get through; a stall ends after `timeout` seconds.
QUICK = {"attempts": 4, "base_delay": 0.01, "max_delay": 0.05, "deadline": 30.0, "timeout": 1.0}
#: Seconds any test here may take before it is failed as hanging.
TIME_LIMIT = 120


@pytest.fixture(autouse=True)
def _time_limit() -> Iterator[None]:
    """Fail a test that runs longer than TIME_LIMIT (SIGALRM interrupts waits on locks and sleeps)."""
    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"test still running after {TIME_LIMIT} s: a retry loop or a read hangs")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _stems() -> dict[str, Path]:
    return {name.split(".")[0]: DATA / original for name, original in FILES.items()}


def _assert_bit_exact(group: Any) -> None:
    for stem, original in _stems().items():
        img = virtnii.to_nibabel(group[stem])
        expected = nib.load(original)
        np.testing.assert_array_equal(img.dataobj.get_unscaled(), np.asanyarray(expected.dataobj.get_unscaled()))
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.asanyarray(expected.dataobj))


# ---------------------------------------------------------------------------------------------- classification

def _client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": "m"},
                                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def _response_error(status: int) -> aiohttp.ClientResponseError:
    return aiohttp.ClientResponseError(None, (), status=status, message="x")  # type: ignore[arg-type]


def _caused(err: BaseException, cause: BaseException) -> BaseException:
    err.__cause__ = cause
    return err


@pytest.mark.parametrize("err, transient", [
    (ConnectionResetError(errno.ECONNRESET, "reset"), True),
    (asyncio.TimeoutError(), True),
    (aiohttp.ServerDisconnectedError(), True),
    (aiohttp.ClientPayloadError("truncated"), True),
    (botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"), True),
    (botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"), True),
    (_response_error(503), True), (_response_error(429), True), (_response_error(504), True),
    (_response_error(403), False), (_response_error(404), False), (_response_error(416), False),
    (_client_error("SlowDown", 503), True), (_client_error("InternalError", 500), True),
    (_client_error("RequestTimeout", 400), True), (_client_error("503", 503), True),  # a HEAD's bare status
    (_client_error("NoSuchKey", 404), False), (_client_error("AccessDenied", 403), False),
    # what fsspec's HTTP info and s3fs raise: the cause decides
    (_caused(FileNotFoundError("http://h/a.nii"), _response_error(503)), True),
    (_caused(FileNotFoundError("http://h/a.nii"), _response_error(404)), False),
    (FileNotFoundError("s3://b/a.nii"), False),
    (_caused(OSError(errno.EIO, "SlowDown"), _client_error("SlowDown", 503)), True),
    (_caused(PermissionError("Access Denied"), _client_error("AccessDenied", 403)), False),
    (aiohttp.ClientSSLError(None, OSError("bad certificate")), False),  # type: ignore[arg-type]
    (ValueError("not a URL"), False),
    (virtnii.StaleSource("s3://b/a.nii", "changed"), False),
])
def test_transient_failures_are_told_from_permanent_ones(err: BaseException, transient: bool) -> None:
    assert classify(err)[0] is transient


# --------------------------------------------------------------------------------------------------- settings

def test_policy_backoff_is_full_jitter_within_its_bounds() -> None:
    policy = RetryPolicy(base_delay=0.5, max_delay=3.0)
    for retry, bound in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (9, 3.0)]:
        delays = [policy.delay(retry) for _ in range(200)]
        assert all(0 <= d <= bound for d in delays) and max(delays) > bound / 2


@pytest.mark.parametrize("value, problem", [({"atempts": 3}, "unknown setting"), ({"attempts": 0}, "attempts"),
                                            ({"timeout": -1}, "timeout"), ({"deadline": 0}, "deadline"),
                                            (3, "dict of settings")])
def test_bad_retry_settings_are_a_virtnii_error(value: Any, problem: str) -> None:
    with pytest.raises(virtnii.VirtniiError, match=problem):
        policy_of({"retry": value})


def test_backends_are_set_to_one_attempt_and_bounded_timeouts() -> None:
    """s3fs around botocore would retry 5 x 5 (x 5 in cat_file) times; aiohttp would wait 300 s for a stall."""
    policy = RetryPolicy(timeout=7.0)
    s3 = backend_options("s3", {"anon": True}, policy)
    assert s3["config_kwargs"] == {"retries": {"total_max_attempts": 1}, "connect_timeout": 7.0, "read_timeout": 7.0}
    mine = backend_options("s3", {"config_kwargs": {"retries": {"max_attempts": 9}, "read_timeout": 60}}, policy)
    assert mine["config_kwargs"]["retries"] == {"max_attempts": 9} and mine["config_kwargs"]["read_timeout"] == 60
    timeout = backend_options("https", {}, policy)["client_kwargs"]["timeout"]
    assert (timeout.total, timeout.sock_read, timeout.sock_connect) == (None, 7.0, 7.0)
    fs, _ = open_fs("s3://bucket/key.nii", {"anon": True, "retry": {"attempts": 3}})
    assert isinstance(fs, RetryingFileSystem) and fs.policy.attempts == 3 and fs.fs.retries == 1
    assert fs.unstrip_protocol("bucket/key.nii") == "s3://bucket/key.nii"
    local, _ = open_fs(__file__, {"retry": {"attempts": 3}})
    assert not isinstance(local, RetryingFileSystem)  # nothing to retry on a local disk


# ------------------------------------------------------------------------------------------------- the layer

class _Flaky(MemoryFileSystem):
    """A filesystem whose reads fail with ``error`` the first ``failures`` times, counting calls."""

    protocol = "flaky"
    cachable = False
    store: dict[str, Any] = {}  # not memory://'s own
    pseudo_dirs = [""]

    def __init__(self, failures: int, error: BaseException | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.failures, self.error, self.calls = failures, error or ConnectionResetError(104, "reset"), 0
        self.pipe_file("/a.nii", bytes(range(100)))

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        if self.error == "stall":
            time.sleep(3)
        return super().cat_file(path, start=start, end=end, **kwargs)


def _retrying(flaky: _Flaky, **settings: Any) -> RetryingFileSystem:
    return RetryingFileSystem(flaky, RetryPolicy(**{**QUICK, **settings}))


def test_transient_failures_are_retried_until_they_pass() -> None:
    flaky = _Flaky(failures=3)
    assert _retrying(flaky).cat_file("/a.nii", start=10, end=20) == bytes(range(10, 20))
    assert flaky.calls == 4


def test_giving_up_names_the_source_the_request_and_the_attempts() -> None:
    flaky = _Flaky(failures=99, error=_caused(OSError(errno.EIO, "x"), _client_error("SlowDown", 503)))
    with pytest.raises(virtnii.SourceUnavailable) as raised:
        _retrying(flaky, attempts=3).cat_file("/a.nii", start=0, end=352)
    assert re.fullmatch(r"flaky:///a.nii: cannot read bytes 0-352: 3 attempt\(s\) failed in \d+\.\d s; the last: "
                        r"SlowDown \(HTTP 503\): m", str(raised.value))
    assert flaky.calls == 3 and isinstance(raised.value, virtnii.SourceAccessError)


def test_permanent_failures_are_raised_at_once_as_they_were() -> None:
    flaky = _Flaky(failures=99, error=PermissionError("Access Denied"))
    with pytest.raises(PermissionError):
        _retrying(flaky).cat_file("/a.nii")
    assert flaky.calls == 1


def test_the_deadline_bounds_all_attempts_and_stalls() -> None:
    """Backoff that would end past the deadline is not waited for; a stalled attempt is cut off by it."""
    flaky = _Flaky(failures=99)
    start = time.monotonic()
    with pytest.raises(virtnii.SourceUnavailable, match=r"attempt\(s\) failed in 0\.\d s, stopped by the deadline of "
                                                        "0.5 s"):
        _retrying(flaky, attempts=50, base_delay=0.4, max_delay=0.4, deadline=0.5).cat_file("/a.nii")
    assert time.monotonic() - start < 3 and flaky.calls < 50
    stalled = _Flaky(failures=0, error="stall")  # type: ignore[arg-type]
    start = time.monotonic()
    with pytest.raises(virtnii.SourceUnavailable, match="the last: timed out"):
        _retrying(stalled, deadline=0.5).cat_file("/a.nii")
    assert time.monotonic() - start < 3


def test_files_opened_for_streaming_retry_each_piece() -> None:
    flaky = _Flaky(failures=2)
    with _retrying(flaky).open("/a.nii", "rb", cache_type="none", size=100) as f:
        f.seek(50)
        assert f.read(30) == bytes(range(50, 80))
    assert flaky.calls == 3


# ------------------------------------------------------------------------------------------ HTTP, end to end

@pytest.fixture
def flaky_http(http_root: tuple[Path, LocalHTTP]) -> Iterator[FaultProxy]:
    """The nibabel files served over HTTP behind a proxy that faults 30% of requests (all kinds)."""
    root, server = http_root
    for name, original in FILES.items():
        shutil.copy(DATA / original, root / name)
    proxy = FaultProxy(server.url, rate=0.3, stall=3.0)
    yield proxy
    proxy.stop()


def test_http_scan_and_read_through_faults_are_bit_exact(flaky_http: FaultProxy, tmp_path: Path) -> None:
    options = {"retry": QUICK}
    result = virtnii.scan([f"{flaky_http.url}/{name}" for name in FILES], str(tmp_path / "out"),
                          storage_options=options)
    assert not result.failures, [str(f) for f in result.failures]
    _assert_bit_exact(virtnii.open(str(tmp_path / "out"), **options))
    count, problems = virtnii.verify(str(tmp_path / "out"), **options)
    assert count == len(FILES) and not problems
    assert len(flaky_http.injected) >= 3  # faults of several kinds met, and got through


def test_a_stalled_http_request_ends_by_timeout_and_is_retried(flaky_http: FaultProxy, tmp_path: Path) -> None:
    flaky_http.kinds = ("stall",)
    start = time.monotonic()
    result = virtnii.scan([f"{flaky_http.url}/{name}" for name in FILES], str(tmp_path / "out"),
                          storage_options={"retry": QUICK})
    assert not result.failures and flaky_http.injected["stall"] > 0
    assert time.monotonic() - start < 2 * flaky_http.injected["stall"] * QUICK["timeout"] + 30


def test_a_source_that_is_always_down_is_reported_once_with_its_attempts(flaky_http: FaultProxy,
                                                                         tmp_path: Path) -> None:
    """The others are indexed; the down one is one failure naming the request, attempts and cause — and it got
    exactly `attempts` requests of each kind (no retry loop inside another)."""
    flaky_http.rate = 0.0
    flaky_http.fail["/anat.nii"] = 503
    result = virtnii.scan([f"{flaky_http.url}/{name}" for name in FILES], str(tmp_path / "out"),
                          storage_options={"retry": QUICK})
    assert sorted(e.name for e in result.images) == ["bold", "n2"]
    [error] = result.failures
    assert isinstance(error, virtnii.SourceUnavailable) and error.source == f"{flaky_http.url}/anat.nii"
    assert "cannot stat: 4 attempt(s) failed" in error.problem and "HTTP 503" in error.problem
    assert flaky_http.requests["/anat.nii"] == 2 * QUICK["attempts"]  # fsspec's HTTP info: a HEAD, then a GET


@pytest.mark.parametrize("status, error_class", [(403, virtnii.SourceAccessError), (404, virtnii.SourceNotFound)])
def test_forbidden_or_missing_http_sources_are_not_retried(flaky_http: FaultProxy, tmp_path: Path, status: int,
                                                           error_class: type) -> None:
    flaky_http.rate = 0.0
    flaky_http.fail["/anat.nii"] = status
    [error] = virtnii.scan([f"{flaky_http.url}/anat.nii"], str(tmp_path / "out"),
                           storage_options={"retry": QUICK}).failures
    assert type(error) is error_class and "attempt" not in error.problem
    assert flaky_http.requests["/anat.nii"] == 2  # fsspec's HTTP info: a HEAD, then a GET; never again


def test_cli_flags_set_the_retries(flaky_http: FaultProxy, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    flaky_http.rate = 0.0
    flaky_http.fail["/anat.nii"] = 503
    argv = ["scan", *(f"{flaky_http.url}/{name}" for name in FILES), "-o", str(tmp_path / "out"), "-q",
            "--retries", "2", "--retry-delay", "0.01", "--timeout", "2"]
    assert main(argv) == 1
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("virtnii: error")]
    assert line.startswith(f"virtnii: error: {flaky_http.url}/anat.nii: cannot stat: 2 attempt(s) failed")
    assert flaky_http.requests["/anat.nii"] == 4


# -------------------------------------------------------------------------------------------- S3, end to end

@pytest.fixture
def flaky_s3(s3: LocalS3) -> Iterator[tuple[FaultProxy, str, dict[str, Any]]]:
    """The nibabel files in a bucket of the local S3 server, behind a proxy answering S3's way (SlowDown,
    InternalError) or resetting 30% of requests; the options reach the bucket through the proxy."""
    bucket = s3.create_bucket()
    fs = s3.filesystem()
    for name, original in FILES.items():
        fs.put_file(str(DATA / original), f"{bucket}/ds/{name}")
    proxy = FaultProxy(s3.endpoint, rate=0.3, stall=3.0, s3=True)
    yield proxy, bucket, {**s3.storage_options, "endpoint_url": proxy.url, "retry": QUICK}
    proxy.stop()


def test_s3_scan_and_read_through_faults_are_bit_exact(flaky_s3: tuple[FaultProxy, str, dict[str, Any]],
                                                       tmp_path: Path) -> None:
    proxy, bucket, options = flaky_s3
    result = virtnii.scan(f"s3://{bucket}/ds", str(tmp_path / "out"), storage_options=options)
    assert not result.failures, [str(f) for f in result.failures]
    _assert_bit_exact(virtnii.open(str(tmp_path / "out"), **options))
    assert proxy.injected


def test_s3_bids_index_through_faults(flaky_s3: tuple[FaultProxy, str, dict[str, Any]], s3: LocalS3,
                                      tmp_path: Path) -> None:
    """The BIDS listing (one recursive find), its batches and a manifest on the same faulty S3."""
    proxy, bucket, options = flaky_s3
    fs = s3.filesystem()
    fs.pipe_file(f"{bucket}/bids/dataset_description.json", b'{"Name": "x", "BIDSVersion": "1.9.0"}')
    fs.put_file(str(DATA / "anatomical.nii"), f"{bucket}/bids/sub-01/anat/sub-01_T1w.nii")
    fs.put_file(str(DATA / "example4d.nii.gz"), f"{bucket}/bids/sub-01/func/sub-01_task-rest_bold.nii.gz")
    proxy.reset_counters()
    proxy.kinds = ("reset", "truncate", 500, 503)  # stalls are tested above, and each costs a timeout
    result = virtnii.index(f"s3://{bucket}/bids", f"s3://{bucket}/manifest", storage_options=options)
    assert not result.skipped and len(result.images) == 2
    group = virtnii.open(f"s3://{bucket}/manifest", **options)  # the manifest is read without the retry option
    for name, original in [("sub-01/anat/sub-01_T1w", "anatomical.nii"),
                           ("sub-01/func/sub-01_task-rest_bold", "example4d.nii.gz")]:
        np.testing.assert_array_equal(virtnii.to_nibabel(group[name]).dataobj.get_unscaled(),
                                      np.asanyarray(nib.load(DATA / original).dataobj.get_unscaled()))
    assert proxy.injected


def test_an_s3_object_always_slowing_down_is_reported_once_after_exactly_its_attempts(
        flaky_s3: tuple[FaultProxy, str, dict[str, Any]], tmp_path: Path) -> None:
    proxy, bucket, options = flaky_s3
    proxy.rate = 0.0
    proxy.fail[f"/{bucket}/ds/anat.nii"] = 503
    result = virtnii.scan(f"s3://{bucket}/ds", str(tmp_path / "out"), storage_options=options)
    assert sorted(e.name for e in result.images) == ["bold", "n2"]
    [error] = result.failures
    assert isinstance(error, virtnii.SourceUnavailable) and error.source == f"s3://{bucket}/ds/anat.nii"
    assert "cannot read bytes 0-" in error.problem and "4 attempt(s)" in error.problem and "SlowDown" in error.problem
    assert proxy.requests[f"/{bucket}/ds/anat.nii"] == QUICK["attempts"]  # not s3fs's 5 x botocore's 5


@pytest.mark.parametrize("status, error_class", [(403, virtnii.SourceAccessError), (404, virtnii.SourceNotFound)])
def test_forbidden_or_missing_s3_objects_are_not_retried(flaky_s3: tuple[FaultProxy, str, dict[str, Any]],
                                                         tmp_path: Path, status: int, error_class: type) -> None:
    proxy, bucket, options = flaky_s3
    proxy.rate = 0.0
    proxy.fail[f"/{bucket}/ds/anat.nii"] = status
    result = virtnii.scan(f"s3://{bucket}/ds", str(tmp_path / "out"), storage_options=options)
    [error] = result.failures
    assert type(error) is error_class and "attempt" not in error.problem
    assert proxy.requests[f"/{bucket}/ds/anat.nii"] == 1


def test_reads_of_an_s3_source_that_went_down_give_up_naming_the_chunk(
        flaky_s3: tuple[FaultProxy, str, dict[str, Any]], tmp_path: Path) -> None:
    proxy, bucket, options = flaky_s3
    proxy.rate = 0.0
    assert not virtnii.scan(f"s3://{bucket}/ds", str(tmp_path / "out"), storage_options=options).failures
    group = virtnii.open(str(tmp_path / "out"), **options)
    _assert_bit_exact(group)  # sources checked: their next reads within RECHECK_AFTER make no stat
    array = group["anat"]["0"]
    proxy.fail[f"/{bucket}/ds/anat.nii"] = 500
    with pytest.raises(virtnii.SourceUnavailable,
                       match=rf"s3://{bucket}/ds/anat.nii: cannot read bytes \d+-\d+: 4 attempt.*InternalError"):
        array[...]
    proxy.fail[f"/{bucket}/ds/bold.nii.gz"] = 503  # a .nii.gz: read through gzidx://, retried the same way
    with pytest.raises(virtnii.SourceUnavailable, match=rf"s3://{bucket}/ds/bold.nii.gz: cannot read bytes"):
        group["bold"]["0"][...]
    del proxy.fail[f"/{bucket}/ds/anat.nii"], proxy.fail[f"/{bucket}/ds/bold.nii.gz"]
    _assert_bit_exact(group)  # up again: the same reader reads again


def test_plain_zarr_with_reference_options_retries_too(flaky_s3: tuple[FaultProxy, str, dict[str, Any]],
                                                       tmp_path: Path) -> None:
    import zarr

    proxy, bucket, options = flaky_s3
    assert not virtnii.scan(f"s3://{bucket}/ds", str(tmp_path / "out"), storage_options=options).failures
    proxy.reset_counters()
    proxy.rate, proxy.kinds = 1.0, ("reset", 503)  # every request fails twice, then gets through
    group = zarr.open_group("reference://", mode="r",
                            storage_options=virtnii.reference_options(str(tmp_path / "out"), **options))
    np.testing.assert_array_equal(np.asarray(group["anat"]["0"][...]),
                                  np.asanyarray(nib.load(DATA / "anatomical.nii").dataobj.get_unscaled()).T)
    assert proxy.injected["reset"] + proxy.injected["503"] == 2 * sum(proxy.requests.values()) // 3


def test_fsspec_filesystems_are_wrapped_once_per_backend_instance() -> None:
    """Sources found by separate arguments share one wrapper, as they share one s3fs: the scan groups header
    reads by filesystem into concurrent batches."""
    a, _ = open_fs("s3://bucket/a.nii", {"anon": True})
    b, _ = open_fs("s3://bucket/b.nii", {"anon": True})
    assert a is b and isinstance(a, RetryingFileSystem)
