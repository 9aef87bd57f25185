"""Image -> real sentence retrieval: hierarchical (centroids, then inside clusters) and exact.

Scores are inner products accumulated in float64 and rounded to float32, so a score does not
depend on how a matrix product was blocked (cluster size, group size, gemm vs gemv): the two
searches agree bit for bit where they see the same candidates. Ranking is by score descending,
then row id ascending. Missing candidates are padded with id -1 and score -inf.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from realsyn.clustering import assign

# Bytes of one float64 score block; queries are processed in chunks that fit it.
SCORE_BLOCK_BYTES = 64 * 1024 * 1024


def _empty(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, k), -1, dtype=np.int64), np.full((n, k), -np.inf, dtype=np.float32)


def _scores(queries: np.ndarray, keys64_t: np.ndarray, keys_finite: bool) -> np.ndarray:
    """float32 (Q, M) inner products of queries with float64 (D, M) keys; NaN becomes -inf."""
    s = (queries.astype(np.float64) @ keys64_t).astype(np.float32)
    if not keys_finite or not np.isfinite(queries).all():
        s[np.isnan(s)] = -np.inf
    return s


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


def _top_k_block(scores: np.ndarray, key_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k of one (Q, M) score block with ids ``key_ids`` (M,), ties by id."""
    q, m = scores.shape
    if m <= k:
        return _rank(np.broadcast_to(key_ids, (q, m)), scores, k)
    # argpartition finds the k-th best score; rows with ties at that score may hold more than
    # k candidates, and argpartition would pick among them arbitrarily: those rows are ranked
    # over all their tied candidates instead.
    part = np.argpartition(scores, m - k, axis=1)[:, m - k :]
    part_scores = np.take_along_axis(scores, part, axis=1)
    kth = part_scores.min(axis=1)
    n_at_least = np.count_nonzero(scores >= kth[:, None], axis=1)
    out_ids, out_scores = _rank(key_ids[part], part_scores, k)
    for r in np.nonzero(n_at_least > k)[0]:
        cand = np.nonzero(scores[r] >= kth[r])[0]
        ri, rs = _rank(key_ids[cand][None, :], scores[r, cand][None, :], k)
        out_ids[r], out_scores[r] = ri[0], rs[0]
    return out_ids, out_scores


def _top_k(queries: np.ndarray, keys: np.ndarray, key_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k keys per query, the score matrix computed in query chunks of bounded memory."""
    out_ids, out_scores = _empty(len(queries), k)
    if len(keys) == 0 or len(queries) == 0:
        return out_ids, out_scores
    keys64_t = np.ascontiguousarray(keys.T, dtype=np.float64)
    keys_finite = bool(np.isfinite(keys).all())
    chunk = max(1, SCORE_BLOCK_BYTES // (8 * len(keys)))
    for start in range(0, len(queries), chunk):
        block = _scores(queries[start : start + chunk], keys64_t, keys_finite)
        ids, scores = _top_k_block(block, key_ids, k)
        out_ids[start : start + chunk], out_scores[start : start + chunk] = ids, scores
    return out_ids, out_scores


def _check(emb: np.ndarray, dim: int | None, what: str) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or (dim is not None and emb.shape[1] != dim):
        raise ValueError(f"{what} must be (n, {dim if dim is not None else 'D'}), got shape {emb.shape}")
    return emb


def exact_search(image_emb: np.ndarray, sentence_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: every image against every sentence; row ids are sentence row numbers."""
    image_emb = _check(image_emb, None, "image_emb")
    sentence_emb = _check(sentence_emb, image_emb.shape[1], "sentence_emb")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    return _top_k(image_emb, sentence_emb, np.arange(len(sentence_emb), dtype=np.int64), k)


def hierarchical_search(
    image_emb: np.ndarray,
    centroids: np.ndarray,
    load_cluster: Callable[[int], tuple[np.ndarray, np.ndarray]],
    n_probe: int = 1,
    k: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Top k sentences per image, searching only the image's ``n_probe`` nearest clusters.

    ``load_cluster(c)`` returns (row_ids int64 (M,), sentence embeddings (M, D)) of cluster c; it is
    called once per touched cluster. Images are grouped by probed cluster so each cluster costs one
    matrix product against the images that probe it. Returns (row_ids (N, k) int64, scores (N, k) float32).
    Images with non-finite embeddings get padding only.
    """
    image_emb = _check(image_emb, None, "image_emb")
    centroids = _check(centroids, image_emb.shape[1], "centroids")
    if k <= 0 or n_probe <= 0:
        raise ValueError(f"k and n_probe must be positive, got k={k}, n_probe={n_probe}")
    n = len(image_emb)
    valid = np.nonzero(np.isfinite(image_emb).all(axis=1))[0]
    if len(valid) == 0 or len(centroids) == 0:
        return _empty(n, k)

    # Inter-cluster retrieval: the probed clusters of each (valid) image.
    probe_ids, _ = assign(image_emb[valid], centroids, n_probe)
    p = probe_ids.shape[1]
    # Candidate table: probe slot j of image i owns columns [j*k, (j+1)*k).
    cand_ids = np.full((len(valid), p * k), -1, dtype=np.int64)
    cand_scores = np.full((len(valid), p * k), -np.inf, dtype=np.float32)

    # Intra-cluster retrieval: group (image, slot) pairs by cluster, one product per cluster.
    flat_cluster = probe_ids.ravel()
    pair_order = np.argsort(flat_cluster, kind="stable")
    clusters, starts = np.unique(flat_cluster[pair_order], return_index=True)
    ends = np.append(starts[1:], len(pair_order))
    for cluster, start, end in zip(clusters.tolist(), starts.tolist(), ends.tolist()):
        if cluster < 0:
            continue
        row_ids, emb = load_cluster(int(cluster))
        row_ids = np.asarray(row_ids, dtype=np.int64)
        emb = _check(emb, image_emb.shape[1], f"embeddings of cluster {cluster}")
        if len(row_ids) != len(emb):
            raise ValueError(f"cluster {cluster}: {len(row_ids)} row ids for {len(emb)} embeddings")
        if len(row_ids) == 0:
            continue
        pairs = pair_order[start:end]
        images, slots = np.divmod(pairs, p)
        ids, scores = _top_k(image_emb[valid[images]], emb, row_ids, k)
        cols = slots[:, None] * k + np.arange(k)
        cand_ids[images[:, None], cols] = ids
        cand_scores[images[:, None], cols] = scores

    out_ids, out_scores = _empty(n, k)
    out_ids[valid], out_scores[valid] = _rank(cand_ids, cand_scores, k)
    return out_ids, out_scores
