"""K-means over embeddings (faiss) in bounded memory: a fixed-size training sample, flat or two-level training, assignment.

At scale K-means trains on a sample of at most ``sample_rows`` rows (faiss itself trains on at most
``max_points_per_centroid`` points per centroid), then every shard is assigned to the trained
centroids on its own through one ``CentroidIndex``. Nothing here grows with the number of rows
streamed past the sample: the reservoir is preallocated once, training works on it in place.

Two-level training (``train_kmeans_two_level``) is used above a configurable number of centroids:
flat K-means costs ``sample x k x D`` per iteration, which at millions of centroids is out of reach
even on a GPU; two levels (about ``sqrt(k)`` coarse cells, then each cell's share of the fine
centroids trained on that cell's rows) cost about ``sample x 2 sqrt(k) x D``. The price is that a
fine centroid only competes with the centroids of its own cell during training; the final
assignment is still a search over all k centroids.
"""

from __future__ import annotations

import logging

import numpy as np

from realsyn.runtime import faiss_use_gpu, l2_normalize

logger = logging.getLogger(__name__)

# Rows normalised per step by ``normalize_rows_inplace`` (bounds its temporaries).
_NORMALIZE_CHUNK = 65_536


class ReservoirSample:
    """A uniform random sample of at most ``capacity`` rows out of every row passed to ``add``.

    Algorithm R, vectorised per batch: row number ``t`` (0-based, over the whole stream) takes a
    random slot ``j`` in ``[0, t]`` and replaces slot ``j`` when ``j < capacity``. Rows with a
    non-finite value are skipped and counted in ``skipped_nonfinite``. The ``capacity x dim``
    buffer is allocated once up front (pages are only touched as rows arrive), so memory is the
    capacity, never the stream.
    """

    def __init__(self, capacity: int, dim: int, seed: int):
        if capacity <= 0 or dim <= 0:
            raise ValueError(f"capacity and dim must be positive, got {capacity}, {dim}")
        self.capacity, self.dim = int(capacity), int(dim)
        self.rng = np.random.default_rng(seed)
        self.seen = 0
        self.skipped_nonfinite = 0
        self._rows = np.empty((self.capacity, self.dim), dtype=np.float32)
        self._filled = 0

    def add(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim != 2 or batch.shape[1] != self.dim:
            raise ValueError(f"expected a (n, {self.dim}) batch, got shape {batch.shape}")
        finite = np.isfinite(batch).all(axis=1)
        if not finite.all():
            self.skipped_nonfinite += int((~finite).sum())
            batch = batch[finite]
        if len(batch) == 0:
            return
        # The first rows fill the reservoir until it is full.
        free = self.capacity - self._filled
        if free:
            take = min(free, len(batch))
            self._rows[self._filled : self._filled + take] = batch[:take]
            self._filled += take
            self.seen += take
            batch = batch[take:]
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
        return self._filled

    @property
    def nbytes(self) -> int:
        """Bytes of the preallocated buffer."""
        return self._rows.nbytes

    def array(self) -> np.ndarray:
        """The sampled rows, float32 (min(seen, capacity), dim): a view of the buffer (no copy), changed by a later ``add``."""
        return self._rows[: self._filled]


def sample_capacity(n_rows: int, k: int, sample_rows: int, max_points_per_centroid: int) -> int:
    """Reservoir rows: min(sample budget, k x faiss's points-per-centroid cap, rows available), at least 1."""
    if sample_rows <= 0 or max_points_per_centroid <= 0:
        raise ValueError(f"sample_rows and max_points_per_centroid must be positive, got {sample_rows}, {max_points_per_centroid}")
    return max(1, min(int(sample_rows), int(k) * int(max_points_per_centroid), int(n_rows)))


def normalize_rows_inplace(x: np.ndarray) -> np.ndarray:
    """Scale the rows of a float32 C-contiguous array to unit length in place (zero rows stay zero); returns ``x``."""
    if x.dtype != np.float32 or not x.flags.c_contiguous or not x.flags.writeable:
        raise ValueError("normalize_rows_inplace needs a writeable C-contiguous float32 array")
    for start in range(0, len(x), _NORMALIZE_CHUNK):
        block = x[start : start + _NORMALIZE_CHUNK]
        block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
    return x


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
    normalized: bool = False,
) -> np.ndarray:
    """Centroids float32 (min(k, n), D) by faiss K-means; spherical (unit centroids, for cosine) by default.

    With ``spherical`` the sample rows are normalised first (into a copy), so the clustering is by
    cosine; ``normalized=True`` says the caller already did (``normalize_rows_inplace``) and skips the copy.
    """
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if sample.ndim != 2 or len(sample) == 0:
        raise ValueError(f"need a non-empty (n, D) sample, got shape {sample.shape}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if not all(np.isfinite(sample[i : i + _NORMALIZE_CHUNK]).all() for i in range(0, len(sample), _NORMALIZE_CHUNK)):
        raise ValueError("sample holds non-finite values")
    n, dim = sample.shape
    k_eff = min(int(k), n)
    if k_eff < k:
        logger.warning("train_kmeans: only %d training points for k=%d; training %d centroids", n, k, k_eff)
    if spherical and not normalized:
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


def allocate_fine(cell_sizes: np.ndarray, k: int) -> np.ndarray:
    """Fine centroids per coarse cell, proportional to the cell sizes and summing to exactly ``k``.

    Largest remainder: cell c gets floor(k n_c / n), then the cells with the largest remainders
    (ties: lower cell first) one more each. No cell gets more centroids than rows (k <= n needed).
    """
    sizes = np.asarray(cell_sizes, dtype=np.int64)
    n = int(sizes.sum())
    if k <= 0 or k > n:
        raise ValueError(f"need 0 < k <= rows, got k={k}, rows={n}")
    scaled = int(k) * sizes  # exact integers: k * n_c fits int64 for any realistic k and n
    out = scaled // n
    left = int(k - out.sum())
    if left:
        out[np.argsort(-(scaled % n), kind="stable")[:left]] += 1
    return out


def train_kmeans_two_level(
    sample: np.ndarray,
    k: int,
    *,
    n_coarse: int | None = None,
    niter: int = 20,
    seed: int = 0,
    use_gpu: str = "auto",
    max_points_per_centroid: int = 256,
    normalized: bool = False,
) -> np.ndarray:
    """Spherical two-level K-means: exactly min(k, n) unit centroids, grouped by coarse cell.

    ``n_coarse`` (default round(sqrt(k))) coarse centroids are trained on the whole sample; every
    sample row goes to its nearest coarse centroid (``CentroidIndex``); cell c then trains
    ``allocate_fine(cell sizes, k)[c]`` centroids on its own rows (seed ``seed + c``) and the
    cells' centroids are concatenated in cell order. With one coarse cell this is exactly
    ``train_kmeans(sample, k, seed=seed)``. Extra memory beyond the sample: one cell's rows.
    """
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    if sample.ndim != 2 or len(sample) == 0:
        raise ValueError(f"need a non-empty (n, D) sample, got shape {sample.shape}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    n = len(sample)
    k_eff = min(int(k), n)
    if k_eff < k:
        logger.warning("train_kmeans_two_level: only %d training points for k=%d; training %d centroids", n, k, k_eff)
    if not normalized:
        sample = l2_normalize(sample)
    n_coarse = max(1, min(int(n_coarse) if n_coarse else round(np.sqrt(k_eff)), k_eff))
    common = {"niter": niter, "use_gpu": use_gpu, "max_points_per_centroid": max_points_per_centroid, "normalized": True}
    if n_coarse == 1:
        cell = np.zeros(n, dtype=np.int64)
    else:
        coarse = train_kmeans(sample, n_coarse, seed=seed, **common)
        cell = CentroidIndex(coarse, use_gpu=use_gpu).search(sample, 1)[0][:, 0]
    fine = allocate_fine(np.bincount(cell, minlength=n_coarse), k_eff)
    parts = []
    for c in np.flatnonzero(fine):
        rows = sample if n_coarse == 1 else sample[cell == c]
        parts.append(train_kmeans(rows, int(fine[c]), seed=seed + int(c), **common))
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def fit_centroids(
    sample: np.ndarray,
    k: int,
    *,
    two_level_above: int = 1024,
    niter: int = 20,
    seed: int = 0,
    use_gpu: str = "auto",
    max_points_per_centroid: int = 256,
    normalized: bool = False,
) -> tuple[np.ndarray, int]:
    """(unit centroids, coarse cells): flat ``train_kmeans`` up to ``two_level_above`` centroids, two-level above (0 coarse cells = flat)."""
    common = {
        "niter": niter,
        "seed": seed,
        "use_gpu": use_gpu,
        "max_points_per_centroid": max_points_per_centroid,
        "normalized": normalized,
    }
    if min(int(k), len(sample)) <= two_level_above:
        return train_kmeans(sample, k, **common), 0
    k_eff = min(int(k), len(sample))
    n_coarse = max(1, round(np.sqrt(k_eff)))
    return train_kmeans_two_level(sample, k, n_coarse=n_coarse, **common), n_coarse


class CentroidIndex:
    """Nearest centroids by inner product, the one index that assigns and probes clusters.

    Three regimes by the number of centroids K (``mode``):

    - ``exact`` up to ``exact_up_to``: a blocked scan of all K, float32 products through numpy's
      BLAS (faiss-cpu's bundled BLAS is built for an old instruction set and measured several
      times slower here); on a GPU machine a faiss flat index on the GPUs (``use_gpu``).
    - ``cells`` up to ``cells_up_to``: the centroids are grouped into ~sqrt(K) cells by a small
      spherical K-means over the centroids themselves; a query scans the cell centres, then only
      the centroids of its ``probe_cells`` best cells, as one matrix product per cell over the
      queries that probe it. Work per query ~ (1 + probe_cells) sqrt(K) instead of K, still BLAS;
      a query's best centroid is missed only when it lies outside its ``probe_cells`` best cells
      (bench/bench_kmeans.py measures the agreement with the exact scan).
    - ``hnsw`` above: HNSW over the centroids (``hnsw_m`` links, ``ef_search`` candidates), log K.

    Ties go to the lower centroid id (exact and cells).
    """

    block_scores = 1 << 22  # scores per block of the exact CPU scan (16 MiB)
    cells_batch = 65_536  # queries per batch of the cells search

    def __init__(
        self,
        centroids: np.ndarray,
        *,
        exact_up_to: int = 65_536,
        cells_up_to: int = 65_536,
        probe_cells: int = 8,
        hnsw_m: int = 32,
        ef_search: int = 128,
        use_gpu: str = "auto",
        seed: int = 0,
    ):
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        if centroids.ndim != 2 or len(centroids) == 0:
            raise ValueError(f"need a non-empty (k, D) centroid array, got shape {centroids.shape}")
        if probe_cells <= 0:
            raise ValueError(f"probe_cells must be positive, got {probe_cells}")
        faiss = _faiss()
        self.k, self.dim = centroids.shape
        gpu = faiss_use_gpu(use_gpu)
        # a GPU scans every centroid faster than the cells bookkeeping saves
        self.mode = "exact" if self.k <= exact_up_to or (gpu and self.k <= cells_up_to) else "cells" if self.k <= cells_up_to else "hnsw"
        self.exact = self.mode == "exact"
        self.centroids = None
        self.index = None
        if self.mode == "exact" and not gpu:
            self.centroids = centroids
            return
        if self.mode == "cells":
            self._build_cells(centroids, probe_cells, seed)
            return
        if self.exact:
            index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(self.dim))
        else:
            index = faiss.IndexHNSWFlat(self.dim, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = max(int(ef_search), 1)
        index.add(centroids)
        self.index = index

    def _build_cells(self, centroids: np.ndarray, probe_cells: int, seed: int) -> None:
        n_cells = max(1, round(np.sqrt(self.k)))
        centres = train_kmeans(centroids, n_cells, niter=10, seed=seed, use_gpu="never", max_points_per_centroid=1 << 20)
        cell = _exact_top(centroids, centres, 1)[0][:, 0]
        used = np.unique(cell)  # K-means may leave a centre without centroids: drop it
        self.cell_centres = np.ascontiguousarray(centres[used])
        cell = np.searchsorted(used, cell)
        self.cell_order = np.argsort(cell, kind="stable").astype(np.int64)  # centroid ids, cell by cell
        self.cell_offsets = np.zeros(len(used) + 1, np.int64)
        np.cumsum(np.bincount(cell, minlength=len(used)), out=self.cell_offsets[1:])
        self.cell_centroids = np.ascontiguousarray(centroids[self.cell_order])
        self.probe_cells = min(int(probe_cells), len(used))
        self._all_centroids = centroids  # exact fallback for a query whose probed cells hold fewer than n centroids

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
        if self.centroids is not None:
            return _exact_top(queries, self.centroids, p, self.block_scores)
        if self.mode == "cells":
            ids = np.empty((len(queries), p), dtype=np.int64)
            scores = np.empty((len(queries), p), dtype=np.float32)
            for start in range(0, len(queries), self.cells_batch):
                stop = start + self.cells_batch
                ids[start:stop], scores[start:stop] = self._cells_search(queries[start:stop], p)
            return ids, scores
        if not self.exact:
            self.index.hnsw.efSearch = max(self.index.hnsw.efSearch, p)
        scores, ids = self.index.search(queries, p)
        return ids.astype(np.int64), scores.astype(np.float32)

    def _cells_search(self, queries: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
        probe = self.probe_cells
        cells, _ = _exact_top(queries, self.cell_centres, probe, self.block_scores)
        # candidates: p per probed cell, in slot (query, j-th probed cell); -inf where a cell has fewer
        cand_ids = np.full((len(queries), probe * p), -1, dtype=np.int64)
        cand_scores = np.full((len(queries), probe * p), -np.inf, dtype=np.float32)
        flat_cell = cells.ravel()
        pair_order = np.argsort(flat_cell, kind="stable")
        bounds = np.searchsorted(flat_cell[pair_order], np.arange(len(self.cell_centres) + 1))
        for c in np.flatnonzero(np.diff(bounds)):
            pairs = pair_order[bounds[c] : bounds[c + 1]]
            rows, slot = pairs // probe, pairs % probe
            lo, hi = self.cell_offsets[c], self.cell_offsets[c + 1]
            top, top_scores = _exact_top(queries[rows], self.cell_centroids[lo:hi], min(p, int(hi - lo)), self.block_scores)
            cols = slot[:, None] * p + np.arange(top.shape[1])
            cand_ids[rows[:, None], cols] = self.cell_order[lo + top]
            cand_scores[rows[:, None], cols] = top_scores
        top = (
            np.argpartition(-cand_scores, p - 1, axis=1)[:, :p]
            if p < cand_scores.shape[1]
            else np.arange(p)[None, :].repeat(len(queries), 0)
        )
        ids = np.take_along_axis(cand_ids, top, axis=1)
        scores = np.take_along_axis(cand_scores, top, axis=1)
        order = np.lexsort((ids, -scores), axis=1)
        ids, scores = np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)
        short = np.flatnonzero(ids[:, -1] < 0)  # probed cells held fewer than p centroids
        if len(short):
            ids[short], scores[short] = _exact_top(queries[short], self._all_centroids, p, self.block_scores)
        return ids, scores


def _exact_top(queries: np.ndarray, keys: np.ndarray, p: int, block_scores: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``p`` best keys by inner product, best first, ties by lower key id: blocked BLAS products."""
    k = len(keys)
    ids = np.empty((len(queries), p), dtype=np.int64)
    scores = np.empty((len(queries), p), dtype=np.float32)
    rows = max(1, block_scores // k)
    keys_t = keys.T
    for start in range(0, len(queries), rows):
        block = queries[start : start + rows] @ keys_t
        if p == 1:  # the common case (assignment): argmax is one pass and takes the first, i.e. lowest, best id
            best = block.argmax(axis=1)
            best_scores = np.take_along_axis(block, best[:, None], axis=1)[:, 0]
            if not np.isnan(best_scores).any():  # argmax prefers NaN; the general path ranks it last
                ids[start : start + rows, 0] = best
                scores[start : start + rows, 0] = best_scores
                continue
        top = np.argpartition(-block, p - 1, axis=1)[:, :p] if p < k else np.broadcast_to(np.arange(k), block.shape).copy()
        top_scores = np.take_along_axis(block, top, axis=1)
        # best first; equal scores by key id
        order = np.lexsort((top, -top_scores), axis=1)
        ids[start : start + rows] = np.take_along_axis(top, order, axis=1)
        scores[start : start + rows] = np.take_along_axis(top_scores, order, axis=1)
    return ids, scores


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


def bank_part_bounds(sizes: np.ndarray, part_rows: int) -> np.ndarray:
    """Cluster boundaries of the bank parts: part p holds clusters [bounds[p], bounds[p+1]).

    Greedy in cluster order: a part takes clusters while its rows stay within ``part_rows``; a
    single cluster larger than the budget is a part on its own (with the empty clusters around
    it); empty clusters join the part before them. So no part is empty unless every cluster is.
    Returns int64 (P + 1,), bounds[0] = 0, bounds[-1] = k.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if part_rows <= 0:
        raise ValueError(f"part_rows must be positive, got {part_rows}")
    k = len(sizes)
    cum = np.zeros(k + 1, dtype=np.int64)
    np.cumsum(sizes, out=cum[1:])
    bounds, lo = [0], 0
    while lo < k:
        fits = int(np.searchsorted(cum, cum[lo] + part_rows, side="right")) - 1  # last end within the budget
        first_row = int(np.searchsorted(cum, cum[lo], side="right"))  # end just past the next non-empty cluster
        hi = min(max(fits, first_row), k)
        hi = int(np.searchsorted(cum, cum[hi], side="right")) - 1  # trailing empty clusters join
        bounds.append(hi)
        lo = hi
    if k == 0:
        bounds.append(0)
    return np.asarray(bounds, dtype=np.int64)
