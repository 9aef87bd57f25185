"""Image -> real sentence retrieval: one cluster-ordered global pass, and exact search as the reference.

The pass (``cluster_ordered_search``):

1. every image is assigned once to its ``n_probe`` nearest sentence clusters (``CentroidIndex``);
2. the (image, cluster) pairs are sorted into bank order (part, then row offset of the cluster);
3. the cluster-ordered sentence bank is streamed once, part by part. A cluster probed by many pairs
   costs one float32 product, its contiguous bank rows times the (gathered, contiguous) images that
   probe it; clusters probed by a few pairs are read-bound and are scanned by one compiled kernel
   (``realsyn.scan_kernels``) that reads each row once. A float16 bank (``bank_dtype``) is widened
   to float32 in registers or per cluster: half the bytes read;
4. each pair keeps its cluster's top k; after each part the pairs are merged into a running top k
   per image.

Clusters are spread over a thread pool in contiguous ranges with one BLAS thread per worker (numpy
releases the GIL inside sgemm, the kernels release it too). The work done for a cluster does not
depend on the number of threads, so neither does any score. Ranking is by score descending, then
bank row ascending; missing candidates are padded with id -1 and score -inf. Images with a
non-finite value get padding only; NaN scores (a non-finite bank row) count as -inf.

Memory: the running top k (N x k), the probes (N x n_probe), one bank part and the gathered
embeddings of the pairs of the current part. Images are held whole (N x D) by default; with
``max_image_bytes`` the bank parts are searched in rounds, a round being as many consecutive parts
as have pairs fitting in that budget, and one more streaming pass over ``images`` spills each
round's gathered vectors to a local temporary file, read back when the round comes (images read
twice in all, memory one round).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from realsyn.bank_encoding import bank_rows

# Bytes of one float64 score block of exact_search; queries are processed in chunks that fit it.
SCORE_BLOCK_BYTES = 64 * 1024 * 1024
# Images assigned to their clusters per CentroidIndex call.
ASSIGN_BATCH = 65536
# Work units per thread in one bank part: contiguous cluster ranges of about equal estimated cost. One
# each measured best: in the read-bound sparse regime every extra range is Python work under the GIL
# (2 threads, 300 images: search 7.7 ms at 1 per thread, 9.6 at 2, 10.0 at 8); the dense regime is even.
RANGES_PER_THREAD = 1
# Scores per block of a cluster's product (float32, 1 MiB): small enough to stay in a core's L2.
CHUNK_SCORES = 262144
# Clusters probed by at most this many pairs are scanned by the compiled kernel (realsyn.scan_kernels):
# reading their rows costs more than the arithmetic, and an sgemm call per cluster costs more still.
FUSED_MAX_PAIRS = 4
# Fixed cost of one cluster in flop-equivalents when ranges are balanced (Python and call overhead).
CLUSTER_OVERHEAD_FLOPS = 200_000
# A float32 read from memory costs about as much as this many flops of sgemm (12 GB/s vs 100 GFLOP/s).
BYTES_PER_FLOP_EQ = 8
# Least work of one range (flop-equivalents, ~0.25 ms): below, handing it to a thread costs more than it saves.
MIN_RANGE_FLOPS = 25_000_000
# Least centroid-scan work of one image batch run on several BLAS threads (about 10 ms of sgemm on one core).
MIN_PARALLEL_ASSIGN_FLOPS = 1_000_000_000


def _empty(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, k), -1, dtype=np.int64), np.full((n, k), -np.inf, dtype=np.float32)


def _rank(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best (score desc, id asc) of candidate (ids, scores) rows of equal width.

    Candidates with score -inf are dropped (padding); output is padded to width k.
    """
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    top_ids = np.take_along_axis(ids, order, axis=1)
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_ids[np.isneginf(top_scores)] = -1
    out_ids, out_scores = _empty(len(ids), k)
    out_ids[:, : top_ids.shape[1]] = top_ids
    out_scores[:, : top_scores.shape[1]] = top_scores
    return out_ids, out_scores


# ---------------------------------------------------------------------------------------- exact
def _scores64(queries: np.ndarray, keys64_t: np.ndarray, keys_finite: bool) -> np.ndarray:
    """float32 (Q, M) inner products of queries with float64 (D, M) keys; NaN becomes -inf."""
    s = (queries.astype(np.float64) @ keys64_t).astype(np.float32)
    if not keys_finite or not np.isfinite(queries).all():
        s[np.isnan(s)] = -np.inf
    return s


def _top_k_block(scores: np.ndarray, key_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k of one (Q, M) score block with ids ``key_ids`` (M,), ties by id."""
    q, m = scores.shape
    if m <= k:
        return _rank(np.broadcast_to(key_ids, (q, m)), scores, k)
    part = np.argpartition(scores, m - k, axis=1)[:, m - k :]
    part_scores = np.take_along_axis(scores, part, axis=1)
    kth = part_scores.min(axis=1)
    n_at_least = np.count_nonzero(scores >= kth[:, None], axis=1)
    out_ids, out_scores = _rank(key_ids[part], part_scores, k)
    # rows with ties at the k-th score hold more than k candidates: ranked over all of them
    for r in np.nonzero(n_at_least > k)[0]:
        cand = np.nonzero(scores[r] >= kth[r])[0]
        ri, rs = _rank(key_ids[cand][None, :], scores[r, cand][None, :], k)
        out_ids[r], out_scores[r] = ri[0], rs[0]
    return out_ids, out_scores


def _check(emb: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or (dim is not None and emb.shape[1] != dim):
        raise ValueError(f"{what} must be (n, {dim if dim is not None else 'D'}), got shape {emb.shape}")
    return emb


def exact_search(image_emb: np.ndarray, sentence_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force in float64, the reference: every image against every sentence; ids are sentence rows."""
    image_emb = _check(image_emb, None, "image_emb")
    sentence_emb = _check(sentence_emb, image_emb.shape[1], "sentence_emb")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    out_ids, out_scores = _empty(len(image_emb), k)
    if len(sentence_emb) == 0 or len(image_emb) == 0:
        return out_ids, out_scores
    keys64_t = np.ascontiguousarray(sentence_emb.T, dtype=np.float64)
    keys_finite = bool(np.isfinite(sentence_emb).all())
    key_ids = np.arange(len(sentence_emb), dtype=np.int64)
    chunk = max(1, SCORE_BLOCK_BYTES // (8 * len(sentence_emb)))
    for start in range(0, len(image_emb), chunk):
        block = _scores64(image_emb[start : start + chunk], keys64_t, keys_finite)
        out_ids[start : start + chunk], out_scores[start : start + chunk] = _top_k_block(block, key_ids, k)
    return out_ids, out_scores


# ------------------------------------------------------------------------------ the global pass
@dataclass
class BankLayout:
    """Where each cluster's rows lie in a cluster-ordered bank cut into parts.

    Cluster ``c`` is rows ``start[c]:end[c]`` of part ``part[c]``; its global row ids are
    ``part_base[part[c]] + start[c] ... + end[c] - 1``.
    """

    part: np.ndarray
    start: np.ndarray
    end: np.ndarray
    part_base: np.ndarray = field(init=False)

    def __post_init__(self):
        self.part = np.asarray(self.part, dtype=np.int64)
        self.start = np.asarray(self.start, dtype=np.int64)
        self.end = np.asarray(self.end, dtype=np.int64)
        if not (self.part.shape == self.start.shape == self.end.shape) or self.part.ndim != 1:
            raise ValueError("part, start and end must be 1-D arrays of one length (one entry per cluster)")
        if len(self.part) and (self.part.min() < 0 or (self.start > self.end).any() or self.start.min() < 0):
            raise ValueError("bank layout: negative part or start, or start after end")
        n_parts = int(self.part.max()) + 1 if len(self.part) else 0
        sizes = np.zeros(n_parts, np.int64)
        np.maximum.at(sizes, self.part, self.end)
        self.part_base = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    @classmethod
    def from_offsets(cls, offsets: np.ndarray) -> BankLayout:
        """One part holding every cluster; cluster c is rows offsets[c]:offsets[c+1]."""
        offsets = np.asarray(offsets, dtype=np.int64)
        return cls(np.zeros(len(offsets) - 1, np.int64), offsets[:-1], offsets[1:])

    @property
    def n_clusters(self) -> int:
        return len(self.part)

    @property
    def n_parts(self) -> int:
        return len(self.part_base) - 1

    @property
    def n_rows(self) -> int:
        return int(self.part_base[-1])


@dataclass
class SearchResult:
    row_ids: np.ndarray  # (N, k) int64 global bank rows, -1 = padding
    scores: np.ndarray  # (N, k) float32, -inf = padding
    stats: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # assign, gather, load, search, merge


_THREADPOOLS = None


def _threadpools():
    """One threadpoolctl controller per process: building one inspects every loaded library (~1-3 ms,
    as much as a whole small search), its ``limit`` is cheap. Built on first use, after faiss and
    numpy's BLAS are loaded (a BLAS loaded later is not limited: the pass calls none)."""
    global _THREADPOOLS
    if _THREADPOOLS is None:
        from threadpoolctl import ThreadpoolController

        _THREADPOOLS = ThreadpoolController()
    return _THREADPOOLS


def resolve_threads(threads: int) -> int:
    """``threads`` itself, or for 0 the cores this process may run on."""
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    if threads:
        return int(threads)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


ImageBatches = Callable[[], Iterable[np.ndarray]]


def _as_batches(images: np.ndarray | ImageBatches) -> tuple[ImageBatches, np.ndarray | None]:
    """(re-iterable batches, the whole array when images were given as one)."""
    if callable(images):
        return images, None
    arr = _check(images, None, "images")

    def batches() -> Iterator[np.ndarray]:
        for s in range(0, len(arr), ASSIGN_BATCH):
            yield arr[s : s + ASSIGN_BATCH]

    return batches, arr


def _top_k_exact_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of an (m, W) block: columns and scores of the k best by (score desc, column asc),
    unordered, by argpartition; rows with ties at the k-th score are ranked over all tied columns."""
    m, w = scores.shape
    if w <= k:
        return np.broadcast_to(np.arange(w), (m, w)).copy(), scores.copy()
    # the k+1 best: position 0 holds the (k+1)-th, the k after it are all >= it
    idx = np.argpartition(scores, w - k - 1, axis=1)[:, w - k - 1 :]
    vals = np.take_along_axis(scores, idx, axis=1)
    cols, top = idx[:, 1:].copy(), vals[:, 1:].copy()
    for i in np.nonzero(top.min(axis=1) == vals[:, 0])[0].tolist():
        cand = np.nonzero(scores[i] >= top[i].min())[0]  # ascending columns
        best = cand[np.argsort(-scores[i, cand], kind="stable")[:k]]
        cols[i], top[i] = best, scores[i, best]
    return cols, top


_local = threading.local()


def _scratch(n: int) -> np.ndarray:
    """A float32 buffer of n values, reused by the calling thread (no allocation per chunk)."""
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < n:
        buf = _local.buf = np.empty(max(n, CHUNK_SCORES), np.float32)
    return buf[:n]


class _PartSearch:
    """The clusters of one bank part against the gathered images (one row per pair) that probe them.

    Each pair's running top k lives in ``cand_ids`` / ``cand_scores`` (pairs, k), best first. A
    cluster probed by few pairs is read-bound: those go to one compiled scan (``scan_clusters``).
    A cluster probed by many is compute-bound: one sgemm per cluster into a cache-sized score block
    (cut by pairs when the cluster is wide), then a compiled pass merges the block into the top k.
    """

    def __init__(self, bank: np.ndarray, x: np.ndarray, k: int, row_base: int):
        self.bank, self.x, self.k, self.row_base = bank, x, k, row_base
        self.cand_ids, self.cand_scores = _empty(len(x), k)

    def run(self, pair_lo: np.ndarray, pair_hi: np.ndarray, row_lo: np.ndarray, row_hi: np.ndarray) -> int:
        """Clusters given by their pair and row ranges (within the part); returns useful flops."""
        from realsyn.scan_kernels import scan_clusters

        n_pairs = pair_hi - pair_lo
        flops = int((2 * n_pairs * (row_hi - row_lo)).sum()) * self.x.shape[1]
        few = n_pairs <= FUSED_MAX_PAIRS
        if few.any():
            scan_clusters(
                self.bank, self.x, pair_lo[few], pair_hi[few], row_lo[few], row_hi[few], self.row_base, self.cand_ids, self.cand_scores
            )
        if not few.all():
            many = ~few
            self._products(pair_lo[many], pair_hi[many], row_lo[many], row_hi[many])
        return flops

    def _rows(self, s: int, e: int) -> np.ndarray:
        """Bank rows [s, e) as float32 (a float16 bank is widened into a per-thread buffer)."""
        if self.bank.dtype == np.float32:
            return self.bank[s:e]
        from realsyn.scan_kernels import widen_f16

        buf = getattr(_local, "wide", None)
        n = (e - s) * self.bank.shape[1]
        if buf is None or len(buf) < n:
            buf = _local.wide = np.empty(n, np.float32)
        return widen_f16(self.bank, s, e, buf[:n].reshape(e - s, self.bank.shape[1]))

    def _products(self, pair_lo: np.ndarray, pair_hi: np.ndarray, row_lo: np.ndarray, row_hi: np.ndarray) -> None:
        from realsyn.scan_kernels import keep_block

        x = self.x
        for p0, p1, s, e in zip(pair_lo.tolist(), pair_hi.tolist(), row_lo.tolist(), row_hi.tolist()):
            if e == s:
                continue
            rows = self._rows(s, e)
            step = max(1, CHUNK_SCORES // (e - s))
            for a in range(p0, p1, step):
                b = min(p1, a + step)
                block = _scratch((e - s) * (b - a)).reshape(e - s, b - a)  # bank rows x pairs
                if b - a == 1:  # np.dot releases the GIL in sgemv; matmul of one column does not
                    block[:, 0] = np.dot(rows, x[a])
                else:
                    np.matmul(rows, x[a:b].T, out=block)
                keep_block(block, a, self.row_base + s, self.cand_ids, self.cand_scores)


def _merge_sorted(a_ids, a_scores, b_ids, b_scores, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise merge of two lists each ranked best first (score desc, id asc; padding -inf / -1)
    into the k best, by k vectorised steps; no bank row appears in both lists."""
    n = len(a_ids)
    rows = np.arange(n)
    pad_ids, pad_scores = _empty(n, 1)
    a_ids, a_scores = np.hstack([a_ids, pad_ids]), np.hstack([a_scores, pad_scores])
    b_ids, b_scores = np.hstack([b_ids, pad_ids]), np.hstack([b_scores, pad_scores])
    ia, ib = np.zeros(n, np.int64), np.zeros(n, np.int64)
    out_ids, out_scores = _empty(n, k)
    for j in range(k):
        sa, sb, da, db = a_scores[rows, ia], b_scores[rows, ib], a_ids[rows, ia], b_ids[rows, ib]
        take_a = (sa > sb) | ((sa == sb) & (da <= db))
        out_scores[:, j] = np.where(take_a, sa, sb)
        out_ids[:, j] = np.where(take_a, da, db)
        ia += take_a
        ib += ~take_a
    out_ids[np.isneginf(out_scores)] = -1
    return out_ids, out_scores


def _merge_into(run_ids: np.ndarray, run_scores: np.ndarray, images: np.ndarray, ids: np.ndarray, scores: np.ndarray, k: int) -> None:
    """Merge ranked candidate rows (one per pair; ``images`` may repeat) into the running top k."""
    if len(images) == 0:
        return
    order = np.argsort(images, kind="stable")
    images = images[order]
    first = np.flatnonzero(np.r_[True, images[1:] != images[:-1]])
    occurrence = np.arange(len(images)) - np.repeat(first, np.diff(np.r_[first, len(images)]))
    for level in range(int(occurrence.max()) + 1):
        sel = order[occurrence == level] if level else order[first]
        img = images[occurrence == level] if level else images[first]
        run_ids[img], run_scores[img] = _merge_sorted(run_ids[img], run_scores[img], ids[sel], scores[sel], k)


def _ranges(weights: np.ndarray, n: int) -> list[tuple[int, int]]:
    """Cut a sequence into at most ``n`` contiguous ranges of about equal weight."""
    if len(weights) == 0:
        return []
    cum = np.cumsum(weights, dtype=np.float64)
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, n) / n, side="right")
    bounds = np.unique(np.concatenate([[0], cuts, [len(weights)]]))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


class _RoundSpill:
    """The image vectors of each round's pairs, in bank order, spilled to local files by one more
    streaming pass over the batches and read back one round at a time.

    Images are read twice in all (assignment, spill) whatever the number of rounds, and memory holds
    one round's vectors plus one batch: the budget bounds the pass, not the corpus.
    """

    def __init__(self, batches: ImageBatches, pair_image: np.ndarray, round_starts: np.ndarray, n_images: int, dim: int):
        import tempfile

        self.dim, self.round_starts = dim, round_starts
        self.dir = tempfile.TemporaryDirectory(prefix="realsyn-retrieval-")
        by_image = np.argsort(pair_image, kind="stable")  # pair positions, grouped by image
        image_sorted = pair_image[by_image]
        start = 0
        for batch in batches():
            batch = _check(batch, dim, "image batch")
            lo, hi = np.searchsorted(image_sorted, [start, start + len(batch)])
            pos = by_image[lo:hi]
            rows = image_sorted[lo:hi] - start
            rnd = np.searchsorted(round_starts, pos, side="right") - 1
            order = np.argsort(rnd, kind="stable")
            pos, rows, rnd = pos[order], rows[order], rnd[order]
            cuts = np.flatnonzero(np.r_[True, rnd[1:] != rnd[:-1], True]) if len(rnd) else np.zeros(1, np.int64)
            for a, b in zip(cuts[:-1], cuts[1:]):
                r = int(rnd[a])
                with open(self._path(r, "pos"), "ab") as f:
                    pos[a:b].astype(np.int64).tofile(f)
                with open(self._path(r, "vec"), "ab") as f:
                    np.ascontiguousarray(batch[rows[a:b]]).tofile(f)
            start += len(batch)
        if start != n_images:
            raise ValueError(f"image batches changed between passes: {start} rows, first pass saw {n_images}")

    def _path(self, r: int, kind: str) -> str:
        return os.path.join(self.dir.name, f"round-{r}.{kind}")

    def read(self, r: int, n_pairs: int) -> np.ndarray:
        """Round ``r``'s (n_pairs, D) vectors, row i for the round's i-th pair in bank order."""
        out = np.empty((n_pairs, self.dim), np.float32)
        pos = np.fromfile(self._path(r, "pos"), dtype=np.int64) - int(self.round_starts[r])
        if len(pos) != n_pairs:
            raise RuntimeError(f"retrieval spill of round {r} holds {len(pos)} pairs, expected {n_pairs}")
        step = ASSIGN_BATCH
        with open(self._path(r, "vec"), "rb") as f:
            for s in range(0, len(pos), step):
                chunk = np.fromfile(f, dtype=np.float32, count=min(step, len(pos) - s) * self.dim)
                out[pos[s : s + step]] = chunk.reshape(-1, self.dim)
        os.unlink(self._path(r, "pos"))
        os.unlink(self._path(r, "vec"))
        return out

    def close(self) -> None:
        self.dir.cleanup()


def _search_part(bank, x, pair_cluster, layout: BankLayout, part: int, k: int, threads: int, executor):
    """Candidates (ids, scores (pairs, k)) of the pairs of one part, and the useful flops."""
    clusters, first = np.unique(pair_cluster, return_index=True)  # pairs are sorted by bank order
    # np.unique sorts by cluster id: restore bank order (pairs are contiguous per cluster)
    o = np.argsort(first, kind="stable")
    clusters, pair_lo = clusters[o], first[o]
    pair_hi = np.r_[pair_lo[1:], len(pair_cluster)]
    row_lo, row_hi = layout.start[clusters], layout.end[clusters]
    if len(bank) < (row_hi.max() if len(row_hi) else 0):
        raise ValueError(f"bank part {part} has {len(bank)} rows; the layout needs {int(row_hi.max())}")
    search = _PartSearch(bank, x, k, int(layout.part_base[part]))
    # cost in flop-equivalents: the product, or reading the bank rows when few images share them
    weights = (row_hi - row_lo) * x.shape[1] * np.maximum(2 * (pair_hi - pair_lo), BYTES_PER_FLOP_EQ * 4) + CLUSTER_OVERHEAD_FLOPS
    n_ranges = min(threads * RANGES_PER_THREAD, int(weights.sum() // MIN_RANGE_FLOPS))
    if executor is None or n_ranges < 2:  # too little work to pay for handing it to threads
        flops = search.run(pair_lo, pair_hi, row_lo, row_hi)
    else:
        jobs = [executor.submit(search.run, pair_lo[a:b], pair_hi[a:b], row_lo[a:b], row_hi[a:b]) for a, b in _ranges(weights, n_ranges)]
        flops = sum(j.result() for j in jobs)
    return search.cand_ids, search.cand_scores, flops


def cluster_ordered_search(
    images: np.ndarray | ImageBatches,
    centroids,
    layout: BankLayout,
    load_part: Callable[[int], np.ndarray],
    *,
    n_probe: int = 1,
    k: int = 3,
    threads: int = 0,
    max_image_bytes: int | None = None,
) -> SearchResult:
    """Top k bank rows per image, searching only each image's ``n_probe`` nearest clusters, in one
    pass over the bank in cluster order.

    ``images``: an (N, D) array, or a callable returning an iterable of float32 (n_i, D) batches
    whose concatenation is the N images (called once to assign, and once more to spill the rounds'
    vectors when ``max_image_bytes`` is set). ``centroids``: (K, D) array or a ``CentroidIndex``.
    ``load_part(p)`` returns bank part ``p`` as (rows, D) float32; each touched part is loaded once.
    ``threads``: 0 = every core. With every cluster probed the result is exact search's.
    """
    from realsyn.clustering import CentroidIndex

    if k <= 0 or n_probe <= 0:
        raise ValueError(f"k and n_probe must be positive, got k={k}, n_probe={n_probe}")
    threads = resolve_threads(threads)
    index = centroids if isinstance(centroids, CentroidIndex) else CentroidIndex(_check(centroids, None, "centroids"))
    if index.k != layout.n_clusters:
        raise ValueError(f"{index.k} centroids but the bank layout has {layout.n_clusters} clusters")
    batches, resident = _as_batches(images)
    dim = index.dim

    # 1. assignment: every image once to its probed clusters
    t_start = time.perf_counter()
    probe_chunks: list[np.ndarray] = []
    finite_chunks: list[np.ndarray] = []
    # batches given without a memory budget are kept (one N x D array); with one, re-read per round
    kept: list[np.ndarray] | None = [] if resident is None and max_image_bytes is None else None
    threadpools = _threadpools()
    for batch in batches():
        batch = _check(batch, dim, "image batch")
        # a small batch runs on one BLAS thread: waking the others costs more than its product
        assign_threads = threads if 2 * len(batch) * index.k * dim >= MIN_PARALLEL_ASSIGN_FLOPS else 1
        with threadpools.limit(limits=assign_threads):
            finite = np.isfinite(batch).all(axis=1)
            probes = np.full((len(batch), min(n_probe, index.k)), -1, dtype=np.int64)
            if finite.any():
                probes[finite] = index.search(batch[finite], n_probe)[0]
            probe_chunks.append(probes)
            finite_chunks.append(finite)
            if kept is not None:
                kept.append(batch)
    n_images = sum(len(p) for p in probe_chunks)
    p = min(n_probe, index.k)
    probes = np.concatenate(probe_chunks) if probe_chunks else np.zeros((0, p), np.int64)
    if kept is not None:
        resident = np.concatenate(kept) if kept else np.zeros((0, dim), np.float32)
        del kept

    t_assigned = time.perf_counter()
    # 2. the (image, cluster) pairs in bank order: part, then row offset, then image
    pair_cluster = probes.ravel()
    pair_image = np.repeat(np.arange(n_images, dtype=np.int64), p)
    valid = pair_cluster >= 0
    pair_cluster, pair_image = pair_cluster[valid], pair_image[valid]
    bank_rank = np.empty(layout.n_clusters, np.int64)
    bank_rank[np.lexsort((np.arange(layout.n_clusters), layout.start, layout.part))] = np.arange(layout.n_clusters)
    order = np.argsort(bank_rank[pair_cluster], kind="stable")
    pair_cluster, pair_image = pair_cluster[order], pair_image[order]
    del probes, order, valid
    pair_part = layout.part[pair_cluster]
    part_bounds = np.searchsorted(pair_part, np.arange(layout.n_parts + 1))

    run_ids, run_scores = _empty(n_images, k)
    stats = {"images": n_images, "images_probing": int(np.concatenate(finite_chunks).sum()) if finite_chunks else 0}
    stats.update(pairs=len(pair_cluster), bank_rows=layout.n_rows, parts_loaded=0, rounds=0, flops=0, distances=0)
    seconds = {"assign": t_assigned - t_start, "gather": 0.0, "load": 0.0, "search": 0.0, "merge": 0.0}

    # 3. rounds of consecutive parts whose gathered pairs fit the image budget
    pair_bytes = 4 * dim
    rounds: list[tuple[int, int]] = []
    lo = 0
    while lo < layout.n_parts:
        hi = lo + 1
        if resident is None:
            while hi < layout.n_parts and (part_bounds[hi + 1] - part_bounds[lo]) * pair_bytes <= max_image_bytes:
                hi += 1
        rounds.append((lo, hi))
        lo = hi

    spill = None
    if resident is None:  # a budget: every round's vectors spilled by one more pass over the images
        t0 = time.perf_counter()
        round_starts = np.array([part_bounds[r_lo] for r_lo, _ in rounds] + [len(pair_image)], dtype=np.int64)
        spill = _RoundSpill(batches, pair_image, round_starts, n_images, dim)
        seconds["gather"] += time.perf_counter() - t0

    executor = None
    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="retrieval")
    try:
        with _threadpools().limit(limits=1, user_api="blas"):
            for r, (r_lo, r_hi) in enumerate(rounds):
                a, b = int(part_bounds[r_lo]), int(part_bounds[r_hi])
                if a == b:
                    continue
                stats["rounds"] += 1
                t0 = time.perf_counter()
                x_round = None if spill is None else spill.read(r, b - a)
                seconds["gather"] += time.perf_counter() - t0
                for part in range(r_lo, r_hi):
                    pa_, pb_ = int(part_bounds[part]), int(part_bounds[part + 1])
                    if pa_ == pb_:
                        continue
                    t0 = time.perf_counter()
                    x = resident[pair_image[pa_:pb_]] if resident is not None else x_round[pa_ - a : pb_ - a]
                    t1 = time.perf_counter()
                    bank = bank_rows(load_part(part))
                    t2 = time.perf_counter()
                    if bank.ndim != 2 or bank.shape[1] != dim:
                        raise ValueError(f"bank part {part} has shape {bank.shape}, expected (rows, {dim})")
                    stats["parts_loaded"] += 1
                    cand_ids, cand_scores, flops = _search_part(bank, x, pair_cluster[pa_:pb_], layout, part, k, threads, executor)
                    stats["flops"] += flops
                    t3 = time.perf_counter()
                    _merge_into(run_ids, run_scores, pair_image[pa_:pb_], cand_ids, cand_scores, k)
                    seconds["gather"] += t1 - t0
                    seconds["load"] += t2 - t1
                    seconds["search"] += t3 - t2
                    seconds["merge"] += time.perf_counter() - t3
                    del bank, x, cand_ids, cand_scores
                del x_round
    finally:
        if executor is not None:
            executor.shutdown()
        if spill is not None:
            spill.close()
    stats["distances"] = stats["flops"] // (2 * dim) if dim else 0
    return SearchResult(run_ids, run_scores, stats, seconds)
