"""2x downsampling against independent computations on whole volumes.

The references below work block by block over the *real* voxels of each 2x2x2 block (no edge repeating, exact
Python arithmetic for integers, ``collections.Counter`` for modes, weight matrices for the Gaussian), so they
share no code and no trick with the plane-streaming implementation they check.
"""

from __future__ import annotations

import collections
import fractions
import functools
import itertools
import operator
import warnings

import numpy as np
import pytest

from virtnii.pyramid.downsample import METHODS, halved, plane_stream


def stream(volume: np.ndarray, method: str) -> np.ndarray:
    """The implementation under test, fed one z-plane at a time, as the builder feeds it."""
    out: dict[int, np.ndarray] = {}
    feed = plane_stream(method, volume.dtype, volume.shape[0], lambda j, plane: out.__setitem__(j, plane))
    for i, plane in enumerate(volume):
        feed(i, plane)
    assert sorted(out) == list(range(halved(volume.shape[:1])[0]))
    return np.stack([out[j] for j in sorted(out)])


def blocks(volume: np.ndarray):
    """``(output index, the real voxels of its block)`` for every output voxel."""
    shape = halved(volume.shape[:3])
    for index in itertools.product(*map(range, shape)):
        parts = tuple(slice(2 * i, 2 * i + 2) if n > 1 else slice(0, 1) for i, n in zip(index, volume.shape))
        yield index, volume[parts].reshape(-1, *volume.shape[3:])


def _block_view(volume: np.ndarray, fill: object) -> np.ndarray:
    """The volume padded with ``fill`` (never an edge copy) to whole 2x2x2 blocks, as (z, y, x, 8, ...)."""
    pad = [(0, n % 2 if n > 1 else 0) for n in volume.shape[:3]] + [(0, 0)] * (volume.ndim - 3)
    padded = np.pad(volume, pad, constant_values=fill)
    if padded.dtype == object:  # np.pad's fill is a numpy scalar, which overflows when added to big ints
        padded = np.frompyfunc(int, 1, 1)(padded)
    shape = []
    for n in padded.shape[:3]:
        shape += [n // 2, 2] if n > 1 else [1, 1]
    blocked = padded.reshape(tuple(shape) + padded.shape[3:])
    return np.moveaxis(blocked, (1, 3, 5), (3, 4, 5)).reshape(blocked.shape[0], blocked.shape[2], blocked.shape[4],
                                                              -1, *padded.shape[3:])


def reference_mean(volume: np.ndarray) -> np.ndarray:
    """Mean over the real voxels of each block: padding marks absent voxels, it is never averaged in."""
    present = _block_view(np.ones(volume.shape, bool), False)
    if volume.dtype.kind in "iu" and volume.dtype.itemsize == 8:  # exact: Python integers and fractions
        values = _block_view(volume.astype(object), 0)
        sums = functools.reduce(operator.add, [values[:, :, :, i] for i in range(values.shape[3])])  # Python ints
        counts = present.sum(axis=3)
        return np.vectorize(lambda s, n: round(fractions.Fraction(int(s), int(n))), otypes=[object])(
            sums, counts).astype(volume.dtype)
    if volume.dtype.kind in "iu":  # sums exact in int64; dividing by 1, 2, 4 or 8 is exact in float64
        sums = _block_view(volume.astype(np.int64), 0).sum(axis=3)
        return np.rint(sums / present.sum(axis=3)).astype(volume.dtype)
    if volume.dtype.kind == "c":  # part by part: complex arithmetic turns inf * 1 into NaN
        out = np.empty(halved(volume.shape), volume.dtype)
        missing = np.isnan(volume)
        out.real = reference_mean(np.where(missing, np.nan, volume.real))
        out.imag = reference_mean(np.where(missing, np.nan, volume.imag))
        return out
    values = _block_view(volume.astype(np.float64), np.nan)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks: NaN, as intended
        return np.nanmean(values, axis=3).astype(volume.dtype)


def reference_mode(volume: np.ndarray) -> np.ndarray:
    out = np.zeros(halved(volume.shape), volume.dtype)
    for index, values in blocks(volume):
        numbers = [v for v in values.tolist() if v == v]
        if not numbers:
            out[index] = np.nan
            continue
        counts = collections.Counter(numbers)
        best = max(counts.values())
        out[index] = min(v for v, c in counts.items() if c == best)
    return out


def gaussian_matrix(n: int) -> np.ndarray:
    """Weights of the [1,3,3,1]/8 stride-2 filter along an axis of ``n``, edge taps folded onto the edge."""
    if n == 1:
        return np.ones((1, 1))
    m = (n + 1) // 2
    matrix = np.zeros((m, n))
    for j in range(m):
        for offset, weight in zip((-1, 0, 1, 2), (1, 3, 3, 1)):
            matrix[j, min(max(2 * j + offset, 0), n - 1)] += weight / 8
    return matrix


def reference_gaussian(volume: np.ndarray) -> np.ndarray:
    mz, my, mx = (gaussian_matrix(n) for n in volume.shape)
    values = volume.astype(np.float64)
    valid = ~np.isnan(values)
    total = np.einsum("az,by,cx,zyx->abc", mz, my, mx, np.where(valid, values, 0))
    weight = np.einsum("az,by,cx,zyx->abc", mz, my, mx, valid.astype(np.float64))
    with np.errstate(invalid="ignore"):
        out = total / weight
    if volume.dtype.kind in "iu":
        return np.rint(out).astype(volume.dtype)
    return out.astype(volume.dtype)


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float) -> None:
    """allclose part by part for complex (numpy's complex subtraction turns matching infinities into NaN)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if actual.dtype.kind == "c":
        assert_close(actual.real, expected.real, rtol)
        assert_close(actual.imag, expected.imag, rtol)
        return
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=0)


SHAPES = [(6, 8, 10), (7, 5, 9), (1, 5, 6), (5, 1, 1), (3, 4, 1)]
INTEGERS = ["u1", "i1", "i2", "u2", "i4", "u4"]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", INTEGERS + ["i8", "u8"])
def test_integer_mean_rounds_half_to_even_exactly_and_never_overflows(shape, dtype) -> None:
    rng = np.random.default_rng(1)
    info = np.iinfo(dtype)
    volume = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    volume.flat[:8] = info.max  # full blocks at the extreme: a sum that overflows the type (and int64 for 64-bit)
    np.testing.assert_array_equal(stream(volume, "mean"), reference_mean(volume))


def test_half_way_means_round_to_even() -> None:
    volume = np.array([[[0, 1]], [[0, 1]]], dtype=np.int16)  # mean 0.5 → 0
    assert stream(volume, "mean").item() == 0
    volume = np.array([[[1, 2]], [[1, 2]]], dtype=np.int16)  # mean 1.5 → 2
    assert stream(volume, "mean").item() == 2
    volume = np.array([[[-3, -2]], [[-3, -2]]], dtype=np.int16)  # mean -2.5 → -2
    assert stream(volume, "mean").item() == -2


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["f4", "f8", "c8", "c16"])
def test_float_mean_leaves_nan_out(shape, dtype) -> None:
    rng = np.random.default_rng(2)
    volume = (rng.standard_normal(shape) * 100).astype(dtype)
    if np.dtype(dtype).kind == "c":
        volume = volume + 1j * rng.standard_normal(shape).astype(dtype)
    volume.flat[::3] = np.nan
    volume[:2, :2, :2] = np.nan  # one block of NaN only
    volume[-1, -1, -1] = complex(np.inf, 1.0) if np.dtype(dtype).kind == "c" else np.inf
    got, expected = stream(volume, "mean"), reference_mean(volume)
    assert_close(got, expected, rtol=1e-6 if dtype in ("f4", "c8") else 1e-12)
    assert np.isnan(got.flat[0]) and not np.isnan(got).all()
    assert np.isinf(got[-1, -1, -1].real)  # infinite in, infinite out (complex: the other part stays finite)
    if np.dtype(dtype).kind == "c":
        assert np.isfinite(got[-1, -1, -1].imag) and np.nanmax(np.abs(got.imag)) > 0  # the imaginary part is kept


@pytest.mark.parametrize("shape", SHAPES + [(9, 11, 13)])
@pytest.mark.parametrize("dtype", ["u1", "i2", "i4", "f4", "f8"])
def test_gaussian_equals_weight_matrices(shape, dtype) -> None:
    rng = np.random.default_rng(3)
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        volume = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    else:
        volume = (rng.standard_normal(shape) * 100).astype(dtype)
        volume.flat[::5] = np.nan
    got, expected = stream(volume, "gaussian"), reference_gaussian(volume)
    if np.dtype(dtype).kind in "iu":
        # the reference divides in float64, the implementation in integers: a tie may round either way only
        # where float64 cannot tell; none at these magnitudes
        np.testing.assert_array_equal(got, expected)
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-5 if dtype == "f4" else 1e-12)


@pytest.mark.parametrize("shape", SHAPES + [(9, 11, 13)])
@pytest.mark.parametrize("dtype", ["u1", "i2", "u4", "f4"])
def test_mode_picks_the_most_frequent_value_of_each_block(shape, dtype) -> None:
    rng = np.random.default_rng(4)
    volume = rng.integers(0, 4, size=shape).astype(dtype)  # few labels: real ties and majorities
    if np.dtype(dtype).kind == "f":
        volume.flat[::4] = np.nan
    got = stream(volume, "mode")
    np.testing.assert_array_equal(got, reference_mode(volume))


def test_mode_never_invents_a_label() -> None:
    rng = np.random.default_rng(5)
    labels = np.array([0, 2, 17, 1002, 65535], dtype=np.uint16)
    volume = labels[rng.integers(0, len(labels), size=(15, 14, 13))]
    got = stream(volume, "mode")
    assert set(np.unique(got)) <= set(labels.tolist())
    mean = stream(volume, "mean")
    assert not set(np.unique(mean)) <= set(labels.tolist())  # the check above can fail


@pytest.mark.parametrize("method", METHODS)
def test_rgb_is_downsampled_channel_by_channel(method) -> None:
    rgb = np.dtype([("r", "u1"), ("g", "u1"), ("b", "u1")])
    rng = np.random.default_rng(6)
    channels = rng.integers(0, 256, size=(5, 6, 7, 3), dtype=np.uint8)
    volume = np.ascontiguousarray(channels).view(rgb).reshape(5, 6, 7)
    got = stream(volume, method)
    assert got.dtype == rgb
    for c, field in enumerate("rgb"):
        single = np.ascontiguousarray(channels[..., c])
        np.testing.assert_array_equal(got[field], stream(single, method))


def test_plane_stream_holds_only_the_planes_it_still_needs() -> None:
    """Streaming is bounded: at most four input planes are alive at once, whatever the depth."""
    alive: set[int] = set()
    peak = [0]

    class Plane(np.ndarray):
        def __del__(self) -> None:
            alive.discard(id(self))

    feed = plane_stream("gaussian", np.dtype("f4"), 64, lambda j, plane: None)
    for i in range(64):
        plane = np.zeros((4, 4), "f4").view(Plane)
        alive.add(id(plane))
        feed(i, plane)
        del plane
        peak[0] = max(peak[0], len(alive))
    assert peak[0] <= 4
