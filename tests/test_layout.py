"""Chunk layout arithmetic against brute force: every chunk is one byte range holding its voxels in zarr's order.

The references are nothing but ``(offset, length)`` per chunk, so an off-by-one here returns wrong voxels with
no error anywhere else.  The brute force numbers every voxel by its position in the file (NIfTI order: x
fastest, then y, z, t, c), lays those numbers out as the zarr array ([t, c,] z, y, x), and checks that each
chunk reads a run of consecutive positions starting where ``chunk_table`` says.
"""

from __future__ import annotations

import contextlib
import math
import signal
from typing import Iterator

import numpy as np
import pytest

from virtnii.errors import UnsupportedNifti
from virtnii.layout import (FILE_AXES, MAX_CHUNK_BYTES, MAX_CHUNKS, TARGET_CHUNK_BYTES, best_divisor, plan,
                            zarr_ndim)

#: (NIfTI shape, itemsize, target, limit): ranks 1–5, t and c both > 1, primes, rows bigger than the limit.
CASES = [
    ((7,), 2, 8, 64),
    ((11, 7), 4, 40, 200),
    ((6, 5, 4), 2, 30, 100),
    ((6, 5, 127), 2, 200, 1000),
    ((3, 2, 127), 8, 10**6, 10**7),
    ((5, 4, 3, 6), 4, 200, 1000),
    ((5, 4, 3, 6), 1, 1000, 4000),
    ((5, 4, 3, 3, 2), 2, 100, 1000),
    ((5, 4, 3, 3, 2), 2, 10**6, 10**7),
    ((5, 4, 3, 1, 3), 2, 10**6, 10**7),
    ((5, 4, 3, 2, 1), 4, 10**6, 10**7),
    ((4, 3, 2, 5, 7), 3, 50, 150),
    ((97, 3, 2), 8, 8, 16),  # one row (776 B) is over the limit: rows stay whole
    ((8, 9, 10, 11), 2, 2000, 20000),
]


def _brute_force_file_positions(file_shape: tuple[int, ...], file_axes: tuple[int, ...]) -> np.ndarray:
    """The zarr-ordered array whose values are each voxel's element index in the file."""
    positions = np.arange(math.prod(file_shape), dtype=np.int64).reshape(file_shape, order="F")
    dropped = tuple(a for a in range(5) if a not in file_axes)  # axes a rank-3/4 array does not keep
    return positions.squeeze(axis=dropped).transpose(
        [sorted(file_axes).index(a) for a in file_axes])


@pytest.mark.parametrize("shape, itemsize, target, limit", CASES)
def test_every_chunk_is_one_byte_range_in_zarr_order(shape: tuple[int, ...], itemsize: int, target: int,
                                                      limit: int) -> None:
    layout = plan(shape, itemsize, 352, target=target, limit=limit)
    positions = _brute_force_file_positions(layout.file_shape, layout.file_axes)
    assert positions.shape == layout.shape
    indices, offsets = layout.chunk_table()
    assert len(indices) == len(offsets) == math.prod(layout.chunk_grid())
    per_chunk = math.prod(layout.chunks)
    assert layout.chunk_nbytes == per_chunk * itemsize
    for index, offset in zip(indices.tolist(), offsets.tolist()):
        block = positions[tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, layout.chunks))]
        assert block.shape == layout.chunks  # full-sized: references cannot describe partial chunks
        start = int(block.flat[0])
        np.testing.assert_array_equal(block.ravel(), np.arange(start, start + per_chunk))
        assert offset == 352 + start * itemsize


@pytest.mark.parametrize("shape, itemsize, target, limit", CASES)
def test_chunks_tile_the_data_block_once(shape: tuple[int, ...], itemsize: int, target: int, limit: int) -> None:
    """Indices are row-major over the grid; the byte ranges cover the data block with no gap or overlap."""
    layout = plan(shape, itemsize, 1000, target=target, limit=limit)
    indices, offsets = layout.chunk_table()
    assert np.array_equal(indices, np.array(np.unravel_index(np.arange(len(indices)), layout.chunk_grid())).T)
    np.testing.assert_array_equal(np.diff(np.sort(offsets)), layout.chunk_nbytes)
    assert offsets.min() == 1000 and offsets.max() + layout.chunk_nbytes == 1000 + layout.nbytes
    if layout.file_shape[3] == 1 or layout.file_shape[4] == 1:  # then grid order is also file order
        assert np.all(np.diff(offsets) > 0)


@pytest.mark.parametrize("shape, itemsize, target, limit", CASES)
def test_plan_respects_size_and_axis_rules(shape: tuple[int, ...], itemsize: int, target: int, limit: int) -> None:
    layout = plan(shape, itemsize, 0, target=target, limit=limit)
    file_shape, file_chunks = layout.file_shape, layout.file_chunks
    assert all(s % c == 0 for s, c in zip(file_shape, file_chunks))
    assert file_chunks[0] == file_shape[0]  # rows are always whole
    row = file_shape[0] * itemsize
    assert layout.chunk_nbytes <= max(limit, row)
    split = [a for a in range(5) if file_chunks[a] < file_shape[a]]
    if split:  # once an axis is split, every slower axis has chunk 1 (else a chunk is not one byte range)
        assert all(file_chunks[a] == 1 for a in range(split[0] + 1, 5))
    if file_shape[3] > 1:  # never several channels of a time series: file and zarr order t, c differently
        assert file_chunks[4] == 1


@pytest.mark.parametrize("shape, expected_axes, expected_shape", [
    ((7,), ("z", "y", "x"), (1, 1, 7)),
    ((11, 7), ("z", "y", "x"), (1, 7, 11)),
    ((6, 5, 4), ("z", "y", "x"), (4, 5, 6)),
    ((6, 5, 4, 3), ("t", "z", "y", "x"), (3, 4, 5, 6)),
    ((6, 5, 4, 3, 2), ("t", "c", "z", "y", "x"), (3, 2, 4, 5, 6)),
    ((6, 5, 4, 1, 2), ("t", "c", "z", "y", "x"), (1, 2, 4, 5, 6)),
    ((6, 5, 4, 1, 1, 1, 1), ("t", "c", "z", "y", "x"), (1, 1, 4, 5, 6)),
])
def test_axes_and_shape_follow_nifti_zarr(shape: tuple[int, ...], expected_axes: tuple[str, ...],
                                          expected_shape: tuple[int, ...]) -> None:
    layout = plan(shape, 2, 352)
    assert layout.axes == expected_axes
    assert layout.shape == expected_shape
    assert layout.ndim == zarr_ndim(shape) == len(expected_axes)
    assert [FILE_AXES[a] for a in layout.file_axes] == list(expected_axes)


@pytest.mark.parametrize("shape, itemsize, chunks", [
    ((256, 256, 170), 2, (34, 256, 256)),            # T1w: whole-slice slabs of ~4 MiB (34 divides 170)
    ((64, 64, 36, 200), 2, (20, 36, 64, 64)),        # fMRI: several whole volumes per chunk
    ((8192, 8192), 4, (1, 128, 8192)),               # a huge single slice: bands of whole rows
    ((91, 109, 91, 1, 3), 4, (1, 1, 91, 109, 91)),   # vectors in c: one volume per chunk
    ((64, 64, 36, 3, 2), 2, (3, 1, 36, 64, 64)),     # t and c: never several channels at once
])
def test_default_plan_typical_images(shape: tuple[int, ...], itemsize: int, chunks: tuple[int, ...]) -> None:
    layout = plan(shape, itemsize, 352)
    assert layout.chunks == chunks
    assert layout.chunk_nbytes <= MAX_CHUNK_BYTES


def _brute_force_best_divisor(n: int, unit: int, target: int, limit: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    fitting = [d for d in divisors if d * unit <= limit] or [1]
    return min(fitting, key=lambda d: (abs(math.log2(d * unit / target)), d))


@pytest.mark.parametrize("n", [1, 2, 7, 12, 97, 127, 128, 170, 200, 360, 1000, 1024, 4096, 9973])
@pytest.mark.parametrize("unit", [1, 3, 1000, 2**17, 2**25])
def test_best_divisor_matches_brute_force(n: int, unit: int) -> None:
    chosen = best_divisor(n, unit, TARGET_CHUNK_BYTES, MAX_CHUNK_BYTES)
    assert n % chosen == 0
    assert chosen == _brute_force_best_divisor(n, unit, TARGET_CHUNK_BYTES, MAX_CHUNK_BYTES)


def test_best_divisor_falls_back_to_one_when_a_unit_is_over_the_limit() -> None:
    assert best_divisor(10, unit_bytes=100, target=10, limit=50) == 1


def test_best_divisor_prime_is_all_or_one() -> None:
    assert best_divisor(127, unit_bytes=1, target=100, limit=1000) == 127
    assert best_divisor(127, unit_bytes=1, target=10, limit=1000) == 1


class _Hung(Exception):
    """Raised by :func:`_hang_guard` when the guarded code is still running."""


@contextlib.contextmanager
def _hang_guard(seconds: int = 20) -> Iterator[None]:
    """Fail, instead of hanging the suite, if the block runs far longer than it ever should (not a timing test:
    the bound is orders of magnitude above the expected milliseconds)."""
    def expire(signum: int, frame: object) -> None:
        raise _Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("n", [2**62, 2**61 - 1, 2**40 * 3])  # a power of two, a Mersenne prime, a mix
def test_best_divisor_search_is_bounded_for_huge_dims(n: int) -> None:
    """A NIfTI-2 dim of 2**62 once meant 2**31 trial divisions: only divisors that can fit the limit are tried."""
    with _hang_guard():
        for unit in (1, 2, 1000, 2**30):
            k = best_divisor(n, unit, TARGET_CHUNK_BYTES, MAX_CHUNK_BYTES)
            assert n % k == 0 and (k == 1 or k * unit <= MAX_CHUNK_BYTES)


def test_plan_refuses_more_than_max_chunks_before_building_a_chunk_table() -> None:
    """3 x 5,000,011 float32 (y prime): 12-byte rows no divisor can group, so 5 million chunks; refused."""
    with pytest.raises(UnsupportedNifti, match=f"s3://b/x.nii: .*5000011 chunks.*at most {MAX_CHUNKS}"):
        plan((3, 5_000_011), 4, 352, source="s3://b/x.nii")
    assert math.prod(plan((3, 2**20), 4, 352).chunk_grid()) <= MAX_CHUNKS  # a divisible one of that size is fine


def test_plan_refuses_data_past_64_bit_offsets() -> None:
    with pytest.raises(UnsupportedNifti, match="64-bit"):
        plan((2**40, 2**20, 8), 1, 544, source="x.nii")
