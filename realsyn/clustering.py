"""K-means over embeddings (faiss) in bounded memory: a fixed-size training sample, flat or two-level training, assignment.

At scale K-means trains on a sample of at most ``sample_rows`` rows (faiss itself trains on at most
``max_points_per_centroid`` points per centroid), then every shard is assigned to the trained
centroids on its own through one ``CentroidIndex``. Nothing here grows with the number of rows
streamed past the sample: the reservoir is preallocated once, training works on it in place.

Two-level training (``train_kmeans_two_level``) is used above a configurable number of centroids:
flat K-means costs ``sample x k x D`` per iteration, which at millions of centroids is out of reach
even on a GPU; two levels (about ``sqrt(k)`` coarse cells, then each cell's share of the fine
centroids trained on that cell's rows) cost about ``sample x 2 sqrt(k) x D``. The price is that a
fine centroid only competes with the centroids of its own cell during training. Training keeps its
tree (``CentroidTree``: the coarse centroids and each fine centroid's cell), and assignment descends
the same tree (``CentroidIndex(centroids, tree=...)``): a row's ``probe_cells`` nearest coarse
centroids, then the best fine centroid among their children, about ``(C + probe x k / C) x D`` per
row instead of ``k x D``, so assignment cost per row grows with sqrt(k), not k.
"""

from __future__ import annotations

import logging

import numpy as np

from realsyn import layout
from realsyn.runtime import faiss_use_gpu, l2_normalize

logger = logging.getLogger(__name__)

# Rows normalised (checked, copied) per step by ``normalize_rows_inplace`` and ``ReservoirSample`` (bounds their temporaries: 4 MiB at D=128).
_NORMALIZE_CHUNK = 8192
# Coarse cells a query probes in a ``CentroidIndex`` with a tree. On bench_scale's own corpus (near
# uniform: noisy copies of 20k topics, 300k training rows), rows given the exact scan's centroid at
# probe 16 / 24: sentences k = 2,333 (C = 48) 0.983 / 0.996, k = 9,332 (C = 97) 0.918 / 0.961;
# images k = 1,400 0.995 / 0.999, k = 5,601 0.959 / 0.984 (mean cosine lost at 24: <= 0.0006).
# Per row at 24 (one core): 6.9 / 9.1 us vs the exact scan's 5.5 / 17.7 (sentences 1M / 4M).
TREE_PROBE_CELLS = 24


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
        finite = np.concatenate(
            [np.isfinite(batch[i : i + _NORMALIZE_CHUNK]).all(axis=1) for i in range(0, len(batch), _NORMALIZE_CHUNK)] or [np.ones(0, bool)]
        )
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
            src = rev[first]
            for i in range(0, len(slot_ids), _NORMALIZE_CHUNK):  # bounded temporaries: one chunk of rows gathered at a time
                self._rows[slot_ids[i : i + _NORMALIZE_CHUNK]] = batch[src[i : i + _NORMALIZE_CHUNK]]
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


class CentroidTree:
    """How two-level training grouped its centroids: ``coarse`` float32 (C, D) unit coarse centroids,
    ``cell`` int32 (k,) each fine centroid's coarse cell (a cell may hold no centroid)."""

    def __init__(self, coarse: np.ndarray, cell: np.ndarray):
        self.coarse = np.ascontiguousarray(coarse, dtype=np.float32)
        self.cell = np.ascontiguousarray(cell, dtype=np.int32)
        if self.coarse.ndim != 2 or len(self.coarse) == 0 or self.cell.ndim != 1:
            raise ValueError(f"need (C, D) coarse centroids and a 1-D cell array, got {self.coarse.shape}, {self.cell.shape}")
        if len(self.cell) and (self.cell.min() < 0 or self.cell.max() >= len(self.coarse)):
            raise ValueError(f"centroid cells must lie in [0, {len(self.coarse)})")

    def save(self, writer) -> None:
        """``coarse_centroids.npy`` and ``centroid_cells.npy`` through a storage writer (plain .npy, no pickle)."""
        writer.write_numpy(COARSE_CENTROIDS_FILE, self.coarse)
        writer.write_numpy(CENTROID_CELLS_FILE, self.cell)

    @classmethod
    def load(cls, reader) -> CentroidTree | None:
        """The tree saved by ``save`` next to the centroids, None when there is none (flat training)."""
        if not (reader.has(COARSE_CENTROIDS_FILE) and reader.has(CENTROID_CELLS_FILE)):
            return None
        return cls(np.asarray(reader.read_numpy(COARSE_CENTROIDS_FILE)), np.asarray(reader.read_numpy(CENTROID_CELLS_FILE)))


# Files of a two-level training's tree, next to layout.CENTROIDS_FILE in the cluster assets' outputs.
COARSE_CENTROIDS_FILE = "coarse_centroids.npy"
CENTROID_CELLS_FILE = "centroid_cells.npy"


def train_kmeans_two_level(sample: np.ndarray, k: int, **kwargs) -> np.ndarray:
    """Spherical two-level K-means: exactly min(k, n) unit centroids, grouped by coarse cell
    (``train_centroid_tree``, same keyword arguments, without its tree)."""
    return train_centroid_tree(sample, k, **kwargs)[0]


def train_centroid_tree(
    sample: np.ndarray,
    k: int,
    *,
    n_coarse: int | None = None,
    niter: int = 20,
    seed: int = 0,
    use_gpu: str = "auto",
    max_points_per_centroid: int = 256,
    normalized: bool = False,
) -> tuple[np.ndarray, CentroidTree]:
    """Spherical two-level K-means: (exactly min(k, n) unit centroids grouped by coarse cell, their ``CentroidTree``).

    ``n_coarse`` (default round(sqrt(k))) coarse centroids are trained on the whole sample; every
    sample row goes to its nearest coarse centroid (``CentroidIndex``); cell c then trains
    ``allocate_fine(cell sizes, k)[c]`` centroids on its own rows (seed ``seed + c``) and the
    cells' centroids are concatenated in cell order. With one coarse cell this is exactly
    ``train_kmeans(sample, k, seed=seed)`` (its tree: the sample mean direction, one cell).
    Extra memory beyond the sample: one cell's rows.
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
        coarse = l2_normalize(sample.mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32))
    else:
        coarse = train_kmeans(sample, n_coarse, seed=seed, **common)
        cell = CentroidIndex(coarse, use_gpu=use_gpu).search(sample, 1)[0][:, 0]
    fine = allocate_fine(np.bincount(cell, minlength=n_coarse), k_eff)
    parts = []
    for c in np.flatnonzero(fine):
        rows = sample if n_coarse == 1 else sample[cell == c]
        parts.append(train_kmeans(rows, int(fine[c]), seed=seed + int(c), **common))
    centroids = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
    return centroids, CentroidTree(coarse, np.repeat(np.arange(n_coarse, dtype=np.int32), fine))


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
) -> tuple[np.ndarray, CentroidTree | None]:
    """(unit centroids, their tree): flat ``train_kmeans`` up to ``two_level_above`` centroids (no tree), two-level above."""
    common = {
        "niter": niter,
        "seed": seed,
        "use_gpu": use_gpu,
        "max_points_per_centroid": max_points_per_centroid,
        "normalized": normalized,
    }
    if min(int(k), len(sample)) <= two_level_above:
        return train_kmeans(sample, k, **common), None
    k_eff = min(int(k), len(sample))
    return train_centroid_tree(sample, k, n_coarse=max(1, round(np.sqrt(k_eff))), **common)


class CentroidIndex:
    """Nearest centroids by inner product, the one index that assigns and probes clusters.

    Regimes (``mode``):

    - ``tree`` whenever the centroids come with the ``CentroidTree`` of their two-level training
      (``tree=``), on any machine and at any K: a query scans the C coarse centroids, then the fine
      centroids of its ``probe_cells`` best (non-empty) cells only, as one matrix product per cell
      over the queries that probe it. Work per query ~ (C + probe_cells x k / C) x D, i.e.
      ~(1 + probe_cells) sqrt(k) x D at C = sqrt(k), instead of k x D. A query's best centroid is
      missed only when it lies outside its ``probe_cells`` best cells (bench/bench_kmeans.py
      ``--assignment`` measures the agreement with the exact scan); probing every cell is exact.
    - ``exact`` (no tree) up to ``exact_up_to``: a blocked scan of all K, float32 products through
      numpy's BLAS (faiss-cpu's bundled BLAS is built for an old instruction set and measured several
      times slower here); on a GPU machine a faiss flat index on the GPUs (``use_gpu``).
    - ``cells`` (no tree) up to ``cells_up_to``: the same search as ``tree`` over ~sqrt(K) cells
      built after the fact by a small spherical K-means over the centroids themselves.
    - ``hnsw`` above: HNSW over the centroids (``hnsw_m`` links, ``ef_search`` candidates), log K.

    Ties go to the lower centroid id (exact, tree and cells).
    """

    block_scores = 1 << 22  # scores per block of the exact CPU scan (16 MiB)
    cells_batch = 8192  # queries per batch of the tree / cells search (their gathered rows stay in cache)

    def __init__(
        self,
        centroids: np.ndarray,
        *,
        tree: CentroidTree | None = None,
        exact_up_to: int = 65_536,
        cells_up_to: int = 65_536,
        probe_cells: int = TREE_PROBE_CELLS,
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
        self.k, self.dim = centroids.shape
        self.centroids = None
        self.index = None
        if tree is not None:
            if len(tree.cell) != self.k or tree.coarse.shape[1] != self.dim:
                raise ValueError(f"a tree of {len(tree.cell)} centroids of dim {tree.coarse.shape[1]} for ({self.k}, {self.dim}) centroids")
            self.mode, self.exact = "tree", False
            self._set_cells(centroids, tree.coarse, tree.cell.astype(np.int64), probe_cells)
            return
        faiss = _faiss()
        gpu = faiss_use_gpu(use_gpu)
        # a GPU scans every centroid faster than the cells bookkeeping saves
        self.mode = "exact" if self.k <= exact_up_to or (gpu and self.k <= cells_up_to) else "cells" if self.k <= cells_up_to else "hnsw"
        self.exact = self.mode == "exact"
        if self.mode == "exact" and not gpu:
            self.centroids = centroids
            return
        if self.mode == "cells":
            n_cells = max(1, round(np.sqrt(self.k)))
            centres = train_kmeans(centroids, n_cells, niter=10, seed=seed, use_gpu="never", max_points_per_centroid=1 << 20)
            self._set_cells(centroids, centres, _exact_top(centroids, centres, 1)[0][:, 0], probe_cells)
            return
        if self.exact:
            index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(self.dim))
        else:
            index = faiss.IndexHNSWFlat(self.dim, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = max(int(ef_search), 1)
        index.add(centroids)
        self.index = index

    def _set_cells(self, centroids: np.ndarray, centres: np.ndarray, cell: np.ndarray, probe_cells: int) -> None:
        """Cells = the centroids grouped under ``centres`` (``cell``: each centroid's centre); centres without a centroid are dropped."""
        used = np.unique(cell)
        self.cell_centres = np.ascontiguousarray(centres[used], dtype=np.float32)
        cell = np.searchsorted(used, cell)
        order = np.argsort(cell, kind="stable").astype(np.int64)  # centroid ids, cell by cell
        self.cell_offsets = np.zeros(len(used) + 1, np.int64)
        np.cumsum(np.bincount(cell, minlength=len(used)), out=self.cell_offsets[1:])
        if np.array_equal(order, np.arange(self.k)):  # two-level training's own order: no copy, no id map
            self.cell_order, self.cell_centroids = None, centroids
        else:
            self.cell_order, self.cell_centroids = order, np.ascontiguousarray(centroids[order])
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
        if self.mode in ("tree", "cells"):
            ids = np.empty((len(queries), p), dtype=np.int64)
            scores = np.empty((len(queries), p), dtype=np.float32)
            search = self._best_in_cells if p == 1 else self._top_in_cells
            for start in range(0, len(queries), self.cells_batch):
                stop = start + self.cells_batch
                ids[start:stop], scores[start:stop] = search(queries[start:stop], p)
            return ids, scores
        if not self.exact:
            self.index.hnsw.efSearch = max(self.index.hnsw.efSearch, p)
        scores, ids = self.index.search(queries, p)
        return ids.astype(np.int64), scores.astype(np.float32)

    def _probe_groups(self, queries: np.ndarray):
        """(cell, pairs) for every cell some query probes: pairs = query x probe_cells + slot, one slot per probed cell (in no order)."""
        probe = self.probe_cells
        n_cells = len(self.cell_centres)
        if probe >= n_cells:
            cells = np.broadcast_to(np.arange(n_cells), (len(queries), n_cells))
        else:  # which cells, not in which order: one argpartition per block of queries
            cells = np.empty((len(queries), probe), np.int64)
            rows = max(1, self.block_scores // n_cells)
            for start in range(0, len(queries), rows):
                block = queries[start : start + rows] @ self.cell_centres.T
                cells[start : start + rows] = np.argpartition(-block, probe - 1, axis=1)[:, :probe]
        flat_cell = cells.ravel().astype(np.int16 if n_cells < 2**15 else np.int32)  # a narrow key: numpy's stable sort is a radix sort
        pair_order = np.argsort(flat_cell, kind="stable")
        bounds = np.searchsorted(flat_cell[pair_order], np.arange(n_cells + 1))
        for c in np.flatnonzero(np.diff(bounds)):
            yield int(c), pair_order[bounds[c] : bounds[c + 1]]

    def _best_in_cells(self, queries: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
        """n = 1: the best centroid of each query's probed cells, ties by the lower id (one argmax per probed cell)."""
        probe = self.probe_cells
        cand = np.full(len(queries) * probe, -1, dtype=np.int64)  # best centroid of (query, probed cell)
        cand_scores = np.full(len(queries) * probe, -np.inf, dtype=np.float32)
        for c, pairs in self._probe_groups(queries):
            lo, hi = int(self.cell_offsets[c]), int(self.cell_offsets[c + 1])
            block = np.take(queries, pairs // probe, axis=0) @ self.cell_centroids[lo:hi].T  # take: a faster row gather than [rows]
            j = block.argmax(axis=1)
            cand_scores[pairs] = block.ravel()[np.arange(len(pairs)) * (hi - lo) + j]
            cand[pairs] = lo + j if self.cell_order is None else self.cell_order[lo + j]
        cand, cand_scores = cand.reshape(-1, probe), cand_scores.reshape(-1, probe)
        best_scores = cand_scores.max(axis=1)
        # the lowest id among the probed cells' bests that reach the best score
        best = np.where(cand_scores == best_scores[:, None], cand, np.iinfo(np.int64).max).min(axis=1)
        short = np.flatnonzero(~(best_scores > -np.inf))  # NaN scores: the exact scan decides, as without a tree
        if len(short):
            best[short], best_scores[short] = (a[:, 0] for a in _exact_top(queries[short], self._all_centroids, 1, self.block_scores))
        return best[:, None], best_scores[:, None]

    def _top_in_cells(self, queries: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
        probe = self.probe_cells
        # candidates: p per probed cell, in slot (query, probed cell); -inf where a cell has fewer
        cand_ids = np.full((len(queries), probe * p), -1, dtype=np.int64)
        cand_scores = np.full((len(queries), probe * p), -np.inf, dtype=np.float32)
        for c, pairs in self._probe_groups(queries):
            rows, slot = pairs // probe, pairs % probe
            lo, hi = self.cell_offsets[c], self.cell_offsets[c + 1]
            top, top_scores = _exact_top(queries[rows], self.cell_centroids[lo:hi], min(p, int(hi - lo)), self.block_scores)
            cols = slot[:, None] * p + np.arange(top.shape[1])
            cand_ids[rows[:, None], cols] = lo + top if self.cell_order is None else self.cell_order[lo + top]
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
        short = np.flatnonzero((ids < 0).any(axis=1))  # probed cells held fewer than p centroids (or NaN scores)
        if len(short):
            ids[short], scores[short] = _exact_top(queries[short], self._all_centroids, p, self.block_scores)
        return ids, scores

    @classmethod
    def load(cls, reader, centroids: np.ndarray | None = None, **kwargs) -> CentroidIndex:
        """The index of a cluster asset's output (``reader``): its centroids (or ``centroids``, already read) with its tree, if any."""
        if centroids is None:
            centroids = np.asarray(reader.read_numpy(layout.CENTROIDS_FILE), dtype=np.float32)
        return cls(centroids, tree=CentroidTree.load(reader), **kwargs)


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
