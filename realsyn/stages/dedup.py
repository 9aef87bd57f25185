"""Stage 4 and 5e: global dedup of images and sentences (exact, perceptual, semantic) with Union-Find.

The index is global; queries run shard by shard; components are found over the edge list only.
Output: per shard ``decisions/{shard}.parquet`` (``realsyn.decisions``; detail: the representative's
id) in one global generation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa

from realsyn import layout
from realsyn.decisions import decision_table
from realsyn.stages.common import require_partitions
from realsyn.stats import StepStats
from realsyn.storage import Storage

log = logging.getLogger("realsyn")

IMAGE_EMBEDDINGS, SENTENCE_EMBEDDINGS = layout.IMAGE_EMBEDDINGS, layout.SENTENCE_EMBEDDINGS


def _model_info(storage: Storage, asset: str, shard: str) -> dict:
    return storage.reader(asset, shard).read_json(layout.MODEL_FILE)


def _semantic_edges(
    storage: Storage, asset: str, shards: Sequence[str], threshold: float, index_factory: str, stats: StepStats
) -> np.ndarray:
    from realsyn.dedup import SemanticIndex

    dim = int(_model_info(storage, asset, shards[0])["dim"])
    index = SemanticIndex(dim, threshold, index_factory=index_factory)
    if index_factory != "Flat":
        from realsyn.clustering import ReservoirSample

        sample = ReservoirSample(capacity=100_000, dim=dim, seed=0)
        for s in shards:
            sample.add(np.asarray(storage.reader(asset, s).read_numpy(layout.EMBEDDINGS_FILE)))
        index.train(sample.array())
    for s in shards:
        index.add(np.asarray(storage.reader(asset, s).read_numpy(layout.EMBEDDINGS_FILE), dtype=np.float32))
    edges, offset = [], 0
    for s in shards:
        q = np.asarray(storage.reader(asset, s).read_numpy(layout.EMBEDDINGS_FILE), dtype=np.float32)
        edges.append(index.edges(q, offset))
        offset += len(q)
    out = np.concatenate(edges) if edges else np.zeros((0, 2), np.int64)
    stats.add("semantic_edges", len(out))
    return out


def _write_decisions(
    storage: Storage,
    asset: str,
    shards: Sequence[str],
    sizes: list[int],
    ids: list[str],
    reps: np.ndarray,
    reasons: list[str | None],
    info: dict,
) -> None:
    with storage.writer(asset) as w:
        offset = 0
        for s, n in zip(shards, sizes):
            sl = slice(offset, offset + n)
            r = reps[sl]
            w.write_parquet(layout.decisions_file(s), decision_table(ids[sl], reasons[sl], [ids[j] for j in r]))
            offset += n
        w.write_json(layout.SUMMARY_FILE, info)


def _semantic_threshold(
    storage: Storage, asset: str, shards: Sequence[str], threshold: float | None, on_random_weights: bool
) -> float | None:
    if threshold is None:
        return None
    info = _model_info(storage, asset, shards[0])
    if info.get("random_weights") and not on_random_weights:
        # Random-weight embeddings are not semantic: a threshold on them would collapse distinct items.
        log.warning("%s: embeddings come from random weights (%s); semantic dedup skipped", asset, info.get("model_id"))
        return None
    return threshold


def _read_index(storage: Storage, asset: str, shards: Sequence[str]) -> tuple[list[str], list[pa.Table], list[int]]:
    shards = require_partitions(storage, asset, shards)
    tables = [storage.reader(asset, s).read_parquet(layout.EMBEDDING_INDEX_FILE) for s in shards]
    return shards, tables, [t.num_rows for t in tables]


def _column(tables: list[pa.Table], name: str) -> list:
    return [x for t in tables for x in t.column(name).to_pylist()]


def _decide(
    storage: Storage,
    asset: str,
    shards: Sequence[str],
    sizes: list[int],
    ids: list[str],
    edges: list[np.ndarray],
    priority: np.ndarray | None,
    reason_of: Callable[[int, int], str],
    stats: StepStats,
    info: dict,
) -> None:
    """Union-Find over all edges, one representative per component, a reason for every other member."""
    from realsyn.dedup import representatives

    n = len(ids)
    all_edges = np.concatenate([np.zeros((0, 2), np.int64), *edges]).astype(np.int64)
    reps = representatives(n, all_edges, priority=priority)
    reasons = [None if int(reps[i]) == i else reason_of(i, int(reps[i])) for i in range(n)]
    stats.add("rows_in", n)
    stats.add("rows_out", int((reps == np.arange(n)).sum()))
    stats.add("edges", len(all_edges))
    stats.drop_reasons(reasons)
    _write_decisions(storage, asset, shards, sizes, ids, reps, reasons, {**info, **stats.as_dict()})


def dedup_images(
    storage: Storage,
    shards: Sequence[str],
    *,
    exact: bool = True,
    perceptual_max_distance: int | None = 6,
    semantic_threshold: float | None = 0.95,
    semantic_on_random_weights: bool = False,
    index_factory: str = "Flat",
) -> StepStats:
    from realsyn.dedup import exact_duplicate_edges, hamming_edges

    stats = StepStats(layout.IMAGE_DEDUP)
    with stats.timed():
        shards, tables, sizes = _read_index(storage, IMAGE_EMBEDDINGS, shards)
        ids, sha = _column(tables, "image_id"), _column(tables, "sha256")
        phash = np.array(_column(tables, "phash"), dtype=np.uint64)
        pixels = np.array(_column(tables, "pixels"), dtype=np.int64)
        edges = []
        if exact:
            edges.append(exact_duplicate_edges(sha))
        if perceptual_max_distance is not None and ids:
            edges.append(hamming_edges(phash, perceptual_max_distance))
        threshold = _semantic_threshold(storage, IMAGE_EMBEDDINGS, shards, semantic_threshold, semantic_on_random_weights)
        if threshold is not None and ids:
            edges.append(_semantic_edges(storage, IMAGE_EMBEDDINGS, shards, threshold, index_factory, stats))

        def reason_of(i: int, rep: int) -> str:
            if sha[i] == sha[rep]:
                return "exact_duplicate"
            if perceptual_max_distance is not None and bin(int(phash[i]) ^ int(phash[rep])).count("1") <= perceptual_max_distance:
                return "perceptual_duplicate"
            # linked to its representative only through a chain of other duplicates
            return "near_duplicate" if threshold is None else "semantic_duplicate"

        # the largest image of a duplicate group represents it
        info = {"semantic_threshold": threshold, "perceptual_max_distance": perceptual_max_distance, "exact": exact}
        _decide(storage, layout.IMAGE_DEDUP, shards, sizes, ids, edges, pixels, reason_of, stats, info)
    return stats


def dedup_sentences(
    storage: Storage,
    shards: Sequence[str],
    *,
    exact: bool = True,
    normalized: bool = True,
    semantic_threshold: float | None = 0.95,
    semantic_on_random_weights: bool = False,
    index_factory: str = "Flat",
) -> StepStats:
    from realsyn.dedup import exact_duplicate_edges

    stats = StepStats(layout.SENTENCE_DEDUP)
    with stats.timed():
        shards, tables, sizes = _read_index(storage, SENTENCE_EMBEDDINGS, shards)
        ids, sha, norm = _column(tables, "sentence_id"), _column(tables, "text_sha"), _column(tables, "norm_key")
        edges = []
        if exact:
            edges.append(exact_duplicate_edges(sha))
        if normalized:
            edges.append(exact_duplicate_edges(norm))
        threshold = _semantic_threshold(storage, SENTENCE_EMBEDDINGS, shards, semantic_threshold, semantic_on_random_weights)
        if threshold is not None and ids:
            edges.append(_semantic_edges(storage, SENTENCE_EMBEDDINGS, shards, threshold, index_factory, stats))

        def reason_of(i: int, rep: int) -> str:
            return "exact_duplicate" if sha[i] == sha[rep] else "perceptual_duplicate" if norm[i] == norm[rep] else "semantic_duplicate"

        # the first occurrence represents its group
        info = {"semantic_threshold": threshold, "exact": exact, "normalized": normalized}
        _decide(storage, layout.SENTENCE_DEDUP, shards, sizes, ids, edges, None, reason_of, stats, info)
    return stats
