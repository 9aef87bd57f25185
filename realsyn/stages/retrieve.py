"""Stage 7: hierarchical retrieval of the top-k real sentences per kept image from the sentence bank."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from realsyn import layout
from realsyn.stages.common import kept_image_embeddings
from realsyn.stats import StepStats
from realsyn.storage import Storage


class ClusterBank:
    """Reads the cluster-ordered sentence bank, one part in memory at a time."""

    def __init__(self, storage: Storage):
        self.reader = storage.reader(layout.SENTENCE_CLUSTERS)
        self.centroids = np.asarray(self.reader.read_numpy(layout.CENTROIDS_FILE), dtype=np.float32)
        bank_layout = self.reader.read_parquet(layout.CLUSTER_LAYOUT_FILE)
        self.part = bank_layout.column("part").to_numpy()
        self.start = bank_layout.column("start").to_numpy()
        self.end = bank_layout.column("end").to_numpy()
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

    stats = StepStats(layout.RETRIEVALS)
    with stats.timed():
        image_ids, emb = kept_image_embeddings(storage, shard)
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
        table = pa.table(
            {"image_id": image_ids, "sentence_ids": out_ids, "texts": out_texts, "scores": out_scores}, schema=layout.RETRIEVAL_SCHEMA
        )
        stats.add("images", len(image_ids))
        stats.add("texts_retrieved", int(valid.sum()))
        short = int((valid.sum(axis=1) < k).sum()) if len(image_ids) else 0
        stats.add("images_with_fewer_than_k", short)
        with storage.writer(layout.RETRIEVALS, shard) as w:
            w.write_parquet(layout.RETRIEVALS_FILE, table)
    return stats
