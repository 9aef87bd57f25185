"""Exact vs hierarchical image -> sentence retrieval on synthetic clustered embeddings.

Sentences are noisy copies of random topic directions; each image sits near one topic. K-means is
trained on a reservoir sample streamed over sentence "shards", sentences are laid out cluster by
cluster (the inverted file on storage), then both searches run on the same images and the script
prints their times, the speedup and recall@k against exact search.

    python bench/bench_retrieval.py --sentences 200000 --images 20000 --clusters 1000
"""

from __future__ import annotations

import argparse
import os
import time

# One BLAS/OpenMP thread unless told otherwise: on a small shared machine, threads fighting for
# cores make many small per-cluster products look slower than the work they do.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from realsyn.clustering import ReservoirSample, assign, cluster_order, train_kmeans  # noqa: E402
from realsyn.retrieval import exact_search, hierarchical_search  # noqa: E402
from realsyn.runtime import l2_normalize  # noqa: E402


def synthetic(n_sentences: int, n_images: int, dim: int, n_topics: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    topics = l2_normalize(rng.standard_normal((n_topics, dim)))
    sentences = l2_normalize(topics[rng.integers(0, n_topics, n_sentences)] + noise * rng.standard_normal((n_sentences, dim)))
    images = l2_normalize(topics[rng.integers(0, n_topics, n_images)] + noise * rng.standard_normal((n_images, dim)))
    return sentences, images


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f) & set(t)) for f, t in zip(found.tolist(), truth.tolist()))
    return hits / truth.size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=200_000)
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--topics", type=int, default=0, help="true topics in the data (default: = clusters)")
    ap.add_argument("--noise", type=float, default=0.08, help="per-dimension noise around a topic")
    ap.add_argument("--points-per-centroid", type=int, default=64, help="training sample = clusters x this")
    ap.add_argument("--niter", type=int, default=10)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--probes", default="1,4")
    ap.add_argument("--shard-rows", type=int, default=50_000, help="rows per streamed sentence shard")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    sentences, images = synthetic(args.sentences, args.images, args.dim, args.topics or args.clusters, args.noise, args.seed)
    print(
        f"data: {args.sentences} sentences, {args.images} images, dim {args.dim}, k={args.k}; "
        f"BLAS threads {os.environ['OPENBLAS_NUM_THREADS']}"
    )

    t0 = time.perf_counter()
    sample = ReservoirSample(args.clusters * args.points_per_centroid, args.dim, seed=args.seed)
    for start in range(0, len(sentences), args.shard_rows):
        sample.add(sentences[start : start + args.shard_rows])
    centroids = train_kmeans(sample.array(), args.clusters, niter=args.niter, seed=args.seed)
    t_train = time.perf_counter() - t0

    t0 = time.perf_counter()
    cluster_ids = np.concatenate(
        [assign(sentences[s : s + args.shard_rows], centroids)[0][:, 0] for s in range(0, len(sentences), args.shard_rows)]
    )
    order, offsets = cluster_order(cluster_ids, len(centroids))
    laid_out = sentences[order]
    t_layout = time.perf_counter() - t0
    sizes = np.diff(offsets)
    print(
        f"k-means: {len(centroids)} centroids on {len(sample)} sampled rows in {t_train:.1f}s; "
        f"assign + layout {t_layout:.1f}s; cluster sizes min/median/max {sizes.min()}/{int(np.median(sizes))}/{sizes.max()}"
    )

    def load_cluster(c: int):
        return order[offsets[c] : offsets[c + 1]], laid_out[offsets[c] : offsets[c + 1]]

    # Wall and CPU seconds both: on a shared machine the wall clock also counts other tenants.
    w0, c0 = time.perf_counter(), time.process_time()
    exact_ids, _ = exact_search(images, sentences, args.k)
    wall_exact, cpu_exact = time.perf_counter() - w0, time.process_time() - c0

    head = f"{'method':<20}{'wall s':>9}{'cpu s':>9}{'speedup wall':>14}{'speedup cpu':>13}{'recall@' + str(args.k):>11}"
    print(f"\n{head}\n{'exact':<20}{wall_exact:>9.2f}{cpu_exact:>9.2f}{1.0:>14.1f}{1.0:>13.1f}{1.0:>11.4f}")
    for n_probe in (int(p) for p in args.probes.split(",")):
        w0, c0 = time.perf_counter(), time.process_time()
        ids, _ = hierarchical_search(images, centroids, load_cluster, n_probe=n_probe, k=args.k)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        name = f"hierarchical p={n_probe}"
        recall = recall_at_k(ids, exact_ids)
        print(f"{name:<20}{wall:>9.2f}{cpu:>9.2f}{wall_exact / wall:>14.1f}{cpu_exact / cpu:>13.1f}{recall:>11.4f}")


if __name__ == "__main__":
    main()
