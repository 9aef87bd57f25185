"""Near-duplicate detection and collapsing (SPEC stages 4 and 5e).

Duplicates are found as *edges* (pairs of global row ids): exact-key edges, perceptual edges
(64-bit pHash within a Hamming radius, or normalised sentence text) and semantic edges (CLIP
cosine similarity above a threshold, via faiss). The edges of all shards are then collapsed with
Union-Find and every connected group keeps one representative.
"""

from __future__ import annotations

import io
import logging
import re
import unicodedata
from collections.abc import Sequence

import numpy as np

from realsyn.runtime import faiss_use_gpu
from realsyn.stats import StepStats

logger = logging.getLogger("realsyn")

_NO_EDGES = np.zeros((0, 2), dtype=np.int64)


# -- Union-Find ---------------------------------------------------------------------------------


class UnionFind:
    """Disjoint sets over 0..n-1: path compression and union by size."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)
        self.size = np.ones(n, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.parent)

    def find(self, a: int) -> int:
        parent = self.parent
        root = int(a)
        while parent[root] != root:
            root = int(parent[root])
        while parent[a] != root:  # compress the walked path onto the root
            parent[a], a = root, int(parent[a])
        return root

    def union(self, a: int, b: int) -> int:
        """Join the sets of a and b; returns the new root."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]
        return ra

    def _compress_all(self) -> np.ndarray:
        """Point every element straight at its root (pointer jumping); returns the roots."""
        parent = self.parent
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return parent
            parent[:] = grand

    def _roots_of(self, idx: np.ndarray) -> np.ndarray:
        """Roots of many elements at once; the elements are then pointed straight at them."""
        parent = self.parent
        roots = parent[idx]
        pending = np.flatnonzero(parent[roots] != roots)
        while len(pending):
            roots[pending] = parent[roots[pending]]
            pending = pending[parent[roots[pending]] != roots[pending]]
        parent[idx] = roots
        return roots

    def union_edges(self, edges: np.ndarray) -> None:
        """Union every (a, b) row of an (E, 2) array, in numpy rounds rather than a Python loop.

        Each round finds the roots of the still-split edges and hooks every larger root onto the
        smallest root offered to it; hooks only go to smaller indices, so no cycles form, and every
        round merges at least one pair of sets.
        """
        edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
        if len(edges) == 0:
            return
        if edges.min() < 0 or edges.max() >= len(self.parent):
            raise IndexError(f"edge endpoint outside 0..{len(self.parent) - 1}")
        a, b = edges[:, 0].copy(), edges[:, 1].copy()
        while len(a):
            ra, rb = self._roots_of(a), self._roots_of(b)
            split = ra != rb
            a, b, ra, rb = a[split], b[split], ra[split], rb[split]
            # parent[root] == root, so the minimum over {root} + offers is the smallest offer.
            np.minimum.at(self.parent, np.maximum(ra, rb), np.minimum(ra, rb))
        roots = self._compress_all()
        self.size = np.bincount(roots, minlength=len(roots)).astype(np.int64)

    def labels(self) -> np.ndarray:
        """Per element, the smallest index of its component (int64)."""
        roots = self._compress_all()
        n = len(roots)
        smallest = np.full(n, n, dtype=np.int64)
        np.minimum.at(smallest, roots, np.arange(n, dtype=np.int64))
        return smallest[roots]


def representatives(n: int, edges: np.ndarray, priority: np.ndarray | None = None) -> np.ndarray:
    """Per element, its component's representative: highest priority, ties to the smallest index.

    An element is kept iff ``representatives(...)[i] == i``.
    """
    uf = UnionFind(n)
    uf.union_edges(edges)
    component = uf.labels()
    if priority is None:
        return component
    index = np.arange(n, dtype=np.int64)
    p = np.asarray(priority)
    if p.shape != (n,):
        raise ValueError(f"priority has shape {p.shape}, want ({n},)")
    # Sort key: descending priority; NaN counts as lowest.
    p = np.nan_to_num(p.astype(np.float64), nan=-np.inf)
    order = np.lexsort((index, -p, component))  # by component, then priority desc, then index
    comp_sorted = component[order]
    first = np.ones(n, dtype=bool)
    first[1:] = comp_sorted[1:] != comp_sorted[:-1]
    best = np.empty(n, dtype=np.int64)
    best[comp_sorted[first]] = order[first]  # component label -> its representative
    return best[component]


# -- exact and text keys ------------------------------------------------------------------------


def exact_duplicate_edges(keys: Sequence[str | None]) -> np.ndarray:
    """Edges from each key's first occurrence to every later one; None/empty keys never match."""
    first: dict[str, int] = {}
    pairs: list[tuple[int, int]] = []
    for i, key in enumerate(keys):
        if not key:
            continue
        j = first.setdefault(key, i)
        if j != i:
            pairs.append((j, i))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


_WHITESPACE = re.compile(r"\s+")


def normalize_text(s: str) -> str:
    """Sentence key for perceptual dedup: NFKC, lowercase, punctuation dropped, whitespace collapsed."""
    s = unicodedata.normalize("NFKC", s).lower()
    s = "".join(ch for ch in s if not unicodedata.category(ch).startswith("P"))
    return _WHITESPACE.sub(" ", s).strip()


# -- perceptual image hashes --------------------------------------------------------------------


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II basis: coefficients = M @ x."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)


def perceptual_hash(image_bytes: bytes) -> int:
    """64-bit pHash: grayscale, 32x32, 2-D DCT, the 8x8 lowest frequencies past the DC row and
    column (pHash.org convention), each bit = coefficient > their median. Raises ValueError if
    the bytes do not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image_bytes)) as im:
            gray = im.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    except Exception as exc:
        raise ValueError(f"undecodable image: {type(exc).__name__}: {exc}") from exc
    pixels = np.asarray(gray, dtype=np.float64)
    coeffs = (_DCT32 @ pixels @ _DCT32.T)[1:9, 1:9]
    bits = (coeffs > np.median(coeffs)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def perceptual_hashes(images: Sequence[bytes], stats: StepStats | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(hashes uint64, ok mask) for a batch; undecodable images get hash 0, ok False, and are
    counted as ``dropped_undecodable``."""
    hashes = np.zeros(len(images), dtype=np.uint64)
    ok = np.zeros(len(images), dtype=bool)
    for i, data in enumerate(images):
        try:
            hashes[i] = perceptual_hash(data)
            ok[i] = True
        except (ValueError, TypeError):
            if stats is not None:
                stats.drop("undecodable")
    return hashes, ok


def _hash_bytes(hashes: np.ndarray) -> np.ndarray:
    """uint64 -> (N, 8) uint8, the layout faiss binary indexes take."""
    return np.ascontiguousarray(np.asarray(hashes, dtype=np.uint64).astype(">u8").view(np.uint8).reshape(-1, 8))


def _upper_pairs(query_rows: np.ndarray, neighbours: np.ndarray, query_offset: int) -> np.ndarray:
    """(query row, neighbour id) hits -> sorted (query id, neighbour id) pairs, query id < neighbour id."""
    q = query_rows.astype(np.int64) + int(query_offset)
    nb = neighbours.astype(np.int64)
    keep = q < nb
    pairs = np.stack([q[keep], nb[keep]], axis=1)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def _rows_of_range_result(lims: np.ndarray) -> np.ndarray:
    """faiss range-search limits -> the query row of every result."""
    counts = np.diff(lims.astype(np.int64))
    return np.repeat(np.arange(len(counts), dtype=np.int64), counts)


class BinaryHashIndex:
    """Exact Hamming range search over 64-bit hashes (faiss IndexBinaryFlat); global ids in add order.

    Brute force, O(indexed x queries) popcounts: fine per shard and for tens of millions with GPU
    or sharded queries, the cost centre at the paper's 300M scale.
    """

    def __init__(self) -> None:
        import faiss

        self._index = faiss.IndexBinaryFlat(64)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def add(self, hashes: np.ndarray) -> None:
        self._index.add(_hash_bytes(hashes))

    def edges(self, query_hashes: np.ndarray, query_offset: int, max_distance: int = 6) -> np.ndarray:
        """Pairs (query global id, indexed id) with Hamming distance <= max_distance and query id
        < indexed id, so that querying every indexed row yields each pair once."""
        if len(query_hashes) == 0 or self.ntotal == 0:
            return _NO_EDGES.copy()
        # faiss binary range search keeps distances strictly below the radius.
        lims, _, ids = self._index.range_search(_hash_bytes(query_hashes), int(max_distance) + 1)
        return _upper_pairs(_rows_of_range_result(lims), ids, query_offset)


def hamming_edges(hashes: np.ndarray, max_distance: int = 6) -> np.ndarray:
    """All pairs (i < j) of one hash array within max_distance bits."""
    index = BinaryHashIndex()
    index.add(hashes)
    return index.edges(hashes, 0, max_distance)


# -- semantic (embedding) near-duplicates --------------------------------------------------------


class SemanticIndex:
    """Inner-product faiss index over L2-normalised vectors; edges = pairs with cosine >= threshold.

    ``index_factory`` "Flat" is exact. IVF variants ("IVF4096,Flat"; at scale "IVF65536,SQ8") must
    be ``train``-ed on a sample first and probe only ``nprobe`` lists, so recall is approximate.
    With compressed codes the similarities are approximate too: SQ8 (a byte per dimension) keeps
    them close, while PQ ("IVF65536,PQ32np"; "np" skips polysemous training) underestimates them,
    so pairs just above the threshold are lost (bench/bench_dedup.py measures this).
    On GPU (faiss-gpu with ``use_gpu`` "auto" or "always") range search is not available for every
    index type, so the index is searched for ``k_neighbors`` nearest neighbours and thresholded: a
    row with more than k near-duplicates loses the excess (counted in ``saturated_queries``).
    """

    def __init__(
        self,
        dim: int,
        threshold: float,
        index_factory: str = "Flat",
        use_gpu: str = "auto",
        k_neighbors: int = 64,
        nprobe: int = 16,
        search: str = "auto",
    ) -> None:
        import faiss

        if search not in ("auto", "range", "knn"):
            raise ValueError("search must be 'auto', 'range' or 'knn'")
        gpu = faiss_use_gpu(use_gpu)
        self.dim, self.threshold, self.k_neighbors, self.nprobe = int(dim), float(threshold), int(k_neighbors), int(nprobe)
        self.saturated_queries = 0
        index = faiss.index_factory(self.dim, index_factory, faiss.METRIC_INNER_PRODUCT)
        if gpu:
            index = faiss.index_cpu_to_all_gpus(index)
        self.on_gpu = gpu
        self.search = ("knn" if gpu else "range") if search == "auto" else search
        self._index = index
        self._set_nprobe()

    def _set_nprobe(self) -> None:
        import faiss

        space = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
        try:
            space.set_index_parameter(self._index, "nprobe", self.nprobe)
        except RuntimeError:  # not an IVF index: nothing to probe
            pass

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    def _check(self, emb: np.ndarray) -> np.ndarray:
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"embeddings have shape {emb.shape}, want (N, {self.dim})")
        return emb

    def train(self, sample: np.ndarray) -> None:
        """Train IVF/PQ quantisers on a sample (faiss wants >= ~39 points per list)."""
        self._index.train(self._check(sample))
        self._set_nprobe()

    def add(self, emb: np.ndarray) -> None:
        """Append rows; they get the next consecutive global ids."""
        if not self.is_trained:
            raise RuntimeError("index must be trained before add(): call train(sample)")
        self._index.add(self._check(emb))

    def edges(self, query_emb: np.ndarray, query_offset: int) -> np.ndarray:
        """Sorted pairs (query global id, indexed id) with similarity >= threshold and query id <
        indexed id: when every indexed row is queried once, each pair comes out exactly once."""
        query_emb = self._check(query_emb)
        if len(query_emb) == 0 or self.ntotal == 0:
            return _NO_EDGES.copy()
        if self.search == "range":
            # faiss keeps similarities strictly above the radius; step one float below to get >=.
            radius = float(np.nextafter(np.float32(self.threshold), np.float32(-np.inf)))
            lims, sims, ids = self._index.range_search(query_emb, radius)
            keep = sims >= np.float32(self.threshold)
            return _upper_pairs(_rows_of_range_result(lims)[keep], ids[keep], query_offset)
        k = min(self.k_neighbors, self.ntotal)
        sims, ids = self._index.search(query_emb, k)
        hit = (sims >= np.float32(self.threshold)) & (ids >= 0)
        saturated = int(hit.all(axis=1).sum()) if k < self.ntotal else 0
        if saturated:
            self.saturated_queries += saturated
            logger.warning("%d queries had all %d neighbours above %.3f; raise k_neighbors", saturated, k, self.threshold)
        rows = np.broadcast_to(np.arange(len(query_emb), dtype=np.int64)[:, None], hit.shape)
        return _upper_pairs(rows[hit], ids[hit], query_offset)
