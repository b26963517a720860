"""The HTTP rules of ``virtnii serve`` (virtnii.server.semantics), without a server: request paths, byte ranges,
conditional requests."""

from __future__ import annotations

import pytest

from virtnii.server.semantics import (MAX_PATH, HTTPError, byte_range, etag_matches, http_date, not_modified,
                                      range_applies, request_path)


@pytest.mark.parametrize("raw, decoded", [
    ("/zarr/sub-01/anat/sub-01_T1w/0/c/0/0/0", "/zarr/sub-01/anat/sub-01_T1w/0/c/0/0/0"),
    ("/zarr/", "/zarr/"), ("/", "/"), ("/zarr/a%20b/zarr.json", "/zarr/a b/zarr.json"),
    ("/zarr/%C3%A9", "/zarr/\u00e9"), ("/zarr/..a/.b", "/zarr/..a/.b"),
])
def test_request_paths_that_name_keys(raw: str, decoded: str) -> None:
    assert request_path(raw) == decoded


@pytest.mark.parametrize("raw", [
    "/zarr/../secret", "/zarr/%2e%2e/secret", "/zarr/%2E%2e/secret", "/zarr/.%2e/x", "/zarr/./x", "/zarr/..",
    "/zarr/a%2Fb", "/zarr/a%2fb", "/zarr/a%5Cb", "/zarr/a\\b", "/zarr/a%00b", "/zarr//x", "//zarr/x",
    "/zarr/%zz", "/zarr/%4", "/zarr/%ff", "/zarr/a%0Ab", "zarr/x", "",
])
def test_traversal_and_malformed_paths_are_400(raw: str) -> None:
    with pytest.raises(HTTPError) as caught:
        request_path(raw)
    assert caught.value.status == 400


def test_absurdly_long_paths_are_414() -> None:
    request_path("/" + "a" * (MAX_PATH - 1))
    with pytest.raises(HTTPError) as caught:
        request_path("/" + "a" * MAX_PATH)
    assert caught.value.status == 414


@pytest.mark.parametrize("header, expected", [
    (None, None), ("bytes=0-0", (0, 1)), ("bytes=10-19", (10, 20)), ("bytes=10-", (10, 100)),
    ("bytes=-10", (90, 100)), ("bytes=-1000", (0, 100)), ("bytes=90-1000", (90, 100)),
    ("bytes=0-18446744073709551615", (0, 100)), (" Bytes = 5-6", (5, 7)),
    ("items=0-5", None),  # another unit: ignored (RFC 9110 14.2)
    ("bytes=0-5, 10-20", None),  # several ranges: ignored, the whole body is sent (no multipart)
])
def test_byte_ranges(header: str | None, expected: tuple[int, int] | None) -> None:
    assert byte_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=1000-2000", "bytes=-0", "bytes=18446744073709551615-"])
def test_unsatisfiable_ranges_are_416_with_the_size(header: str) -> None:
    with pytest.raises(HTTPError) as caught:
        byte_range(header, 100)
    assert (caught.value.status, caught.value.size) == (416, 100)


def test_any_range_of_an_empty_body_is_416() -> None:
    with pytest.raises(HTTPError) as caught:
        byte_range("bytes=0-", 0)
    assert caught.value.status == 416


@pytest.mark.parametrize("header", ["bytes=", "bytes=-", "bytes=a-b", "bytes=5-2", "bytes=1-2-3", "bytes=0x10-",
                                    "bytes=" + "9" * 21 + "-", "bytes=-" + "9" * 5000, "bytes=0-5,x",
                                    "bytes=" + ",".join(["0-1"] * 50) + ",z"])
def test_malformed_ranges_are_400(header: str) -> None:
    with pytest.raises(HTTPError) as caught:
        byte_range(header, 100)
    assert caught.value.status == 400


def test_if_none_match_lists_star_and_weak_tags() -> None:
    assert etag_matches('"a"', '"a"')
    assert etag_matches('"x", W/"a"', '"a"')
    assert etag_matches("*", '"a"')
    assert not etag_matches('"ab"', '"a"')
    assert not etag_matches('a', '"a"')  # unquoted: malformed, matches nothing


def test_not_modified_prefers_if_none_match() -> None:
    stamp = 1_700_000_000.5
    date = http_date(stamp)
    assert date.endswith(" GMT")
    assert not_modified(None, date, '"a"', stamp)
    assert not not_modified(None, http_date(stamp - 10), '"a"', stamp)
    assert not not_modified('"b"', date, '"a"', stamp)  # If-None-Match wins over a matching date
    assert not not_modified(None, date, '"a"', None)  # no Last-Modified: a date proves nothing
    assert not not_modified(None, "not a date", '"a"', stamp)


def test_if_range_needs_the_current_strong_tag_or_date() -> None:
    assert range_applies(None, '"a"', None)
    assert range_applies('"a"', '"a"', None)
    assert not range_applies('"b"', '"a"', None)
    assert not range_applies('W/"a"', '"a"', None)  # weak tags never validate a range
    assert range_applies(http_date(1_700_000_000), '"a"', 1_700_000_000.25)
    assert not range_applies(http_date(1_600_000_000), '"a"', 1_700_000_000)
