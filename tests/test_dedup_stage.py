"""The global dedup stage over several shards: semantic duplicates across shards, reasons, random-weight guard."""

import numpy as np
import pyarrow as pa

from realsyn import layout
from realsyn.layout import IMAGE_DEDUP, IMAGE_EMBEDDINGS
from realsyn.stages.common import dedup_kept_mask
from realsyn.stages.dedup import dedup_images
from realsyn.storage import Storage


def _write_shard(storage, shard, ids, emb, sha, phash, pixels, random_weights=False):
    emb = np.asarray(emb, np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    with storage.writer(IMAGE_EMBEDDINGS, shard) as w:
        w.write_numpy("embeddings.npy", emb)
        w.write_parquet(
            "index.parquet",
            pa.table({"image_id": ids, "sha256": sha, "phash": pa.array(phash, pa.uint64()), "pixels": pa.array(pixels, pa.int64())}),
        )
        w.write_json("model.json", {"model_id": "test", "dim": emb.shape[1], "random_weights": random_weights})


def _corpus(storage, random_weights=False):
    # a0 ~ b1 semantically (cosine 0.995), a1 == b0 byte-identical, a2 and b2 distinct
    _write_shard(
        storage,
        "a",
        ["a0", "a1", "a2"],
        [[1, 0.1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]],
        ["s0", "s1", "s2"],
        [0x0, 0xFFFF, 0xFF00FF],
        [100, 50, 10],
        random_weights,
    )
    _write_shard(
        storage,
        "b",
        ["b0", "b1", "b2"],
        [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]],
        ["s1", "s4", "s5"],
        [0xFFFF, 0xFFFFFFFF00000000, 0xF0F0F0F0F0F0F0F0],
        [50, 400, 10],
        random_weights,
    )


def _decisions(storage, shard):
    # the decision record's detail names the representative
    return {
        r["id"]: (r["kept"], r["detail"], r["reason"])
        for r in storage.reader(IMAGE_DEDUP).read_parquet(layout.decisions_file(shard)).to_pylist()
    }


def test_semantic_and_exact_duplicates_across_shards(tmp_path):
    storage = Storage(str(tmp_path))
    _corpus(storage)
    stats = dedup_images(storage, ["a", "b"], semantic_threshold=0.95)
    a, b = _decisions(storage, "a"), _decisions(storage, "b")
    # the larger image (b1, 400 px) represents the semantic pair; a1 (first) represents the exact pair
    assert a["a0"] == (False, "b1", "semantic_duplicate")
    assert b["b1"] == (True, "b1", None)
    assert a["a1"] == (True, "a1", None) and b["b0"] == (False, "a1", "exact_duplicate")
    assert a["a2"][0] and b["b2"][0]
    assert stats.dropped == {"exact_duplicate": 1, "semantic_duplicate": 1}
    assert list(dedup_kept_mask(storage, IMAGE_DEDUP, "a")) == [False, True, True]


def test_random_weight_embeddings_never_merge_distinct_images(tmp_path):
    storage = Storage(str(tmp_path))
    _corpus(storage, random_weights=True)
    stats = dedup_images(storage, ["a", "b"], semantic_threshold=0.95)
    assert stats.dropped == {"exact_duplicate": 1}
    assert _decisions(storage, "a")["a0"] == (True, "a0", None)
    # an explicit opt-in applies the threshold anyway
    assert dedup_images(storage, ["a", "b"], semantic_threshold=0.95, semantic_on_random_weights=True).dropped == {
        "exact_duplicate": 1,
        "semantic_duplicate": 1,
    }


def test_perceptual_duplicates_by_hamming_distance(tmp_path):
    storage = Storage(str(tmp_path))
    _write_shard(storage, "a", ["x", "y", "z"], [[1, 0], [0, 1], [1, 1]], ["1", "2", "3"], [0b1111, 0b1110, 0xFF00], [10, 20, 30])
    stats = dedup_images(storage, ["a"], semantic_threshold=None, perceptual_max_distance=1)
    d = _decisions(storage, "a")
    assert d["x"] == (False, "y", "perceptual_duplicate") and d["y"][0] and d["z"][0]
    assert stats.dropped == {"perceptual_duplicate": 1}


def test_perceptual_chain_is_a_near_duplicate_and_largest_image_represents(tmp_path):
    storage = Storage(str(tmp_path))
    # p0 -3 bits- p1 -3 bits- p2: one component at distance 3, though p0 and p2 are 6 bits apart
    _write_shard(storage, "a", ["p0", "p1"], [[1, 0], [0, 1]], ["h0", "h1"], [0b0, 0b111], [10, 20])
    _write_shard(storage, "b", ["p2", "p3"], [[1, 1], [1, 2]], ["h2", "h0"], [0b111111, 0b0], [30, 5])
    stats = dedup_images(storage, ["a", "b"], semantic_threshold=None, perceptual_max_distance=3)
    a, b = _decisions(storage, "a"), _decisions(storage, "b")
    assert a == {"p0": (False, "p2", "near_duplicate"), "p1": (False, "p2", "perceptual_duplicate")}
    assert b == {"p2": (True, "p2", None), "p3": (False, "p2", "near_duplicate")}
    assert stats.dropped == {"near_duplicate": 2, "perceptual_duplicate": 1}
    # exact off: p3 (same bytes as p0) still joins through its pHash; the sha names it exact_duplicate
    # only when its representative shares the bytes, which p2 does not
    stats = dedup_images(storage, ["a", "b"], exact=False, semantic_threshold=None, perceptual_max_distance=0)
    assert _decisions(storage, "b")["p3"] == (False, "p0", "exact_duplicate")
    assert stats.as_dict()["edges"] == 1 and stats.dropped == {"exact_duplicate": 1}


def _pair_partner(x: np.ndarray, cosine: float, rng) -> np.ndarray:
    """A unit vector at exactly ``cosine`` from unit x."""
    u = rng.standard_normal(x.shape)
    u -= (u @ x) * x
    u /= np.linalg.norm(u)
    return cosine * x + np.sqrt(1 - cosine**2) * u


def _sq8_corpus(storage):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((300, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    # edges at 0.97 (in shard a: 0-1, across a-b: 2-150); candidates at 0.94 that must be
    # rejected (in shard b: 101-102, across b-c: 103-250)
    for i, j, c in [(0, 1, 0.97), (2, 150, 0.97), (101, 102, 0.94), (103, 250, 0.94)]:
        x[j] = _pair_partner(x[i], c, rng)
    for k, shard in enumerate("abc"):
        rows = range(100 * k, 100 * k + 100)
        _write_shard(storage, shard, [f"i{i}" for i in rows], x[rows], [f"s{i}" for i in rows], [0] * 100, [i for i in rows])


def test_ivf_sq8_semantic_edges_are_verified_exactly_across_shards(tmp_path):
    storage = Storage(str(tmp_path))
    _sq8_corpus(storage)
    flat = dedup_images(storage, ["a", "b", "c"], perceptual_max_distance=None, index_factory="Flat")
    flat_decisions = [_decisions(storage, s) for s in "abc"]
    sq8 = dedup_images(storage, ["a", "b", "c"], perceptual_max_distance=None, index_factory="IVF4,SQ8", nprobe=4)
    assert [_decisions(storage, s) for s in "abc"] == flat_decisions
    hnsw = dedup_images(storage, ["a", "b", "c"], perceptual_max_distance=None, index_factory="IVF4_HNSW32,SQ8", nprobe=4)
    assert [_decisions(storage, s) for s in "abc"] == flat_decisions
    assert hnsw.as_dict()["semantic_edges"] == 2 and hnsw.as_dict()["semantic_candidates"] == 4
    # the larger image (more pixels: the later id here) represents each pair
    assert flat_decisions[0]["i0"] == (False, "i1", "semantic_duplicate") and flat_decisions[0]["i2"] == (
        False,
        "i150",
        "semantic_duplicate",
    )
    assert flat.dropped == sq8.dropped == {"semantic_duplicate": 2}
    counts = sq8.as_dict()
    assert counts["semantic_edges"] == 2 and counts["semantic_candidates"] == 4 and counts["semantic_rejected"] == 2
    assert "semantic_candidates" not in flat.as_dict()


def _write_sentences(storage, shard, ids, texts, emb):
    import hashlib

    from realsyn.dedup import normalize_text

    emb = np.asarray(emb, np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    with storage.writer(layout.SENTENCE_EMBEDDINGS, shard) as w:
        w.write_numpy("embeddings.npy", emb)
        w.write_parquet(
            "index.parquet",
            pa.table(
                {
                    "sentence_id": ids,
                    "text_sha": [hashlib.sha1(t.encode()).hexdigest() for t in texts],
                    "norm_key": [hashlib.sha1(normalize_text(t).encode()).hexdigest() for t in texts],
                }
            ),
        )
        w.write_json("model.json", {"model_id": "test", "dim": emb.shape[1], "random_weights": False})


def test_sentence_dedup_first_occurrence_represents_across_shards(tmp_path):
    from realsyn.stages.dedup import dedup_sentences

    storage = Storage(str(tmp_path))
    _write_sentences(storage, "a", ["a0", "a1", "a2"], ["A dog runs.", "A cat sits.", "Sky"], [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])
    _write_sentences(
        storage,
        "b",
        ["b0", "b1", "b2", "b3"],
        ["a dog runs", "A cat sits.", "A feline sits.", "Sea"],
        [[0, 0, 0, 1], [0, 1, 0, 0], [0.05, 1, 0, 0], [0.5, 0, 0.5, 1]],
    )
    stats = dedup_sentences(storage, ["a", "b"], semantic_threshold=0.95)

    def decisions(shard):
        table = storage.reader(layout.SENTENCE_DEDUP).read_parquet(layout.decisions_file(shard))
        return {r["id"]: (r["kept"], r["detail"], r["reason"]) for r in table.to_pylist()}

    assert decisions("a") == {"a0": (True, "a0", None), "a1": (True, "a1", None), "a2": (True, "a2", None)}
    assert decisions("b") == {
        "b0": (False, "a0", "perceptual_duplicate"),
        "b1": (False, "a1", "exact_duplicate"),
        "b2": (False, "a1", "semantic_duplicate"),
        "b3": (True, "b3", None),
    }
    assert stats.dropped == {"exact_duplicate": 1, "perceptual_duplicate": 1, "semantic_duplicate": 1}
    counts = stats.as_dict()
    assert (counts["rows_in"], counts["rows_out"], counts["edges"], counts["semantic_edges"]) == (
        7,
        4,
        6,
        3,
    )  # semantic: a1-b1, a1-b2, b1-b2
    summary = storage.reader(layout.SENTENCE_DEDUP).read_json(layout.SUMMARY_FILE)
    assert summary["rows_out"] == 4 and summary["semantic_threshold"] == 0.95
    # exact text edges off: the identical pair still joins through its normalised key and is named exact
    dedup_sentences(storage, ["a", "b"], exact=False, semantic_threshold=None)
    assert decisions("b")["b1"] == (False, "a1", "exact_duplicate")
