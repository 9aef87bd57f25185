import logging

import numpy as np
import pytest

from realsyn import runtime
from realsyn.clustering import (
    CentroidIndex,
    ReservoirSample,
    allocate_fine,
    assign,
    bank_part_bounds,
    cluster_order,
    fit_centroids,
    normalize_rows_inplace,
    sample_capacity,
    train_kmeans,
    train_kmeans_two_level,
)


def _stream(n: int, dim: int = 2) -> np.ndarray:
    """Row i is (i, i, ...), so a sampled row tells which stream position it came from."""
    return np.repeat(np.arange(n, dtype=np.float32)[:, None], dim, axis=1)


def _blobs(n_blobs: int, per_blob: int, dim: int, seed: int, noise: float = 0.02):
    rng = np.random.default_rng(seed)
    centers = np.eye(dim, dtype=np.float32)[:n_blobs]
    points = np.repeat(centers, per_blob, axis=0) + noise * rng.standard_normal((n_blobs * per_blob, dim)).astype(np.float32)
    return centers, points.astype(np.float32)


# ----------------------------------------------------------------------------- ReservoirSample
def test_reservoir_keeps_every_row_until_full():
    res = ReservoirSample(capacity=10, dim=2, seed=0)
    res.add(_stream(4))
    res.add(_stream(7)[4:])
    assert len(res) == 7 and res.seen == 7
    np.testing.assert_array_equal(res.array(), _stream(7))


@pytest.mark.parametrize("batch_size", [1, 7, 50, 500])
def test_reservoir_sample_is_a_subset_of_distinct_stream_rows(batch_size):
    data = _stream(500)
    res = ReservoirSample(capacity=40, dim=2, seed=3)
    for start in range(0, 500, batch_size):
        res.add(data[start : start + batch_size])
    rows = res.array()[:, 0].astype(int)
    assert res.seen == 500 and rows.shape == (40,)
    assert len(set(rows)) == 40 and rows.min() >= 0 and rows.max() < 500


def test_reservoir_inclusion_is_uniform_over_the_stream():
    # Capacity 10 of 50 rows: every row is sampled with probability 0.2, early or late alike.
    n_runs, hits = 400, np.zeros(50)
    for seed in range(n_runs):
        res = ReservoirSample(capacity=10, dim=2, seed=seed)
        for start in range(0, 50, 8):  # batches that straddle the fill boundary
            res.add(_stream(50)[start : start + 8])
        hits[res.array()[:, 0].astype(int)] += 1
    freq = hits / n_runs
    assert np.abs(freq - 0.2).max() < 0.09
    assert abs(freq[:25].mean() - freq[25:].mean()) < 0.03


def test_reservoir_is_deterministic_for_a_seed():
    def run(seed):
        res = ReservoirSample(capacity=5, dim=2, seed=seed)
        res.add(_stream(100))
        return res.array()

    np.testing.assert_array_equal(run(1), run(1))
    assert not np.array_equal(run(1), run(2))


def test_reservoir_skips_and_counts_non_finite_rows():
    res = ReservoirSample(capacity=10, dim=2, seed=0)
    batch = _stream(5)
    batch[1, 0] = np.nan
    batch[3, 1] = np.inf
    res.add(batch)
    assert res.skipped_nonfinite == 2 and res.seen == 3
    np.testing.assert_array_equal(res.array()[:, 0], [0, 2, 4])
    with pytest.raises(ValueError):
        res.add(np.zeros((3, 5), dtype=np.float32))


def test_reservoir_buffer_is_preallocated_once_and_array_is_a_view():
    res = ReservoirSample(capacity=8, dim=3, seed=0)
    buffer = res._rows
    assert buffer.shape == (8, 3) and res.nbytes == 8 * 3 * 4 and len(res) == 0
    for start in range(0, 100, 7):
        res.add(_stream(100, 3)[start : start + 7])
        assert res._rows is buffer  # filled and replaced in place, never regrown or copied
    rows = res.array()
    assert rows.shape == (8, 3) and np.shares_memory(rows, buffer) and rows.flags.c_contiguous
    partial = ReservoirSample(capacity=8, dim=3, seed=0)
    partial.add(_stream(3, 3))
    assert partial.array().shape == (3, 3) and np.shares_memory(partial.array(), partial._rows)


def test_sample_capacity_is_the_smallest_of_budget_faiss_cap_and_rows():
    assert sample_capacity(n_rows=10_000, k=10, sample_rows=1_000_000, max_points_per_centroid=256) == 2_560
    assert sample_capacity(n_rows=10_000, k=100, sample_rows=3_000, max_points_per_centroid=256) == 3_000
    assert sample_capacity(n_rows=500, k=100, sample_rows=3_000, max_points_per_centroid=256) == 500
    assert sample_capacity(n_rows=0, k=1, sample_rows=3_000, max_points_per_centroid=256) == 1
    with pytest.raises(ValueError):
        sample_capacity(n_rows=10, k=1, sample_rows=0, max_points_per_centroid=256)


def test_normalize_rows_inplace_scales_rows_in_their_own_memory():
    x = np.array([[3, 4], [0, 0], [0, -2]], np.float32)
    out = normalize_rows_inplace(x)
    assert out is x
    np.testing.assert_allclose(x, [[0.6, 0.8], [0, 0], [0, -1]], rtol=1e-6)
    with pytest.raises(ValueError):
        normalize_rows_inplace(np.ones((2, 2), np.float64))
    with pytest.raises(ValueError):
        normalize_rows_inplace(np.ones((2, 4), np.float32)[:, ::2])


# ----------------------------------------------------------------------------- train_kmeans
def test_train_kmeans_finds_separated_blobs_with_unit_centroids():
    centers, points = _blobs(4, 40, dim=8, seed=0)
    cents = train_kmeans(points, k=4, niter=20, seed=0, use_gpu="never")
    assert cents.shape == (4, 8) and cents.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(cents, axis=1), 1.0, atol=1e-5)
    sim = cents @ centers.T
    # One-to-one match: each centroid is near exactly one blob centre.
    assert sorted(sim.argmax(axis=1).tolist()) == [0, 1, 2, 3]
    assert sim.max(axis=1).min() > 0.99


def test_train_kmeans_is_deterministic_for_a_seed():
    rng = np.random.default_rng(5)
    data = rng.standard_normal((300, 16)).astype(np.float32)
    a = train_kmeans(data, k=8, niter=10, seed=7, use_gpu="never")
    b = train_kmeans(data, k=8, niter=10, seed=7, use_gpu="never")
    c = train_kmeans(data, k=8, niter=10, seed=8, use_gpu="never")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_train_kmeans_clips_k_to_the_sample_size_with_a_warning(caplog):
    _, points = _blobs(5, 1, dim=8, seed=1)
    with caplog.at_level(logging.WARNING, logger="realsyn.clustering"):
        cents = train_kmeans(points, k=10, seed=0, use_gpu="never")
    assert cents.shape == (5, 8)
    assert "training 5 centroids" in caplog.text


def test_train_kmeans_euclidean_keeps_centroid_scale():
    _, points = _blobs(2, 30, dim=4, seed=2)
    cents = train_kmeans(3.0 * points, k=2, seed=0, spherical=False, use_gpu="never")
    np.testing.assert_allclose(np.sort(np.linalg.norm(cents, axis=1)), [3.0, 3.0], atol=0.05)


def test_train_kmeans_gpu_choice(monkeypatch):
    _, points = _blobs(2, 10, dim=4, seed=0)
    with pytest.raises(ValueError):
        train_kmeans(points, k=2, use_gpu="sometimes")
    monkeypatch.setattr(runtime, "faiss_gpu_count", lambda: 0)
    with pytest.raises(RuntimeError):
        train_kmeans(points, k=2, use_gpu="always")
    assert train_kmeans(points, k=2, use_gpu="auto").shape == (2, 4)  # falls back to the CPU
    with pytest.raises(ValueError):
        train_kmeans(np.zeros((0, 4), np.float32), k=2)


@pytest.mark.gpu
def test_train_kmeans_on_gpu_finds_blobs():
    centers, points = _blobs(4, 40, dim=8, seed=0)
    cents = train_kmeans(points, k=4, seed=0, use_gpu="always")
    assert sorted((cents @ centers.T).argmax(axis=1).tolist()) == [0, 1, 2, 3]


def test_train_kmeans_normalized_flag_skips_only_the_normalising_copy():
    rng = np.random.default_rng(4)
    data = rng.standard_normal((200, 8)).astype(np.float32)
    unit = normalize_rows_inplace(data.copy())
    np.testing.assert_array_equal(unit, runtime.l2_normalize(data))  # the same bits as the normalising copy
    np.testing.assert_array_equal(
        train_kmeans(unit, k=5, niter=8, seed=1, use_gpu="never", normalized=True),
        train_kmeans(data, k=5, niter=8, seed=1, use_gpu="never"),
    )


# ----------------------------------------------------------------------------- two-level
def test_allocate_fine_is_proportional_and_sums_to_k():
    np.testing.assert_array_equal(allocate_fine(np.array([5, 3, 2]), 4), [2, 1, 1])  # remainders 0, 2, 8 (of 10)
    np.testing.assert_array_equal(allocate_fine(np.array([1, 0, 9]), 10), [1, 0, 9])  # k = n: one centroid per row
    np.testing.assert_array_equal(allocate_fine(np.array([1, 1, 1]), 2), [1, 1, 0])  # ties go to the lower cell
    np.testing.assert_array_equal(allocate_fine(np.array([7]), 3), [3])
    rng = np.random.default_rng(0)
    for _ in range(50):
        sizes = rng.integers(0, 40, 12)
        k = int(rng.integers(1, sizes.sum() + 1))
        fine = allocate_fine(sizes, k)
        assert fine.sum() == k and (fine <= sizes).all() and (np.abs(fine - k * sizes / sizes.sum()) < 1).all()
    with pytest.raises(ValueError):
        allocate_fine(np.array([2, 1]), 4)


def test_two_level_with_one_coarse_cell_is_flat_kmeans():
    rng = np.random.default_rng(6)
    data = rng.standard_normal((400, 16)).astype(np.float32)
    flat = train_kmeans(data, k=12, niter=10, seed=3, use_gpu="never")
    two = train_kmeans_two_level(data, k=12, n_coarse=1, niter=10, seed=3, use_gpu="never")
    np.testing.assert_array_equal(two, flat)


def test_two_level_returns_exactly_k_unit_centroids_one_per_blob():
    # Two far groups (around e0 and e1) of two blobs each: the 2 coarse cells are the groups, each
    # holds 60 of 120 rows and so gets exactly 2 of the 4 fine centroids, one per blob.
    e = np.eye(8, dtype=np.float32)
    centers = runtime.l2_normalize(np.stack([e[0] + 0.5 * e[2], e[0] - 0.5 * e[2], e[1] + 0.5 * e[3], e[1] - 0.5 * e[3]]))
    points = (np.repeat(centers, 30, axis=0) + 0.02 * np.random.default_rng(0).standard_normal((120, 8))).astype(np.float32)
    cents = train_kmeans_two_level(points, k=4, n_coarse=2, niter=20, seed=0, use_gpu="never")
    assert cents.shape == (4, 8) and cents.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(cents, axis=1), 1.0, atol=1e-5)
    sim = cents @ centers.T
    assert sorted(sim.argmax(axis=1).tolist()) == [0, 1, 2, 3] and sim.max(axis=1).min() > 0.99
    # the centroids come grouped by coarse cell: the first two are one group's blobs
    assert sorted(sim.argmax(axis=1)[:2].tolist()) in ([0, 1], [2, 3])
    rng = np.random.default_rng(1)
    for k, n_coarse in [(37, 6), (50, 7), (300, 17)]:
        data = rng.standard_normal((300, 8)).astype(np.float32)
        cents = train_kmeans_two_level(data, k=k, n_coarse=n_coarse, niter=5, seed=0, use_gpu="never")
        assert cents.shape == (k, 8)
        np.testing.assert_allclose(np.linalg.norm(cents, axis=1), 1.0, atol=1e-5)


def test_fit_centroids_switches_to_two_level_above_the_threshold():
    rng = np.random.default_rng(2)
    data = normalize_rows_inplace(rng.standard_normal((500, 8)).astype(np.float32))
    flat, tree = fit_centroids(data, 20, two_level_above=20, niter=5, seed=0, use_gpu="never", normalized=True)
    assert tree is None
    np.testing.assert_array_equal(flat, train_kmeans(data, 20, niter=5, seed=0, use_gpu="never", normalized=True))
    two, tree = fit_centroids(data, 20, two_level_above=19, niter=5, seed=0, use_gpu="never", normalized=True)
    assert tree.coarse.shape == (4, 8) and two.shape == (20, 8)  # round(sqrt(20)) coarse cells
    np.testing.assert_array_equal(two, train_kmeans_two_level(data, 20, n_coarse=4, niter=5, seed=0, use_gpu="never", normalized=True))


# ----------------------------------------------------------------------------- assign
def test_every_row_is_assigned_to_its_brute_force_nearest_centroid():
    rng = np.random.default_rng(9)
    data = rng.standard_normal((2000, 16)).astype(np.float32)
    cents = train_kmeans_two_level(data, k=40, n_coarse=6, niter=5, seed=0, use_gpu="never")
    ids, scores = CentroidIndex(cents, use_gpu="never").search(data, 1)
    sims = data @ cents.T
    np.testing.assert_array_equal(ids[:, 0], sims.argmax(axis=1))
    np.testing.assert_allclose(scores[:, 0], sims.max(axis=1), rtol=1e-5, atol=1e-5)


def _two_scale_centroids(n_groups: int, per_group: int, dim: int, seed: int) -> np.ndarray:
    """Unit centroids in well-separated groups: group directions orthogonal, members close to theirs."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.eye(dim, dtype=np.float32)[:n_groups], per_group, axis=0)
    cents = groups + 0.1 * rng.standard_normal(groups.shape).astype(np.float32)
    return cents / np.linalg.norm(cents, axis=1, keepdims=True)


def test_cells_search_equals_the_exact_scan_on_well_separated_centroids():
    cents = _two_scale_centroids(16, 16, 32, seed=3)
    rng = np.random.default_rng(4)
    queries = cents[rng.integers(0, len(cents), 3000)] + 0.05 * rng.standard_normal((3000, 32)).astype(np.float32)
    exact = CentroidIndex(cents, use_gpu="never")
    cells = CentroidIndex(cents, exact_up_to=0, probe_cells=2, use_gpu="never")
    assert exact.mode == "exact" and cells.mode == "cells"
    assert len(cells.cell_centres) <= 16 and cells.cell_offsets[-1] == 256  # round(sqrt(256)) cells, every centroid in one
    assert sorted(cells.cell_order.tolist()) == list(range(256))
    for n in (1, 3):
        want_ids, want_scores = exact.search(queries, n)
        ids, scores = cells.search(queries, n)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    # more neighbours than the probed cells hold (here all 256): the rows fall back to the exact scan
    want_ids, _ = exact.search(queries[:50], 256)
    np.testing.assert_array_equal(cells.search(queries[:50], 256)[0], want_ids)
    # small batches take the same path batch by batch
    cells.cells_batch = 7
    np.testing.assert_array_equal(cells.search(queries[:100], 1)[0], exact.search(queries[:100], 1)[0])
    with pytest.raises(ValueError):
        CentroidIndex(cents, probe_cells=0)


def test_cells_search_breaks_ties_by_the_lower_centroid_id():
    cents = np.repeat(np.eye(4, dtype=np.float32), 5, axis=0)  # five copies of each axis: ties everywhere
    ids, scores = CentroidIndex(cents, exact_up_to=0, probe_cells=4, use_gpu="never").search(np.eye(4, dtype=np.float32), 3)
    np.testing.assert_array_equal(ids, [[0, 1, 2], [5, 6, 7], [10, 11, 12], [15, 16, 17]])
    np.testing.assert_array_equal(scores, np.ones((4, 3), np.float32))
    # the exact scan's one-neighbour path (argmax) keeps the same rule
    ids, _ = CentroidIndex(cents, use_gpu="never").search(np.eye(4, dtype=np.float32), 1)
    np.testing.assert_array_equal(ids[:, 0], [0, 5, 10, 15])


def test_assign_returns_nearest_centroids_best_first():
    centroids = np.eye(3, dtype=np.float32)
    emb = np.array([[0.1, 0.9, 0.3], [0.8, 0.0, 0.6], [0.0, 0.2, 1.0]], dtype=np.float32)
    ids, scores = assign(emb, centroids, n_probe=2)
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, [[1, 2], [0, 2], [2, 1]])
    np.testing.assert_allclose(scores, [[0.9, 0.3], [0.8, 0.6], [1.0, 0.2]], rtol=1e-6)
    ids, _ = assign(emb, centroids, n_probe=10)  # clipped to the number of centroids
    assert ids.shape == (3, 3)
    ids, scores = assign(np.zeros((0, 3), np.float32), centroids)
    assert ids.shape == (0, 1) and scores.shape == (0, 1)
    with pytest.raises(ValueError):
        assign(emb, np.eye(4, dtype=np.float32))


# ----------------------------------------------------------------------------- cluster_order
def test_cluster_order_is_a_stable_csr_layout():
    order, offsets = cluster_order(np.array([2, 0, 2, 1, 0]), k=4)
    np.testing.assert_array_equal(order, [1, 4, 3, 0, 2])
    np.testing.assert_array_equal(offsets, [0, 2, 3, 5, 5])
    assert order.dtype == np.int64 and offsets.dtype == np.int64
    order, offsets = cluster_order(np.array([], dtype=np.int64), k=2)
    assert len(order) == 0 and offsets.tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        cluster_order(np.array([0, 3]), k=3)
    with pytest.raises(ValueError):
        cluster_order(np.array([-1, 0]), k=3)


# ----------------------------------------------------------------------------- bank_part_bounds
def test_bank_part_bounds_cut_by_rows():
    sizes = np.array([3, 0, 2, 5, 1])
    np.testing.assert_array_equal(bank_part_bounds(sizes, 4), [0, 2, 3, 4, 5])  # cluster 3 (5 rows) stands alone
    np.testing.assert_array_equal(bank_part_bounds(sizes, 1), [0, 2, 3, 4, 5])  # empty cluster 1 joins cluster 0
    np.testing.assert_array_equal(bank_part_bounds(sizes, 6), [0, 3, 5])  # 3 + 0 + 2, then 5 + 1
    np.testing.assert_array_equal(bank_part_bounds(sizes, 10**9), [0, 5])
    np.testing.assert_array_equal(bank_part_bounds(np.array([0, 2]), 1), [0, 2])  # no empty part up front
    np.testing.assert_array_equal(bank_part_bounds(np.array([0, 0, 1, 0]), 1), [0, 4])
    np.testing.assert_array_equal(bank_part_bounds(np.zeros(3, np.int64), 5), [0, 3])
    with pytest.raises(ValueError):
        bank_part_bounds(sizes, 0)
