"""Near-duplicate detection and collapsing (SPEC stages 4 and 5e).

Duplicates are found as *edges* (pairs of global row ids): exact-key edges, perceptual edges
(64-bit pHash within a Hamming radius, or normalised sentence text) and semantic edges (CLIP
cosine similarity above a threshold, via faiss). The edges of all shards are then collapsed into
connected components and every component keeps one representative.

Everything is columnar: string keys become fixed-width 16-byte numpy keys (``string_keys``),
exact groups come from one sort (``exact_key_edges``), pHash pairs from multi-index hashing
(``hamming_edges``: a sort per chunk combination instead of all pairs), and components are found
over the nodes the edges touch only (``group_representatives``), so the work after the key sort
scales with the number of duplicates, not with the corpus.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from itertools import combinations

import numpy as np
import pyarrow as pa

from realsyn.runtime import faiss_use_gpu
from realsyn.stats import StepStats

logger = logging.getLogger("realsyn")

_NO_EDGES = np.zeros((0, 2), dtype=np.int64)


def _empty_edges() -> np.ndarray:
    return _NO_EDGES.copy()


def release_free_memory() -> None:
    """Hand the allocator's free heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    A global step frees large temporaries between phases (the pHash sorts, the index training, the
    inverted lists of each IVF range: many small C++ allocations), but glibc keeps freed small
    blocks in its heap, so without a trim the resident set after a phase still counts them and
    grows with the corpus even though the live state does not."""
    import ctypes
    import ctypes.util

    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


# -- Union-Find and connected components ---------------------------------------------------------


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


COMPONENT_METHODS = ("csgraph", "union_find")
# bench/bench_dedup.py times both on dedup-shaped edge lists; the faster one is the default.
DEFAULT_COMPONENT_METHOD = "csgraph"


def component_labels(n: int, edges: np.ndarray, method: str = DEFAULT_COMPONENT_METHOD) -> np.ndarray:
    """Per element of 0..n-1, the smallest index of its connected component (int64).

    ``method``: "csgraph" (scipy.sparse.csgraph.connected_components over a CSR adjacency) or
    "union_find" (``UnionFind.union_edges``, numpy rounds); both give the same labels.
    """
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if len(edges) and (edges.min() < 0 or edges.max() >= n):
        raise IndexError(f"edge endpoint outside 0..{n - 1}")
    if method == "union_find":
        uf = UnionFind(n)
        uf.union_edges(edges)
        return uf.labels()
    if method != "csgraph":
        raise ValueError(f"method must be one of {COMPONENT_METHODS}, got {method!r}")
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    index_dtype = np.int32 if n < 2**31 else np.int64
    graph = csr_matrix(
        (np.ones(len(edges), dtype=np.int8), (edges[:, 0].astype(index_dtype), edges[:, 1].astype(index_dtype))), shape=(n, n)
    )
    n_comp, comp = connected_components(graph, directed=False)
    smallest = np.full(n_comp, n, dtype=np.int64)
    np.minimum.at(smallest, comp, np.arange(n, dtype=np.int64))
    return smallest[comp]


def _pick_representatives(labels: np.ndarray, priority: np.ndarray | None) -> np.ndarray:
    """Per element, its component's element of highest priority, ties to the smallest index
    (``labels``: the smallest index of each element's component)."""
    n = len(labels)
    if priority is None:
        return labels
    index = np.arange(n, dtype=np.int64)
    p = np.asarray(priority)
    if p.shape != (n,):
        raise ValueError(f"priority has shape {p.shape}, want ({n},)")
    # Sort key: descending priority; NaN counts as lowest.
    p = np.nan_to_num(p.astype(np.float64), nan=-np.inf)
    order = np.lexsort((index, -p, labels))  # by component, then priority desc, then index
    comp_sorted = labels[order]
    first = np.ones(n, dtype=bool)
    first[1:] = comp_sorted[1:] != comp_sorted[:-1]
    best = np.empty(n, dtype=np.int64)
    best[comp_sorted[first]] = order[first]  # component label -> its representative
    return best[labels]


def group_representatives(
    edges: np.ndarray, priority: Callable[[np.ndarray], np.ndarray] | None = None, method: str = DEFAULT_COMPONENT_METHOD
) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, reps) over the nodes the edges touch only: ``nodes`` sorted unique endpoints,
    ``reps[k]`` the representative (a global id) of ``nodes[k]``: the highest ``priority(nodes)``
    of its component, ties (and ``priority=None``) to the smallest id. Every other element is a
    singleton and represents itself, so the cost is O(E log E) whatever the corpus size."""
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if len(edges) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    nodes, local = np.unique(edges.ravel(), return_inverse=True)
    labels = component_labels(len(nodes), local.reshape(-1, 2), method)  # nodes sorted: local order = global order
    p = None if priority is None else np.asarray(priority(nodes))
    return nodes, nodes[_pick_representatives(labels, p)]


def representatives(n: int, edges: np.ndarray, priority: np.ndarray | None = None, method: str = DEFAULT_COMPONENT_METHOD) -> np.ndarray:
    """Per element, its component's representative: highest priority, ties to the smallest index.

    An element is kept iff ``representatives(...)[i] == i``.
    """
    if priority is not None and np.shape(priority) != (n,):
        raise ValueError(f"priority has shape {np.shape(priority)}, want ({n},)")
    reps = np.arange(n, dtype=np.int64)
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if len(edges) and (edges.min() < 0 or edges.max() >= n):
        raise IndexError(f"edge endpoint outside 0..{n - 1}")
    nodes, node_reps = group_representatives(edges, None if priority is None else (lambda idx: np.asarray(priority)[idx]), method)
    reps[nodes] = node_reps
    return reps


# -- exact and text keys ------------------------------------------------------------------------

_KEY_BLOCK = 1 << 16  # rows decoded at a time
_HEX_LENGTHS = (40, 64)  # sha1 and sha256 hex digests: the keys the embed stage writes
_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
_HEX_VALUE[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10, dtype=np.uint8)
_HEX_VALUE[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def _as_string_array(values: Sequence[str | None] | pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], pa.string())
    if not isinstance(values, pa.Array):
        values = pa.array(list(values), pa.string())
    if not pa.types.is_large_string(values.type):
        values = values.cast(pa.large_string())  # int64 offsets, one code path
    return values


def string_keys(values: Sequence[str | None] | pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-width keys of string keys: ``(keys (N, 2) uint64, valid (N,) bool)``.

    A lowercase hex digest of 40 or 64 characters (sha1, sha256) is decoded in numpy and folded
    to 16 bytes (XOR of its 16-byte halves); any other string gets its 16-byte BLAKE2b digest (a
    Python loop over those rows only). Equal strings get equal keys; distinct strings collide with
    probability ~2^-128. Null and empty strings are invalid (they never match anything).
    """
    arr = _as_string_array(values)
    n = len(arr)
    keys = np.zeros((n, 2), dtype=np.uint64)
    if n == 0:
        return keys, np.zeros(0, dtype=bool)
    _, offsets_buf, data_buf = arr.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    valid = lengths > 0
    if arr.null_count:
        valid &= arr.is_valid().to_numpy(zero_copy_only=False)
    fast = np.zeros(n, dtype=bool)
    for length in _HEX_LENGTHS:
        candidates = np.flatnonzero(valid & (lengths == length))
        for s in range(0, len(candidates), _KEY_BLOCK):  # bounded temporaries
            rows = candidates[s : s + _KEY_BLOCK]
            if rows[-1] - rows[0] == len(rows) - 1:  # contiguous rows of one length: a zero-copy view
                chars = data[offsets[rows[0]] : offsets[rows[-1] + 1]].reshape(len(rows), length)
            else:
                chars = data[offsets[rows, None] + np.arange(length)]
            nibbles = _HEX_VALUE[chars]
            hex_ok = (nibbles != 255).all(axis=1)
            rows, nibbles = rows[hex_ok], nibbles[hex_ok]
            raw = np.zeros((len(rows), 32), dtype=np.uint8)
            raw[:, : length // 2] = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
            keys[rows] = (raw[:, :16] ^ raw[:, 16:]).view(np.uint64)
            fast[rows] = True
    slow = np.flatnonzero(valid & ~fast)
    if len(slow):
        texts = arr.take(pa.array(slow)).to_pylist()
        digests = b"".join(hashlib.blake2b(t.encode(), digest_size=16).digest() for t in texts)
        keys[slow] = np.frombuffer(digests, dtype=np.uint64).reshape(-1, 2)
    return keys, valid


def exact_key_edges(keys: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Edges (first occurrence, later occurrence) of equal fixed-width keys, sorted by the later
    occurrence: one sort of the valid keys (``keys``: (N, 2) uint64 from ``string_keys``, or (N,))."""
    keys = np.asarray(keys)
    if keys.ndim == 1:
        keys = keys[:, None]
    if valid is None or valid.all():
        idx, k = None, keys  # no copy
    else:
        idx = np.flatnonzero(valid)
        k = keys[idx]
    if len(k) < 2:
        return _empty_edges()
    order = np.lexsort(k.T[::-1])  # stable: equal keys stay in index order, the first occurrence leads
    same = np.ones(len(k) - 1, dtype=bool)
    for col in range(k.shape[1]):  # one sorted column at a time: 8 bytes per key of temporaries
        sorted_col = k[order, col]
        same &= sorted_col[1:] == sorted_col[:-1]
        del sorted_col
    if not same.any():
        return _empty_edges()
    # positions (in sorted order) inside runs of equal keys: memory scales with the duplicates
    in_run = np.zeros(len(k), dtype=bool)
    in_run[:-1] |= same
    in_run[1:] |= same
    pos = np.flatnonzero(in_run)
    del in_run
    is_start = np.ones(len(pos), dtype=bool)
    is_start[1:] = ~same[pos[1:] - 1]
    run_first = pos[is_start][np.cumsum(is_start) - 1]  # per position: its run's first position
    later = ~is_start
    first, member = order[run_first[later]], order[pos[later]]
    if idx is not None:
        first, member = idx[first], idx[member]
    edges = np.stack([first, member], axis=1)
    return edges[np.argsort(edges[:, 1], kind="stable")]


def exact_duplicate_edges(keys: Sequence[str | None] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Edges from each key's first occurrence to every later one; None/empty keys never match."""
    return exact_key_edges(*string_keys(keys))


def first_of(edges: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Per item, the first occurrence of its key in ``exact_key_edges`` output (itself when unique)."""
    items = np.asarray(items, dtype=np.int64)
    if len(edges) == 0:
        return items.copy()
    pos = np.minimum(np.searchsorted(edges[:, 1], items), len(edges) - 1)
    return np.where(edges[pos, 1] == items, edges[pos, 0], items)


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

    from realsyn.image_decode import MAX_PIXELS_CEILING, open_image

    try:
        # allowed formats only, pixel ceiling, memory budget (realsyn.image_decode)
        with open_image(image_bytes, max_pixels=MAX_PIXELS_CEILING) as im:
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


_BYTE_BITS = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64 (np.bitwise_count on numpy >= 2, a byte table before)."""
    x = np.asarray(x, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return _BYTE_BITS[np.ascontiguousarray(x).view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.uint8)


def _hash_bytes(hashes: np.ndarray) -> np.ndarray:
    """uint64 -> (N, 8) uint8, the layout faiss binary indexes take."""
    return np.ascontiguousarray(np.asarray(hashes, dtype=np.uint64).astype(">u8").view(np.uint8).reshape(-1, 8))


def _upper_pairs(query_rows: np.ndarray, neighbours: np.ndarray, query_offset: int, sims: np.ndarray | None = None):
    """(query row, neighbour id) hits -> sorted (query id, neighbour id) pairs, query id < neighbour id
    (and, when ``sims`` is given, their similarities in the same order)."""
    q = query_rows.astype(np.int64) + int(query_offset)
    nb = neighbours.astype(np.int64)
    keep = q < nb
    pairs = np.stack([q[keep], nb[keep]], axis=1)
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    if sims is None:
        return pairs[order]
    return pairs[order], np.asarray(sims)[keep][order]


def _rows_of_range_result(lims: np.ndarray) -> np.ndarray:
    """faiss range-search limits -> the query row of every result."""
    counts = np.diff(lims.astype(np.int64))
    return np.repeat(np.arange(len(counts), dtype=np.int64), counts)


class BinaryHashIndex:
    """Exact Hamming range search over 64-bit hashes (faiss IndexBinaryFlat); global ids in add order.

    Brute force, O(indexed x queries) popcounts: the reference ``hamming_edges`` is checked against
    (tests, bench/bench_dedup.py); the global step uses multi-index hashing instead.
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
            return _empty_edges()
        # faiss binary range search keeps distances strictly below the radius.
        lims, _, ids = self._index.range_search(_hash_bytes(query_hashes), int(max_distance) + 1)
        return _upper_pairs(_rows_of_range_result(lims), ids, query_offset)


def hamming_edges_brute_force(hashes: np.ndarray, max_distance: int = 6) -> np.ndarray:
    """All pairs (i < j) within max_distance bits by brute force (faiss IndexBinaryFlat): O(N^2)."""
    index = BinaryHashIndex()
    index.add(hashes)
    return index.edges(hashes, 0, max_distance)


# Multi-index hashing. Split the 64 bits into m chunks; two hashes within distance d differ in at
# most d chunks, so they agree exactly on at least s = m - d of them (pigeonhole; m = d + 1 is the
# classic "one equal chunk"). For every s-subset of chunks, sort the hashes by those bits and
# verify the pairs inside each run of equal bits. A pair is reported only under the lowest s
# chunks it agrees on, so it comes out exactly once. More chunks mean longer keys (fewer chance
# candidates) but C(m, d) sorts; ``mih_chunks`` picks m by a cost model.

_SORT_NS_PER_ITEM_LOG = 4.0  # argsort of uint64, per element and log2(N)
_PASS_NS_PER_ITEM = 12.0  # masking and run detection per key
_PAIR_NS = 40.0  # generating and verifying one candidate pair
MIH_BLOCK_PAIRS = 1 << 21  # candidate pairs generated and verified at a time (bounds memory)
MIH_WARN_BUCKET = 20_000  # distinct hashes sharing a key: logged (quadratic work, bounded memory)


def _chunk_masks(m: int) -> list[int]:
    """m contiguous bit ranges covering 64 bits, the wider ones first."""
    widths = [64 // m + (1 if k < 64 % m else 0) for k in range(m)]
    masks, start = [], 0
    for w in widths:
        masks.append(((1 << w) - 1) << start)
        start += w
    return masks


def _mih_cost(n: int, d: int, m: int) -> float:
    s = m - d
    widths = sorted(bin(mask).count("1") for mask in _chunk_masks(m))
    key_bits = sum(widths[:s])  # pessimistic: the narrowest s chunks
    keys = math.comb(m, s)
    per_key = n * (_SORT_NS_PER_ITEM_LOG * max(math.log2(max(n, 2)), 1.0) + _PASS_NS_PER_ITEM)
    per_key += _PAIR_NS * n * (n - 1) / 2 / 2.0**key_bits
    return keys * per_key


def mih_chunks(n: int, max_distance: int) -> int:
    """The number of chunks m (d + 1 <= m <= 64) minimising the estimated multi-index-hashing cost
    for n distinct uniform hashes (more chunks: fewer chance candidates, more sorts)."""
    d = int(max_distance)
    if d <= 0:
        return 1
    if d >= 64:
        return 64
    best, best_cost = d + 1, math.inf
    for m in range(d + 1, 65):
        if math.comb(m, d) > 5000:  # the number of sorts stays bounded
            break
        cost = _mih_cost(n, d, m)
        if cost < best_cost:
            best, best_cost = m, cost
    return best


def _run_pairs(sorted_keys: np.ndarray, block_pairs: int):
    """Blocks of (p, q) positions, p < q, of every pair inside the runs of equal ``sorted_keys``;
    each block has at most ``block_pairs`` pairs (or one position's pairs, if that is more)."""
    n = len(sorted_keys)
    if n < 2:
        return
    eq = sorted_keys[1:] == sorted_keys[:-1]
    if not eq.any():
        return
    in_run = np.zeros(n, dtype=bool)
    in_run[:-1] |= eq
    in_run[1:] |= eq
    pos = np.flatnonzero(in_run)
    starts = np.ones(len(pos), dtype=bool)
    starts[1:] = ~eq[pos[1:] - 1]
    run_start = np.flatnonzero(starts)
    run_len = np.diff(np.append(run_start, len(pos)))
    if run_len.max() > MIH_WARN_BUCKET:
        big = int(run_len.max())
        logger.warning(
            "pHash bucket of %d distinct hashes: %d candidate pairs, verified in blocks of %d", big, big * (big - 1) // 2, block_pairs
        )
    run_of = np.cumsum(starts) - 1
    rank = np.arange(len(pos)) - run_start[run_of]
    count = run_len[run_of] - rank - 1  # pairs (pos[k], pos[k] + t), t = 1..count
    del run_of, rank, starts
    cum = np.cumsum(count)
    lo = 0
    while lo < len(pos):
        done = int(cum[lo - 1]) if lo else 0
        hi = max(int(np.searchsorted(cum, done + block_pairs, side="right")), lo + 1)
        c = count[lo:hi]
        if c.sum():
            first = np.repeat(pos[lo:hi], c)
            step = np.arange(len(first), dtype=np.int64) - np.repeat(np.cumsum(c) - c, c) + 1
            yield first, first + step
        lo = hi


def _subset_key(values: np.ndarray, masks: list[int]) -> np.ndarray:
    """The bits of the chunks ``masks`` of every value: packed into uint32 when they fit (a faster
    sort, half the memory), else the masked uint64."""
    widths = [bin(mask).count("1") for mask in masks]
    if sum(widths) > 32:
        return values & np.uint64(sum(masks))
    key = np.zeros(len(values), dtype=np.uint32)
    pos = 0
    for mask, width in zip(masks, widths):
        start = (mask & -mask).bit_length() - 1
        key |= ((values >> np.uint64(start)) & np.uint64((1 << width) - 1)).astype(np.uint32) << np.uint32(pos)
        pos += width
    return key


def _distinct_hamming_pairs(values: np.ndarray, d: int, chunks: int | None, block_pairs: int) -> np.ndarray:
    """Pairs (u < v) of indices into sorted distinct ``values`` within d bits, by multi-index hashing."""
    n = len(values)
    if n < 2 or d <= 0:
        return _empty_edges()
    if d >= 64:
        subsets, masks = [()], []
    else:
        m = mih_chunks(n, d) if chunks is None else int(chunks)
        if not d + 1 <= m <= 64:
            raise ValueError(f"chunks must be in {d + 1}..64 for max_distance {d}, got {m}")
        masks = _chunk_masks(m)
        subsets = list(combinations(range(m), m - d))
    masks_u = [np.uint64(x) for x in masks]
    out = []
    for subset in subsets:
        keys = _subset_key(values, [masks[k] for k in subset])
        order = np.argsort(keys)
        earlier = [masks_u[k] for k in range(max(subset, default=-1)) if k not in subset]
        for p, q in _run_pairs(keys[order], block_pairs):
            a, b = order[p], order[q]
            diff = values[a] ^ values[b]
            ok = popcount64(diff) <= d
            for mk in earlier:  # agreeing on an earlier chunk: reported under another subset
                ok &= (diff & mk) != 0
            if ok.any():
                a, b = a[ok], b[ok]
                out.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
    return np.concatenate(out) if out else _empty_edges()


def _cross_pairs(members_a: np.ndarray, members_b: np.ndarray, starts: np.ndarray, counts: np.ndarray, pairs: np.ndarray):
    """Every (x, y) with x in group pairs[:, 0] and y in group pairs[:, 1] (groups as runs of members)."""
    ca, cb = counts[pairs[:, 0]], counts[pairs[:, 1]]
    per = ca * cb
    pair_of = np.repeat(np.arange(len(pairs)), per)
    k = np.arange(int(per.sum()), dtype=np.int64) - np.repeat(np.cumsum(per) - per, per)
    x = members_a[starts[pairs[pair_of, 0]] + k // cb[pair_of]]
    y = members_b[starts[pairs[pair_of, 1]] + k % cb[pair_of]]
    return x, y


def hamming_edges(
    hashes: np.ndarray, max_distance: int = 6, *, all_pairs: bool = True, chunks: int | None = None, block_pairs: int = MIH_BLOCK_PAIRS
) -> np.ndarray:
    """Pairs (i < j) of one hash array within max_distance bits, by multi-index hashing.

    Identical hashes are collapsed first (``np.unique``), so a pathological bucket of equal hashes
    (blank images all hash to 0) costs one sort, and pairs are searched among distinct values only.
    A run of many *distinct* hashes sharing a key is still verified pair by pair, but in blocks of
    ``block_pairs`` (memory stays bounded; a warning names its size).

    ``all_pairs=True``: every pair, sorted, exactly as brute force finds them. ``all_pairs=False``:
    a spanning edge set with the same connected components, for Union-Find: every copy of a hash
    to its first occurrence, and one edge per pair of distinct near hashes between their first
    occurrences (O(N) edges even when a million images share a hash).
    ``chunks``: the number of chunks m (d + 1..64); None picks it with ``mih_chunks``.
    """
    d = int(max_distance)
    if d < 0:
        raise ValueError(f"max_distance must be >= 0, got {d}")
    h = np.asarray(hashes, dtype=np.uint64).ravel()
    if len(h) < 2:
        return _empty_edges()
    values, first, inverse, counts = np.unique(h, return_index=True, return_inverse=True, return_counts=True)
    near = _distinct_hamming_pairs(values, d, chunks, block_pairs)
    if not all_pairs:
        copies = np.flatnonzero(first[inverse] != np.arange(len(h)))
        a, b = first[near[:, 0]], first[near[:, 1]]
        edges = np.concatenate([np.stack([first[inverse[copies]], copies], axis=1), np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)])
        return edges[np.lexsort((edges[:, 1], edges[:, 0]))]
    # Expand groups of equal hashes into every pair: members of each distinct value, in index order.
    members = np.argsort(inverse, kind="stable").astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    parts = []
    multi = np.flatnonzero(counts > 1)
    if len(multi):
        for p, q in _run_pairs(inverse[members], block_pairs):
            parts.append(np.stack([members[p], members[q]], axis=1))
    if len(near):
        x, y = _cross_pairs(members, members, starts, counts, near)
        parts.append(np.stack([np.minimum(x, y), np.maximum(x, y)], axis=1))
    if not parts:
        return _empty_edges()
    edges = np.concatenate(parts)
    return edges[np.lexsort((edges[:, 1], edges[:, 0]))]


# -- semantic (embedding) near-duplicates --------------------------------------------------------

AUTO_FLAT_BELOW = 50_000  # "auto": exact Flat below this many vectors, IVF-SQ8 from here on
AUTO_LIST_LENGTH = 256  # "auto": vectors per IVF list, constant so a probe costs the same at any N ...
AUTO_MAX_LISTS = 1 << 20  # ... up to 268M vectors; above, longer lists (the coarse quantiser stays ~1M centroids)
APPROXIMATE_CODES = re.compile(r"SQ|PQ|LSH|RaBitQ")
SQ_MARGIN = 0.02  # approximate codes: candidates from threshold - margin, then exact verification
TRAIN_POINTS_PER_LIST = 32  # coarse quantiser training sample per IVF list (two-level K-means) ...
TRAIN_ROWS_CAP = 262_144  # ... capped, so the training reservoir does not grow with N
QUANTIZER_EF_SEARCH = 64  # HNSW coarse quantiser: candidates per assignment / probe (>= nprobe)


def auto_index_factory(n: int) -> str:
    """The faiss index of "auto": Flat (exact) below AUTO_FLAT_BELOW vectors, else
    ``IVF{n / 256}_HNSW32,SQ8`` (at most 2^20 lists): lists of a constant ~256 vectors, so ``nprobe`` lists cost the same
    per query at any N, and an HNSW coarse quantiser, so finding the lists grows with log(nlist)
    instead of nlist (bench/bench_dedup.py: recall and time against Flat)."""
    if n < AUTO_FLAT_BELOW:
        return "Flat"
    return f"IVF{min(max(1, n // AUTO_LIST_LENGTH), AUTO_MAX_LISTS)}_HNSW32,SQ8"


def rowwise_dot(a: np.ndarray, b: np.ndarray, block: int = 65536) -> np.ndarray:
    """float32 inner product of matching rows."""
    out = np.empty(len(a), dtype=np.float32)
    for s in range(0, len(a), block):
        out[s : s + block] = np.einsum("ij,ij->i", a[s : s + block], b[s : s + block])
    return out


def ivf_list_ranges(list_sizes: np.ndarray, entry_bytes: int, max_bytes: int) -> np.ndarray:
    """Cut IVF lists 0..nlist-1 into contiguous ranges whose stored entries (``list_sizes`` x
    ``entry_bytes``: code plus 8-byte id) fit ``max_bytes``, greedily from list 0; a list larger
    than the budget gets a range of its own. Returns the bounds (R + 1,): range r is lists
    ``bounds[r]:bounds[r + 1]``."""
    sizes = np.asarray(list_sizes, dtype=np.int64)
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
    cum = np.cumsum(sizes * int(entry_bytes))  # bytes of lists 0..i
    bounds, start = [0], 0
    while start < len(sizes):
        base = int(cum[start - 1]) if start else 0
        end = max(int(np.searchsorted(cum, base + int(max_bytes), side="right")), start + 1)
        bounds.append(end)
        start = end
    return np.asarray(bounds, dtype=np.int64)


class SemanticIndex:
    """Inner-product faiss index over L2-normalised vectors; edges = pairs with cosine >= threshold.

    ``index_factory`` "Flat" is exact. IVF variants ("IVF4096,Flat"; at scale "IVF65536_HNSW32,SQ8",
    ``auto_index_factory``) must be ``train``-ed on a sample first and probe only ``nprobe``
    lists, so recall is approximate. With compressed codes (SQ, PQ: ``approximate``) the
    similarities are approximate too: ``edges`` then returns *candidates* at ``threshold -
    margin``, with their approximate similarity, and the caller verifies them with the exact
    inner product (``realsyn.stages.dedup`` does, so every edge it keeps is exact).
    On GPU (faiss-gpu with ``use_gpu`` "auto" or "always") range search is not available for every
    index type, so the index is searched for ``k_neighbors`` nearest neighbours and thresholded: a
    row with more than k near-duplicates loses the excess (counted in ``saturated_queries``).
    ``partitioned_edges`` gives the same pairs as ``add`` + ``edges`` over a whole corpus with only
    one contiguous range of IVF lists in memory at a time (bounded memory; CPU only).
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
        margin: float | None = None,
    ) -> None:
        import faiss

        if search not in ("auto", "range", "knn"):
            raise ValueError("search must be 'auto', 'range' or 'knn'")
        gpu = faiss_use_gpu(use_gpu)
        self.dim, self.threshold, self.k_neighbors, self.nprobe = int(dim), float(threshold), int(k_neighbors), int(nprobe)
        self.approximate = bool(APPROXIMATE_CODES.search(index_factory))
        self.margin = float((SQ_MARGIN if self.approximate else 0.0) if margin is None else margin)
        self.saturated_queries = 0
        self.index_ranges = 0  # ranges of IVF lists the last partitioned_edges indexed one at a time
        if gpu:  # GPU IVF searches its coarse centroids by brute force on the device
            index_factory = re.sub(r"_HNSW\d*", "", index_factory)
        self.index_factory = index_factory
        index = faiss.index_factory(self.dim, index_factory, faiss.METRIC_INNER_PRODUCT)
        self._hnsw_quantizer = None
        try:
            ivf = faiss.extract_index_ivf(index)
            self.nlist = int(ivf.nlist)
            quantizer = faiss.downcast_index(ivf.quantizer)
            if isinstance(quantizer, faiss.IndexHNSW):
                self._hnsw_quantizer = quantizer
                quantizer.hnsw.efSearch = max(QUANTIZER_EF_SEARCH, self.nprobe)
        except RuntimeError:  # not an IVF index
            self.nlist = 0
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
    def partitionable(self) -> bool:
        """Whether ``partitioned_edges`` applies: a plain IVF index (no pre-transform) on CPU."""
        import faiss

        return not self.on_gpu and isinstance(faiss.downcast_index(self._index), faiss.IndexIVF)

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    @property
    def train_size(self) -> int:
        """Training sample to ask for: 64 points per IVF list (faiss wants >= 39), at least 10,000;
        with an HNSW quantiser (trained two-level) 32 per list, capped at TRAIN_ROWS_CAP but never
        under 2 per list."""
        if self._hnsw_quantizer is not None:
            return max(10_000, min(TRAIN_POINTS_PER_LIST * self.nlist, max(TRAIN_ROWS_CAP, 2 * self.nlist)))
        return max(10_000, 64 * self.nlist)

    def _check(self, emb: np.ndarray) -> np.ndarray:
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"embeddings have shape {emb.shape}, want (N, {self.dim})")
        return emb

    def train(self, sample: np.ndarray) -> None:
        """Train IVF/SQ/PQ quantisers on a sample (faiss wants >= ~39 points per list).

        An HNSW coarse quantiser gets its centroids from spherical two-level K-means
        (``realsyn.clustering``: ~sample x 2 sqrt(nlist) work instead of faiss's sample x nlist,
        which at nlist ~ N / 256 would grow as N^2); faiss then trains only the codes."""
        sample = self._check(sample)
        if self._hnsw_quantizer is not None and self._hnsw_quantizer.ntotal == 0:
            from realsyn.clustering import train_kmeans_two_level

            if len(sample) < self.nlist:
                raise ValueError(f"{self.index_factory}: need at least {self.nlist} training rows, got {len(sample)}")
            centroids = train_kmeans_two_level(sample, self.nlist, niter=10, use_gpu="never", normalized=False)
            self._hnsw_quantizer.add(centroids)
            del centroids
            release_free_memory()  # the K-means temporaries, before faiss trains the codes on residuals
        self._index.train(sample)
        self._set_nprobe()

    def add(self, emb: np.ndarray) -> None:
        """Append rows; they get the next consecutive global ids."""
        if not self.is_trained:
            raise RuntimeError("index must be trained before add(): call train(sample)")
        self._index.add(self._check(emb))

    def edges(self, query_emb: np.ndarray, query_offset: int, with_similarity: bool = False):
        """Sorted pairs (query global id, indexed id) with similarity >= threshold - margin and query
        id < indexed id: when every indexed row is queried once, each pair comes out exactly once.
        ``with_similarity``: also the (index's, so approximate for SQ/PQ codes) similarities."""
        query_emb = self._check(query_emb)
        if len(query_emb) == 0 or self.ntotal == 0:
            return (_empty_edges(), np.zeros(0, np.float32)) if with_similarity else _empty_edges()
        cut = np.float32(self.threshold - self.margin)
        if self.search == "range":
            # faiss keeps similarities strictly above the radius; step one float below to get >=.
            radius = float(np.nextafter(cut, np.float32(-np.inf)))
            lims, sims, ids = self._index.range_search(query_emb, radius)
            keep = sims >= cut
            pairs, s = _upper_pairs(_rows_of_range_result(lims)[keep], ids[keep], query_offset, sims[keep])
            return (pairs, s) if with_similarity else pairs
        k = min(self.k_neighbors, self.ntotal)
        sims, ids = self._index.search(query_emb, k)
        hit = (sims >= cut) & (ids >= 0)
        saturated = int(hit.all(axis=1).sum()) if k < self.ntotal else 0
        if saturated:
            self.saturated_queries += saturated
            logger.warning("%d queries had all %d neighbours above %.3f; raise k_neighbors", saturated, k, cut)
        rows = np.broadcast_to(np.arange(len(query_emb), dtype=np.int64)[:, None], hit.shape)
        pairs, s = _upper_pairs(rows[hit], ids[hit], query_offset, sims[hit])
        return (pairs, s) if with_similarity else pairs

    def partitioned_edges(
        self,
        shards: Sequence[tuple[int, Callable[[], np.ndarray]]],
        max_bytes: int,
        *,
        with_similarity: bool = False,
        spill_dir: str | None = None,
    ):
        """``edges`` of every vector against every other, with the IVF lists cut into contiguous
        ranges whose stored entries fit ``max_bytes``: exactly the pairs (and similarities) that one
        index holding every vector, queried with every vector, would give, in bounded memory.

        ``shards``: (global id of its first row, a function returning its (n, dim) vectors; a
        memory map is fine), in id order, contiguous. The index must be trained, empty and on CPU.

        1. One pass over the shards: per vector its list (``quantizer.assign``: what ``add`` uses)
           and its ``nprobe`` probed lists with their coarse similarities (``quantizer.search``:
           what a query probes), from the same quantiser on the same shard batch, spilled per shard
           to int32 / float32 files under a temporary folder (removed at the end), never held for
           the corpus; the list sizes are counted on the way.
        2. ``ivf_list_ranges`` cuts the lists by list sizes x (code size + 8 id bytes).
        3. Per range, in a fresh set of inverted lists over the same trained quantiser and codes:
           every vector whose list is in the range is added with its spilled list and global id
           (``add_preassigned``), then every vector probing a list in the range is range-searched
           with its probes outside the range masked to -1 (``range_search_preassigned``, spilled
           coarse similarities: the residual codes need them). A candidate (query, indexed) is
           found in the one range holding the indexed vector's list, so each pair comes out once,
           and ``query < indexed`` keeps it exactly as ``edges`` does.

        Memory: one range's entries (<= ``max_bytes`` unless one list alone is larger) plus one
        shard's vectors and probes, plus the quantiser. Reads: one pass over the shards for the
        probes, then up to two per range (add, query; a shard with nothing in the range is
        skipped). Disk: (4 + 8 x nprobe) bytes per vector. ``self.index_ranges``: the ranges.
        CPU only: range search over preassigned lists has no GPU version, so the stage builds the
        index with ``use_gpu="never"`` when a budget is set.
        """
        import os
        import shutil
        import tempfile

        import faiss
        from faiss.contrib.ivf_tools import add_preassigned, range_search_preassigned

        if self.on_gpu:
            raise RuntimeError("partitioned_edges runs on CPU: build the SemanticIndex with use_gpu='never'")
        ivf = faiss.downcast_index(self._index)
        if not self.partitionable:
            raise ValueError(
                f"{self.index_factory}: partitioned_edges needs a plain IVF index (no pre-transform), not {type(ivf).__name__}"
            )
        if not self.is_trained:
            raise RuntimeError("index must be trained before partitioned_edges(): call train(sample)")
        if self.ntotal:
            raise RuntimeError("partitioned_edges adds every vector itself: the index must be empty")
        nlist, nprobe = self.nlist, min(self.nprobe, self.nlist)
        ivf.nprobe = nprobe  # range_search_preassigned reads nprobe keys per query
        quantizer = ivf.quantizer
        cut = np.float32(self.threshold - self.margin)
        radius = float(np.nextafter(cut, np.float32(-np.inf)))  # faiss keeps > radius: one float below for >=
        pairs_out, sims_out = [], []
        sizes = np.zeros(nlist, dtype=np.int64)
        tmp = tempfile.mkdtemp(prefix="realsyn-ivf-ranges-", dir=spill_dir)
        try:
            files = []
            for k, (offset, load) in enumerate(shards):
                x = self._check(load())
                assign = quantizer.assign(x, 1).reshape(-1).astype(np.int32)
                coarse, probes = quantizer.search(x, nprobe)
                del x
                paths = tuple(os.path.join(tmp, f"{k}.{name}.npy") for name in ("assign", "probes", "coarse"))
                for path, array in zip(paths, (assign, probes.astype(np.int32), coarse.astype(np.float32))):
                    np.save(path, array)
                sizes += np.bincount(assign[assign >= 0], minlength=nlist)
                files.append((int(offset), load, paths))
                del assign, probes, coarse
            bounds = ivf_list_ranges(sizes, int(ivf.code_size) + 8, max_bytes)
            self.index_ranges = 0
            for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
                if not sizes[lo:hi].any():
                    continue  # nothing indexed in these lists: no candidates
                self.index_ranges += 1
                lists = faiss.ArrayInvertedLists(nlist, ivf.code_size)
                ivf.replace_invlists(lists, True)  # the index owns (and frees) it from here
                lists.this.disown()
                ivf.ntotal = 0
                for list_no in (np.flatnonzero(sizes[lo:hi]) + lo).tolist():
                    # each list's vectors reserved at its final size: no growth slack (up to 2x) on the budget
                    lists.resize(list_no, int(sizes[list_no]))
                    lists.resize(list_no, 0)
                for offset, load, (assign_path, _, _) in files:
                    assign = np.load(assign_path)
                    rows = np.flatnonzero((assign >= lo) & (assign < hi))
                    if len(rows):
                        ids = rows.astype(np.int64) + offset  # held here: add_preassigned passes only a pointer
                        keys = assign[rows].astype(np.int64)
                        add_preassigned(ivf, self._check(load()[rows]), keys, ids=ids)
                        del ids, keys
                for offset, load, (_, probes_path, coarse_path) in files:
                    probes = np.load(probes_path, mmap_mode="r")
                    inside = (probes >= lo) & (probes < hi)
                    rows = np.flatnonzero(inside.any(axis=1))
                    if not len(rows):
                        continue
                    keys = np.where(inside[rows], probes[rows], -1).astype(np.int64)
                    coarse = np.ascontiguousarray(np.load(coarse_path, mmap_mode="r")[rows])
                    del inside, probes
                    lims, sims, found = range_search_preassigned(ivf, self._check(load()[rows]), radius, keys, coarse)
                    keep = sims >= cut
                    query_rows = rows[_rows_of_range_result(lims)[keep]]
                    p, s = _upper_pairs(query_rows, found[keep], offset, sims[keep])
                    pairs_out.append(p)
                    sims_out.append(s)
                logger.info("IVF lists %d..%d: %d vectors indexed", lo, hi - 1, int(sizes[lo:hi].sum()))
            empty = faiss.ArrayInvertedLists(nlist, ivf.code_size)  # leave the index empty
            ivf.replace_invlists(empty, True)
            empty.this.disown()
            ivf.ntotal = 0
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        pairs = np.concatenate([_empty_edges(), *pairs_out])
        sims = np.concatenate([np.zeros(0, np.float32), *sims_out])
        order = np.lexsort((pairs[:, 1], pairs[:, 0]))
        return (pairs[order], sims[order]) if with_similarity else pairs[order]
