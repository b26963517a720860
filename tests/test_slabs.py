"""Read plans: whole chunks, about SLAB_BYTES each, volumes in NIfTI file order (c outer, t inner)."""

from __future__ import annotations

import numpy as np

from virtnii import slabs


def covered(shape, reads) -> np.ndarray:
    """How often each voxel is read by ``reads`` (each exactly once, or a plan is wrong)."""
    count = np.zeros(shape, np.int32)
    for read in reads:
        count[read.index] += 1
    return count


def test_a_big_volume_is_read_in_chunk_aligned_slabs_of_about_the_target() -> None:
    shape, chunks = (640, 140, 160), (2, 140, 160)
    reads = slabs.plan(shape, chunks, 2, target=4 * 140 * 160 * 2 * 10)  # 40 slices' worth
    assert [r.index[0] for r in reads][:2] == [slice(0, 40), slice(40, 80)]
    assert all((r.index[0].start % 2, r.index[0].stop % 2) == (0, 0) for r in reads)
    assert (covered(shape, reads) == 1).all()
    assert [p.z0 for r in reads for p in r.pieces] == list(range(0, 640, 40))


def test_a_chunk_bigger_than_the_target_is_still_read_whole() -> None:
    reads = slabs.plan((30, 50, 60), (5, 50, 60), 8, target=1)
    assert [r.index[0] for r in reads] == [slice(z, z + 5) for z in range(0, 30, 5)]


def test_small_frames_sharing_chunks_are_read_a_chunk_at_a_time() -> None:
    shape, chunks = (7, 3, 5, 6), (3, 3, 5, 6)  # t=7 frames, three per chunk
    reads = slabs.plan(shape, chunks, 4)
    assert [r.index for r in reads] == [(slice(0, 3),), (slice(3, 6),), (slice(6, 7),)]
    assert [p.volume for r in reads for p in r.pieces] == [(t,) for t in range(7)]
    assert (covered(shape, reads) == 1).all()


def test_five_dimensional_volumes_come_in_file_order() -> None:
    shape, chunks = (2, 3, 4, 5, 6), (1, 1, 4, 5, 6)  # t=2, c=3
    reads = slabs.plan(shape, chunks, 2)
    assert [p.volume for r in reads for p in r.pieces] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    assert (covered(shape, reads) == 1).all()


def test_stream_yields_every_piece_with_its_planes() -> None:
    data = np.arange(7 * 3 * 5 * 6, dtype=">i2").reshape(7, 3, 5, 6)
    reads = slabs.plan(data.shape, (3, 3, 5, 6), 2)
    got = {piece.volume: planes for piece, planes in slabs.stream(data, reads, np.dtype("<i2"))}
    assert sorted(got) == [(t,) for t in range(7)]
    for (t,), planes in got.items():
        assert planes.dtype == np.dtype("<i2") and planes.shape == (3, 5, 6)
        np.testing.assert_array_equal(planes, data[t])
