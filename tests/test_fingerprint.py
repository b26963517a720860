"""Fingerprints and the checks before reads: shared by concurrent reads, never cached when failing, and not
broken by a reader that gives up while waiting."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

import virtnii
from virtnii import fingerprint


class SlowFileSystem:
    """Just enough of a remote fsspec filesystem for :class:`fingerprint.Checker`: a slow ``info``, counted."""

    local_file = False

    def __init__(self, size: int = 10, delay: float = 0.2) -> None:
        self.size, self.delay, self.calls = size, delay, 0
        self._lock = threading.Lock()

    def invalidate_cache(self, path: str | None = None) -> None:
        pass

    def info(self, path: str) -> dict[str, Any]:
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)
        return {"name": path, "size": self.size, "type": "file", "ETag": '"e1"'}


RECORDED = {"size": 10, "etag": "e1"}


def test_concurrent_reads_share_one_check_and_a_cancelled_reader_does_not_break_it() -> None:
    checker, fs = fingerprint.Checker(), SlowFileSystem()

    async def main() -> list[Any]:
        readers = [asyncio.create_task(checker.ensure(fs, "b/x.nii", "s3://b/x.nii", RECORDED)) for _ in range(5)]
        await asyncio.sleep(0.05)
        readers[0].cancel()  # e.g. a read that timed out
        return await asyncio.gather(*readers, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert isinstance(outcomes[0], asyncio.CancelledError) and outcomes[1:] == [None] * 4
    assert fs.calls == 1
    asyncio.run(checker.ensure(fs, "b/x.nii", "s3://b/x.nii", RECORDED))  # within RECHECK_AFTER: no request
    assert fs.calls == 1


def test_failed_checks_are_not_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    checker, fs = fingerprint.Checker(), SlowFileSystem(size=11, delay=0)
    for _ in range(2):
        with pytest.raises(virtnii.StaleSource, match="size was 10, now 11"):
            asyncio.run(checker.ensure(fs, "b/x.nii", "s3://b/x.nii", RECORDED))
    assert fs.calls == 2
    fs.size = 10
    asyncio.run(checker.ensure(fs, "b/x.nii", "s3://b/x.nii", RECORDED))
    monkeypatch.setattr(fingerprint, "RECHECK_AFTER", 0.0)  # and passing ones only for RECHECK_AFTER
    asyncio.run(checker.ensure(fs, "b/x.nii", "s3://b/x.nii", RECORDED))
    assert fs.calls == 4
