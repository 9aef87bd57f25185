"""Peak memory of sentence K-means + the cluster-ordered bank at two corpus sizes: bounded by the sample budget, not N.

Synthetic sentence shards (unit vectors around random topics) stream through the functions the
``sentence_clusters`` stage runs: ``train_on_sample`` (preallocated reservoir, in-place
normalisation, flat or two-level faiss K-means), one ``CentroidIndex``, and ``SentenceBankBuilder``
(per-shard assignment + sorted spill runs, then the merge into bank parts) writing through a local
``Storage``. Each size runs in its own subprocess, so its peak RSS (``getrusage``) is its own; the
parent prints both side by side, then one RESULT line.

    python bench/bench_kmeans.py --rows 500000,2000000 --dim 128
    python bench/bench_kmeans.py --assignment 2333,9332   # CentroidIndex regimes (tree, cells, hnsw) vs the exact scan
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _shard(i: int, rows: int, dim: int, topics: np.ndarray, seed: int):
    import pyarrow as pa

    from realsyn.clustering import normalize_rows_inplace

    # float32 throughout and normalised in place: the generator should not dominate the peak it measures
    rng = np.random.default_rng(seed + 1 + i)
    emb = rng.standard_normal((rows, dim), dtype=np.float32)
    emb *= 0.15
    emb += topics[rng.integers(0, len(topics), rows)]
    normalize_rows_inplace(emb)
    ids = pa.array([f"{i}-{j}" for j in range(rows)], pa.string())
    return emb, pa.table({"sentence_id": ids, "text": ids})


def child(args) -> dict:
    import faiss

    from realsyn import layout
    from realsyn.clustering import CentroidIndex
    from realsyn.runtime import l2_normalize
    from realsyn.stages.cluster import SentenceBankBuilder, train_on_sample
    from realsyn.storage import Storage

    k = args.clusters or max(1, round(args.rows / 420))
    sizes = [args.shard_rows] * (args.rows // args.shard_rows) + ([args.rows % args.shard_rows] if args.rows % args.shard_rows else [])
    topics = l2_normalize(np.random.default_rng(args.seed).standard_normal((k, args.dim)).astype(np.float32))
    out: dict = {
        "rows": args.rows,
        "clusters": k,
        "shards": len(sizes),
        "threads": faiss.omp_get_max_threads(),
        "rss_mb": {},
        "seconds": {},
    }
    out["rss_mb"]["start"] = _rss_mb()

    def batches():
        for i, n in enumerate(sizes):
            yield _shard(i, n, args.dim, topics, args.seed)[0]
        # runs when train_on_sample has drawn the last shard: the sample is full, training not begun
        out["rss_mb"]["sample"] = _rss_mb()
        out["seconds"]["sample"] = time.perf_counter() - t

    t = time.perf_counter()
    centroids, tree, facts = train_on_sample(
        batches(),
        args.rows,
        k,
        args.dim,
        sample_rows=args.sample_rows,
        max_points_per_centroid=args.max_points_per_centroid,
        two_level_above=args.two_level_above,
        niter=args.niter,
        seed=args.seed,
    )
    out["seconds"]["train"] = time.perf_counter() - t - out["seconds"]["sample"]
    out["rss_mb"]["train"] = _rss_mb()
    out.update(facts)

    root = tempfile.mkdtemp(prefix="bench_kmeans_", dir=args.tmp)
    try:
        storage = Storage(root)
        index = CentroidIndex(centroids, tree=tree)
        with storage.writer(layout.SENTENCE_CLUSTERS) as w:
            w.write_numpy(layout.CENTROIDS_FILE, centroids)
            bank = SentenceBankBuilder(w, index, args.bank_part_rows)
            t = time.perf_counter()
            for i, n in enumerate(sizes):
                bank.add_shard(f"shard-{i:05d}", *_shard(i, n, args.dim, topics, args.seed))
            out["seconds"]["assign_and_spill"] = time.perf_counter() - t
            out["rss_mb"]["assign_and_spill"] = _rss_mb()
            t = time.perf_counter()
            out["bank_parts"] = bank.finish()
            out["seconds"]["merge"] = time.perf_counter() - t
            out["rss_mb"]["merge"] = _rss_mb()
        bank_layout = storage.reader(layout.SENTENCE_CLUSTERS).read_parquet(layout.CLUSTER_LAYOUT_FILE)
        out["bank_rows"] = int((bank_layout.column("end").to_numpy() - bank_layout.column("start").to_numpy()).sum())
        out["largest_cluster"] = int(bank.sizes.max())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out["peak_rss_mb"] = _rss_mb()
    return out


def _corpus(n: int, dim: int, rng, structure: str) -> np.ndarray:
    """Unit vectors. "uniform": bench_scale's corpus (20,000 random topics, noise 0.6 per dim: cosine
    ~0.15 to its topic, nearly uniform on the sphere); "nested": 200 themes x 100 topics each, so
    there is structure at the scale of the clusters (as in real embeddings)."""
    from realsyn.runtime import l2_normalize

    if structure == "uniform":
        topics = l2_normalize(np.random.default_rng(1).standard_normal((20_000, dim)).astype(np.float32))
        return l2_normalize(topics[rng.integers(0, len(topics), n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32))
    trng = np.random.default_rng(1)
    themes = l2_normalize(trng.standard_normal((200, dim)).astype(np.float32))
    topics = l2_normalize(np.repeat(themes, 100, axis=0) + 0.08 * trng.standard_normal((20_000, dim)).astype(np.float32))
    return l2_normalize(topics[rng.integers(0, len(topics), n)] + 0.05 * rng.standard_normal((n, dim)).astype(np.float32))


def bench_assignment(
    ks: list[int], dim: int, queries: int, seed: int, train_per_centroid: int, probes: list[int], structures: list[str]
) -> None:
    """Centroid assignment (n=1) by each CentroidIndex regime against the exact scan: time per query and agreement.

    The centroids are trained as the stages train them above 1,024 (``train_centroid_tree``, ``train_per_centroid``
    sample rows per centroid); ``tree`` descends that training's own tree, ``cells`` builds cells after the fact.
    """
    regimes = [("tree", {"probe_cells": p}, f"tree probe={p}") for p in probes]
    regimes += [("cells", {"exact_up_to": 0, "probe_cells": p}, f"cells probe={p}") for p in (4, 8)]
    regimes += [("hnsw", {"exact_up_to": 0, "cells_up_to": 0, "ef_search": ef}, f"hnsw ef={ef}") for ef in (64,)]
    for structure in structures:
        for k in ks:
            _assignment_at(k, structure, dim, queries, seed, train_per_centroid, regimes)


def _assignment_at(k: int, structure: str, dim: int, queries: int, seed: int, train_per_centroid: int, regimes) -> None:
    from threadpoolctl import threadpool_limits

    from realsyn.clustering import CentroidIndex, train_centroid_tree

    with threadpool_limits(limits=1):  # per-core figures, as bench_scale's steps run
        rng = np.random.default_rng(seed)
        centroids, tree = train_centroid_tree(_corpus(train_per_centroid * k, dim, rng, structure), k, niter=10, seed=seed, use_gpu="never")
        q = _corpus(queries, dim, rng, structure)
        t0, c0 = time.perf_counter(), time.process_time()
        want, want_scores = CentroidIndex(centroids, use_gpu="never").search(q, 1)
        exact_us, exact_cpu = (1e6 * (time.perf_counter() - t0) / queries, 1e6 * (time.process_time() - c0) / queries)
        print(
            f"RESULT assign data={structure} k={k} coarse={len(tree.coarse)} regime=exact us_per_query={exact_us:.1f} "
            f"cpu_us_per_query={exact_cpu:.1f} agreement=1.0000 mean_cosine_lost=0.00000",
            flush=True,
        )
        for mode, params, label in regimes:
            index = CentroidIndex(centroids, use_gpu="never", tree=tree if mode == "tree" else None, **params)
            assert index.mode == mode
            t0, c0 = time.perf_counter(), time.process_time()
            got, got_scores = index.search(q, 1)
            us, cpu = 1e6 * (time.perf_counter() - t0) / queries, 1e6 * (time.process_time() - c0) / queries
            print(
                f"RESULT assign data={structure} k={k} coarse={len(tree.coarse)} regime={label.replace(' ', '_')} us_per_query={us:.1f} "
                f"cpu_us_per_query={cpu:.1f} agreement={np.mean(got[:, 0] == want[:, 0]):.4f} "
                f"mean_cosine_lost={np.mean(want_scores[:, 0] - got_scores[:, 0]):.5f}",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--assignment",
        default="",
        help="instead: centroid assignment regimes vs the exact scan at these K, comma-separated (e.g. 2380,9524 = 1M and 4M sentences)",
    )
    ap.add_argument("--queries", type=int, default=40_000, help="queries of --assignment")
    ap.add_argument("--probes", default="1,2,4,8,16", help="--assignment: probed coarse cells of the tree regime, comma-separated")
    ap.add_argument("--structures", default="uniform,nested", help="--assignment: corpora (uniform = bench_scale's, nested)")
    ap.add_argument(
        "--train-per-centroid", type=int, default=128, help="--assignment: training rows per centroid (bench_scale 1M: 300k / 2,333 = 128)"
    )
    ap.add_argument("--rows", default="500000,2000000", help="corpus sizes, comma-separated (each in its own subprocess)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--clusters", type=int, default=0, help="K (default: rows / 420, as the stage)")
    ap.add_argument("--sample-rows", type=int, default=250_000, help="K-means sample budget (stage default 4M)")
    ap.add_argument("--max-points-per-centroid", type=int, default=256)
    ap.add_argument("--two-level-above", type=int, default=1000, help="two-level K-means above this K (stage default 1024)")
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--shard-rows", type=int, default=100_000)
    ap.add_argument("--bank-part-rows", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", default=None, help="folder for the bench storage root (default: the system temp dir)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.assignment:
        import faiss

        faiss.omp_set_num_threads(1)
        bench_assignment(
            [int(k) for k in args.assignment.split(",")],
            args.dim,
            args.queries,
            args.seed,
            args.train_per_centroid,
            [int(p) for p in args.probes.split(",")],
            args.structures.split(","),
        )
        return
    if args.child:
        args.rows = int(args.rows)
        print(json.dumps(child(args)))
        return

    results = []
    for rows in [int(r) for r in args.rows.split(",")]:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--rows", str(rows)]
        for name in (
            "dim",
            "clusters",
            "sample_rows",
            "max_points_per_centroid",
            "two_level_above",
            "niter",
            "shard_rows",
            "bank_part_rows",
            "seed",
        ):
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        if args.tmp:
            cmd += ["--tmp", args.tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"rows={rows} failed:\n{proc.stderr[-4000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    d = args.dim
    print(
        f"dim {d}, sample budget {args.sample_rows} rows ({args.sample_rows * d * 4 / 2**20:.0f} MiB), "
        f"shard {args.shard_rows} rows ({args.shard_rows * d * 4 / 2**20:.0f} MiB), bank part {args.bank_part_rows} rows "
        f"({args.bank_part_rows * d * 4 / 2**20:.0f} MiB), two-level above K={args.two_level_above}, niter {args.niter}"
    )
    cols = [f"rows={r['rows']:,}" for r in results]
    print(" " * 40 + "".join(f"{c:>18s}" for c in cols))

    def row(label, values):
        print(f"{label:40s}" + "".join(f"{v:>18}" for v in values))

    row("clusters (K)", [r["clusters"] for r in results])
    row("coarse cells (0 = flat)", [r["coarse_clusters"] for r in results])
    row("shards / bank parts", [f"{r['shards']} / {r['bank_parts']}" for r in results])
    row("training rows", [r["training_rows"] for r in results])
    row("embeddings streamed (MiB)", [f"{r['rows'] * d * 4 / 2**20:.0f}" for r in results])
    for step in ("start", "sample", "train", "assign_and_spill", "merge"):
        row(f"peak RSS after {step} (MiB)", [f"{r['rss_mb'][step]:.0f}" for r in results])
    for step in ("sample", "train", "assign_and_spill", "merge"):
        row(f"seconds {step}", [f"{r['seconds'][step]:.1f}" for r in results])
    row("bank rows == rows", [str(r["bank_rows"] == r["rows"]) for r in results])
    a, b = results[0], results[-1]
    growth = b["peak_rss_mb"] - a["peak_rss_mb"]
    data_growth = (b["rows"] - a["rows"]) * d * 4 / 2**20
    print(
        f"peak RSS grew {growth:.0f} MiB ({b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x) while the corpus grew "
        f"{data_growth:.0f} MiB of embeddings ({b['rows'] / a['rows']:.1f}x)"
    )
    peaks = ",".join(f"{r['peak_rss_mb']:.0f}" for r in results)
    seconds = ",".join(f"{sum(r['seconds'].values()):.0f}" for r in results)
    print(
        "RESULT "
        f"rows={','.join(str(r['rows']) for r in results)} dim={d} clusters={','.join(str(r['clusters']) for r in results)} "
        f"sample_rows={args.sample_rows} bank_part_rows={args.bank_part_rows} threads={a['threads']} "
        f"peak_rss_mb={peaks} rss_growth_mb={growth:.0f} "
        f"rss_ratio={b['peak_rss_mb'] / a['peak_rss_mb']:.2f} rows_ratio={b['rows'] / a['rows']:.1f} "
        f"seconds={seconds}"
    )


if __name__ == "__main__":
    main()
