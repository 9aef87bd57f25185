"""RealSyn's semantic balanced sampling: at most ``cap`` rows per image cluster."""

from __future__ import annotations

import os
import shutil
import tempfile
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
    ``max_held_rows``: the (cluster, key) rows ``fit`` holds in memory (None: ``MAX_HELD_ROWS``);
    beyond it they are spilled to a temporary folder as sorted runs (``spill_dir``; None: the
    system's), merged at the end one range of clusters at a time. The state does not depend on it.
    """

    name = "cluster_cap"
    required_columns = ("image_id", "cluster")

    def __init__(self, cap: int, seed: int = 0, max_held_rows: int | None = None, spill_dir: str | None = None):
        if cap <= 0:
            raise ValueError(f"cap must be positive, got {cap}")
        if max_held_rows is not None and max_held_rows <= 0:
            raise ValueError(f"max_held_rows must be positive, got {max_held_rows}")
        self.cap, self.seed = int(cap), int(seed)
        self.max_held_rows, self.spill_dir = max_held_rows, spill_dir
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
        they have doubled since the last compaction, so each row is sorted O(1) times amortised. A
        dropped row's key is at or above a cap-th smallest key already seen, so it can never be among
        the cluster's final ``cap`` smallest: the state equals a sort of all keys per cluster.

        Memory: the held rows are O(clusters * cap), as many as the rows when clusters are small, so
        once a compaction leaves more than ``max_held_rows`` they are written out as a run (sorted by
        cluster, key; at most ``cap`` per cluster) and holding starts afresh; the running thresholds
        stay (each is still the cap-th smallest of keys seen). The final thresholds are then the
        cap-th smallest over all runs, merged one contiguous range of clusters (<= ``max_held_rows``
        run rows) at a time: resident state is O(max_held_rows + clusters), whatever the rows.
        """
        budget = int(self.max_held_rows or MAX_HELD_ROWS)
        counts = np.zeros(0, dtype=np.int64)
        running = np.zeros(0, dtype=np.float64)  # per cluster: upper bound of its final threshold
        held_clusters = np.empty(0, dtype=np.int64)  # compacted: each cluster's cap smallest keys so far
        held_keys = np.empty(0, dtype=np.float64)
        pending: list[tuple[np.ndarray, np.ndarray]] = []  # held since the last compaction
        pending_rows = 0
        runs = _Runs(self.spill_dir)
        try:
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
                    if len(held_keys) > budget:
                        runs.write(held_clusters, held_keys)
                        held_clusters, held_keys = np.empty(0, np.int64), np.empty(0, np.float64)
            held_clusters, held_keys = self._compact(held_clusters, held_keys, pending, running)
            threshold = np.full(len(counts), np.inf, dtype=np.float64)
            big = counts > self.cap
            if runs.paths:
                runs.write(held_clusters, held_keys)
                del held_clusters, held_keys
                self.stats.add("fit_spilled_runs", len(runs.paths))
                threshold[big] = runs.cap_th_smallest(len(counts), self.cap, budget)[big]
            else:
                threshold[big] = running[big]  # a cluster with more than cap rows holds exactly cap: its running threshold is exact
        finally:
            runs.close()
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
MAX_HELD_ROWS = 1 << 17  # (cluster, key) rows fit holds before spilling a run: 16 bytes each, ~5x that while compacting


class _Runs:
    """Runs of (cluster, key) rows sorted by (cluster, key), spilled as .npy files to a temporary folder
    (made on the first write, removed by ``close``), with the run rows per cluster counted."""

    def __init__(self, spill_dir: str | None):
        self.spill_dir, self.tmp = spill_dir, None
        self.paths: list[tuple[str, str]] = []
        self.rows_per_cluster = np.zeros(0, dtype=np.int64)

    def write(self, clusters: np.ndarray, keys: np.ndarray) -> None:
        if self.tmp is None:
            self.tmp = tempfile.mkdtemp(prefix="realsyn-cluster-cap-", dir=self.spill_dir)
        paths = tuple(os.path.join(self.tmp, f"{len(self.paths)}.{name}.npy") for name in ("clusters", "keys"))
        np.save(paths[0], clusters)
        np.save(paths[1], keys)
        self.paths.append(paths)
        if len(clusters):
            self.rows_per_cluster = _grow(self.rows_per_cluster, int(clusters[-1]) + 1)
            self.rows_per_cluster += np.bincount(clusters, minlength=len(self.rows_per_cluster))

    def cap_th_smallest(self, n_clusters: int, cap: int, max_rows: int) -> np.ndarray:
        """Per cluster, the cap-th smallest key over every run (+inf with fewer): contiguous ranges of
        clusters holding <= ``max_rows`` run rows (a cluster alone may hold more) read one at a time."""
        out = np.full(n_clusters, np.inf, dtype=np.float64)
        cum = np.cumsum(_grow(self.rows_per_cluster, n_clusters)[:n_clusters])
        lo = 0
        while lo < n_clusters:
            done = int(cum[lo - 1]) if lo else 0
            hi = max(int(np.searchsorted(cum, done + max_rows, side="right")), lo + 1)
            parts_c, parts_k = [], []
            for clusters_path, keys_path in self.paths:
                run_clusters = np.load(clusters_path, mmap_mode="r")
                a, b = np.searchsorted(run_clusters, [lo, hi])
                if b > a:
                    parts_c.append(np.array(run_clusters[a:b]))
                    parts_k.append(np.array(np.load(keys_path, mmap_mode="r")[a:b]))
                del run_clusters
            if parts_c:
                clusters, keys = np.concatenate(parts_c), np.concatenate(parts_k)
                del parts_c, parts_k
                order = np.lexsort((keys, clusters))
                clusters, keys = clusters[order], keys[order]
                at = _rank_within_groups(clusters) == cap - 1
                out[clusters[at]] = keys[at]
            lo = hi
        return out

    def close(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


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
