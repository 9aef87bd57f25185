"""The retrievals asset body: one global pass over every shard's kept images and the sentence bank."""

import numpy as np
import pyarrow as pa
import pytest

from realsyn import layout
from realsyn.clustering import CentroidIndex, cluster_order, train_kmeans
from realsyn.decisions import decision_table
from realsyn.retrieval import exact_search
from realsyn.runtime import l2_normalize
from realsyn.stages.common import read_retrievals
from realsyn.stages.retrieve import retrieve_all
from realsyn.storage import Storage

DIM, N_SENTENCES, N_CLUSTERS, N_PARTS = 8, 300, 6, 3
# shard -> kept flag per image row; s1 has images but none survived dedup
SHARDS = {"s0": [True, False, True, True, True, False, True, True, True, True], "s1": [False, False], "s2": [True] * 7}


def _unit(n: int, seed: int) -> np.ndarray:
    return l2_normalize(np.random.default_rng(seed).standard_normal((n, DIM)))


def _fixture(root) -> tuple[Storage, dict]:
    """image_embeddings + image_dedup per shard, and a sentence_clusters bank in N_PARTS parts (bank order = sentence rows)."""
    storage = Storage(str(root))
    images = {}
    with storage.writer(layout.IMAGE_DEDUP) as dedup:
        for i, (shard, kept) in enumerate(SHARDS.items()):
            emb, ids = _unit(len(kept), 10 + i), [f"{shard}-img{j}" for j in range(len(kept))]
            with storage.writer(layout.IMAGE_EMBEDDINGS, shard) as w:
                w.write_numpy(layout.EMBEDDINGS_FILE, emb)
                w.write_parquet(layout.EMBEDDING_INDEX_FILE, pa.table({"image_id": ids}))
                w.write_json(layout.MODEL_FILE, {"model_id": "test", "dim": DIM})
            dedup.write_parquet(layout.decisions_file(shard), decision_table(ids, [None if k else "exact_duplicate" for k in kept]))
            images[shard] = ([x for x, k in zip(ids, kept) if k], emb[np.array(kept, bool)])
    sent = _unit(N_SENTENCES, 0)
    centroids = train_kmeans(sent, N_CLUSTERS, niter=10, seed=0, use_gpu="never")
    order, offsets = cluster_order(CentroidIndex(centroids).search(sent, 1)[0][:, 0], N_CLUSTERS)
    bank, bank_ids = sent[order], [f"sent{i}" for i in order]
    bank_cluster = np.repeat(np.arange(N_CLUSTERS, dtype=np.int32), np.diff(offsets))
    bounds = np.linspace(0, N_CLUSTERS, N_PARTS + 1).astype(np.int64)
    part = np.searchsorted(bounds, np.arange(N_CLUSTERS), side="right") - 1
    start = offsets[:-1] - offsets[bounds[part]]
    with storage.writer(layout.SENTENCE_CLUSTERS) as w:
        w.write_numpy(layout.CENTROIDS_FILE, centroids)
        w.write_parquet(
            layout.CLUSTER_LAYOUT_FILE,
            pa.table(
                {"cluster": np.arange(N_CLUSTERS)[::-1], "part": part[::-1], "start": start[::-1], "end": (start + np.diff(offsets))[::-1]}
            ),
        )
        for p in range(N_PARTS):
            a, b = offsets[bounds[p]], offsets[bounds[p + 1]]
            w.write_numpy(layout.bank_part_file(p, "npy"), bank[a:b])
            w.write_parquet(
                layout.bank_part_file(p, "parquet"),
                pa.table({"sentence_id": bank_ids[a:b], "text": [f"text of {x}" for x in bank_ids[a:b]], "cluster": bank_cluster[a:b]}),
            )
    return storage, {"images": images, "bank": bank, "bank_ids": bank_ids}


def test_every_cluster_probed_gives_exact_search_one_file_per_shard(tmp_path):
    storage, fx = _fixture(tmp_path)
    stats = retrieve_all(storage, ["s0", "s1", "s2"], k=3, n_probe=N_CLUSTERS, threads=1)
    reader = storage.reader(layout.RETRIEVALS)
    assert sorted(reader.files) == ["shards/s0.parquet", "shards/s1.parquet", "shards/s2.parquet", layout.SUMMARY_FILE]
    for shard, (ids, emb) in fx["images"].items():
        table = read_retrievals(storage, shard)
        assert table.schema == layout.RETRIEVAL_SCHEMA
        assert table.column("image_id").to_pylist() == ids
        exact_rows, exact_scores = exact_search(emb, fx["bank"], 3) if len(emb) else (np.zeros((0, 3), int), np.zeros((0, 3)))
        expected = [[fx["bank_ids"][r] for r in row] for row in exact_rows.tolist()]
        assert table.column("sentence_ids").to_pylist() == expected
        assert table.column("texts").to_pylist() == [[f"text of {x}" for x in row] for row in expected]
        np.testing.assert_allclose(np.array(table.column("scores").to_pylist(), dtype=np.float32).reshape(-1, 3), exact_scores, atol=1e-5)
    assert read_retrievals(storage, "s1").num_rows == 0  # images, none kept: an empty table with the schema
    assert read_retrievals(storage, "s2", columns=["image_id"]).column_names == ["image_id"]
    counts = stats.as_dict()
    assert counts["shards"] == 3 and counts["images"] == 15 and counts["texts_retrieved"] == 45 and counts["images_with_fewer_than_k"] == 0
    assert counts["bank_parts_read"] == N_PARTS and counts["distances"] == 15 * N_SENTENCES
    assert reader.read_json(layout.SUMMARY_FILE)["images"] == 15


def test_result_does_not_depend_on_shard_order_threads_or_image_budget(tmp_path, monkeypatch):
    from realsyn import retrieval

    monkeypatch.setattr(retrieval, "MIN_RANGE_FLOPS", 1)  # small as it is, hand the work to the threads
    storage, _ = _fixture(tmp_path)

    def tables():
        return {s: read_retrievals(storage, s) for s in SHARDS}

    retrieve_all(storage, ["s0", "s1", "s2"], k=2, n_probe=2, threads=1)
    first = tables()
    assert all(len(r) == 2 for r in first["s0"].column("sentence_ids").to_pylist())
    for kwargs in ({"threads": 2}, {"threads": 2, "max_image_gb": 12 * DIM * 4 / 2**30}):
        stats = retrieve_all(storage, ["s2", "s1", "s0"], k=2, n_probe=2, **kwargs)
        assert tables() == first
    assert stats.as_dict()["image_rounds"] > 1  # 30 probed pairs, 12 per round unless one part holds more
    assert len(storage.reader(layout.RETRIEVALS).files) == 4  # each run replaces the whole generation


def test_missing_image_shard_is_an_error(tmp_path):
    from realsyn.stages.common import MissingShardsError

    storage, _ = _fixture(tmp_path)
    with pytest.raises(MissingShardsError, match="image_embeddings: 1 of 4"):
        retrieve_all(storage, ["s0", "s1", "s2", "s9"])


def test_float16_bank_written_by_the_bank_builder_is_searched_as_rounded(tmp_path):
    """sentence_clusters' builder with bank_dtype float16 writes half the bytes; retrieval reads it as is."""
    from realsyn.stages.cluster import SentenceBankBuilder

    storage, fx = _fixture(tmp_path)
    sent = _unit(N_SENTENCES, 0)
    centroids = np.asarray(storage.reader(layout.SENTENCE_CLUSTERS).read_numpy(layout.CENTROIDS_FILE))
    with pytest.raises(ValueError, match="bank_dtype"):
        SentenceBankBuilder(None, CentroidIndex(centroids), 100, bank_dtype="int8")
    with storage.writer(layout.SENTENCE_CLUSTERS) as w:
        w.write_numpy(layout.CENTROIDS_FILE, centroids)
        builder = SentenceBankBuilder(w, CentroidIndex(centroids), 120, bank_dtype="float16")
        for s in range(0, N_SENTENCES, 100):  # three shards
            ids = [f"sent{i}" for i in range(s, s + 100)]
            builder.add_shard(f"x{s}", sent[s : s + 100], pa.table({"sentence_id": ids, "text": [f"text of {x}" for x in ids]}))
        n_parts = builder.finish()
    reader = storage.reader(layout.SENTENCE_CLUSTERS)
    parts = [np.asarray(reader.read_numpy(layout.bank_part_file(p, "npy"))) for p in range(n_parts)]
    assert n_parts >= 2 and all(p.dtype == np.float16 for p in parts) and sum(len(p) for p in parts) == N_SENTENCES
    retrieve_all(storage, ["s0", "s1", "s2"], k=3, n_probe=N_CLUSTERS, threads=1)
    rounded = sent.astype(np.float16).astype(np.float32)
    for shard, (_, emb) in fx["images"].items():
        if not len(emb):
            continue
        table = read_retrievals(storage, shard)
        exact_rows, exact_scores = exact_search(emb, rounded, 3)
        assert table.column("sentence_ids").to_pylist() == [[f"sent{r}" for r in row] for row in exact_rows.tolist()]
        got = np.array(table.column("scores").to_pylist(), dtype=np.float32).reshape(-1, 3)
        np.testing.assert_allclose(got, exact_scores, atol=1e-5)
