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
        """State: ``threshold`` (per cluster, the cap-th smallest key, +inf when size <= cap) and ``counts``.

        One pass: a batch's row is held only if its key is below its cluster's running threshold (the
        cap-th smallest key held so far, +inf until the cluster has ``cap`` rows). Held rows are
        compacted to each cluster's ``cap`` smallest (and the running thresholds tightened) only when
        they have doubled since the last compaction, so memory stays O(clusters * cap) and each row is
        sorted O(1) times amortised. A dropped row's key is at or above a cap-th smallest key already
        seen, so it can never be among the cluster's final ``cap`` smallest: the state equals a sort of
        all keys per cluster.
        """
        counts = np.zeros(0, dtype=np.int64)
        running = np.zeros(0, dtype=np.float64)  # per cluster: upper bound of its final threshold
        held_clusters = np.empty(0, dtype=np.int64)  # compacted: each cluster's cap smallest keys so far
        held_keys = np.empty(0, dtype=np.float64)
        pending: list[tuple[np.ndarray, np.ndarray]] = []  # held since the last compaction
        pending_rows = 0
        for batch in batches:
            valid, keys, clusters = self._keys_and_clusters(batch)
            self.stats.add("fit_rows", len(valid))
            self.stats.add("fit_invalid_rows", int((~valid).sum()))
            if not len(clusters):
                continue
            size = int(clusters.max()) + 1
            counts = _grow(counts, size)
            counts += np.bincount(clusters, minlength=len(counts))
            running = _grow(running, size, fill=np.inf)
            below = keys < running[clusters]
            pending.append((clusters[below], keys[below]))
            pending_rows += int(below.sum())
            if pending_rows > max(len(held_keys), _MIN_COMPACTION_ROWS):
                held_clusters, held_keys = self._compact(held_clusters, held_keys, pending, running)
                pending, pending_rows = [], 0
        held_clusters, held_keys = self._compact(held_clusters, held_keys, pending, running)
        threshold = np.full(len(counts), np.inf, dtype=np.float64)
        big = counts > self.cap
        threshold[big] = running[big]  # a cluster with more than cap rows holds exactly cap: its running threshold is exact
        return {"threshold": threshold, "counts": counts}

    def _compact(
        self, held_clusters: np.ndarray, held_keys: np.ndarray, pending: list[tuple[np.ndarray, np.ndarray]], running: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each cluster's ``cap`` smallest of held + pending rows, sorted by (cluster, key); tightens ``running`` in place."""
        clusters = np.concatenate([held_clusters, *(c for c, _ in pending)])
        keys = np.concatenate([held_keys, *(k for _, k in pending)])
        order = np.lexsort((keys, clusters))
        clusters, keys = clusters[order], keys[order]
        keep = _rank_within_groups(clusters) < self.cap
        clusters, keys = clusters[keep], keys[keep]
        if len(clusters):
            # The cap-th key of every cluster holding cap rows: its last one in (cluster, key) order.
            last = np.append(clusters[1:] != clusters[:-1], True)
            full = last & (_rank_within_groups(clusters) == self.cap - 1)
            running[clusters[full]] = keys[full]
        return clusters, keys

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


_MIN_COMPACTION_ROWS = 1 << 16


def _grow(values: np.ndarray, size: int, fill: float = 0) -> np.ndarray:
    if size <= len(values):
        return values
    out = np.full(size, fill, dtype=values.dtype)
    out[: len(values)] = values
    return out


def _rank_within_groups(sorted_groups: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal values of a sorted array."""
    n = len(sorted_groups)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.nonzero(np.append(True, sorted_groups[1:] != sorted_groups[:-1]))[0]
    run_start = np.repeat(starts, np.diff(np.append(starts, n)))
    return np.arange(n, dtype=np.int64) - run_start
