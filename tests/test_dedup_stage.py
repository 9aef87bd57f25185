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


def _planted_image_corpus(storage, n_shards=3, per=800, dim=16):
    """Random unit vectors; 0.97 pairs (edges) and 0.94 pairs (SQ8 candidates to reject), across and inside shards."""
    rng = np.random.default_rng(11)
    n = n_shards * per
    x = rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    planted = [(i, i + per + 7, 0.97) for i in range(0, 60)]  # shard 0 -> 1
    planted += [(i, i + per + 5, 0.97) for i in range(per + 100, per + 140)]  # shard 1 -> 2
    planted += [(i, i + 3, 0.97) for i in range(2 * per + 500, 2 * per + 520, 4)]  # inside shard 2
    planted += [(i, i + 2 * per, 0.94) for i in range(300, 330)]  # shard 0 -> 2, rejected
    for i, j, c in planted:
        x[j] = _pair_partner(x[i], c, rng)
    for k in range(n_shards):
        rows = range(k * per, (k + 1) * per)
        _write_shard(storage, f"s{k}", [f"i{i}" for i in rows], x[rows], [f"h{i}" for i in rows], [0] * per, list(rows))
    return [f"s{k}" for k in range(n_shards)], n


def test_semantic_dedup_in_ivf_list_ranges_equals_one_index_and_brute_force(tmp_path, monkeypatch):
    import tempfile

    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))  # where the probes are spilled
    storage = Storage(str(tmp_path / "root"))
    shards, n = _planted_image_corpus(storage)

    def run(**kw):
        stats = dedup_images(storage, shards, perceptual_max_distance=None, **kw)
        return stats.as_dict(), [_decisions(storage, s) for s in shards]

    flat, flat_decisions = run(index_factory="Flat")
    assert flat["semantic_edges"] == 105 and flat["dropped_semantic_duplicate"] == 105
    # factory, nprobe, bytes per stored vector (code + 8-byte id), ranges at a quarter of the index
    for factory, nprobe, entry, quarter_ranges in [
        ("IVF24,SQ8", 24, 16 + 8, 5),
        ("IVF24,Flat", 24, 64 + 8, 5),
        ("IVF24_HNSW32,SQ8", 3, 24, 5),
    ]:
        one, one_decisions = run(index_factory=factory, nprobe=nprobe)
        assert "semantic_index_ranges" not in one
        # a quarter of the index; 1e-9 GiB: under one list, one list per range
        for max_index_gb, ranges in [(n * entry / 4 / 2**30, quarter_ranges), (1e-9, 24)]:
            part, part_decisions = run(index_factory=factory, nprobe=nprobe, max_index_gb=max_index_gb)
            assert part_decisions == one_decisions
            assert part.pop("semantic_index_ranges") == ranges
            assert {k: v for k, v in part.items() if k != "seconds"} == {k: v for k, v in one.items() if k != "seconds"}
            assert list(spill.iterdir()) == []
        if nprobe == 24:  # every list probed: brute force's decisions
            assert one_decisions == flat_decisions and one["semantic_edges"] == 105
            if factory.endswith("SQ8"):
                assert one["semantic_candidates"] == 135 and one["semantic_rejected"] == 30


def test_sentence_dedup_with_an_index_budget_matches_one_index(tmp_path):
    from realsyn.stages.dedup import dedup_sentences

    rng = np.random.default_rng(4)
    x = rng.standard_normal((1200, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for i in range(0, 1200, 40):
        x[(i + 601) % 1200] = _pair_partner(x[i], 0.98, rng)
    storage = Storage(str(tmp_path))
    for k in range(3):
        rows = range(400 * k, 400 * k + 400)
        _write_sentences(storage, f"t{k}", [f"t{i}" for i in rows], [f"sentence {i}" for i in rows], x[rows])

    def decisions():
        return [storage.reader(layout.SENTENCE_DEDUP).read_parquet(layout.decisions_file(f"t{k}")).to_pylist() for k in range(3)]

    one = dedup_sentences(storage, ["t0", "t1", "t2"], index_factory="IVF16,SQ8", nprobe=16).as_dict()
    want = decisions()
    part = dedup_sentences(storage, ["t0", "t1", "t2"], index_factory="IVF16,SQ8", nprobe=16, max_index_gb=1200 * 16 / 3 / 2**30).as_dict()
    assert decisions() == want
    assert part.pop("semantic_index_ranges") == 4  # a third of the index per range, cut at list bounds
    assert {k: v for k, v in part.items() if k != "seconds"} == {k: v for k, v in one.items() if k != "seconds"}
    # 30 planted pairs and 28 chance pairs of 8-dimensional vectors; 72 SQ8 candidates rejected
    assert (one["semantic_edges"], one["semantic_candidates"], one["dropped_semantic_duplicate"]) == (58, 130, 58)
    # Flat is not an IVF index: the budget does not apply, one index
    flat = dedup_sentences(storage, ["t0", "t1", "t2"], index_factory="Flat", max_index_gb=1e-9).as_dict()
    assert "semantic_index_ranges" not in flat and flat["semantic_edges"] == 58
