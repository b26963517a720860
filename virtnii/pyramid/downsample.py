"""2x downsampling of one volume, a z-plane at a time: pure numpy, no I/O.

Every spatial axis longer than one voxel is halved, rounding up: an odd axis's last output voxel comes from a
partial block (its one remaining input voxel), never dropped.  Partial blocks are made whole by repeating the
edge voxel, which leaves every rule below exact: each real voxel of the block then counts equally.

Methods (the rules users can rely on; ``docs/pyramid.md`` repeats them):

``mean``
    The mean of each 2x2x2 block.  Integers round half to even (exactly, in integer arithmetic, for every
    width up to 64 bits: no overflow, no truncation); floats are averaged in float64 (complex128) and cast
    back (complex part by part, so that an infinite part stays infinite).  NaN voxels (a complex one with
    a NaN part) are left out of the mean; a block of NaN only gives NaN.
``gaussian``
    A separable binomial filter ``[1, 3, 3, 1] / 8`` (a Gaussian of sigma ~0.87 input voxels) centred on each
    2x2x2 block, edges repeated: it suppresses the aliasing a plain mean leaves.  Same rounding and NaN rules
    as ``mean`` (NaN weights are left out and the rest renormalised); 64-bit integers are filtered in
    float64, so values beyond 2**53 keep only float64's precision.
``mode``
    The most frequent value of each 2x2x2 block, ties going to the smallest value (NaN never wins over a
    number): for label images, where an average would invent labels.  Every output value is a value of its
    block.

RGB(A) images are downsampled channel by channel as uint8.  The caller feeds native-byte-order arrays.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

METHODS = ("mean", "gaussian", "mode")
#: NIfTI intents of label images (NIFTI_INTENT_LABEL 1002, NIFTI_INTENT_NEURONAME 1003), by their JNIfTI
#: names: downsampled with ``mode`` unless a method is asked for.
LABEL_INTENTS = frozenset({"label", "neuronames"})
#: Taps and weights along one halved axis, per method: output j reads inputs ``2j + offset`` (edges repeated).
_TAPS = {"mean": ((0, 1), (1, 1)), "mode": ((0, 1), (1, 1)), "gaussian": ((-1, 0, 1, 2), (1, 3, 3, 1))}


def halved(shape: Sequence[int]) -> tuple[int, ...]:
    """The next level's spatial shape: every axis longer than 1 halved, rounding up."""
    return tuple((n + 1) // 2 if n > 1 else 1 for n in shape)


def factors(shape: Sequence[int]) -> tuple[int, ...]:
    """This step's factor along each spatial axis: 2 where the axis is halved, 1 where it is already 1."""
    return tuple(2 if n > 1 else 1 for n in shape)


def plane_sources(method: str, n_in: int, j: int) -> list[int]:
    """Indices of the input z-planes output plane ``j`` reads (edges repeated), in tap order."""
    if n_in == 1:
        return [0]
    offsets, _ = _TAPS[method]
    return [min(max(2 * j + o, 0), n_in - 1) for o in offsets]


def first_needed(method: str, n_in: int, j: int) -> int:
    """The lowest input plane output plane ``j`` (and every later one) still needs."""
    return min(plane_sources(method, n_in, j))


class PlaneReducer:
    """Makes one output z-plane from its input planes (:func:`plane_sources`) for one dtype and method.

    ``reduce(planes)`` takes native-order arrays of shape ``(ny, nx)`` (structured RGB included) and returns
    the output plane, shape ``halved((ny, nx))``, in the input dtype.
    """

    def __init__(self, method: str, dtype: np.dtype, n_in_z: int) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: one of {', '.join(METHODS)}")
        self.method = method
        self.dtype = np.dtype(dtype)
        self.z_weights = (1,) if n_in_z == 1 else _TAPS[method][1]
        self._channels = len(self.dtype.names) if self.dtype.names else 0
        self._value = np.dtype(np.uint8) if self._channels else self.dtype

    def reduce(self, planes: Sequence[np.ndarray]) -> np.ndarray:
        values = [self._values(p) for p in planes]
        if self.method == "mode":
            out = _mode(values)
        elif self._value.kind in "iu":
            out = _linear_int(values, self.z_weights, self.method, self._value)
        else:
            out = _linear_float(values, self.z_weights, self.method, self._value)
        if self._channels:
            return np.ascontiguousarray(out).view(self.dtype).reshape(out.shape[:2])
        return out

    def _values(self, plane: np.ndarray) -> np.ndarray:
        """RGB as a trailing uint8 channel axis; everything else as it is."""
        if self._channels:
            return np.ascontiguousarray(plane).view(np.uint8).reshape(plane.shape + (self._channels,))
        return plane


def _axis_taps(x: np.ndarray, axis: int, method: str) -> list[tuple[int, np.ndarray]]:
    """``(weight, view)`` pairs along ``axis`` whose weighted sum halves it; the axis kept when of length 1."""
    n = x.shape[axis]
    if n == 1:
        return [(1, x)]
    offsets, weights = _TAPS[method]
    m = (n + 1) // 2
    before = -min(offsets)
    after = 2 * (m - 1) + max(offsets) - (n - 1)
    if before or after:
        pad = [(0, 0)] * x.ndim
        pad[axis] = (before, after)
        x = np.pad(x, pad, mode="edge")
    taps = []
    for o, w in zip(offsets, weights):
        index = [slice(None)] * x.ndim
        index[axis] = slice(o + before, o + before + 2 * m - 1, 2)
        taps.append((w, x[tuple(index)]))
    return taps


def _spatial(x: np.ndarray, method: str) -> Iterator[tuple[int, np.ndarray]]:
    """Every ``(weight, view)`` of the y and x taps of one plane (weights multiplied)."""
    for wy, ty in _axis_taps(x, 0, method):
        for wx, txy in _axis_taps(ty, 1, method):
            yield wy * wx, txy


def _weighted_sum(planes: Sequence[np.ndarray], z_weights: Sequence[int], method: str,
                  acc: np.dtype) -> np.ndarray:
    """Σ w · x over the z, y and x taps, accumulated in ``acc``, not yet divided."""
    z = np.multiply(planes[0], z_weights[0], dtype=acc)
    for w, p in zip(z_weights[1:], planes[1:]):
        z += np.multiply(p, w, dtype=acc)
    total = None
    for w, view in _spatial(z, method):
        total = view * w if total is None else total + view * w
    return total


def _total_weight(z_weights: Sequence[int], method: str, shape: tuple[int, ...]) -> int:
    weight = sum(z_weights)
    for n in shape[:2]:
        weight *= 1 if n == 1 else sum(_TAPS[method][1])
    return weight


def _linear_int(planes: Sequence[np.ndarray], z_weights: Sequence[int], method: str,
                dtype: np.dtype) -> np.ndarray:
    """Weighted mean of integers, rounded half to even, exact in integer arithmetic: sums in int32 for 8- and
    16-bit data (at most 512 x 2**16), int64 up to 32 bits, and for 64-bit ``mean`` through quotient and
    remainder, so that sums never overflow."""
    weight = _total_weight(z_weights, method, planes[0].shape)
    if dtype.itemsize < 8:
        acc = np.dtype(np.int32 if dtype.itemsize <= 2 else np.int64)
        return _round_divide(_weighted_sum(planes, z_weights, method, acc), weight, dtype)
    if method == "gaussian":
        floats = _float_parts([p.astype(np.float64) for p in planes], [np.zeros(p.shape, bool) for p in planes],
                              z_weights, method)
        info = np.iinfo(dtype)
        return np.clip(np.rint(floats), info.min, info.max).astype(dtype)
    acc = np.dtype(np.uint64 if dtype.kind == "u" else np.int64)
    quotients = _weighted_sum([p // weight for p in planes], z_weights, method, acc)
    remainders = _weighted_sum([p % weight for p in planes], z_weights, method, acc)
    return _round_divide(remainders, weight, dtype, quotients)


def _round_divide(total: np.ndarray, weight: int, dtype: np.dtype, base: np.ndarray | int = 0) -> np.ndarray:
    """``base + total / weight`` rounded half to even, in integers (the parity is the whole quotient's).

    Every total weight is a power of two (2 or 8 per halved axis), so dividing is a shift.
    """
    shift = weight.bit_length() - 1
    assert weight == 1 << shift
    quotient = (total >> shift) + base
    if not shift:
        return quotient.astype(dtype)
    remainder = total & (weight - 1)
    half = weight >> 1
    up = (remainder > half) | ((remainder == half) & (quotient & 1).astype(bool))
    quotient += up
    return quotient.astype(dtype)


def _linear_float(planes: Sequence[np.ndarray], z_weights: Sequence[int], method: str,
                  dtype: np.dtype) -> np.ndarray:
    """Weighted mean of floats in double precision, NaN left out; complex part by part (a complex product with
    a weight would turn an infinite part's partner into NaN), a voxel with a NaN part left out whole."""
    missing = [np.isnan(p) for p in planes]
    if dtype.kind == "c":
        real = _float_parts([p.real for p in planes], missing, z_weights, method)
        imag = _float_parts([p.imag for p in planes], missing, z_weights, method)
        out = np.empty(real.shape, dtype)
        out.real, out.imag = real, imag
        return out
    return _float_parts(planes, missing, z_weights, method).astype(dtype)


def _float_parts(planes: Sequence[np.ndarray], missing: Sequence[np.ndarray], z_weights: Sequence[int],
                 method: str) -> np.ndarray:
    acc = np.dtype(np.float64)
    if not any(m.any() for m in missing):
        weight = _total_weight(z_weights, method, planes[0].shape)
        return _weighted_sum(planes, z_weights, method, acc) / weight
    zeros = [np.where(m, 0, p) for m, p in zip(missing, planes)]
    total = _weighted_sum(zeros, z_weights, method, acc)
    weights = _weighted_sum([~m for m in missing], z_weights, method, acc)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = total / weights
    out[weights == 0] = np.nan
    return out


def _mode(planes: Sequence[np.ndarray]) -> np.ndarray:
    """The most frequent value of each block (ties: the smallest), from every tap of every plane."""
    values = np.stack([view for p in planes for _, view in _spatial(p, "mode")])
    values.sort(axis=0)  # NaN last, each its own run: a number always beats it
    run = np.ones(values.shape[1:], dtype=np.int8)
    best = run.copy()
    choice = values[0].copy()
    for i in range(1, len(values)):
        same = values[i] == values[i - 1]
        run = np.where(same, run + 1, 1).astype(np.int8)
        longer = run > best
        best = np.where(longer, run, best)
        choice = np.where(longer, values[i], choice)
    return choice


def plane_stream(method: str, dtype: np.dtype, n_in: int,
                 emit: Callable[[int, np.ndarray], None]) -> Callable[[int, np.ndarray], None]:
    """A consumer of input planes ``0..n_in-1`` (in order) that calls ``emit(j, plane)`` for each output plane
    as soon as its inputs have arrived, keeping only the input planes later outputs still need."""
    reducer = PlaneReducer(method, dtype, n_in)
    n_out = halved((n_in,))[0]
    held: dict[int, np.ndarray] = {}
    next_out = [0]

    def feed(i: int, plane: np.ndarray) -> None:
        held[i] = plane
        while next_out[0] < n_out:
            j = next_out[0]
            wanted = plane_sources(method, n_in, j)
            if max(wanted) > i:
                return
            emit(j, reducer.reduce([held[k] for k in wanted]))
            next_out[0] = j + 1
            if j + 1 < n_out:
                keep = first_needed(method, n_in, j + 1)
                for k in [k for k in held if k < keep]:
                    del held[k]

    return feed
