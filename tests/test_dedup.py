"""Dedup: Union-Find, representatives, exact/text keys, pHash, Hamming and semantic edges."""

import io
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
from PIL import Image

from realsyn.dedup import (
    BinaryHashIndex,
    SemanticIndex,
    UnionFind,
    auto_index_factory,
    component_labels,
    exact_duplicate_edges,
    exact_key_edges,
    first_of,
    group_representatives,
    hamming_edges,
    hamming_edges_brute_force,
    ivf_list_ranges,
    mih_chunks,
    normalize_text,
    perceptual_hash,
    perceptual_hashes,
    popcount64,
    representatives,
    rowwise_dot,
    string_keys,
)
from realsyn.stats import StepStats

# chain 3-2-1-0, cycle 5-6-7, pair 4-9, singleton 8
GRAPH = np.array([[3, 2], [2, 1], [1, 0], [7, 5], [5, 6], [6, 7], [9, 4]])
GRAPH_LABELS = [0, 0, 0, 0, 4, 5, 5, 5, 8, 4]


def test_union_find_scalar_unions():
    uf = UnionFind(10)
    for a, b in GRAPH:
        uf.union(int(a), int(b))
    assert uf.labels().tolist() == GRAPH_LABELS
    assert uf.find(3) == uf.find(0) and uf.find(8) == 8 and uf.find(4) != uf.find(5)
    assert uf.size[uf.find(6)] == 3 and uf.size[uf.find(2)] == 4


def test_union_find_edges_and_mixed():
    uf = UnionFind(10)
    uf.union_edges(GRAPH)
    assert uf.labels().tolist() == GRAPH_LABELS
    assert uf.labels().dtype == np.int64
    assert sorted(int(uf.size[r]) for r in set(uf.parent.tolist())) == [1, 2, 3, 4]
    mixed = UnionFind(10)
    mixed.union(9, 4)
    mixed.union(6, 7)
    mixed.union_edges(GRAPH[:5])
    assert mixed.labels().tolist() == GRAPH_LABELS
    mixed.union(8, 0)
    mixed.union_edges(np.array([[4, 5]]))
    assert mixed.labels().tolist() == [0, 0, 0, 0, 4, 4, 4, 4, 0, 4]
    assert mixed.size[mixed.find(0)] == 5 and mixed.size[mixed.find(9)] == 5
    with pytest.raises(IndexError):
        mixed.union_edges(np.array([[0, 10]]))


def test_union_edges_matches_scipy_components_on_random_graph():
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(0)
    n = 5000
    edges = rng.integers(0, n, size=(3000, 2))
    uf = UnionFind(n)
    uf.union_edges(edges)
    _, comp = connected_components(coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n)), directed=False)
    smallest = np.full(comp.max() + 1, n)
    np.minimum.at(smallest, comp, np.arange(n))
    np.testing.assert_array_equal(uf.labels(), smallest[comp])
    assert uf.size[uf.parent == np.arange(n)].sum() == n


def test_representatives_with_and_without_priority():
    assert representatives(10, GRAPH).tolist() == GRAPH_LABELS
    priority = np.array([1, 5, 5, 0, 2, 3, 3, 9, 0, 7])
    assert representatives(10, GRAPH, priority).tolist() == [1, 1, 1, 1, 9, 7, 7, 7, 8, 9]
    reps = representatives(10, GRAPH, priority.astype(np.float64))
    assert np.flatnonzero(reps == np.arange(10)).tolist() == [1, 7, 8, 9]
    assert representatives(3, np.zeros((0, 2)), np.array([np.nan, 1.0, 2.0])).tolist() == [0, 1, 2]
    assert representatives(3, np.array([[0, 1], [1, 2]]), np.array([np.nan, 1.0, 1.0])).tolist() == [1, 1, 1]


def test_exact_duplicate_edges():
    edges = exact_duplicate_edges(["a", "b", "a", None, "b", "a", "", ""])
    assert edges.dtype == np.int64
    assert edges.tolist() == [[0, 2], [1, 4], [0, 5]]
    assert exact_duplicate_edges([]).shape == (0, 2)


def test_normalize_text():
    assert normalize_text("Hello,   World!") == "hello world"
    assert normalize_text("ＨＥＬＬＯ world") == "hello world"
    assert normalize_text("Don't stop…") == "dont stop"
    assert normalize_text("  tabs\tand\nnewlines ") == "tabs and newlines"
    assert normalize_text("«Quoted» — dash") == "quoted dash"
    assert normalize_text("ﬁne print") == "fine print"
    assert normalize_text("$5 + tax") == "$5 + tax"
    keys = [normalize_text(t) for t in ["A dog runs.", "a dog runs", "A DOG  RUNS!", "A cat runs."]]
    assert exact_duplicate_edges(keys).tolist() == [[0, 1], [0, 2]]


def _encode(arr: np.ndarray, fmt="PNG", quality=95, scale=1.0) -> bytes:
    im = Image.fromarray(arr)
    if scale != 1.0:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _bits(x: int) -> int:
    return bin(x).count("1")


def test_perceptual_hash_robust_to_reencoding_and_resizing():
    import skimage.data

    astronaut, coffee = skimage.data.astronaut(), skimage.data.coffee()
    h = perceptual_hash(_encode(astronaut))
    assert isinstance(h, int) and 0 <= h < 2**64
    assert _bits(h) == 32  # median threshold over 64 coefficients: half the bits set
    assert h == perceptual_hash(_encode(astronaut))
    assert _bits(h ^ perceptual_hash(_encode(astronaut, "JPEG", quality=60, scale=0.9))) <= 6
    h_coffee = perceptual_hash(_encode(coffee))
    assert _bits(h_coffee ^ perceptual_hash(_encode(coffee, "JPEG", quality=60, scale=0.9))) <= 6
    assert _bits(h ^ h_coffee) > 20


def test_perceptual_hashes_counts_undecodable():
    import skimage.data

    stats = StepStats("phash")
    good = _encode(skimage.data.camera())
    hashes, ok = perceptual_hashes([good, b"garbage", good], stats)
    assert hashes.dtype == np.uint64 and ok.tolist() == [True, False, True]
    assert int(hashes[0]) == perceptual_hash(good) and hashes[1] == 0
    assert stats.as_dict()["dropped_undecodable"] == 1
    with pytest.raises(ValueError, match="undecodable"):
        perceptual_hash(b"garbage")


CRAFTED = np.array([0, 0b111, 0x3F, 0x7F, 2**64 - 1, 0, 2**63 | 0b11], dtype=np.uint64)
# distances: 0-1 3, 0-2 6, 0-3 7, 0-5 0, 1-2 3, 1-3 4, 1-5 3, 2-3 1, 2-5 6, 3-5 7, 6-0 3, 6-1 2, 6-2 5, 6-3 6, 6-5 3


def test_hamming_edges_on_crafted_hashes():
    assert hamming_edges(CRAFTED, 6).tolist() == [
        [0, 1],
        [0, 2],
        [0, 5],
        [0, 6],
        [1, 2],
        [1, 3],
        [1, 5],
        [1, 6],
        [2, 3],
        [2, 5],
        [2, 6],
        [3, 6],
        [5, 6],
    ]
    assert hamming_edges(CRAFTED, 3).tolist() == [[0, 1], [0, 5], [0, 6], [1, 2], [1, 5], [1, 6], [2, 3], [5, 6]]
    assert hamming_edges(CRAFTED, 0).tolist() == [[0, 5]]
    assert hamming_edges(np.zeros(0, dtype=np.uint64)).shape == (0, 2)


def _brute_hamming(hashes: np.ndarray, max_distance: int) -> list[list[int]]:
    ints = [int(h) for h in hashes]
    return [[i, j] for i in range(len(ints)) for j in range(i + 1, len(ints)) if _bits(ints[i] ^ ints[j]) <= max_distance]


def test_binary_hash_index_across_shards_equals_brute_force():
    rng = np.random.default_rng(1)
    hashes = rng.integers(0, 2**64 - 1, size=120, dtype=np.uint64, endpoint=True)
    for k in range(30):  # plant near-duplicates at 1..7 flipped bits
        flips = rng.choice(64, size=k % 7 + 1, replace=False)
        hashes[60 + k] = hashes[k] ^ np.bitwise_or.reduce(np.uint64(1) << flips.astype(np.uint64))
    want = _brute_hamming(hashes, 5)
    assert len(want) == 22  # planted pairs at 1..5 flips; random pairs are ~30 bits apart
    assert hamming_edges(hashes, 5).tolist() == want
    index = BinaryHashIndex()
    index.add(hashes[:50])
    index.add(hashes[50:])
    assert index.ntotal == 120
    got = np.concatenate([index.edges(hashes[:50], 0, 5), index.edges(hashes[50:], 50, 5)])
    assert sorted(got.tolist()) == want


def _planted_vectors(n=300, dim=16, seed=2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x[200:260] = x[:60] + rng.normal(scale=0.2, size=(60, dim)).astype(np.float32)
    x[260:270] = x[0]  # an exact-duplicate cluster
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _brute_semantic(x: np.ndarray, threshold: float) -> list[list[int]]:
    sims = x @ x.T
    i, j = np.nonzero(np.triu(sims >= threshold, k=1))
    return np.stack([i, j], axis=1).tolist()


def test_semantic_index_flat_equals_brute_force_across_batches():
    x, threshold = _planted_vectors(), 0.9
    sims = x @ x.T
    assert np.abs(sims - threshold).min() > 1e-4  # no pair is ambiguous at float precision
    want = _brute_semantic(x, threshold)
    assert len(want) > 100
    index = SemanticIndex(16, threshold, use_gpu="never")
    index.add(x)
    assert index.edges(x, 0).tolist() == want
    two = SemanticIndex(16, threshold, use_gpu="never")
    two.add(x[:130])
    two.add(x[130:])
    got = np.concatenate([two.edges(x[:130], 0), two.edges(x[130:], 130)])
    assert got.dtype == np.int64
    assert sorted(got.tolist()) == want


def test_semantic_index_threshold_is_inclusive_and_excludes_self():
    x = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    index = SemanticIndex(3, 1.0, use_gpu="never")
    index.add(x)
    assert index.edges(x, 0).tolist() == [[0, 1]]
    assert index.edges(x[1:2], 1).tolist() == []  # the pair is reported by its smaller id only


def test_semantic_index_knn_mode_and_saturation():
    x, threshold = _planted_vectors(), 0.9
    want = _brute_semantic(x, threshold)
    knn = SemanticIndex(16, threshold, use_gpu="never", search="knn", k_neighbors=300)
    knn.add(x)
    assert knn.edges(x, 0).tolist() == want and knn.saturated_queries == 0
    small = SemanticIndex(16, threshold, use_gpu="never", search="knn", k_neighbors=4)
    small.add(x)
    got = small.edges(x, 0).tolist()
    assert set(map(tuple, got)) < set(map(tuple, want))
    # Saturated: rows with at least k neighbours (self included) >= threshold: the 11 copies of
    # x[0] and its noisy copy x[200].
    assert small.saturated_queries == int(((x @ x.T >= threshold).sum(axis=1) >= 4).sum()) == 12


def test_semantic_index_ivf_train_and_probe_all_lists_is_exact():
    x, threshold = _planted_vectors(), 0.9
    index = SemanticIndex(16, threshold, index_factory="IVF4,Flat", use_gpu="never", nprobe=4)
    assert not index.is_trained
    with pytest.raises(RuntimeError, match="trained"):
        index.add(x)
    index.train(x)
    index.add(x)
    assert index.edges(x, 0).tolist() == _brute_semantic(x, threshold)
    with pytest.raises(ValueError):
        index.edges(x[:, :8], 0)


# -- components and sparse representatives ----------------------------------------------------------


def test_component_methods_agree_with_union_find_labels():
    assert component_labels(10, GRAPH, "csgraph").tolist() == GRAPH_LABELS
    assert component_labels(10, GRAPH, "union_find").tolist() == GRAPH_LABELS
    rng = np.random.default_rng(3)
    edges = rng.integers(0, 4000, size=(2500, 2))
    np.testing.assert_array_equal(component_labels(4000, edges, "csgraph"), component_labels(4000, edges, "union_find"))
    with pytest.raises(IndexError):
        component_labels(10, np.array([[0, 10]]))
    with pytest.raises(ValueError, match="method"):
        component_labels(10, GRAPH, "bfs")


def test_group_representatives_touch_only_edge_nodes():
    nodes, reps = group_representatives(GRAPH)
    assert nodes.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9]  # 8 is in no edge
    assert reps.tolist() == [0, 0, 0, 0, 4, 5, 5, 5, 4]
    priority = np.array([1, 5, 5, 0, 2, 3, 3, 9, 0, 7])
    seen = []
    nodes, reps = group_representatives(GRAPH, priority=lambda idx: seen.append(idx.tolist()) or priority[idx])
    assert seen == [[0, 1, 2, 3, 4, 5, 6, 7, 9]]  # priorities are asked for the touched nodes only
    assert reps.tolist() == [1, 1, 1, 1, 9, 7, 7, 7, 9]
    # far-apart ids: the work depends on the edges, not on the largest id
    nodes, reps = group_representatives(np.array([[10**12, 5], [7, 10**12]]))
    assert nodes.tolist() == [5, 7, 10**12] and reps.tolist() == [5, 5, 5]
    assert [a.shape for a in group_representatives(np.zeros((0, 2)))] == [(0,), (0,)]


# -- fixed-width keys --------------------------------------------------------------------------------


def test_string_keys_fast_hex_path_and_fallback_agree_on_equality():
    import hashlib

    import pyarrow as pa

    sha = [hashlib.sha256(f"t{i % 5}".encode()).hexdigest() for i in range(12)]
    sha1 = [hashlib.sha1(f"t{i % 3}".encode()).hexdigest() for i in range(6)]
    other = ["x", "x", "A" * 64, "a" * 64, "a" * 63 + "b", "b" + "a" * 63, None, "", "ÿ" * 20]
    values = sha + sha1 + other
    keys, valid = string_keys(values)
    assert keys.shape == (27, 2) and keys.dtype == np.uint64
    assert valid.tolist() == [True] * 24 + [False, False, True]
    # equal strings, equal keys; distinct strings, distinct keys (hex decoded, others BLAKE2b)
    distinct = {v: tuple(k) for v, k, ok in zip(values, keys.tolist(), valid) if ok}
    assert len(set(distinct.values())) == len(distinct) == 5 + 3 + 6
    assert all(tuple(keys[i]) == distinct[v] for i, v in enumerate(values) if v)
    # the fast path: a sha256 hex digest folds its 32 bytes into 16
    raw = bytes.fromhex(sha[0])
    assert keys[0].tobytes() == bytes(a ^ b for a, b in zip(raw[:16], raw[16:]))
    # the same key from a chunked, sliced or large_string array
    chunked = pa.chunked_array([pa.array(values[:10]), pa.array(values[10:])])
    np.testing.assert_array_equal(string_keys(chunked)[0], keys)
    np.testing.assert_array_equal(string_keys(pa.array(values, pa.large_string()).slice(3))[0], keys[3:])
    assert string_keys([])[0].shape == (0, 2)


def test_exact_key_edges_and_first_of():
    keys = np.array([5, 7, 5, 9, 7, 5, 1], dtype=np.uint64)
    edges = exact_key_edges(keys)
    assert edges.tolist() == [[0, 2], [1, 4], [0, 5]]
    valid = np.array([True, True, False, True, True, True, True])
    assert exact_key_edges(keys, valid).tolist() == [[1, 4], [0, 5]]
    assert first_of(edges, np.array([0, 1, 2, 3, 4, 5, 6])).tolist() == [0, 1, 0, 3, 1, 0, 6]
    assert first_of(np.zeros((0, 2), np.int64), np.array([3, 4])).tolist() == [3, 4]
    # 2-column keys: rows equal only when both halves are
    two = np.array([[1, 2], [1, 3], [1, 2], [0, 2]], dtype=np.uint64)
    assert exact_key_edges(two).tolist() == [[0, 2]]


# -- multi-index hashing -----------------------------------------------------------------------------


def _planted_hashes(n=4000, seed=5):
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    for k in range(n // 4):  # copies of earlier hashes with 0..9 flipped bits
        flips = rng.choice(64, size=k % 10, replace=False).astype(np.uint64)
        h[n // 2 + k] = h[k] ^ np.bitwise_or.reduce(np.uint64(1) << flips) if len(flips) else h[k]
    h[-300:-100] = 0  # blank images
    h[-100:-50] = 0b101  # near-blank: 2 bits from the blanks
    h[-50:] = np.arange(50, dtype=np.uint64) << np.uint64(58)  # distinct hashes sharing 58 zero bits
    return h


@pytest.mark.parametrize("d", [0, 1, 2, 6, 9])
def test_mih_finds_exactly_the_brute_force_pairs(d):
    h = _planted_hashes()
    want = hamming_edges_brute_force(h, d)
    for chunks in [None, d + 1] + ([d + 3] if d else []):  # d = 0: one 64-bit chunk only
        got = hamming_edges(h, d, chunks=chunks, block_pairs=997)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)
    # the spanning edges (the stage's) give the same components with far fewer edges
    span = hamming_edges(h, d, all_pairs=False)
    np.testing.assert_array_equal(component_labels(len(h), span), component_labels(len(h), want))
    assert len(span) < len(h) < len(want)


def test_mih_exact_pair_counts_and_guards():
    h = _planted_hashes()
    # 200 blank + 50 near-blank hashes: C(200, 2) + C(50, 2) pairs at d=0, + 200 x 50 at d=2
    blanks = 200 * 199 // 2 + 50 * 49 // 2
    assert len(hamming_edges(h[-300:-50], 0)) == blanks
    assert len(hamming_edges(h[-300:-50], 2)) == blanks + 200 * 50
    # spanning: every copy to its first occurrence, one edge between the two groups
    span = hamming_edges(h[-300:-50], 2, all_pairs=False)
    assert span.tolist() == [[0, i] for i in range(1, 201)] + [[200, j] for j in range(201, 250)]
    assert hamming_edges(np.array([3], np.uint64), 6).shape == (0, 2)
    assert hamming_edges(np.array([0, 2**64 - 1], np.uint64), 64).tolist() == [[0, 1]]
    with pytest.raises(ValueError):
        hamming_edges(h, -1)
    with pytest.raises(ValueError, match="chunks"):
        hamming_edges(h, 6, chunks=6)
    assert hamming_edges(CRAFTED, 6, chunks=7).tolist() == hamming_edges_brute_force(CRAFTED, 6).tolist()


def test_mih_chunks_cost_model():
    assert [mih_chunks(1000, d) for d in (0, 1, 6)] == [1, 2, 7]
    assert mih_chunks(200_000, 6) == 8
    assert mih_chunks(2_000_000, 6) == 9
    assert mih_chunks(10**8, 6) == 10
    assert mih_chunks(10**8, 70) == 64


# -- semantic: auto factory, approximate codes ------------------------------------------------------


def test_auto_index_factory():
    assert auto_index_factory(0) == auto_index_factory(49_999) == "Flat"
    # lists of a constant ~256 vectors, HNSW over the list centroids
    assert auto_index_factory(50_000) == "IVF195_HNSW32,SQ8"
    assert auto_index_factory(10**6) == "IVF3906_HNSW32,SQ8"
    assert auto_index_factory(4 * 10**6) == "IVF15625_HNSW32,SQ8"
    assert auto_index_factory(10**9) == "IVF1048576_HNSW32,SQ8"  # capped: longer lists beyond 268M vectors


def test_hnsw_quantizer_ivf_trains_two_level_and_finds_the_brute_force_pairs():
    x, threshold = _planted_vectors(), 0.9
    want = _brute_semantic(x, threshold)
    index = SemanticIndex(16, threshold, index_factory="IVF8_HNSW32,SQ8", use_gpu="never", nprobe=8)
    assert index.approximate and index.nlist == 8 and index.train_size == 10_000
    quantizer = index._hnsw_quantizer
    assert quantizer is not None and quantizer.hnsw.efSearch == 64 and quantizer.ntotal == 0
    index.train(x)
    # the coarse centroids came from two-level K-means: 8 unit vectors in the HNSW graph
    assert quantizer.ntotal == 8
    centroids = quantizer.reconstruct_n(0, 8)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    index.add(x)
    pairs = index.edges(x, 0)
    # every list probed (nprobe = nlist): the candidates hold every true pair, verification keeps exactly them
    assert pairs[rowwise_dot(x[pairs[:, 0]], x[pairs[:, 1]]) >= np.float32(threshold)].tolist() == want
    too_few = SemanticIndex(16, threshold, index_factory="IVF400_HNSW32,SQ8", use_gpu="never")
    assert too_few.train_size == 12_800  # 32 points per list
    with pytest.raises(ValueError, match="at least 400 training rows"):
        too_few.train(x)
    large = SemanticIndex(16, threshold, index_factory="IVF100000_HNSW32,SQ8", use_gpu="never")
    assert large.train_size == 262_144  # capped: the training reservoir does not grow with N ...
    huge = SemanticIndex(16, threshold, index_factory="IVF200000_HNSW32,SQ8", use_gpu="never")
    assert huge.train_size == 400_000  # ... but holds at least 2 rows per list


def test_sq8_candidates_cover_the_exact_edges_and_verify_to_them():
    x, threshold = _planted_vectors(), 0.9
    want = _brute_semantic(x, threshold)
    index = SemanticIndex(16, threshold, index_factory="IVF4,SQ8", use_gpu="never", nprobe=4)
    assert index.approximate and index.margin == 0.02 and index.nlist == 4 and index.train_size == 10_000
    index.train(x)
    index.add(x)
    pairs, sims = index.edges(x, 0, with_similarity=True)
    assert set(map(tuple, want)) <= set(map(tuple, pairs.tolist()))  # candidates at threshold - margin
    assert sims.min() >= np.float32(threshold - 0.02)
    exact = rowwise_dot(x[pairs[:, 0]], x[pairs[:, 1]])
    assert np.abs(exact - sims).max() < 0.01  # SQ8 similarities are close, not exact
    assert pairs[exact >= np.float32(threshold)].tolist() == want
    flat = SemanticIndex(16, threshold, use_gpu="never")
    assert not flat.approximate and flat.margin == 0.0 and flat.nlist == 0


def test_ivf_list_ranges_cut_contiguous_lists_within_the_budget():
    # entry bytes per list: 6, 0, 10, 2, 20, 0, 4 with a budget of 12
    bounds = ivf_list_ranges([3, 0, 5, 1, 10, 0, 2], 2, 12)
    assert bounds.tolist() == [0, 2, 4, 5, 7]  # list 4 (20 bytes) is over the budget: a range of its own
    assert ivf_list_ranges([3, 0, 5], 2, 10**9).tolist() == [0, 3]
    assert ivf_list_ranges([3, 0, 5], 2, 1).tolist() == [0, 1, 2, 3]
    assert ivf_list_ranges([], 2, 5).tolist() == [0]
    with pytest.raises(ValueError, match="max_bytes"):
        ivf_list_ranges([1], 2, 0)


def _shards_of(x: np.ndarray, size: int):
    return [(o, (lambda o=o: x[o : o + size])) for o in range(0, len(x), size)]


@pytest.mark.parametrize(
    "factory, nprobe",
    [("IVF24,Flat", 3), ("IVF24,SQ8", 3), ("IVF24_HNSW32,SQ8", 3), ("IVF24,Flat", 24), ("IVF24,SQ8", 24)],
)
def test_partitioned_edges_equal_one_global_index_and_clean_up(tmp_path, factory, nprobe):
    import faiss

    rng = np.random.default_rng(5)
    x = rng.standard_normal((2400, 16)).astype(np.float32)
    x[1600:1900] = x[:300] + rng.normal(scale=0.15, size=(300, 16)).astype(np.float32)  # across shards
    x[500:520] = x[400:420] + rng.normal(scale=0.1, size=(20, 16)).astype(np.float32)  # inside shard 0
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    threshold, shards = 0.9, _shards_of(x, 800)
    whole = SemanticIndex(16, threshold, index_factory=factory, use_gpu="never", nprobe=nprobe)
    whole.train(x)
    for _, load in shards:
        whole.add(load())
    want = [whole.edges(load(), o, with_similarity=True) for o, load in shards]
    want_pairs, want_sims = np.concatenate([w[0] for w in want]), np.concatenate([w[1] for w in want])
    assert len(want_pairs) > 250
    ivf = faiss.extract_index_ivf(whole._index)
    entry, sizes = int(ivf.code_size) + 8, np.array([ivf.invlists.list_size(k) for k in range(24)])
    assert (sizes > 0).all() and sizes.sum() == len(x)
    quarter = len(x) * entry // 4
    bounds = ivf_list_ranges(sizes, entry, quarter)
    assert len(bounds) - 1 >= 4 and max(sizes[a:b].sum() * entry for a, b in zip(bounds[:-1], bounds[1:])) <= quarter
    spill = tmp_path / "spill"
    spill.mkdir()
    for budget, ranges in [(quarter, len(bounds) - 1), (1, 24)]:  # a budget under one list: one list per range
        part = SemanticIndex(16, threshold, index_factory=factory, use_gpu="never", nprobe=nprobe)
        part.train(x)
        pairs, sims = part.partitioned_edges(shards, budget, with_similarity=True, spill_dir=str(spill))
        # exactly the same candidates and (index) similarities, each pair once
        assert pairs.tolist() == want_pairs.tolist() and np.array_equal(sims, want_sims)
        assert part.index_ranges == ranges
        assert part.ntotal == 0 and list(spill.iterdir()) == []  # the index is left empty, the spill removed
    if nprobe == 24:  # every list probed: the (verified) pairs are brute force's
        exact = rowwise_dot(x[pairs[:, 0]], x[pairs[:, 1]]) >= np.float32(threshold)
        assert pairs[exact].tolist() == _brute_semantic(x, threshold)


def test_partitioned_edges_refuses_what_it_cannot_partition():
    x = _planted_vectors()
    flat = SemanticIndex(16, 0.9, use_gpu="never")
    assert not flat.partitionable
    with pytest.raises(ValueError, match="plain IVF index"):
        flat.partitioned_edges(_shards_of(x, 100), 1000)
    pretransform = SemanticIndex(16, 0.9, index_factory="PCA8,IVF4,Flat", use_gpu="never", nprobe=4)
    assert pretransform.nlist == 4 and not pretransform.partitionable
    ivf = SemanticIndex(16, 0.9, index_factory="IVF4,Flat", use_gpu="never", nprobe=4)
    assert ivf.partitionable
    with pytest.raises(RuntimeError, match="trained"):
        ivf.partitioned_edges(_shards_of(x, 100), 1000)
    ivf.train(x)
    ivf.add(x)
    with pytest.raises(RuntimeError, match="empty"):
        ivf.partitioned_edges(_shards_of(x, 100), 1000)


def test_partitioned_edges_removes_its_spill_when_a_shard_fails(tmp_path):
    x = _planted_vectors()
    index = SemanticIndex(16, 0.9, index_factory="IVF4,Flat", use_gpu="never", nprobe=4)
    index.train(x)
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 3:  # spilled (1), added (2), then fails in the query pass
            raise OSError("shard unreadable")
        return x[150:]

    with pytest.raises(OSError, match="unreadable"):
        index.partitioned_edges([(0, lambda: x[:150]), (150, failing)], 10**9, spill_dir=str(tmp_path))
    assert len(calls) == 3 and list(tmp_path.iterdir()) == []


def test_popcount64_with_and_without_numpy_bitwise_count(monkeypatch):
    x = np.array([0, 1, 0b1011, 2**64 - 1, 2**63], dtype=np.uint64)
    assert popcount64(x).tolist() == [0, 1, 3, 64, 1]
    monkeypatch.delattr(np, "bitwise_count", raising=False)  # numpy < 2: the byte table
    assert popcount64(x).tolist() == [0, 1, 3, 64, 1]
    assert popcount64(x.reshape(5, 1)).shape == (5, 1)


def test_release_free_memory_trims_the_heap_or_does_nothing(monkeypatch):
    import realsyn.dedup as dedup

    calls = []
    monkeypatch.setattr(dedup, "_malloc_trim", lambda pad: calls.append(pad) or 1)
    dedup.release_free_memory()
    assert calls == [0]
    monkeypatch.setattr(dedup, "_malloc_trim", False)  # no glibc: nothing to call
    dedup.release_free_memory()
    monkeypatch.setattr(dedup, "_malloc_trim", None)  # looked up once, then called for real
    dedup.release_free_memory()
    assert dedup._malloc_trim is False or callable(dedup._malloc_trim)
