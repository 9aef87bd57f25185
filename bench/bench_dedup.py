"""Benchmark semantic dedup: SemanticIndex (Flat, IVF-Flat, IVF-SQ8, IVF-PQ) vs numpy brute force,
plus Union-Find on a large edge list. Everything is measured in one run, side by side.

    python bench/bench_dedup.py --n 200000 --dim 64
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from realsyn.dedup import SemanticIndex, UnionFind
from realsyn.runtime import l2_normalize


def planted_vectors(n: int, dim: int, dup_fraction: float, noise: float, seed: int) -> np.ndarray:
    """Random unit vectors; a fraction of rows are noisy copies of earlier rows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    n_dup = int(n * dup_fraction)
    copies = rng.choice(n, size=n_dup, replace=False)
    sources = rng.integers(0, n, size=n_dup)
    x[copies] = x[sources] + rng.normal(scale=noise, size=(n_dup, dim)).astype(np.float32)
    return l2_normalize(x)


def brute_force_edges(x: np.ndarray, threshold: float, block: int) -> np.ndarray:
    """All pairs i < j with x_i . x_j >= threshold, one (block x N) matrix product at a time."""
    out = []
    for start in range(0, len(x), block):
        sims = x[start : start + block] @ x[start:].T  # only j >= start can satisfy i < j
        i, j = np.nonzero(sims >= threshold)
        i, j = i + start, j + start
        keep = i < j
        out.append(np.stack([i[keep], j[keep]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


def index_edges(x: np.ndarray, threshold: float, factory: str, nprobe: int, block: int, train_size: int, seed: int):
    index = SemanticIndex(x.shape[1], threshold, index_factory=factory, use_gpu="never", nprobe=nprobe)
    t0 = time.perf_counter()
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        index.train(x[rng.choice(len(x), size=min(train_size, len(x)), replace=False)])
    t_train = time.perf_counter() - t0
    index.add(x)
    edges = np.concatenate([index.edges(x[s : s + block], s) for s in range(0, len(x), block)])
    return edges, t_train, time.perf_counter() - t0


def as_set(edges: np.ndarray) -> set[tuple[int, int]]:
    return set(map(tuple, edges.tolist()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--dup-fraction", type=float, default=0.05)
    ap.add_argument("--noise", type=float, default=0.04, help="per-coordinate noise of planted copies")
    ap.add_argument("--nlist", type=int, default=0, help="IVF lists (0: 2*sqrt(n))")
    ap.add_argument("--nprobe", type=int, default=8)
    ap.add_argument("--train-per-list", type=int, default=40, help="IVF training sample = this x nlist")
    ap.add_argument("--pq", type=int, default=8, help="PQ sub-quantisers of the IVF-PQ variant (0: skip)")
    ap.add_argument("--block", type=int, default=8192, help="query rows per search call (a 'shard')")
    ap.add_argument("--uf-edges", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    x = planted_vectors(args.n, args.dim, args.dup_fraction, args.noise, args.seed)
    nlist = args.nlist or int(2 * np.sqrt(args.n))
    print(
        f"n={args.n} dim={args.dim} threshold={args.threshold} planted={int(args.n * args.dup_fraction)} nlist={nlist} nprobe={args.nprobe}"
    )

    t0 = time.perf_counter()
    truth = brute_force_edges(x, args.threshold, args.block)
    t_brute = time.perf_counter() - t0
    truth_set = as_set(truth)
    print(f"{'method':<22}{'seconds':>9}{'vs brute':>10}{'edges':>9}{'recall':>9}{'precision':>11}")
    print(f"{'numpy brute force':<22}{t_brute:9.2f}{1.0:9.2f}x{len(truth):9d}{1.0:9.4f}{1.0:11.4f}")

    variants = [("Flat", "Flat"), (f"IVF{nlist},Flat", "IVF-Flat"), (f"IVF{nlist},SQ8", "IVF-SQ8")]
    if args.pq:
        # "np": no polysemous training, which only serves Hamming pre-filtering and costs minutes.
        variants.append((f"IVF{nlist},PQ{args.pq}np", "IVF-PQ"))
    for factory, label in variants:
        train_size = min(len(x), args.train_per_list * nlist)
        edges, t_train, t_total = index_edges(x, args.threshold, factory, args.nprobe, args.block, train_size, args.seed)
        got = as_set(edges)
        tp = len(got & truth_set)
        recall = tp / max(len(truth_set), 1)
        precision = tp / max(len(got), 1)
        name = f"{label} (train {t_train:.1f}s)" if t_train > 0.01 else label
        print(f"{name:<22}{t_total:9.2f}{t_brute / t_total:9.2f}x{len(edges):9d}{recall:9.4f}{precision:11.4f}")

    rng = np.random.default_rng(args.seed)
    n_nodes = 2 * args.uf_edges
    edges = rng.integers(0, n_nodes, size=(args.uf_edges, 2))
    t0 = time.perf_counter()
    uf = UnionFind(n_nodes)
    uf.union_edges(edges)
    labels = uf.labels()
    t_uf = time.perf_counter() - t0
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    t0 = time.perf_counter()
    n_comp, _ = connected_components(
        coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(n_nodes, n_nodes)),
        directed=False,
    )
    t_scipy = time.perf_counter() - t0
    assert len(np.unique(labels)) == n_comp, "union-find disagrees with scipy"
    print(
        f"union-find: {args.uf_edges} edges over {n_nodes} nodes -> {n_comp} components in {t_uf:.2f}s "
        f"(scipy connected_components reference: {t_scipy:.2f}s)"
    )


if __name__ == "__main__":
    main()
