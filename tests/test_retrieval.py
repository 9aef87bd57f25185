from collections import Counter

import numpy as np
import pytest

from realsyn import retrieval
from realsyn.clustering import CentroidIndex, cluster_order, train_kmeans
from realsyn.retrieval import BankLayout, cluster_ordered_search, exact_search
from realsyn.runtime import l2_normalize


class Bank:
    """Sentences laid out cluster by cluster and cut into parts by cluster range (as sentence_clusters
    writes them); ``ids`` maps a global bank row back to the sentence row; counts part loads."""

    def __init__(self, sentence_emb: np.ndarray, centroids: np.ndarray, n_parts: int = 1):
        self.centroids = centroids
        k = len(centroids)
        self.cluster_of_sentence = CentroidIndex(centroids).search(sentence_emb, 1)[0][:, 0]
        order, offsets = cluster_order(self.cluster_of_sentence, k)
        self.ids, self.emb = order, sentence_emb[order]
        bounds = np.linspace(0, k, n_parts + 1).astype(np.int64)
        part = np.searchsorted(bounds, np.arange(k), side="right") - 1
        base = offsets[bounds[part]]
        self.layout = BankLayout(part, offsets[:-1] - base, offsets[1:] - base)
        self.parts = [self.emb[offsets[bounds[p]] : offsets[bounds[p + 1]]] for p in range(n_parts)]
        self.loads: Counter = Counter()

    def load(self, p: int) -> np.ndarray:
        self.loads[p] += 1
        return self.parts[p]

    def search(self, images, n_probe: int, k: int, **kw):
        res = cluster_ordered_search(images, self.centroids, self.layout, self.load, n_probe=n_probe, k=k, **kw)
        return np.where(res.row_ids >= 0, self.ids[np.clip(res.row_ids, 0, None)], -1), res.scores, res


def _random_unit(n: int, dim: int, seed: int) -> np.ndarray:
    return l2_normalize(np.random.default_rng(seed).standard_normal((n, dim)))


def _blob_data(seed: int = 0, n_blobs: int = 8, per_blob: int = 40, n_images: int = 60, dim: int = 16):
    rng = np.random.default_rng(seed)
    centers = l2_normalize(rng.standard_normal((n_blobs, dim)))
    sent = l2_normalize(np.repeat(centers, per_blob, axis=0) + 0.05 * rng.standard_normal((n_blobs * per_blob, dim)))
    which = rng.integers(0, n_blobs, n_images)
    img = l2_normalize(centers[which] + 0.05 * rng.standard_normal((n_images, dim)))
    return sent, img


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("n_parts", [1, 3])
def test_probing_every_cluster_equals_exact_search(k, n_parts):
    sent, img = _random_unit(400, 16, 0), _random_unit(50, 16, 1)
    bank = Bank(sent, train_kmeans(sent, 7, niter=10, seed=0, use_gpu="never"), n_parts)
    ids, scores, res = bank.search(img, n_probe=7, k=k)
    exact_ids, exact_scores = exact_search(img, sent, k)
    assert ids.shape == (50, k) and res.row_ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_allclose(scores, exact_scores, rtol=0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()
    # one pass over the bank: each part read once; every image meets every sentence exactly once
    assert dict(bank.loads) == {p: 1 for p in range(n_parts)}
    assert res.stats["distances"] == 50 * 400 and res.stats["pairs"] == 50 * 7 and res.stats["parts_loaded"] == n_parts


def test_one_probe_finds_exact_neighbours_on_separated_blobs():
    sent, img = _blob_data()
    bank = Bank(sent, train_kmeans(sent, 8, niter=20, seed=0, use_gpu="never"))
    ids, scores, res = bank.search(img, n_probe=1, k=3)
    exact_ids, exact_scores = exact_search(img, sent, 3)
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_allclose(scores, exact_scores, rtol=0, atol=1e-5)
    # each image scores the sentences of its one probed cluster only
    probed = CentroidIndex(bank.centroids).search(img, 1)[0][:, 0]
    assert res.stats["distances"] == int(np.bincount(bank.cluster_of_sentence, minlength=8)[probed].sum()) < 60 * 320 / 2


def test_one_probe_on_hard_data_stays_inside_probed_clusters():
    sent, img = _random_unit(600, 16, 2), _random_unit(80, 16, 3)
    bank = Bank(sent, train_kmeans(sent, 12, niter=10, seed=0, use_gpu="never"), n_parts=2)
    exact_ids, _ = exact_search(img, sent, 3)
    recalls = []
    for n_probe in (1, 2, 4):
        ids, _, res = bank.search(img, n_probe=n_probe, k=3)
        probed = CentroidIndex(bank.centroids).search(img, n_probe)[0]
        assert (ids >= 0).all()
        for row, probes in zip(ids, probed):
            assert set(bank.cluster_of_sentence[row].tolist()) <= set(probes.tolist())
        sizes = np.bincount(bank.cluster_of_sentence, minlength=12)
        assert res.stats["distances"] == int(sizes[probed].sum())
        recalls.append(_recall(ids, exact_ids))
    assert 0.3 < recalls[0] < recalls[1] < recalls[2] <= 1.0


def test_padding_for_small_and_empty_clusters():
    # cluster 0: rows 0, 1; cluster 1: empty; cluster 2: row 2 (global rows in bank order)
    centroids = np.eye(3, dtype=np.float32)
    bank = np.array([[1, 0, 0], [0.8, 0.6, 0], [0, 0, 1]], dtype=np.float32)
    layout = BankLayout([0, 0, 0], [0, 2, 2], [2, 2, 3])
    img = np.array([[1, 0, 0], [0, 1, 0], [0.6, 0.0, 0.8]], dtype=np.float32)
    res = cluster_ordered_search(img, centroids, layout, [bank].__getitem__, n_probe=1, k=3, threads=1)
    np.testing.assert_array_equal(res.row_ids, [[0, 1, -1], [-1, -1, -1], [2, -1, -1]])
    np.testing.assert_allclose(res.scores, [[1.0, 0.8, -np.inf], [-np.inf] * 3, [0.8, -np.inf, -np.inf]], rtol=1e-6)
    res = cluster_ordered_search(img, centroids, layout, [bank].__getitem__, n_probe=3, k=3, threads=1)
    np.testing.assert_array_equal(res.row_ids, [[0, 1, 2], [1, 0, 2], [2, 0, 1]])
    np.testing.assert_allclose(res.scores, [[1.0, 0.8, 0.0], [0.6, 0.0, 0.0], [0.8, 0.6, 0.48]], rtol=1e-6, atol=1e-7)


def test_ties_are_broken_by_row_id_at_the_top_k_boundary():
    # Eight identical sentences in one cluster, two in another: the three smallest row ids win, in order.
    bank = np.tile(np.array([[0.6, 0.8]], dtype=np.float32), (10, 1))
    layout = BankLayout([0, 0], [0, 8], [8, 10])
    centroids = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    img = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]], dtype=np.float32)
    res = cluster_ordered_search(img, centroids, layout, [bank].__getitem__, n_probe=2, k=3)
    np.testing.assert_array_equal(res.row_ids, [[0, 1, 2]] * 3)
    np.testing.assert_allclose(res.scores[:2], [[0.6] * 3, [0.8] * 3], rtol=1e-6)
    np.testing.assert_array_equal(exact_search(img, bank, 3)[0], [[0, 1, 2]] * 3)
    # the selection itself: ties at the k-th score resolved by row, NaN never kept, merged into what is kept
    from realsyn.scan_kernels import keep_block

    block = np.array([[0.5, 1.0], [0.9, np.nan], [0.9, 1.0], [0.9, 0.2], [0.1, 1.0], [0.9, 0.3]], np.float32)  # rows x pairs
    ids, scores = np.full((3, 3), -1, np.int64), np.full((3, 3), -np.inf, np.float32)
    ids[0], scores[0] = [7, -1, -1], [0.95, -np.inf, -np.inf]  # pair 0 holds a better row of an earlier block
    keep_block(block, 0, 10, ids, scores)
    np.testing.assert_array_equal(ids, [[7, 11, 12], [10, 12, 14], [-1, -1, -1]])
    np.testing.assert_allclose(scores[:2], [[0.95, 0.9, 0.9], [1.0] * 3])
    keep_block(block[:, 1:], 2, 0, ids, scores)  # pair 2 = column 1: NaN skipped, three 1.0s by row
    np.testing.assert_array_equal(ids[2], [0, 2, 4])


def test_exact_search_ranks_and_pads():
    sent = np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)
    ids, scores = exact_search(np.array([[0.0, 1.0]], np.float32), sent, 5)
    np.testing.assert_array_equal(ids, [[1, 2, 0, -1, -1]])
    np.testing.assert_allclose(scores[0, :3], [1.0, 0.8, 0.0], atol=1e-7)
    assert np.isneginf(scores[0, 3:]).all()


def test_non_finite_images_and_bank_rows_and_empty_input():
    sent, img = _blob_data(n_images=5)
    img[2, 0] = np.nan
    bank = Bank(sent, train_kmeans(sent, 8, niter=10, seed=0, use_gpu="never"))
    ids, scores, res = bank.search(img, n_probe=1, k=3)
    assert ids[2].tolist() == [-1, -1, -1] and np.isneginf(scores[2]).all()
    assert res.stats["images"] == 5 and res.stats["images_probing"] == 4
    good = [0, 1, 3, 4]
    np.testing.assert_array_equal(ids[good], exact_search(img[good], sent, 3)[0])
    # a NaN bank row is never retrieved; the others still are
    best = int(bank.search(img[:1], n_probe=1, k=1)[0][0, 0])
    row = int(np.flatnonzero(bank.ids == best)[0])
    bank.parts[0] = bank.parts[0].copy()
    bank.parts[0][row, 0] = np.nan
    ids, scores, _ = bank.search(img[:1], n_probe=1, k=3)
    assert best not in ids[0].tolist() and np.isfinite(scores).all()
    # nothing to search
    _, _, res = bank.search(np.zeros((0, 16), np.float32), n_probe=1, k=3)
    assert res.row_ids.shape == (0, 3) and res.scores.shape == (0, 3)
    with pytest.raises(ValueError, match="clusters"):
        cluster_ordered_search(img, bank.centroids[:5], bank.layout, bank.load)
    with pytest.raises(ValueError, match="bank part 0"):
        cluster_ordered_search(img[:2], bank.centroids, bank.layout, lambda p: np.zeros((3, 16), np.float32))


def test_result_does_not_depend_on_threads_image_order_or_chunking(monkeypatch):
    monkeypatch.setattr(retrieval, "MIN_RANGE_FLOPS", 1)  # small as it is, hand the work to the threads
    sent, img = _random_unit(3000, 32, 6), _random_unit(400, 32, 7)
    bank = Bank(sent, train_kmeans(sent, 20, niter=10, seed=0, use_gpu="never"), n_parts=3)
    ids, scores, _ = bank.search(img, n_probe=3, k=4, threads=1)
    for threads in (2, 3):
        got_ids, got_scores, _ = bank.search(img, n_probe=3, k=4, threads=threads)
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got_scores, scores)
    perm = np.random.default_rng(0).permutation(len(img))
    got_ids, got_scores, _ = bank.search(img[perm], n_probe=3, k=4, threads=2)
    np.testing.assert_array_equal(got_ids, ids[perm])
    np.testing.assert_allclose(got_scores, scores[perm], rtol=0, atol=1e-6)
    # tiny chunks: clusters cut by pairs, one block per piece
    monkeypatch.setattr(retrieval, "CHUNK_SCORES", 500)
    got_ids, got_scores, _ = bank.search(img, n_probe=3, k=4, threads=2)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got_scores, scores, rtol=0, atol=1e-6)


def test_image_budget_searches_parts_in_rounds_from_spilled_images(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the rounds spill
    sent, img = _random_unit(2000, 16, 8), _random_unit(300, 16, 9)
    bank = Bank(sent, train_kmeans(sent, 16, niter=10, seed=0, use_gpu="never"), n_parts=4)
    ids, scores, res = bank.search(img, n_probe=2, k=3)
    assert res.stats["rounds"] == 4  # held in memory: one part at a time
    calls = Counter()

    def batches():
        calls["read"] += 1
        for s in range(0, len(img), 70):  # shard-sized batches
            yield img[s : s + 70]

    # a budget of ~200 gathered image rows: one or two parts per round; images read twice in all
    # (assignment, then one pass spilling every round's vectors), whatever the number of rounds
    budget = 200 * 16 * 4
    got_ids, got_scores, res = bank.search(batches, n_probe=2, k=3, max_image_bytes=budget)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_scores, scores)
    assert 1 < res.stats["rounds"] <= 4 and calls["read"] == 2
    assert list(tmp_path.iterdir()) == []  # the spill is removed
    # a budget below one row: every part its own round, same result
    calls.clear()
    got_ids, got_scores, res = bank.search(batches, n_probe=2, k=3, max_image_bytes=1)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_scores, scores)
    assert res.stats["rounds"] == 4 and calls["read"] == 2
    assert dict(bank.loads) == {p: 3 for p in range(4)}  # once per search, whatever the rounds
    # without a budget, batches are read once and kept
    calls.clear()
    got_ids, _, _ = bank.search(batches, n_probe=2, k=3)
    np.testing.assert_array_equal(got_ids, ids)
    assert calls["read"] == 1


@pytest.mark.parametrize("k", [1, 3, 5])
def test_compiled_scan_and_products_agree_and_mix_in_one_part(k, monkeypatch):
    # 40 clusters, some probed by 1-4 images (the compiled scan), some by many (sgemm), one part
    sent, img = _random_unit(4000, 24, 10), _random_unit(300, 24, 11)
    bank = Bank(sent, train_kmeans(sent, 40, niter=10, seed=0, use_gpu="never"), n_parts=2)
    exact_ids, exact_scores = exact_search(img, sent, k)
    results = {}
    for fused_max in (0, 4, 10**9):  # all sgemm, mixed, all compiled
        monkeypatch.setattr(retrieval, "FUSED_MAX_PAIRS", fused_max)
        ids, scores, res = bank.search(img, n_probe=40, k=k)
        np.testing.assert_array_equal(ids, exact_ids)
        np.testing.assert_allclose(scores, exact_scores, rtol=0, atol=1e-5)
        results[fused_max] = (res.row_ids, res.stats["distances"])
    assert results[0][1] == results[4][1] == results[10**9][1] == 300 * 4000
    # one probe: clusters with few and with many images; both paths give the same rows
    pair_counts = np.bincount(CentroidIndex(bank.centroids).search(img, 1)[0][:, 0], minlength=40)
    assert (pair_counts[pair_counts > 0] <= 4).any() and (pair_counts > 4).any()
    rows = []
    for fused_max in (0, 4, 10**9):
        monkeypatch.setattr(retrieval, "FUSED_MAX_PAIRS", fused_max)
        rows.append(bank.search(img, n_probe=1, k=k)[2].row_ids)
    np.testing.assert_array_equal(rows[0], rows[1])
    np.testing.assert_array_equal(rows[0], rows[2])


def test_compiled_scan_ranks_ties_by_row_and_skips_nan_and_pads():
    from realsyn.scan_kernels import scan_clusters

    bank = np.array([[0.6, 0.8], [np.nan, 0.0], [0.6, 0.8], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], np.float32)
    x = np.array([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]], np.float32)
    for dtype in (np.float32, np.float16):
        ids, scores = np.full((3, 3), -1, np.int64), np.full((3, 3), -np.inf, np.float32)
        # cluster A = rows 0..4 probed by pairs 0, 1; cluster B = row 5 probed by pair 2
        scan_clusters(bank.astype(dtype), x, np.array([0, 2]), np.array([2, 3]), np.array([0, 5]), np.array([5, 6]), 100, ids, scores)
        np.testing.assert_array_equal(ids, [[100, 102, 104], [103, 100, 102], [105, -1, -1]])
        np.testing.assert_allclose(scores[:2], [[0.8, 0.8, 0.8], [1.0, 0.6, 0.6]], atol=1e-3)
        assert scores[2, 0] == pytest.approx(0.8, abs=1e-3) and np.isneginf(scores[2, 1:]).all()
    with pytest.raises(TypeError, match="float32 or float16"):
        scan_clusters(bank.astype(np.float64), x, np.array([0]), np.array([1]), np.array([0]), np.array([1]), 0, ids, scores)


@pytest.mark.parametrize("fused_max", [0, 4, 10**9])
def test_float16_bank_gives_exact_search_over_the_rounded_bank(fused_max, monkeypatch):
    from realsyn.bank_encoding import encode_bank

    monkeypatch.setattr(retrieval, "FUSED_MAX_PAIRS", fused_max)
    sent, img = _random_unit(3000, 32, 12), _random_unit(200, 32, 13)
    bank = Bank(sent, train_kmeans(sent, 30, niter=10, seed=0, use_gpu="never"), n_parts=3)
    bank.parts = [encode_bank(p, "float16") for p in bank.parts]
    assert all(p.dtype == np.float16 for p in bank.parts)
    rounded = sent.astype(np.float16).astype(np.float32)
    exact_ids, exact_scores = exact_search(img, rounded, 3)
    ids, scores, res = bank.search(img, n_probe=30, k=3, threads=2)
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_allclose(scores, exact_scores, rtol=0, atol=1e-5)
    # against the float32 bank: scores within float16's rounding, and (away from near-ties) the same rows
    f32_ids, f32_scores = exact_search(img, sent, 3)
    assert np.abs(scores - f32_scores).max() < 1e-3
    assert (ids == f32_ids).mean() > 0.99


def test_bank_encoding():
    from realsyn.bank_encoding import bank_rows, encode_bank

    x = _random_unit(10, 8, 14)
    assert encode_bank(x, "float32").dtype == np.float32 and encode_bank(x, "float16").dtype == np.float16
    np.testing.assert_allclose(encode_bank(x, "float16").astype(np.float32), x, atol=1e-3)
    y = x.copy()
    y[0, 0] = 1e6  # beyond float16's range: refused, not silently made inf
    with pytest.raises(ValueError, match="float16's range"):
        encode_bank(y, "float16")
    y[0, 0] = np.nan  # non-finite values are kept as they are (retrieval never returns them)
    assert np.isnan(encode_bank(y, "float16")[0, 0])
    with pytest.raises(ValueError, match="bank dtype"):
        encode_bank(x, "bfloat16")
    assert bank_rows(x.astype(np.float64)).dtype == np.float32 and bank_rows(x.astype(np.float16)).dtype == np.float16


def test_bank_encoding_in_blocks_equals_one_cast():
    from realsyn.bank_encoding import encode_bank

    x = _random_unit(1000, 8, 15)
    np.testing.assert_array_equal(encode_bank(x, "float16", block_rows=64), x.astype(np.float16))
    y = x.copy()
    y[700, 3] = -7e4  # in the eleventh block
    with pytest.raises(ValueError, match="float16's range"):
        encode_bank(y, "float16", block_rows=64)
