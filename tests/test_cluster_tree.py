"""Assignment through the tree of two-level training: exactness when every cell is probed, the descent by hand, persistence, the stages."""

import numpy as np
import pyarrow as pa
import pytest

from realsyn import layout
from realsyn.clustering import (
    CENTROID_CELLS_FILE,
    COARSE_CENTROIDS_FILE,
    CentroidIndex,
    CentroidTree,
    ReservoirSample,
    allocate_fine,
    train_centroid_tree,
    train_kmeans_two_level,
)
from realsyn.decisions import decision_table
from realsyn.runtime import l2_normalize
from realsyn.stages.cluster import cluster_images, cluster_sentences
from realsyn.storage import Storage


def _tree(n_cells: int, per_cell: int, dim: int, seed: int) -> tuple[np.ndarray, CentroidTree]:
    """Random unit coarse centroids, and ``per_cell`` unit fine centroids near each, grouped cell by cell."""
    rng = np.random.default_rng(seed)
    coarse = l2_normalize(rng.standard_normal((n_cells, dim)).astype(np.float32))
    fine = l2_normalize(np.repeat(coarse, per_cell, axis=0) + 0.5 * rng.standard_normal((n_cells * per_cell, dim)).astype(np.float32))
    return fine, CentroidTree(coarse, np.repeat(np.arange(n_cells, dtype=np.int32), per_cell))


def _queries(n: int, dim: int, seed: int) -> np.ndarray:
    return l2_normalize(np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32))


def _descent(queries: np.ndarray, centroids: np.ndarray, tree: CentroidTree, probe: int) -> np.ndarray:
    """By hand, row by row: the ``probe`` best coarse cells that have children, then the best of their children (lower id on ties)."""
    out = []
    used = np.unique(tree.cell)
    for q in queries:
        cells = used[np.argsort(-(tree.coarse[used] @ q), kind="stable")[:probe]]
        children = np.flatnonzero(np.isin(tree.cell, cells))
        scores = centroids[children] @ q
        out.append(children[np.flatnonzero(scores == scores.max())[0]])
    return np.asarray(out)


# ----------------------------------------------------------------------------- the index
@pytest.mark.parametrize("batch", [8192, 7])
def test_tree_search_probing_every_cell_is_the_exact_scan(batch):
    centroids, tree = _tree(9, 13, 16, seed=0)
    q = _queries(3000, 16, seed=1)
    index = CentroidIndex(centroids, tree=tree, probe_cells=9)
    index.cells_batch = batch
    exact = CentroidIndex(centroids, use_gpu="never")
    assert index.mode == "tree" and not index.exact and exact.mode == "exact" and (index.k, index.dim) == (117, 16)
    assert index.cell_order is None and index.cell_centroids is index._all_centroids  # training's order: no copy
    for n in (1, 4):
        ids, scores = index.search(q, n)
        want_ids, want_scores = exact.search(q, n)
        assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (3000, n)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("probe", [1, 2, 4])
def test_tree_assignment_is_the_cell_then_fine_descent(probe):
    centroids, tree = _tree(7, 5, 12, seed=2)
    q = _queries(500, 12, seed=3)
    index = CentroidIndex(centroids, tree=tree, probe_cells=probe)
    ids, scores = index.search(q, 1)
    want = _descent(q, centroids, tree, probe)
    np.testing.assert_array_equal(ids[:, 0], want)
    np.testing.assert_allclose(scores[:, 0], np.einsum("ij,ij->i", q, centroids[want]), rtol=1e-5, atol=1e-6)
    if probe == 1:  # with one probed cell a row's centroid is a child of its nearest coarse centroid
        np.testing.assert_array_equal(tree.cell[ids[:, 0]], (q @ tree.coarse.T).argmax(axis=1))
    # n > 1: the n best children of the probed cells, best first
    top, top_scores = index.search(q[:50], 3)
    for row, query in enumerate(q[:50]):
        cells = np.argsort(-(tree.coarse @ query), kind="stable")[:probe]
        children = np.flatnonzero(np.isin(tree.cell, cells))
        expect = children[np.lexsort((children, -(centroids[children] @ query)))[:3]]
        np.testing.assert_array_equal(top[row], expect)
    assert np.all(np.diff(top_scores, axis=1) <= 0)


def test_tree_search_ties_go_to_the_lower_id_across_cells():
    # centroid 1 (cell 0) and centroid 3 (cell 1) are the same vector: both cells probed, the lower id wins
    centroids = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 0, 0]], np.float32)
    tree = CentroidTree(np.array([[0.6, 0.8, 0], [0.6, 0, 0.8]], np.float32), np.array([0, 0, 1, 1], np.int32))
    q = np.array([[1, 0, 0], [0.9, 0, 0.1]], np.float32)
    ids, scores = CentroidIndex(centroids, tree=tree, probe_cells=2).search(q, 1)
    np.testing.assert_array_equal(ids[:, 0], [1, 1])
    np.testing.assert_array_equal(scores[:, 0], np.array([1.0, 0.9], np.float32))
    # one probed cell: query 1 is nearer to cell 1's centre, so it can only get centroid 3 (the descent, not the exact best id)
    np.testing.assert_array_equal(CentroidIndex(centroids, tree=tree, probe_cells=1).search(q, 1)[0][:, 0], [1, 3])


def test_tree_drops_empty_cells_and_keeps_any_centroid_order():
    rng = np.random.default_rng(4)
    centroids, tree = _tree(6, 4, 8, seed=5)
    # cells 0 and 4 lose their centroids to cell 2; the centroids are listed in a shuffled order
    cell = tree.cell.copy()
    cell[np.isin(cell, [0, 4])] = 2
    perm = rng.permutation(len(centroids))
    tree = CentroidTree(tree.coarse, cell[perm])
    centroids = centroids[perm]
    index = CentroidIndex(centroids, tree=tree, probe_cells=6)
    assert len(index.cell_centres) == 4 and index.probe_cells == 4 and index.cell_order is not None
    q = _queries(400, 8, seed=6)
    want = CentroidIndex(centroids, use_gpu="never").search(q, 2)[0]
    np.testing.assert_array_equal(index.search(q, 2)[0], want)
    np.testing.assert_array_equal(index.search(q, 1)[0][:, 0], want[:, 0])
    np.testing.assert_array_equal(CentroidIndex(centroids, tree=tree, probe_cells=2).search(q, 1)[0][:, 0], _descent(q, centroids, tree, 2))


def test_tree_search_falls_back_to_the_exact_scan_for_short_or_nan_rows():
    centroids, tree = _tree(4, 3, 6, seed=7)
    q = _queries(20, 6, seed=8)
    q[5] = np.nan
    index = CentroidIndex(centroids, tree=tree, probe_cells=1)
    exact = CentroidIndex(centroids, use_gpu="never")
    # more neighbours than one cell holds: every row falls back to the exact scan
    np.testing.assert_array_equal(index.search(q, 5)[0], exact.search(q, 5)[0])
    ids, _ = index.search(q, 1)
    assert ids[5, 0] == exact.search(q[5:6], 1)[0][0, 0]


def test_tree_shape_checks():
    centroids, tree = _tree(3, 2, 4, seed=9)
    with pytest.raises(ValueError):
        CentroidIndex(centroids[:5], tree=tree)
    with pytest.raises(ValueError):
        CentroidTree(tree.coarse, np.array([0, 3], np.int32))
    with pytest.raises(ValueError):
        CentroidIndex(centroids, tree=tree, probe_cells=0)


# ----------------------------------------------------------------------------- training and persistence
def test_two_level_training_returns_the_tree_it_trained():
    rng = np.random.default_rng(10)
    data = l2_normalize(rng.standard_normal((3000, 8)).astype(np.float32))
    centroids, tree = train_centroid_tree(data, 40, n_coarse=6, niter=5, seed=0, use_gpu="never", normalized=True)
    np.testing.assert_array_equal(
        centroids, train_kmeans_two_level(data, 40, n_coarse=6, niter=5, seed=0, use_gpu="never", normalized=True)
    )
    assert tree.coarse.shape == (6, 8) and tree.cell.dtype == np.int32 and tree.cell.shape == (40,)
    # the fine centroids come cell by cell, each cell's share allocated from its sample rows
    rows_cell = (data @ tree.coarse.T).argmax(axis=1)
    np.testing.assert_array_equal(tree.cell, np.repeat(np.arange(6), allocate_fine(np.bincount(rows_cell, minlength=6), 40)))
    # one coarse cell: the tree is one cell holding every centroid
    _, flat_tree = train_centroid_tree(data, 10, n_coarse=1, niter=5, seed=0, use_gpu="never", normalized=True)
    assert flat_tree.coarse.shape == (1, 8) and np.all(flat_tree.cell == 0)


def test_tree_round_trips_through_storage(tmp_path):
    storage = Storage(str(tmp_path))
    centroids, tree = _tree(5, 3, 4, seed=11)
    with storage.writer("clusters_test") as w:
        w.write_numpy(layout.CENTROIDS_FILE, centroids)
        tree.save(w)
    with storage.writer("flat_test") as w:
        w.write_numpy(layout.CENTROIDS_FILE, centroids)
    reader = storage.reader("clusters_test")
    loaded = CentroidTree.load(reader)
    np.testing.assert_array_equal(loaded.coarse, tree.coarse)
    np.testing.assert_array_equal(loaded.cell, tree.cell)
    assert loaded.cell.dtype == np.int32 and loaded.coarse.dtype == np.float32
    assert sorted(reader.files) == sorted([layout.CENTROIDS_FILE, COARSE_CENTROIDS_FILE, CENTROID_CELLS_FILE])
    index = CentroidIndex.load(reader, probe_cells=2)
    assert index.mode == "tree" and index.k == 15
    q = _queries(100, 4, seed=12)
    np.testing.assert_array_equal(index.search(q, 1)[0], CentroidIndex(centroids, tree=tree, probe_cells=2).search(q, 1)[0])
    assert CentroidTree.load(storage.reader("flat_test")) is None
    assert CentroidIndex.load(storage.reader("flat_test"), np.asarray(centroids)).mode == "exact"


def test_reservoir_scatter_in_chunks_is_the_sequential_algorithm(monkeypatch):
    import realsyn.clustering as clustering

    monkeypatch.setattr(clustering, "_NORMALIZE_CHUNK", 3)  # many chunks per batch
    data = np.repeat(np.arange(400, dtype=np.float32)[:, None], 2, axis=1)
    res = ReservoirSample(capacity=20, dim=2, seed=5)
    res.add(data[:20])
    res.add(data[20:400])
    # the same draws applied one row at a time
    rng = np.random.default_rng(5)
    slots = rng.integers(0, np.arange(20, 400) + 1)
    want = data[:20].copy()
    for row, slot in zip(range(20, 400), slots):
        if slot < 20:
            want[slot] = data[row]
    np.testing.assert_array_equal(res.array(), want)


# ----------------------------------------------------------------------------- the stages
DIM = 8


def _emb(n: int, seed: int) -> np.ndarray:
    return l2_normalize(np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32))


def test_sentence_clusters_persist_the_tree_and_assign_through_it(tmp_path):
    storage = Storage(str(tmp_path))
    shards = {"a": 70, "b": 50}
    with storage.writer(layout.SENTENCE_DEDUP) as dedup:
        for i, (shard, n) in enumerate(shards.items()):
            ids = [f"{shard}{j}" for j in range(n)]
            with storage.writer(layout.SENTENCE_EMBEDDINGS, shard) as w:
                w.write_numpy(layout.EMBEDDINGS_FILE, _emb(n, i))
                w.write_json(layout.MODEL_FILE, {"model_id": "test", "dim": DIM})
            with storage.writer(layout.FILTERED_SENTENCES, shard) as w:
                w.write_parquet(layout.SENTENCES_FILE, pa.table({"sentence_id": ids, "text": ids}))
            dedup.write_parquet(layout.decisions_file(shard), decision_table(ids, [None] * n))
    cluster_sentences(storage, list(shards), n_clusters=25, two_level_above=8, niter=5, seed=0)
    reader = storage.reader(layout.SENTENCE_CLUSTERS)
    centroids = np.asarray(reader.read_numpy(layout.CENTROIDS_FILE))
    tree = CentroidTree.load(reader)
    assert tree is not None and tree.coarse.shape == (5, DIM) and len(tree.cell) == 25  # round(sqrt(25)) cells
    assert reader.read_json(layout.SUMMARY_FILE)["coarse_clusters"] == 5
    index = CentroidIndex(centroids, tree=tree)
    for i, (shard, n) in enumerate(shards.items()):
        got = reader.read_parquet(layout.assignments_file(shard)).column("cluster").to_numpy()
        np.testing.assert_array_equal(got, index.search(_emb(n, i), 1)[0][:, 0])
    # flat training writes no tree
    cluster_sentences(storage, list(shards), n_clusters=25, two_level_above=1024, niter=5, seed=0)
    assert CentroidTree.load(storage.reader(layout.SENTENCE_CLUSTERS)) is None


def test_image_clusters_assign_through_the_tree_in_the_decisions_order(tmp_path):
    storage = Storage(str(tmp_path))
    shards = {"p": (60, {1, 7}), "q": (45, set())}
    for i, (shard, (n, dropped)) in enumerate(shards.items()):
        ids = [f"{shard}-img{j}" for j in range(n)]
        with storage.writer(layout.IMAGE_EMBEDDINGS, shard) as w:
            w.write_numpy(layout.EMBEDDINGS_FILE, _emb(n, 20 + i))
            w.write_parquet(layout.EMBEDDING_INDEX_FILE, pa.table({"image_id": ids}))
            w.write_json(layout.MODEL_FILE, {"model_id": "test", "dim": DIM})
        order = list(range(n - 1, -1, -1))  # decisions listed backwards: the assignments follow them
        with storage.writer(layout.FILTERED_PAIRS, shard) as w:
            w.write_parquet(
                layout.DECISIONS_FILE, decision_table([ids[j] for j in order], ["low" if j in dropped else None for j in order])
            )
    cluster_images(storage, list(shards), n_clusters=16, two_level_above=8, niter=5, seed=0)
    reader = storage.reader(layout.IMAGE_CLUSTERS)
    tree = CentroidTree.load(reader)
    assert tree is not None and tree.coarse.shape == (4, DIM)
    index = CentroidIndex(np.asarray(reader.read_numpy(layout.CENTROIDS_FILE)), tree=tree)
    counts = np.zeros(16, np.int64)
    for i, (shard, (n, dropped)) in enumerate(shards.items()):
        kept = [j for j in range(n - 1, -1, -1) if j not in dropped]
        got = reader.read_parquet(layout.assignments_file(shard))
        assert got.column("image_id").to_pylist() == [f"{shard}-img{j}" for j in kept]
        want = index.search(_emb(n, 20 + i)[kept], 1)[0][:, 0]
        np.testing.assert_array_equal(got.column("cluster").to_numpy(), want)
        counts += np.bincount(want, minlength=16)
    np.testing.assert_array_equal(reader.read_numpy(layout.CLUSTER_COUNTS_FILE), counts)
    assert reader.read_json(layout.SUMMARY_FILE)["training_rows"] == 58 + 45


def test_image_clusters_refuse_a_kept_pair_without_embedding(tmp_path):
    storage = Storage(str(tmp_path))
    with storage.writer(layout.IMAGE_EMBEDDINGS, "p") as w:
        w.write_numpy(layout.EMBEDDINGS_FILE, _emb(3, 0))
        w.write_parquet(layout.EMBEDDING_INDEX_FILE, pa.table({"image_id": ["x0", "x1", "x2"]}))
        w.write_json(layout.MODEL_FILE, {"model_id": "test", "dim": DIM})
    with storage.writer(layout.FILTERED_PAIRS, "p") as w:
        w.write_parquet(layout.DECISIONS_FILE, decision_table(["x0", "ghost"], [None, None]))
    with pytest.raises(KeyError, match="ghost"):
        cluster_images(storage, ["p"], n_clusters=1, niter=2, seed=0)
