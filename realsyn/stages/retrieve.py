"""Stages 6-7: sentence K-means with a cluster-ordered sentence bank, then hierarchical retrieval.

The bank is cut into parts by cluster range so one part fits in memory at scale; retrieval loads a
part once for all the images of a shard that probe its clusters.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from realsyn.stages.common import require_partitions
from realsyn.stages.dedup import IMAGE_DEDUP, SENTENCE_DEDUP, kept_mask
from realsyn.stages.embed import IMAGE_EMBEDDINGS, SENTENCE_EMBEDDINGS
from realsyn.stages.ingest import FILTERED_SENTENCES
from realsyn.stats import StepStats
from realsyn.storage import Storage

log = logging.getLogger("realsyn")

SENTENCE_CLUSTERS = "sentence_clusters"
RETRIEVALS = "retrievals"

RETRIEVAL_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("sentence_ids", pa.list_(pa.string())), ("texts", pa.list_(pa.string())), ("scores", pa.list_(pa.float32()))]
)


def _kept_sentences(storage: Storage, shard: str) -> tuple[np.ndarray, pa.Table]:
    """Embeddings and (sentence_id, text) of one shard's sentences that survived dedup."""
    mask = kept_mask(storage, SENTENCE_DEDUP, shard)
    emb = np.asarray(storage.reader(SENTENCE_EMBEDDINGS, shard).read_numpy("embeddings.npy"), dtype=np.float32)[mask]
    texts = storage.reader(FILTERED_SENTENCES, shard).read_parquet("sentences.parquet", columns=["sentence_id", "text"]).filter(pa.array(mask))
    return emb, texts


def cluster_sentences(storage: Storage, shards: Sequence[str], *, n_clusters: int | None = None, sentences_per_cluster: int = 420, max_points_per_centroid: int = 256, niter: int = 20, seed: int = 0, bank_parts: int = 1) -> StepStats:
    """K-means on a sample, assignment of every kept sentence, and the cluster-ordered bank."""
    from realsyn.clustering import ReservoirSample, assign, cluster_order, train_kmeans

    stats = StepStats(SENTENCE_CLUSTERS)
    with stats.timed():
        shards = require_partitions(storage, SENTENCE_EMBEDDINGS, shards)
        n_kept = sum(int(kept_mask(storage, SENTENCE_DEDUP, s).sum()) for s in shards)
        if n_kept == 0:
            raise ValueError("sentence_clusters: no sentence survived filtering and dedup; nothing to cluster")
        # paper: 840M sentences into 2M clusters, i.e. ~420 sentences per cluster
        k = n_clusters or max(1, round(n_kept / sentences_per_cluster))
        k = min(k, n_kept)
        dim = int(storage.reader(SENTENCE_EMBEDDINGS, shards[0]).read_json("model.json")["dim"])
        sample = ReservoirSample(capacity=k * max_points_per_centroid, dim=dim, seed=seed)
        for s in shards:
            sample.add(_kept_sentences(storage, s)[0])
        centroids = np.asarray(train_kmeans(sample.array(), k, niter=niter, seed=seed), dtype=np.float32)
        k = len(centroids)
        bank_parts = max(1, min(bank_parts, k))
        bounds = np.linspace(0, k, bank_parts + 1).astype(np.int64)
        sizes = np.zeros(k, np.int64)
        with storage.writer(SENTENCE_CLUSTERS) as w:
            w.write_numpy("centroids.npy", centroids)
            for s in shards:
                emb, texts = _kept_sentences(storage, s)
                ids, scores = assign(emb, centroids, 1)
                sizes += np.bincount(ids[:, 0], minlength=k)
                w.write_parquet(f"assignments/{s}.parquet", texts.select(["sentence_id"]).append_column("cluster", pa.array(ids[:, 0].astype(np.int32))).append_column("score", pa.array(scores[:, 0])))
            # one pass over the shards per bank part keeps memory at one part
            part_rows = []
            for p in range(bank_parts):
                lo, hi = int(bounds[p]), int(bounds[p + 1])
                embs, tabs, clus = [], [], []
                for s in shards:
                    emb, texts = _kept_sentences(storage, s)
                    cl = w.read_parquet(f"assignments/{s}.parquet", columns=["cluster"]).column("cluster").to_numpy()
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
            w.write_parquet("clusters.parquet", pa.table({"cluster": [r[0] for r in part_rows], "part": [r[1] for r in part_rows], "start": [r[2] for r in part_rows], "end": [r[3] for r in part_rows]}))
            stats.add("sentences", n_kept)
            stats.add("clusters", k)
            stats.add("bank_parts", bank_parts)
            stats.add("largest_cluster", int(sizes.max()))
            stats.add("empty_clusters", int((sizes == 0).sum()))
            w.write_json("summary.json", stats.as_dict())
    return stats


class ClusterBank:
    """Reads the cluster-ordered sentence bank, one part in memory at a time."""

    def __init__(self, storage: Storage):
        self.reader = storage.reader(SENTENCE_CLUSTERS)
        self.centroids = np.asarray(self.reader.read_numpy("centroids.npy"), dtype=np.float32)
        layout = self.reader.read_parquet("clusters.parquet")
        self.part = layout.column("part").to_numpy()
        self.start = layout.column("start").to_numpy()
        self.end = layout.column("end").to_numpy()
        n_parts = int(self.part.max()) + 1 if len(self.part) else 0
        # global bank row id = part base + row within part
        part_sizes = [int(self.end[self.part == p].max(initial=0)) for p in range(n_parts)]
        self.part_base = np.concatenate([[0], np.cumsum(part_sizes)]).astype(np.int64)
        self._loaded: tuple[int, np.ndarray, pa.Table] | None = None
        self.parts_loaded = 0

    def _load_part(self, p: int) -> tuple[np.ndarray, pa.Table]:
        if self._loaded is None or self._loaded[0] != p:
            emb = np.asarray(self.reader.read_numpy(f"bank/part-{p:05d}.npy"), dtype=np.float32)
            tab = self.reader.read_parquet(f"bank/part-{p:05d}.parquet", columns=["sentence_id", "text"])
            self._loaded = (p, emb, tab)
            self.parts_loaded += 1
        return self._loaded[1], self._loaded[2]

    def load_cluster(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        p, s, e = int(self.part[c]), int(self.start[c]), int(self.end[c])
        emb, _ = self._load_part(p)
        return np.arange(self.part_base[p] + s, self.part_base[p] + e, dtype=np.int64), emb[s:e]

    def lookup(self, row_ids: np.ndarray) -> tuple[list[str], list[str]]:
        """(sentence_ids, texts) of global bank rows, loading each part once."""
        sids: list[str] = [""] * len(row_ids)
        texts: list[str] = [""] * len(row_ids)
        parts = np.searchsorted(self.part_base, row_ids, side="right") - 1
        for p in np.unique(parts):
            _, tab = self._load_part(int(p))
            idx = np.flatnonzero(parts == p)
            local = pa.array(row_ids[idx] - self.part_base[p])
            for i, sid, text in zip(idx, tab.column("sentence_id").take(local).to_pylist(), tab.column("text").take(local).to_pylist()):
                sids[i], texts[i] = sid, text
        return sids, texts


def retrieve_for_shard(storage: Storage, shard: str, *, k: int = 3, n_probe: int = 1) -> StepStats:
    """Top-k real sentences for each kept image of one shard, best first."""
    from realsyn.retrieval import hierarchical_search

    stats = StepStats(RETRIEVALS)
    with stats.timed():
        mask = kept_mask(storage, IMAGE_DEDUP, shard)
        emb = np.asarray(storage.reader(IMAGE_EMBEDDINGS, shard).read_numpy("embeddings.npy"), dtype=np.float32)[mask]
        image_ids = storage.reader(IMAGE_EMBEDDINGS, shard).read_parquet("index.parquet", columns=["image_id"]).column("image_id").filter(pa.array(mask)).to_pylist()
        bank = ClusterBank(storage)
        row_ids, scores = hierarchical_search(emb, bank.centroids, bank.load_cluster, n_probe=min(n_probe, len(bank.centroids)), k=k)
        valid = row_ids >= 0
        sids, texts = bank.lookup(row_ids[valid])
        it = iter(zip(sids, texts))
        out_ids, out_texts, out_scores = [], [], []
        for i in range(len(image_ids)):
            pairs = [next(it) for _ in range(int(valid[i].sum()))]
            out_ids.append([p[0] for p in pairs])
            out_texts.append([p[1] for p in pairs])
            out_scores.append([float(x) for x in scores[i][valid[i]]])
        table = pa.table({"image_id": image_ids, "sentence_ids": out_ids, "texts": out_texts, "scores": out_scores}, schema=RETRIEVAL_SCHEMA)
        stats.add("images", len(image_ids))
        stats.add("texts_retrieved", int(valid.sum()))
        short = int((valid.sum(axis=1) < k).sum()) if len(image_ids) else 0
        stats.add("images_with_fewer_than_k", short)
        with storage.writer(RETRIEVALS, shard) as w:
            w.write_parquet("retrievals.parquet", table)
    return stats
