"""Stage 4 and 5e: global dedup of images and sentences (exact, perceptual, semantic) over all shards.

Columnar end to end: a global step holds numpy arrays only, never a Python object per item.
Exact keys (sha256, sha1 of the text and of its normalised form) become 16-byte keys and one sort
gives the exact groups; pHashes (8 bytes) go through multi-index hashing; the semantic index is
global and queried shard by shard (IVF-SQ8 when large, every kept edge verified by the exact inner
product), or, with ``max_index_gb``, built one contiguous range of IVF lists at a time within that
budget (the same edges in bounded memory; ``_semantic_edges``). Components are found over the
nodes the edges touch only, priorities (image pixels) and ids are read back per shard for those
nodes only. Output: per shard ``decisions/{shard}.parquet``
(``realsyn.decisions``; detail: the representative's id) in one global generation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from realsyn import layout
from realsyn.decisions import decision_table
from realsyn.progress import track
from realsyn.stages.common import require_partitions
from realsyn.stats import StepStats
from realsyn.storage import Storage

log = logging.getLogger("realsyn")

IMAGE_EMBEDDINGS, SENTENCE_EMBEDDINGS = layout.IMAGE_EMBEDDINGS, layout.SENTENCE_EMBEDDINGS

# Reason codes of the int8 column the step computes; 0 = kept.
REASONS = np.array([None, "exact_duplicate", "perceptual_duplicate", "semantic_duplicate", "near_duplicate"], dtype=object)
KEPT, EXACT, PERCEPTUAL, SEMANTIC, NEAR = range(5)
VERIFY_ROWS = 1 << 20  # vectors gathered at a time to verify cross-shard semantic candidates


class _Corpus:
    """The shards of one embeddings asset: their row ranges in the global id space."""

    def __init__(self, storage: Storage, asset: str, shards: Sequence[str]):
        self.storage, self.asset = storage, asset
        self.shards = require_partitions(storage, asset, shards)
        sizes = []
        for s in self.shards:  # the Parquet footer only
            with storage.reader(asset, s).open(layout.EMBEDDING_INDEX_FILE) as f:
                sizes.append(pq.ParquetFile(f).metadata.num_rows)
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        self.n = int(self.offsets[-1])

    def ranges(self):
        for k, s in enumerate(self.shards):
            yield s, int(self.offsets[k]), int(self.offsets[k + 1])

    def column(self, shard: str, name: str) -> pa.ChunkedArray:
        return self.storage.reader(self.asset, shard).read_parquet(layout.EMBEDDING_INDEX_FILE, columns=[name]).column(name)

    def embeddings(self, shard: str) -> np.ndarray:
        return self.storage.reader(self.asset, shard).read_numpy(layout.EMBEDDINGS_FILE)  # memory-mapped when local

    def model_info(self) -> dict:
        return self.storage.reader(self.asset, self.shards[0]).read_json(layout.MODEL_FILE)

    def key_edges(self, name: str) -> np.ndarray:
        """Exact-duplicate edges of a string key column: 16-byte keys of every shard, one sort."""
        from realsyn.dedup import exact_key_edges, string_keys

        keys = np.empty((2, self.n), dtype=np.uint64).T  # column-major: the sort reads each key column in place
        valid = np.empty(self.n, dtype=bool)
        for s, lo, hi in self.ranges():
            keys[lo:hi], valid[lo:hi] = string_keys(self.column(s, name))
        return exact_key_edges(keys, valid)

    def uint_column(self, name: str, dtype) -> np.ndarray:
        out = np.empty(self.n, dtype=dtype)
        for s, lo, hi in self.ranges():
            out[lo:hi] = self.column(s, name).to_numpy()
        return out

    def take(self, name: str, rows: np.ndarray) -> pa.Array:
        """Values of a column at sorted global rows, reading only the shards that hold them."""
        parts = []
        for s, lo, hi in self.ranges():
            a, b = np.searchsorted(rows, [lo, hi])
            if b > a:
                parts.append(self.column(s, name).take(pa.array(rows[a:b] - lo)).combine_chunks())
        return pa.concat_arrays(parts) if parts else pa.array([])

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """Embedding vectors at sorted global rows (float32)."""
        out = []
        for s, lo, hi in self.ranges():
            a, b = np.searchsorted(rows, [lo, hi])
            if b > a:
                out.append(np.asarray(self.embeddings(s)[rows[a:b] - lo], dtype=np.float32))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _verify(corpus: _Corpus, pairs: np.ndarray, threshold: float) -> np.ndarray:
    """The pairs whose exact inner product is >= threshold; vectors gathered VERIFY_ROWS at a time."""
    from realsyn.dedup import rowwise_dot

    kept = []
    step = max(1, VERIFY_ROWS // 2)  # a pair brings at most two new rows
    for s in range(0, len(pairs), step):
        block = pairs[s : s + step]
        rows, local = np.unique(block.ravel(), return_inverse=True)
        vectors = corpus.rows(rows)
        local = local.reshape(-1, 2)
        sims = rowwise_dot(vectors[local[:, 0]], vectors[local[:, 1]])
        kept.append(block[sims >= np.float32(threshold)])
    return np.concatenate(kept) if kept else np.zeros((0, 2), np.int64)


def _semantic_edges(
    corpus: _Corpus, threshold: float, index_factory: str, nprobe: int, stats: StepStats, max_index_gb: float | None = None
) -> np.ndarray:
    """Pairs with cosine >= threshold. With approximate codes (SQ8) the index yields candidates at
    threshold - margin and every one is verified by the exact inner product.

    ``max_index_gb`` None: one global index, queried shard by shard (on GPU where faiss sees one);
    in-shard candidates are verified against the query shard, the rest in one gather pass.
    ``max_index_gb`` set and an IVF index: ``SemanticIndex.partitioned_edges`` on CPU, the IVF lists
    cut into contiguous ranges whose codes + ids fit the budget (GiB), one range in memory at a time:
    exactly the same edges, for one pass over the shards plus up to two per range (counted in
    ``semantic_index_ranges``). Any other index ("Flat": "auto" below AUTO_FLAT_BELOW vectors; a
    pre-transform before the IVF) is never partitioned: it runs as the one index whatever the budget."""
    from realsyn.dedup import SemanticIndex, auto_index_factory, release_free_memory, rowwise_dot

    dim = int(corpus.model_info()["dim"])
    factory = auto_index_factory(corpus.n) if index_factory == "auto" else index_factory
    index = SemanticIndex(dim, threshold, index_factory=factory, nprobe=nprobe, use_gpu="auto" if max_index_gb is None else "never")
    partitioned = max_index_gb is not None and index.partitionable
    if max_index_gb is not None and not partitioned:
        log.info("%s: %s is not a plain IVF index; max_index_gb does not apply, one index", corpus.asset, factory)
        index = SemanticIndex(dim, threshold, index_factory=factory, nprobe=nprobe)  # on GPU where faiss sees one, as without a budget
    if not index.is_trained:
        from realsyn.clustering import ReservoirSample

        sample = ReservoirSample(capacity=min(corpus.n, index.train_size), dim=dim, seed=0)
        for s, _, _ in corpus.ranges():
            sample.add(np.asarray(corpus.embeddings(s)))
        release_free_memory()  # the reservoir's per-shard temporaries, before training adds its own
        index.train(sample.array())
        del sample  # the training reservoir is not held while the index is built
        release_free_memory()
    edges, pending, candidates = [], [], 0
    if partitioned:
        shards = [(lo, lambda s=s: corpus.embeddings(s)) for s, lo, _ in corpus.ranges()]
        found = index.partitioned_edges(shards, int(max_index_gb * 2**30))
        stats.add("semantic_index_ranges", index.index_ranges)
        if index.approximate:
            candidates = len(found)
            pending.append(found)
        else:
            edges.append(found)
    else:
        for s, _, _ in corpus.ranges():
            index.add(np.asarray(corpus.embeddings(s), dtype=np.float32))
        for s, lo, hi in track(
            list(corpus.ranges()), f"{corpus.asset}: semantic queries", total=corpus.n, unit="vectors", size=lambda r: r[2] - r[1]
        ):
            q = np.asarray(corpus.embeddings(s), dtype=np.float32)
            found = index.edges(q, lo)
            if not index.approximate:
                edges.append(found)
                continue
            candidates += len(found)
            inside = found[:, 1] < hi
            local = found[inside] - lo
            edges.append(found[inside][rowwise_dot(q[local[:, 0]], q[local[:, 1]]) >= np.float32(threshold)])
            pending.append(found[~inside])
    release_free_memory()  # the inverted lists of every range are freed
    if pending:
        edges.append(_verify(corpus, np.concatenate(pending), threshold))
    out = np.concatenate(edges) if edges else np.zeros((0, 2), np.int64)
    stats.add("semantic_edges", len(out))
    if index.approximate:
        stats.add("semantic_candidates", candidates)
        stats.add("semantic_rejected", candidates - len(out))
    if index.saturated_queries:
        stats.add("semantic_saturated_queries", index.saturated_queries)
    log.info(
        "semantic dedup of %s: %s over %d vectors, %d edges%s",
        corpus.asset,
        factory,
        corpus.n,
        len(out),
        f", {index.index_ranges} list ranges of <= {max_index_gb} GiB" if partitioned else "",
    )
    return out


def _semantic_threshold(corpus: _Corpus, threshold: float | None, on_random_weights: bool) -> float | None:
    if threshold is None or corpus.n == 0:
        return None
    info = corpus.model_info()
    if info.get("random_weights") and not on_random_weights:
        # Random-weight embeddings are not semantic: a threshold on them would collapse distinct items.
        log.warning("%s: embeddings come from random weights (%s); semantic dedup skipped", corpus.asset, info.get("model_id"))
        return None
    return threshold


def _write_decisions(
    corpus: _Corpus, out_asset: str, id_column: str, dropped: np.ndarray, rep_of: np.ndarray, codes: np.ndarray, info: dict
) -> None:
    """Per shard: every row kept (detail: its own id) except ``dropped`` (sorted global rows; detail:
    the id of ``rep_of``, reason ``REASONS[codes]``)."""
    rep_rows = np.unique(rep_of)
    rep_ids = corpus.take(id_column, rep_rows).cast(pa.string())  # the only ids held across shards
    with corpus.storage.writer(out_asset) as w:
        for s, lo, hi in corpus.ranges():
            ids = corpus.column(s, id_column).combine_chunks().cast(pa.string())
            a, b = np.searchsorted(dropped, [lo, hi])
            local = dropped[a:b] - lo
            reasons = np.full(hi - lo, None, dtype=object)
            reasons[local] = REASONS[codes[a:b]]
            source = np.arange(hi - lo, dtype=np.int64)
            source[local] = hi - lo + np.arange(b - a)  # dropped rows take their representative's id
            details = pa.concat_arrays([ids, rep_ids.take(pa.array(np.searchsorted(rep_rows, rep_of[a:b])))]).take(pa.array(source))
            w.write_parquet(layout.decisions_file(s), decision_table(ids, reasons.tolist(), details))
        w.write_json(layout.SUMMARY_FILE, info)


def _finish(
    corpus: _Corpus, out_asset: str, id_column: str, edges: np.ndarray, reps: tuple[np.ndarray, np.ndarray], codes_of, stats, info
) -> None:
    nodes, node_reps = reps
    gone = node_reps != nodes
    dropped, rep_of = nodes[gone], node_reps[gone]
    codes = codes_of(dropped, rep_of)
    stats.add("rows_in", corpus.n)
    stats.add("rows_out", corpus.n - len(dropped))
    stats.add("edges", len(edges))
    for code, count in enumerate(np.bincount(codes, minlength=len(REASONS))):
        if code and count:
            stats.drop(REASONS[code], int(count))
    _write_decisions(corpus, out_asset, id_column, dropped, rep_of, codes, {**info, **stats.as_dict()})


def _concat(edges: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.zeros((0, 2), np.int64), *edges]).astype(np.int64, copy=False)


def dedup_images(
    storage: Storage,
    shards: Sequence[str],
    *,
    exact: bool = True,
    perceptual_max_distance: int | None = 6,
    semantic_threshold: float | None = 0.95,
    semantic_on_random_weights: bool = False,
    index_factory: str = "auto",
    nprobe: int = 16,
    max_index_gb: float | None = None,
) -> StepStats:
    from realsyn.dedup import first_of, group_representatives, hamming_edges, popcount64, release_free_memory

    stats = StepStats(layout.IMAGE_DEDUP)
    with stats.timed():
        corpus = _Corpus(storage, IMAGE_EMBEDDINGS, shards)
        # byte-identical images are named exact duplicates even when only their pHash linked them
        sha_edges = corpus.key_edges("sha256")
        edges = [sha_edges] if exact else []
        if perceptual_max_distance is not None:
            # the pHashes are held for their search only: the reasons read back those of the dropped rows
            edges.append(hamming_edges(corpus.uint_column("phash", np.uint64), perceptual_max_distance, all_pairs=False))
            release_free_memory()
        threshold = _semantic_threshold(corpus, semantic_threshold, semantic_on_random_weights)
        if threshold is not None:
            edges.append(_semantic_edges(corpus, threshold, index_factory, nprobe, stats, max_index_gb))
        all_edges = _concat(edges)
        # the largest image of a duplicate group represents it (ties: the first)
        reps = group_representatives(all_edges, priority=lambda nodes: corpus.take("pixels", nodes).to_numpy(zero_copy_only=False))

        def codes_of(dropped: np.ndarray, rep: np.ndarray) -> np.ndarray:
            codes = np.full(len(dropped), NEAR if threshold is None else SEMANTIC, dtype=np.int8)
            if perceptual_max_distance is not None:  # linked to its representative only through a chain: near/semantic
                rows, inverse = np.unique(np.concatenate([dropped, rep]), return_inverse=True)
                phash = corpus.take("phash", rows).to_numpy(zero_copy_only=False).astype(np.uint64)[inverse]
                codes[popcount64(phash[: len(dropped)] ^ phash[len(dropped) :]) <= perceptual_max_distance] = PERCEPTUAL
            codes[first_of(sha_edges, dropped) == first_of(sha_edges, rep)] = EXACT
            return codes

        info = {"semantic_threshold": threshold, "perceptual_max_distance": perceptual_max_distance, "exact": exact}
        _finish(corpus, layout.IMAGE_DEDUP, "image_id", all_edges, reps, codes_of, stats, info)
    return stats


def dedup_sentences(
    storage: Storage,
    shards: Sequence[str],
    *,
    exact: bool = True,
    normalized: bool = True,
    semantic_threshold: float | None = 0.95,
    semantic_on_random_weights: bool = False,
    index_factory: str = "auto",
    nprobe: int = 16,
    max_index_gb: float | None = None,
) -> StepStats:
    from realsyn.dedup import first_of, group_representatives

    stats = StepStats(layout.SENTENCE_DEDUP)
    with stats.timed():
        corpus = _Corpus(storage, SENTENCE_EMBEDDINGS, shards)
        # the keys name the reason even when their edges are off (exact=False: identical texts
        # linked through their normalised key are still exact duplicates)
        sha_edges, norm_edges = corpus.key_edges("text_sha"), corpus.key_edges("norm_key")
        edges = [e for e, on in ((sha_edges, exact), (norm_edges, normalized)) if on]
        threshold = _semantic_threshold(corpus, semantic_threshold, semantic_on_random_weights)
        if threshold is not None:
            edges.append(_semantic_edges(corpus, threshold, index_factory, nprobe, stats, max_index_gb))
        all_edges = _concat(edges)
        reps = group_representatives(all_edges)  # the first occurrence represents its group

        def codes_of(dropped: np.ndarray, rep: np.ndarray) -> np.ndarray:
            codes = np.full(len(dropped), SEMANTIC, dtype=np.int8)
            codes[first_of(norm_edges, dropped) == first_of(norm_edges, rep)] = PERCEPTUAL
            codes[first_of(sha_edges, dropped) == first_of(sha_edges, rep)] = EXACT
            return codes

        info = {"semantic_threshold": threshold, "exact": exact, "normalized": normalized}
        _finish(corpus, layout.SENTENCE_DEDUP, "sentence_id", all_edges, reps, codes_of, stats, info)
    return stats
