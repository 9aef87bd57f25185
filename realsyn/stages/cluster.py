"""Stages 6 and 10: sentence K-means with a cluster-ordered sentence bank; image K-means of the kept pairs.

The bank is cut into parts by cluster range so one part fits in memory at scale; retrieval loads a
part once for all the images of a shard that probe its clusters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from realsyn import layout
from realsyn.stages.common import dedup_kept_mask, kept_pair_ids, require_partitions
from realsyn.stats import StepStats
from realsyn.storage import Storage


def _kept_sentences(storage: Storage, shard: str) -> tuple[np.ndarray, pa.Table]:
    """Embeddings and (sentence_id, text) of one shard's sentences that survived dedup."""
    mask = dedup_kept_mask(storage, layout.SENTENCE_DEDUP, shard)
    emb = np.asarray(storage.reader(layout.SENTENCE_EMBEDDINGS, shard).read_numpy(layout.EMBEDDINGS_FILE), dtype=np.float32)[mask]
    texts = (
        storage.reader(layout.FILTERED_SENTENCES, shard)
        .read_parquet(layout.SENTENCES_FILE, columns=["sentence_id", "text"])
        .filter(pa.array(mask))
    )
    return emb, texts


def cluster_sentences(
    storage: Storage,
    shards: Sequence[str],
    *,
    n_clusters: int | None = None,
    sentences_per_cluster: int = 420,
    max_points_per_centroid: int = 256,
    niter: int = 20,
    seed: int = 0,
    bank_parts: int = 1,
) -> StepStats:
    """K-means on a sample, assignment of every kept sentence, and the cluster-ordered bank."""
    from realsyn.clustering import ReservoirSample, assign, cluster_order, train_kmeans

    stats = StepStats(layout.SENTENCE_CLUSTERS)
    with stats.timed():
        shards = require_partitions(storage, layout.SENTENCE_EMBEDDINGS, shards)
        n_kept = sum(int(dedup_kept_mask(storage, layout.SENTENCE_DEDUP, s).sum()) for s in shards)
        if n_kept == 0:
            raise ValueError("sentence_clusters: no sentence survived filtering and dedup; nothing to cluster")
        # paper: 840M sentences into 2M clusters, i.e. ~420 sentences per cluster
        k = n_clusters or max(1, round(n_kept / sentences_per_cluster))
        k = min(k, n_kept)
        dim = int(storage.reader(layout.SENTENCE_EMBEDDINGS, shards[0]).read_json(layout.MODEL_FILE)["dim"])
        sample = ReservoirSample(capacity=k * max_points_per_centroid, dim=dim, seed=seed)
        for s in shards:
            sample.add(_kept_sentences(storage, s)[0])
        centroids = np.asarray(train_kmeans(sample.array(), k, niter=niter, seed=seed), dtype=np.float32)
        k = len(centroids)
        bank_parts = max(1, min(bank_parts, k))
        bounds = np.linspace(0, k, bank_parts + 1).astype(np.int64)
        sizes = np.zeros(k, np.int64)
        with storage.writer(layout.SENTENCE_CLUSTERS) as w:
            w.write_numpy(layout.CENTROIDS_FILE, centroids)
            for s in shards:
                emb, texts = _kept_sentences(storage, s)
                ids, scores = assign(emb, centroids, 1)
                sizes += np.bincount(ids[:, 0], minlength=k)
                w.write_parquet(
                    layout.assignments_file(s),
                    texts.select(["sentence_id"])
                    .append_column("cluster", pa.array(ids[:, 0].astype(np.int32)))
                    .append_column("score", pa.array(scores[:, 0])),
                )
            # one pass over the shards per bank part keeps memory at one part
            part_rows = []
            for p in range(bank_parts):
                lo, hi = int(bounds[p]), int(bounds[p + 1])
                embs, tabs, clus = [], [], []
                for s in shards:
                    emb, texts = _kept_sentences(storage, s)
                    cl = w.read_parquet(layout.assignments_file(s), columns=["cluster"]).column("cluster").to_numpy()
                    sel = (cl >= lo) & (cl < hi)
                    embs.append(emb[sel])
                    tabs.append(texts.filter(pa.array(sel)))
                    clus.append(cl[sel])
                emb_p = np.concatenate(embs) if embs else np.zeros((0, dim), np.float32)
                cl_p = np.concatenate(clus).astype(np.int64) - lo if clus else np.zeros(0, np.int64)
                order, offsets = cluster_order(cl_p, hi - lo)
                tab_p = pa.concat_tables(tabs).take(pa.array(order)) if tabs else pa.table({"sentence_id": [], "text": []})
                w.write_numpy(f"bank/part-{p:05d}.npy", emb_p[order])
                w.write_parquet(f"bank/part-{p:05d}.parquet", tab_p.append_column("cluster", pa.array((cl_p[order] + lo).astype(np.int32))))
                for c in range(lo, hi):
                    part_rows.append((c, p, int(offsets[c - lo]), int(offsets[c - lo + 1])))
            w.write_parquet(
                layout.CLUSTER_LAYOUT_FILE,
                pa.table(
                    {
                        "cluster": [r[0] for r in part_rows],
                        "part": [r[1] for r in part_rows],
                        "start": [r[2] for r in part_rows],
                        "end": [r[3] for r in part_rows],
                    }
                ),
            )
            stats.add("sentences", n_kept)
            stats.add("clusters", k)
            stats.add("bank_parts", bank_parts)
            stats.add("largest_cluster", int(sizes.max()))
            stats.add("empty_clusters", int((sizes == 0).sum()))
            w.write_json(layout.SUMMARY_FILE, stats.as_dict())
    return stats


def _embeddings_of(storage: Storage, shard: str, image_ids: Sequence[str]) -> np.ndarray:
    reader = storage.reader(layout.IMAGE_EMBEDDINGS, shard)
    all_ids = reader.read_parquet(layout.EMBEDDING_INDEX_FILE, columns=["image_id"]).column("image_id").to_pylist()
    pos = {x: i for i, x in enumerate(all_ids)}
    return np.asarray(reader.read_numpy(layout.EMBEDDINGS_FILE), dtype=np.float32)[[pos[i] for i in image_ids]]


def cluster_images(
    storage: Storage,
    shards: Sequence[str],
    *,
    n_clusters: int | None = None,
    images_per_cluster: int = 168,
    max_points_per_centroid: int = 256,
    niter: int = 20,
    seed: int = 0,
) -> StepStats:
    """K-means of the kept pairs' image embeddings (paper: 168M images into 1M centres)."""
    from realsyn.clustering import ReservoirSample, assign, train_kmeans

    stats = StepStats(layout.IMAGE_CLUSTERS)
    with stats.timed():
        shards = require_partitions(storage, layout.FILTERED_PAIRS, shards)
        kept = {s: kept_pair_ids(storage, s) for s in shards}
        n = sum(len(v) for v in kept.values())
        if n == 0:
            raise ValueError("image_clusters: no image-text pair survived the similarity filter")
        k = min(n, n_clusters or max(1, round(n / images_per_cluster)))
        dim = int(storage.reader(layout.IMAGE_EMBEDDINGS, shards[0]).read_json(layout.MODEL_FILE)["dim"])
        sample = ReservoirSample(capacity=k * max_points_per_centroid, dim=dim, seed=seed)
        for s in shards:
            sample.add(_embeddings_of(storage, s, kept[s]))
        centroids = np.asarray(train_kmeans(sample.array(), k, niter=niter, seed=seed), dtype=np.float32)
        counts = np.zeros(len(centroids), np.int64)
        with storage.writer(layout.IMAGE_CLUSTERS) as w:
            w.write_numpy(layout.CENTROIDS_FILE, centroids)
            for s in shards:
                ids, _ = assign(_embeddings_of(storage, s, kept[s]), centroids, 1)
                counts += np.bincount(ids[:, 0], minlength=len(centroids))
                w.write_parquet(
                    layout.assignments_file(s),
                    pa.table({"image_id": pa.array(kept[s], pa.string()), "cluster": pa.array(ids[:, 0].astype(np.int32))}),
                )
            w.write_numpy(layout.CLUSTER_COUNTS_FILE, counts)
            stats.add("images", n)
            stats.add("clusters", len(centroids))
            stats.add("largest_cluster", int(counts.max()))
            w.write_json(layout.SUMMARY_FILE, stats.as_dict())
    return stats
