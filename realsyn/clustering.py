"""K-means over embeddings (faiss): a streaming training sample, training, assignment, cluster layout.

At scale K-means trains on a sample (faiss uses at most ``max_points_per_centroid`` points per
centroid anyway), then every shard is assigned to the trained centroids on its own.
"""

from __future__ import annotations

import logging

import numpy as np

from realsyn.runtime import faiss_use_gpu, l2_normalize

logger = logging.getLogger(__name__)


class ReservoirSample:
    """A uniform random sample of at most ``capacity`` rows out of every row passed to ``add``.

    Algorithm R, vectorised per batch: row number ``t`` (0-based, over the whole stream) takes a
    random slot ``j`` in ``[0, t]`` and replaces slot ``j`` when ``j < capacity``. Rows with a
    non-finite value are skipped and counted in ``skipped_nonfinite``.
    """

    def __init__(self, capacity: int, dim: int, seed: int):
        if capacity <= 0 or dim <= 0:
            raise ValueError(f"capacity and dim must be positive, got {capacity}, {dim}")
        self.capacity, self.dim = int(capacity), int(dim)
        self.rng = np.random.default_rng(seed)
        self.seen = 0
        self.skipped_nonfinite = 0
        self._rows = np.empty((0, self.dim), dtype=np.float32)  # grows until capacity

    def add(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim != 2 or batch.shape[1] != self.dim:
            raise ValueError(f"expected a (n, {self.dim}) batch, got shape {batch.shape}")
        finite = np.isfinite(batch).all(axis=1)
        self.skipped_nonfinite += int((~finite).sum())
        batch = batch[finite]
        if len(batch) == 0:
            return
        # The first rows fill the reservoir until it is full.
        free = max(0, self.capacity - len(self._rows))
        if free:
            self._rows = np.concatenate([self._rows, batch[:free]])
            self.seen += min(free, len(batch))
            batch = batch[free:]
        if len(batch) == 0:
            return
        stream_pos = self.seen + np.arange(len(batch), dtype=np.int64)
        slots = self.rng.integers(0, stream_pos + 1)
        replace = np.nonzero(slots < self.capacity)[0]
        if len(replace):
            # Several rows of this batch may hit the same slot: the latest one wins, as in the
            # sequential algorithm. np.unique over the reversed hits finds each slot's latest row.
            rev = replace[::-1]
            slot_ids, first = np.unique(slots[rev], return_index=True)
            self._rows[slot_ids] = batch[rev[first]]
        self.seen += len(batch)

    def __len__(self) -> int:
        return len(self._rows)

    def array(self) -> np.ndarray:
        """The sampled rows, float32 (min(seen, capacity), dim)."""
        return self._rows.copy()


def _faiss():
    import faiss

    return faiss


def train_kmeans(
    sample: np.ndarray,
    k: int,
    niter: int = 20,
    seed: int = 0,
    spherical: bool = True,
    use_gpu: str = "auto",
    max_points_per_centroid: int = 256,
) -> np.ndarray:
    """Centroids float32 (min(k, n), D) by faiss K-means; spherical (unit centroids, for cosine) by default.

    With ``spherical`` the sample rows are normalised first, so the clustering is by cosine.
    """
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if sample.ndim != 2 or len(sample) == 0:
        raise ValueError(f"need a non-empty (n, D) sample, got shape {sample.shape}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if not np.isfinite(sample).all():
        raise ValueError("sample holds non-finite values")
    n, dim = sample.shape
    k_eff = min(int(k), n)
    if k_eff < k:
        logger.warning("train_kmeans: only %d training points for k=%d; training %d centroids", n, k, k_eff)
    if spherical:
        sample = l2_normalize(sample)
    gpu = faiss_use_gpu(use_gpu)
    faiss = _faiss()
    km = faiss.Kmeans(
        dim,
        k_eff,
        niter=int(niter),
        seed=int(seed),
        spherical=bool(spherical),
        gpu=gpu,
        verbose=False,
        max_points_per_centroid=int(max_points_per_centroid),
        # faiss warns below 39 points per centroid; a small sample is the caller's choice.
        min_points_per_centroid=1,
    )
    km.train(sample)
    return np.ascontiguousarray(km.centroids, dtype=np.float32).reshape(k_eff, dim)


class CentroidIndex:
    """Nearest centroids by inner product, the one index that assigns and probes clusters.

    Exact (``IndexFlatIP``) up to ``exact_up_to`` centroids; above, HNSW over the centroids
    (``hnsw_m`` links, ``ef_search`` candidates), whose cost grows with log K instead of K: at 2M
    sentence clusters a flat scan is nearly all of the assignment work. On a GPU machine the flat
    index moves to the GPUs (``use_gpu``: auto, true, false).
    """

    def __init__(self, centroids: np.ndarray, *, exact_up_to: int = 65536, hnsw_m: int = 32, ef_search: int = 128, use_gpu: str = "auto"):
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        if centroids.ndim != 2 or len(centroids) == 0:
            raise ValueError(f"need a non-empty (k, D) centroid array, got shape {centroids.shape}")
        faiss = _faiss()
        self.k, self.dim = centroids.shape
        self.exact = self.k <= exact_up_to
        if self.exact:
            index = faiss.IndexFlatIP(self.dim)
            if faiss_use_gpu(use_gpu):
                index = faiss.index_cpu_to_all_gpus(index)
        else:
            index = faiss.IndexHNSWFlat(self.dim, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = max(int(ef_search), 1)
        index.add(centroids)
        self.index = index

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Each row's ``n`` nearest centroids, best first: (ids int64 (N, p), scores float32 (N, p)), p = min(n, k)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries of shape {queries.shape} do not match centroids of dim {self.dim}")
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        p = min(int(n), self.k)
        if len(queries) == 0:
            return np.empty((0, p), dtype=np.int64), np.empty((0, p), dtype=np.float32)
        if not self.exact:
            self.index.hnsw.efSearch = max(self.index.hnsw.efSearch, p)
        scores, ids = self.index.search(queries, p)
        return ids.astype(np.int64), scores.astype(np.float32)


def assign(emb: np.ndarray, centroids: np.ndarray | CentroidIndex, n_probe: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``n_probe`` nearest centroids by inner product, best first (through a ``CentroidIndex``).

    Returns (ids int64 (N, p), scores float32 (N, p)) with p = min(n_probe, number of centroids).
    """
    index = centroids if isinstance(centroids, CentroidIndex) else CentroidIndex(centroids)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[1] != index.dim:
        raise ValueError(f"embeddings of shape {emb.shape} do not match centroids of dim {index.dim}")
    if n_probe <= 0:
        raise ValueError(f"n_probe must be positive, got {n_probe}")
    return index.search(emb, n_probe)


def cluster_order(cluster_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, offsets): a stable permutation grouping rows by cluster; cluster c is order[offsets[c]:offsets[c+1]]."""
    cluster_ids = np.asarray(cluster_ids)
    if cluster_ids.ndim != 1:
        raise ValueError(f"cluster_ids must be 1-D, got shape {cluster_ids.shape}")
    cluster_ids = cluster_ids.astype(np.int64, copy=False)
    if len(cluster_ids) and (cluster_ids.min() < 0 or cluster_ids.max() >= k):
        raise ValueError(f"cluster ids must lie in [0, {k}), got [{cluster_ids.min()}, {cluster_ids.max()}]")
    order = np.argsort(cluster_ids, kind="stable").astype(np.int64)
    offsets = np.zeros(k + 1, dtype=np.int64)
    np.cumsum(np.bincount(cluster_ids, minlength=k), out=offsets[1:])
    return order, offsets
