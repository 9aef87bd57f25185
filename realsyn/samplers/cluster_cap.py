"""RealSyn's semantic balanced sampling: at most ``cap`` rows per image cluster."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa

from realsyn.plugins.kinds import Sampler
from realsyn.samplers import uniform_keys
from realsyn.stats import StepStats


def _column(batch: pa.Table | pa.RecordBatch, name: str) -> pa.Array:
    col = batch.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


class ClusterCapSampler(Sampler):
    """RealSyn's semantic balanced sampling: at most ``cap`` random rows per cluster.

    Clusters larger than ``cap`` keep exactly ``cap`` rows (those with the smallest hash keys),
    smaller clusters are kept whole. Rows with a null id or a null/negative cluster are dropped
    and counted in ``stats``. Image ids are assumed unique (they are, after dedup).
    """

    name = "cluster_cap"
    required_columns = ("image_id", "cluster")

    def __init__(self, cap: int, seed: int = 0):
        if cap <= 0:
            raise ValueError(f"cap must be positive, got {cap}")
        self.cap, self.seed = int(cap), int(seed)
        self.stats = StepStats(f"sample_{self.name}")

    def _keys_and_clusters(self, batch: pa.Table | pa.RecordBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(valid row mask, keys of valid rows, clusters of valid rows)."""
        ids = _column(batch, "image_id")
        clusters = _column(batch, "cluster")
        if not pa.types.is_integer(clusters.type):
            raise TypeError(f"column 'cluster' must be an integer column, got {clusters.type}")
        id_ok = ~np.asarray(ids.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        cluster_values = clusters.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        cluster_ok = cluster_values >= 0
        valid = id_ok & cluster_ok
        id_list = ids.to_pylist()
        keys = uniform_keys([id_list[i] for i in np.nonzero(valid)[0]], self.seed)
        return valid, keys, cluster_values[valid]

    def fit(self, batches: Iterable[pa.Table]) -> dict[str, np.ndarray]:
        """State: ``threshold`` (per cluster, the cap-th smallest key, +inf when size <= cap) and ``counts``."""
        counts = np.zeros(0, dtype=np.int64)
        best_clusters = np.empty(0, dtype=np.int64)  # running cap smallest keys per cluster
        best_keys = np.empty(0, dtype=np.float64)
        for batch in batches:
            valid, keys, clusters = self._keys_and_clusters(batch)
            self.stats.add("fit_rows", len(valid))
            self.stats.add("fit_invalid_rows", int((~valid).sum()))
            if len(clusters):
                counts = _grow(counts, int(clusters.max()) + 1)
                counts += np.bincount(clusters, minlength=len(counts))
            best_clusters = np.concatenate([best_clusters, clusters])
            best_keys = np.concatenate([best_keys, keys])
            # Sort by (cluster, key); keep each cluster's first `cap`: memory stays O(clusters * cap).
            order = np.lexsort((best_keys, best_clusters))
            best_clusters, best_keys = best_clusters[order], best_keys[order]
            keep = _rank_within_groups(best_clusters) < self.cap
            best_clusters, best_keys = best_clusters[keep], best_keys[keep]
        threshold = np.full(len(counts), np.inf, dtype=np.float64)
        big = counts > self.cap
        # best_* is sorted by (cluster, key): each big cluster's last kept key is its threshold.
        last_of_group = np.append(best_clusters[1:] != best_clusters[:-1], True) if len(best_clusters) else np.zeros(0, bool)
        group_clusters, group_max = best_clusters[last_of_group], best_keys[last_of_group]
        sel = big[group_clusters]
        threshold[group_clusters[sel]] = group_max[sel]
        return {"threshold": threshold, "counts": counts}

    def reasons(self, batch: pa.Table, state: dict[str, np.ndarray]) -> list[str | None]:
        threshold = np.asarray(state["threshold"], dtype=np.float64)
        valid, keys, clusters = self._keys_and_clusters(batch)
        reasons: np.ndarray = np.full(len(valid), "null_image_id_or_cluster", dtype=object)
        fitted = clusters < len(threshold)
        # A cluster the fit never saw means the input changed since fitting.
        keep_valid = np.zeros(len(clusters), dtype=bool)
        keep_valid[fitted] = keys[fitted] <= threshold[clusters[fitted]]
        valid_reasons = np.where(fitted, np.where(keep_valid, None, "over_cap"), "cluster_not_fitted")
        reasons[np.nonzero(valid)[0]] = valid_reasons
        self.stats.drop("null_image_id_or_cluster", int((~valid).sum()))
        self.stats.drop("cluster_not_fitted", int((~fitted).sum()))
        self.stats.add("selected", int(keep_valid.sum()))
        self.stats.drop("over_cap", int(fitted.sum() - keep_valid.sum()))
        return reasons.tolist()


def _grow(counts: np.ndarray, size: int) -> np.ndarray:
    if size <= len(counts):
        return counts
    out = np.zeros(size, dtype=counts.dtype)
    out[: len(counts)] = counts
    return out


def _rank_within_groups(sorted_groups: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal values of a sorted array."""
    n = len(sorted_groups)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.nonzero(np.append(True, sorted_groups[1:] != sorted_groups[:-1]))[0]
    run_start = np.repeat(starts, np.diff(np.append(starts, n)))
    return np.arange(n, dtype=np.int64) - run_start
