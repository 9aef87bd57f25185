"""The cluster stage over several shards: bounded sample, assignments, and the external-sort sentence bank against a brute-force layout."""

import numpy as np
import pyarrow as pa
import pytest

from realsyn import layout
from realsyn.clustering import CentroidIndex, train_kmeans
from realsyn.decisions import decision_table
from realsyn.runtime import l2_normalize
from realsyn.stages.cluster import RUNS_DIR, SentenceBankBuilder, cluster_images, cluster_sentences
from realsyn.storage import Storage
from tests.s3_server import moto_s3

DIM = 8
# shard -> (sentences, dropped by dedup); shard "c" keeps nothing
SHARDS = {"a": (40, {3, 4, 17}), "b": (25, {0, 24}), "c": (2, {0, 1}), "d": (30, set())}


def _embeddings(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    topics = l2_normalize(np.random.default_rng(99).standard_normal((6, DIM)))
    return l2_normalize(topics[rng.integers(0, 6, n)] + 0.3 * rng.standard_normal((n, DIM)))


def _sentence_corpus(storage: Storage) -> None:
    with storage.writer(layout.SENTENCE_DEDUP) as dedup:
        for i, (shard, (n, dropped)) in enumerate(SHARDS.items()):
            ids = [f"{shard}{j}" for j in range(n)]
            with storage.writer(layout.SENTENCE_EMBEDDINGS, shard) as w:
                w.write_numpy(layout.EMBEDDINGS_FILE, _embeddings(n, seed=i))
                w.write_json(layout.MODEL_FILE, {"model_id": "test", "dim": DIM})
            with storage.writer(layout.FILTERED_SENTENCES, shard) as w:
                w.write_parquet(layout.SENTENCES_FILE, pa.table({"sentence_id": ids, "text": [f"text of {x}" for x in ids]}))
            reasons = ["semantic_duplicate" if j in dropped else None for j in range(n)]
            dedup.write_parquet(layout.decisions_file(shard), decision_table(ids, reasons))


def _kept_rows():
    """(sentence ids, embeddings) of every kept sentence, shard by shard in order."""
    ids, embs = [], []
    for i, (shard, (n, dropped)) in enumerate(SHARDS.items()):
        keep = [j for j in range(n) if j not in dropped]
        ids += [f"{shard}{j}" for j in keep]
        embs.append(_embeddings(n, seed=i)[keep])
    return ids, np.concatenate(embs)


def _read_bank(storage: Storage):
    """(parts, concatenated embeddings, concatenated table, layout table) of the committed bank."""
    reader = storage.reader(layout.SENTENCE_CLUSTERS)
    bank_layout = reader.read_parquet(layout.CLUSTER_LAYOUT_FILE)
    n_parts = int(bank_layout.column("part").to_numpy().max()) + 1
    emb = np.concatenate([np.asarray(reader.read_numpy(layout.bank_part_file(p, "npy"))) for p in range(n_parts)])
    tab = pa.concat_tables([reader.read_parquet(layout.bank_part_file(p, "parquet")) for p in range(n_parts)])
    return n_parts, emb, tab, bank_layout


@pytest.mark.parametrize("part_rows", [1, 3, 10**9])
def test_sentence_bank_is_the_global_stable_sort_by_cluster(tmp_path, part_rows):
    storage = Storage(str(tmp_path))
    _sentence_corpus(storage)
    stats = cluster_sentences(storage, list(SHARDS), n_clusters=5, niter=10, seed=0, bank_part_rows=part_rows)
    reader = storage.reader(layout.SENTENCE_CLUSTERS)
    centroids = np.asarray(reader.read_numpy(layout.CENTROIDS_FILE))
    assert centroids.shape == (5, DIM)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)

    # brute force: nearest centroid of every kept sentence, then a stable sort (shard, row order)
    ids, emb = _kept_rows()
    cluster = (emb @ centroids.T).argmax(axis=1)
    order = np.argsort(cluster, kind="stable")
    n_parts, bank_emb, bank_tab, bank_layout = _read_bank(storage)
    assert bank_tab.column_names == ["sentence_id", "text", "cluster"]
    assert bank_tab.column("sentence_id").to_pylist() == [ids[i] for i in order]
    assert bank_tab.column("text").to_pylist() == [f"text of {ids[i]}" for i in order]
    assert bank_tab.column("cluster").to_pylist() == cluster[order].tolist()
    np.testing.assert_array_equal(bank_emb, emb[order])

    # clusters.parquet: cluster c is rows start..end of its part, parts are cut by the row budget
    sizes = np.bincount(cluster, minlength=5)
    assert bank_layout.column_names == ["cluster", "part", "start", "end"]
    assert bank_layout.column("cluster").to_pylist() == list(range(5))
    part, start, end = (bank_layout.column(c).to_numpy() for c in ("part", "start", "end"))
    np.testing.assert_array_equal(end - start, sizes)
    for c in range(5):
        rows = reader.read_parquet(layout.bank_part_file(int(part[c]), "parquet")).column("cluster").to_numpy()[start[c] : end[c]]
        assert (rows == c).all()
    part_sizes = np.bincount(part, weights=sizes)
    assert part_sizes.max() <= max(part_rows, sizes.max())
    assert n_parts == {1: int((sizes > 0).sum()), 3: n_parts, 10**9: 1}[part_rows]

    # assignments: every kept sentence, shard by shard, with its nearest centroid and score
    for shard, (n, dropped) in SHARDS.items():
        got = reader.read_parquet(layout.assignments_file(shard))
        keep = [j for j in range(n) if j not in dropped]
        assert got.column("sentence_id").to_pylist() == [f"{shard}{j}" for j in keep]
        sims = _embeddings(n, seed=list(SHARDS).index(shard))[keep] @ centroids.T
        assert got.column("cluster").to_pylist() == (sims.argmax(axis=1).tolist() if keep else [])
        np.testing.assert_allclose(got.column("score").to_numpy(), sims.max(axis=1, initial=-1), atol=1e-5)

    # the spill runs are gone from disk and were never in the manifest
    assert not any(f.startswith(RUNS_DIR) for f in reader.files)
    assert not (tmp_path / layout.SENTENCE_CLUSTERS / "_global" / f"g-{reader.generation}" / RUNS_DIR).exists()

    summary = reader.read_json(layout.SUMMARY_FILE)
    assert summary["sentences"] == len(ids) == 90 and summary["clusters"] == 5 and summary["bank_parts"] == n_parts
    assert summary["training_rows"] == 90 and summary["coarse_clusters"] == 0  # min(4M, 5 x 256, 90)
    assert summary["largest_cluster"] == sizes.max() and summary["empty_clusters"] == int((sizes == 0).sum())
    assert int((end - start).sum()) == summary["sentences"]  # what the asset check verifies
    assert stats.counts["sentences"] == 90


def test_sentence_bank_is_identical_for_any_part_budget(tmp_path):
    banks = []
    for part_rows in (1, 7, 10**9):
        storage = Storage(str(tmp_path / str(part_rows)))
        _sentence_corpus(storage)
        cluster_sentences(storage, list(SHARDS), n_clusters=5, niter=10, seed=0, bank_part_rows=part_rows)
        _, emb, tab, _ = _read_bank(storage)
        banks.append((emb, tab.to_pylist()))
    for emb, rows in banks[1:]:
        np.testing.assert_array_equal(emb, banks[0][0])
        assert rows == banks[0][1]


def test_sample_budget_and_two_level_training_in_the_stage(tmp_path):
    storage = Storage(str(tmp_path))
    _sentence_corpus(storage)
    cluster_sentences(storage, list(SHARDS), n_clusters=9, sample_rows=30, two_level_above=8, niter=5, seed=0)
    reader = storage.reader(layout.SENTENCE_CLUSTERS)
    summary = reader.read_json(layout.SUMMARY_FILE)
    assert summary["training_rows"] == 30 and summary["coarse_clusters"] == 3  # round(sqrt(9))
    centroids = np.asarray(reader.read_numpy(layout.CENTROIDS_FILE))
    assert centroids.shape == (9, DIM)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    assert summary["sentences"] == 90 and len(_read_bank(storage)[1]) == 90


def _builder_roundtrip(storage: Storage, part_rows: int, run_row_group: int):
    rng = np.random.default_rng(5)
    centroids = train_kmeans(rng.standard_normal((200, DIM)).astype(np.float32), 6, niter=5, seed=0, use_gpu="never")
    shards = {
        "s0": rng.standard_normal((23, DIM)),
        "s1": np.zeros((0, DIM)),
        "s2": rng.standard_normal((41, DIM)),
        "s3": rng.standard_normal((9, DIM)),
    }
    with storage.writer("bank_test") as w:
        bank = SentenceBankBuilder(w, CentroidIndex(centroids, use_gpu="never"), part_rows, run_row_group=run_row_group)
        for name, emb in shards.items():
            ids = [f"{name}-{i}" for i in range(len(emb))]
            bank.add_shard(
                name, emb.astype(np.float32), pa.table({"sentence_id": pa.array(ids, pa.string()), "text": pa.array(ids, pa.string())})
            )
        # three non-empty shards spilled a run each, outside the manifest
        assert sorted(storage.fs.ls(f"{w.gen_dir}/{RUNS_DIR}", detail=False)) == sorted(
            f"{w.gen_dir}/{RUNS_DIR}/{i}.{ext}" for i in range(3) for ext in ("npy", "parquet")
        )
        assert not any(f.startswith(RUNS_DIR) for f in w.files)
        n_parts = bank.finish()
    reader = storage.reader("bank_test")
    all_emb = np.concatenate([e for e in shards.values()]).astype(np.float32)
    all_ids = [f"{name}-{i}" for name, emb in shards.items() for i in range(len(emb))]
    cluster = (all_emb @ centroids.T).argmax(axis=1)
    order = np.argsort(cluster, kind="stable")
    emb = np.concatenate([np.asarray(reader.read_numpy(layout.bank_part_file(p, "npy"))) for p in range(n_parts)])
    tab = pa.concat_tables([reader.read_parquet(layout.bank_part_file(p, "parquet")) for p in range(n_parts)])
    np.testing.assert_array_equal(emb, all_emb[order])
    assert tab.column("sentence_id").to_pylist() == [all_ids[i] for i in order]
    assert tab.column("cluster").to_pylist() == cluster[order].tolist()
    assert reader.read_parquet(layout.assignments_file("s1")).num_rows == 0
    assert not any(f.startswith(RUNS_DIR) for f in reader.files)
    assert not storage.fs.exists(f"{reader.gen_dir}/{RUNS_DIR}")
    return n_parts, np.bincount(cluster, minlength=6)


@pytest.mark.parametrize("part_rows,run_row_group", [(1, 2), (10, 3), (10**9, 8192)])
def test_builder_merges_runs_read_by_slices(tmp_path, part_rows, run_row_group):
    # small row groups make every merge step read a slice that starts and ends inside row groups
    n_parts, sizes = _builder_roundtrip(Storage(str(tmp_path)), part_rows, run_row_group)
    if part_rows == 1:
        assert n_parts == int((sizes > 0).sum())
    if part_rows == 10**9:
        assert n_parts == 1


def test_builder_on_s3():
    with moto_s3():
        n_parts, sizes = _builder_roundtrip(Storage("s3://realsyn/root"), 10, 3)
    assert n_parts >= 2 and sizes.sum() == 73


# ----------------------------------------------------------------------------- images
IMAGE_SHARDS = {"a": (30, {1, 2, 29}), "b": (12, set()), "c": (3, {0, 1, 2})}


def _image_corpus(storage: Storage) -> None:
    for i, (shard, (n, dropped)) in enumerate(IMAGE_SHARDS.items()):
        ids = [f"{shard}-img{j}" for j in range(n)]
        with storage.writer(layout.IMAGE_EMBEDDINGS, shard) as w:
            w.write_numpy(layout.EMBEDDINGS_FILE, _embeddings(n, seed=10 + i))
            w.write_parquet(layout.EMBEDDING_INDEX_FILE, pa.table({"image_id": ids}))
            w.write_json(layout.MODEL_FILE, {"model_id": "test", "dim": DIM})
        # the decision record lists pairs in another order than the embeddings
        rev = ids[::-1]
        with storage.writer(layout.FILTERED_PAIRS, shard) as w:
            w.write_parquet(
                layout.DECISIONS_FILE, decision_table(rev, [("below_band" if int(x.split("img")[1]) in dropped else None) for x in rev])
            )


def test_image_clusters_assign_every_kept_pair_to_its_nearest_centroid(tmp_path):
    storage = Storage(str(tmp_path))
    _image_corpus(storage)
    stats = cluster_images(storage, list(IMAGE_SHARDS), n_clusters=4, sample_rows=20, niter=5, seed=0)
    reader = storage.reader(layout.IMAGE_CLUSTERS)
    centroids = np.asarray(reader.read_numpy(layout.CENTROIDS_FILE))
    assert centroids.shape == (4, DIM)
    counts = np.zeros(4, np.int64)
    for i, (shard, (n, dropped)) in enumerate(IMAGE_SHARDS.items()):
        got = reader.read_parquet(layout.assignments_file(shard))
        kept = [j for j in range(n - 1, -1, -1) if j not in dropped]
        assert got.column("image_id").to_pylist() == [f"{shard}-img{j}" for j in kept]
        expect = (_embeddings(n, seed=10 + i)[kept] @ centroids.T).argmax(axis=1) if kept else np.zeros(0, np.int64)
        assert got.column("cluster").to_pylist() == expect.tolist()
        counts += np.bincount(expect, minlength=4)
    np.testing.assert_array_equal(reader.read_numpy(layout.CLUSTER_COUNTS_FILE), counts)
    summary = reader.read_json(layout.SUMMARY_FILE)
    assert summary["images"] == 39 == counts.sum() and summary["clusters"] == 4
    assert summary["training_rows"] == 20 and summary["coarse_clusters"] == 0  # min(sample_rows 20, 4 x 256, 39)
    assert stats.counts["largest_cluster"] == counts.max()
