"""Retrieval: exact (faiss IndexFlatIP) vs faiss IndexIVFFlat vs our cluster-ordered global pass.

Synthetic clustered embeddings: sentences are noisy copies of random topic directions, each image
sits near one topic. K-means is trained on a reservoir sample streamed over sentence "shards", the
sentences are laid out cluster by cluster into bank parts (as the sentence_clusters asset does), and
then, in one run:

- exact: faiss IndexFlatIP over the bank (on ``--exact-images`` images when that is fewer than all);
- IVF: faiss IndexIVFFlat whose quantizer holds the SAME centroids and whose inverted lists are the
  SAME bank clusters (added with their precomputed assignment), ``nprobe`` as ours, faiss.omp threads T;
- ours: ``realsyn.retrieval.cluster_ordered_search``, the function the retrievals asset calls, images
  streamed in shard-sized batches, bank parts loaded through a callback, T threads.

Printed: recall@k of IVF and ours against exact, distances per image (ours counts the centroid
scan too), throughputs, vs_ivf (our images/s over IVF's), gflops of our per-cluster products over our
whole search time, and peak_pct against this machine's float32 sgemm peak (a large np.dot at T
threads, measured in the same run); gflops_search and search_peak_pct divide the same flops by the
search phase alone (products and top-k, without the centroid assignment, which runs in faiss's own
BLAS for both IVF and ours); gflops_all and all_peak_pct count all the distances we compute (the
products and the exact centroid scan, the work fewer_distances counts) over the whole pass. Times are the best of ``--repeat`` runs; the load average is printed
because the machine is shared.

~100 images per probed cluster (the global pass at paper scale: 198M images x n_probe / 2M clusters),
then ~1 (a small run), at 1 and 2 threads:

    python bench/bench_retrieval.py --sentences 200000 --images 50000 --dim 512 --clusters 500 --nprobe 1 --threads 1 --exact-images 2000
    python bench/bench_retrieval.py --sentences 200000 --images 300 --dim 512 --clusters 500 --nprobe 1 --threads 1 --repeat 10
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from realsyn.bank_encoding import BANK_DTYPES, encode_bank
from realsyn.clustering import CentroidIndex, ReservoirSample, cluster_order, train_kmeans
from realsyn.retrieval import BankLayout, cluster_ordered_search
from realsyn.runtime import l2_normalize


def synthetic(n_sentences: int, n_images: int, dim: int, n_topics: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    topics = l2_normalize(rng.standard_normal((n_topics, dim)))
    sentences = l2_normalize(topics[rng.integers(0, n_topics, n_sentences)] + noise * rng.standard_normal((n_sentences, dim)))
    images = l2_normalize(topics[rng.integers(0, n_topics, n_images)] + noise * rng.standard_normal((n_images, dim)))
    return sentences, images


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f) & set(t)) for f, t in zip(found.tolist(), truth.tolist()))
    return hits / truth.size


def best_time(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def sgemm_peak(threads: int, n: int = 2048, repeat: int = 3) -> float:
    """GFLOP/s of a large float32 np.dot at ``threads`` BLAS threads."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    with threadpool_limits(limits=threads, user_api="blas"):
        np.dot(a, b)  # warm up
        t, _ = best_time(lambda: np.dot(a, b), repeat)
    return 2 * n**3 / t / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=200_000)
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=500)
    ap.add_argument("--nprobe", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--topics", type=int, default=0, help="true topics in the data (default: = clusters)")
    ap.add_argument("--noise", type=float, default=0.08, help="per-dimension noise around a topic")
    ap.add_argument("--points-per-centroid", type=int, default=64, help="training sample = clusters x this")
    ap.add_argument("--niter", type=int, default=10)
    ap.add_argument("--bank-parts", type=int, default=4, help="bank parts, cut by cluster range as sentence_clusters does")
    ap.add_argument("--shard-rows", type=int, default=50_000, help="rows per streamed shard (sentences and images)")
    ap.add_argument("--exact-images", type=int, default=5_000, help="images searched exactly for recall (a random subset)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of IVF and ours; the best counts")
    ap.add_argument(
        "--bank-dtype",
        choices=BANK_DTYPES,
        default="float32",
        help="how our bank parts are stored (sentence_clusters' bank_dtype); exact and IVF keep float32",
    )
    args = ap.parse_args()

    import faiss
    from threadpoolctl import threadpool_limits

    load_before = os.getloadavg()
    sentences, images = synthetic(args.sentences, args.images, args.dim, args.topics or args.clusters, args.noise, args.seed)
    k, t = args.k, args.threads
    faiss.omp_set_num_threads(t)

    # k-means on a streamed sample, then the bank laid out cluster by cluster in parts
    sample = ReservoirSample(args.clusters * args.points_per_centroid, args.dim, seed=args.seed)
    for s in range(0, len(sentences), args.shard_rows):
        sample.add(sentences[s : s + args.shard_rows])
    centroids = train_kmeans(sample.array(), args.clusters, niter=args.niter, seed=args.seed)
    n_clusters = len(centroids)
    index = CentroidIndex(centroids)
    assigned = np.concatenate(
        [index.search(sentences[s : s + args.shard_rows], 1)[0][:, 0] for s in range(0, len(sentences), args.shard_rows)]
    )
    order, offsets = cluster_order(assigned, n_clusters)
    bank = np.ascontiguousarray(sentences[order])  # global bank row r = sentence order[r]
    del sentences
    bounds = np.linspace(0, n_clusters, max(1, min(args.bank_parts, n_clusters)) + 1).astype(np.int64)
    part_of = np.searchsorted(bounds, np.arange(n_clusters), side="right") - 1
    layout = BankLayout(part_of, offsets[:-1] - offsets[bounds[part_of]], offsets[1:] - offsets[bounds[part_of]])
    parts = [encode_bank(bank[offsets[bounds[p]] : offsets[bounds[p + 1]]], args.bank_dtype) for p in range(len(bounds) - 1)]
    sizes = np.diff(offsets)

    # exact, on a subset of images when there are many
    rng = np.random.default_rng(args.seed + 1)
    sub = np.sort(rng.choice(args.images, args.exact_images, replace=False)) if args.exact_images < args.images else np.arange(args.images)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(bank)
    t_exact, (_, exact_ids) = best_time(lambda: flat.search(images[sub], k), 1)

    # faiss IVF with the same centroids and lists
    quantizer = faiss.IndexFlatIP(args.dim)
    quantizer.add(centroids)
    ivf = faiss.IndexIVFFlat(quantizer, args.dim, n_clusters, faiss.METRIC_INNER_PRODUCT)
    ivf.is_trained = True
    list_of_row = np.repeat(np.arange(n_clusters, dtype=np.int64), sizes)
    row_ids = np.arange(len(bank), dtype=np.int64)
    ivf.add_core(len(bank), faiss.swig_ptr(bank), faiss.swig_ptr(row_ids), faiss.swig_ptr(list_of_row))
    ivf.nprobe = args.nprobe
    t_ivf, (_, ivf_ids) = best_time(lambda: ivf.search(images, k), args.repeat)

    # a reference only: faiss IVF over the same lists with float16 codes (what our float16 bank stores)
    ivf_sq = faiss.IndexIVFScalarQuantizer(
        quantizer, args.dim, n_clusters, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT, False
    )
    ivf_sq.is_trained = True
    ivf_sq.add_core(len(bank), faiss.swig_ptr(bank), faiss.swig_ptr(row_ids), faiss.swig_ptr(list_of_row))
    ivf_sq.nprobe = args.nprobe
    t_ivf_sq, (_, ivf_sq_ids) = best_time(lambda: ivf_sq.search(images, k), args.repeat)

    # ours: the function the retrievals asset calls, images streamed in shard-sized batches
    def image_batches():
        for s in range(0, len(images), args.shard_rows):
            yield images[s : s + args.shard_rows]

    def run_ours():
        return cluster_ordered_search(image_batches, index, layout, parts.__getitem__, n_probe=args.nprobe, k=k, threads=t)

    t_ours, res = best_time(run_ours, args.repeat)
    peak = sgemm_peak(t)
    with threadpool_limits(limits=t):
        probes = index.search(images, args.nprobe)[0]
    load_after = os.getloadavg()

    recall_ours = recall_at_k(res.row_ids[sub], exact_ids)
    recall_ivf = recall_at_k(ivf_ids[sub], exact_ids)
    probed = np.unique(probes)
    imgs_per_probed = probes.size / len(probed)
    bank_dist = res.stats["distances"] / args.images
    our_dist = bank_dist + n_clusters  # the centroid scan counts too
    fewer = len(bank) / our_dist
    gflops = res.stats["flops"] / t_ours / 1e9
    # the work we do in all: the per-cluster products and the exact centroid scan (both sgemm), i.e.
    # the same distances fewer_distances counts
    assign_flops = 2 * res.stats["images_probing"] * n_clusters * args.dim if index.exact else 0
    gflops_all = (res.stats["flops"] + assign_flops) / t_ours / 1e9
    gflops_search = res.stats["flops"] / res.seconds["search"] / 1e9
    peak_pct = 100 * gflops / peak
    vs_ivf = t_ivf / t_ours
    vs_exact = (t_exact / len(sub)) / (t_ours / args.images)

    print(
        f"data: {len(bank)} sentences, {args.images} images, dim {args.dim}, {n_clusters} clusters "
        f"(sizes min/median/max {sizes.min()}/{int(np.median(sizes))}/{sizes.max()}), {len(parts)} bank parts, "
        f"nprobe {args.nprobe}, k {k}, threads {t}; {imgs_per_probed:.2f} images per probed cluster ({len(probed)} probed)"
    )
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (2-core machine shared with other agents)")
    print(f"exact on {len(sub)} images, recall measured on those; sgemm peak at {t} threads {peak:.1f} GFLOP/s\n")
    print(f"{'method':<12}{'s':>9}{'images/s':>12}{'distances/img':>15}{'recall@' + str(k):>10}")
    print(f"{'exact':<12}{t_exact:>9.3f}{len(sub) / t_exact:>12.0f}{len(bank):>15.0f}{1.0:>10.4f}")
    print(f"{'faiss IVF':<12}{t_ivf:>9.3f}{args.images / t_ivf:>12.0f}{bank_dist + n_clusters:>15.0f}{recall_ivf:>10.4f}")
    print(
        f"{'IVF fp16':<12}{t_ivf_sq:>9.3f}{args.images / t_ivf_sq:>12.0f}{bank_dist + n_clusters:>15.0f}{recall_at_k(ivf_sq_ids[sub], exact_ids):>10.4f}"
    )
    print(f"{'ours':<12}{t_ours:>9.3f}{args.images / t_ours:>12.0f}{our_dist:>15.0f}{recall_ours:>10.4f}")
    print("ours, seconds by phase: " + ", ".join(f"{name} {v:.3f}" for name, v in res.seconds.items()))
    print(
        f"\nours vs IVF {vs_ivf:.2f}x, vs exact {vs_exact:.1f}x; {gflops:.1f} GFLOP/s in the per-cluster products = {peak_pct:.0f}% of peak"
    )
    print(
        f"RESULT recall3={recall_ours:.4f} recall3_ivf={recall_ivf:.4f} fewer_distances={fewer:.1f} "
        f"fewer_bank_distances={len(bank) / bank_dist:.1f} vs_ivf={vs_ivf:.2f} gflops={gflops:.1f} peak_pct={peak_pct:.1f} "
        f"gflops_search={gflops_search:.1f} search_peak_pct={100 * gflops_search / peak:.1f} "
        f"gflops_all={gflops_all:.1f} all_peak_pct={100 * gflops_all / peak:.1f} assign_s={res.seconds['assign']:.4f} "
        f"peak_gflops={peak:.1f} imgs_per_probed={imgs_per_probed:.2f} threads={t} ours_s={t_ours:.4f} ivf_s={t_ivf:.4f} "
        f"vs_exact={vs_exact:.1f} bank_dtype={args.bank_dtype} vs_ivf_fp16={t_ivf_sq / t_ours:.2f} load={load_before[0]:.2f}/{load_after[0]:.2f}"
    )


if __name__ == "__main__":
    main()
