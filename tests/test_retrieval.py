from collections import Counter

import numpy as np
import pytest

from realsyn import retrieval
from realsyn.clustering import assign, cluster_order, train_kmeans
from realsyn.retrieval import exact_search, hierarchical_search
from realsyn.runtime import l2_normalize


class ClusterStore:
    """Sentences laid out cluster by cluster (as on storage); counts loads per cluster."""

    def __init__(self, sentence_emb: np.ndarray, centroids: np.ndarray):
        self.centroids = centroids
        cluster_ids = assign(sentence_emb, centroids, 1)[0][:, 0]
        self.cluster_of = cluster_ids
        order, self.offsets = cluster_order(cluster_ids, len(centroids))
        self.row_ids, self.emb = order, sentence_emb[order]
        self.loads: Counter = Counter()

    def load(self, c: int):
        self.loads[c] += 1
        s, e = self.offsets[c], self.offsets[c + 1]
        return self.row_ids[s:e], self.emb[s:e]


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
def test_probing_every_cluster_equals_exact_search(k):
    sent, img = _random_unit(400, 16, 0), _random_unit(50, 16, 1)
    store = ClusterStore(sent, train_kmeans(sent, 7, niter=10, seed=0, use_gpu="never"))
    ids, scores = hierarchical_search(img, store.centroids, store.load, n_probe=7, k=k)
    exact_ids, exact_scores = exact_search(img, sent, k)
    assert ids.shape == (50, k) and ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_array_equal(scores, exact_scores)
    assert (np.diff(scores, axis=1) <= 0).all()
    assert dict(store.loads) == {c: 1 for c in range(7)}


def test_one_probe_finds_exact_neighbours_on_separated_blobs():
    sent, img = _blob_data()
    store = ClusterStore(sent, train_kmeans(sent, 8, niter=20, seed=0, use_gpu="never"))
    ids, scores = hierarchical_search(img, store.centroids, store.load, n_probe=1, k=3)
    exact_ids, exact_scores = exact_search(img, sent, 3)
    assert _recall(ids, exact_ids) == 1.0
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_array_equal(scores, exact_scores)


def test_one_probe_on_hard_data_stays_inside_probed_clusters():
    sent, img = _random_unit(600, 16, 2), _random_unit(80, 16, 3)
    store = ClusterStore(sent, train_kmeans(sent, 12, niter=10, seed=0, use_gpu="never"))
    for n_probe in (1, 2):
        store.loads.clear()
        ids, _ = hierarchical_search(img, store.centroids, store.load, n_probe=n_probe, k=3)
        probed = assign(img, store.centroids, n_probe)[0]
        assert (ids >= 0).all()
        for row, probes in zip(ids, probed):
            assert set(store.cluster_of[row].tolist()) <= set(probes.tolist())
        assert set(store.loads) == set(probed.ravel().tolist()) and max(store.loads.values()) == 1
    exact_ids, _ = exact_search(img, sent, 3)
    one_probe_ids, _ = hierarchical_search(img, store.centroids, store.load, n_probe=1, k=3)
    recall_1 = _recall(one_probe_ids, exact_ids)
    recall_4 = _recall(hierarchical_search(img, store.centroids, store.load, n_probe=4, k=3)[0], exact_ids)
    assert 0.3 < recall_1 < 1.0 and recall_1 < recall_4 <= 1.0


def test_padding_for_small_and_empty_clusters():
    centroids = np.eye(3, dtype=np.float32)
    clusters = {
        0: (np.array([10, 11], dtype=np.int64), np.array([[1, 0, 0], [0.8, 0.6, 0]], dtype=np.float32)),
        1: (np.zeros(0, dtype=np.int64), np.zeros((0, 3), dtype=np.float32)),  # no sentences
        2: (np.array([20], dtype=np.int64), np.array([[0, 0, 1]], dtype=np.float32)),
    }
    img = np.array([[1, 0, 0], [0, 1, 0], [0.6, 0.0, 0.8]], dtype=np.float32)
    ids, scores = hierarchical_search(img, centroids, clusters.__getitem__, n_probe=1, k=3)
    np.testing.assert_array_equal(ids, [[10, 11, -1], [-1, -1, -1], [20, -1, -1]])
    np.testing.assert_allclose(scores, [[1.0, 0.8, -np.inf], [-np.inf] * 3, [0.8, -np.inf, -np.inf]], rtol=1e-6)
    ids, scores = hierarchical_search(img, centroids, clusters.__getitem__, n_probe=3, k=3)
    np.testing.assert_array_equal(ids, [[10, 11, 20], [11, 10, 20], [20, 10, 11]])
    np.testing.assert_allclose(scores, [[1.0, 0.8, 0.0], [0.6, 0.0, 0.0], [0.8, 0.6, 0.48]], rtol=1e-6, atol=1e-7)


def test_ties_are_broken_by_row_id_at_the_top_k_boundary():
    # Eight identical sentences with scrambled row ids: the three smallest ids win, in order.
    emb = np.tile(np.array([[0.6, 0.8]], dtype=np.float32), (8, 1))
    row_ids = np.array([9, 3, 7, 12, 1, 5, 30, 4], dtype=np.int64)
    img = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    ids, scores = hierarchical_search(img, np.array([[1.0, 0.0]], np.float32), lambda c: (row_ids, emb), n_probe=1, k=3)
    np.testing.assert_array_equal(ids, [[1, 3, 4], [1, 3, 4]])
    np.testing.assert_allclose(scores, [[0.6] * 3, [0.8] * 3], rtol=1e-6)
    exact_ids, _ = exact_search(img, emb, 3)
    np.testing.assert_array_equal(exact_ids, [[0, 1, 2], [0, 1, 2]])


def test_exact_search_ranks_and_pads():
    sent = np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)
    ids, scores = exact_search(np.array([[0.0, 1.0]], np.float32), sent, 5)
    np.testing.assert_array_equal(ids, [[1, 2, 0, -1, -1]])
    np.testing.assert_allclose(scores[0, :3], [1.0, 0.8, 0.0], atol=1e-7)
    assert np.isneginf(scores[0, 3:]).all()


def test_non_finite_images_get_padding_and_empty_input_works():
    sent, img = _blob_data(n_images=5)
    img[2, 0] = np.nan
    store = ClusterStore(sent, train_kmeans(sent, 8, niter=10, seed=0, use_gpu="never"))
    ids, scores = hierarchical_search(img, store.centroids, store.load, n_probe=1, k=3)
    assert ids[2].tolist() == [-1, -1, -1] and np.isneginf(scores[2]).all()
    good = [0, 1, 3, 4]
    np.testing.assert_array_equal(ids[good], exact_search(img[good], sent, 3)[0])
    ids, scores = hierarchical_search(np.zeros((0, 16), np.float32), store.centroids, store.load, k=3)
    assert ids.shape == (0, 3) and scores.shape == (0, 3)
    with pytest.raises(ValueError):
        hierarchical_search(img, store.centroids, lambda c: (np.arange(2), np.zeros((3, 16), np.float32)))


def test_chunked_scoring_gives_the_same_result(monkeypatch):
    sent, img = _random_unit(200, 8, 4), _random_unit(25, 8, 5)
    expected = exact_search(img, sent, 4)
    monkeypatch.setattr(retrieval, "SCORE_BLOCK_BYTES", 8 * 200 * 3)  # three queries per block
    got = exact_search(img, sent, 4)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    # The reference: a plain float64 product, ranked by (score desc, id asc).
    ref = (img.astype(np.float64) @ sent.astype(np.float64).T).astype(np.float32)
    ref_ids = np.lexsort((np.broadcast_to(np.arange(200), ref.shape), -ref), axis=1)[:, :4]
    np.testing.assert_array_equal(got[0], ref_ids)
