"""Benchmark the global dedup step, side by side in one run:

1. pHash pairs: multi-index hashing (m = d + 1 chunks, and the cost-model choice) vs faiss
   brute force (IndexBinaryFlat): the same pairs, the speedup; MIH alone at larger N.
2. Sentence dedup stage: columnar (realsyn.stages.dedup) vs the old list-based path (kept here
   verbatim as the reference): peak memory per sentence and time, each in a fresh process, and
   identical decision files.
3. Components: scipy csgraph vs numpy Union-Find on dedup-shaped edge lists.
4. Semantic dedup: IVF-SQ8 (``auto``: IVF{N/256}_HNSW32, verified by the exact inner product) vs Flat
   (exact, the old default; its edges are the truth), through the stage's own sharded path:
   time, recall, precision.
5. With ``--max-index-gb``: semantic dedup (``auto``) in bounded memory, one global index vs IVF
   list ranges within the budget (``SemanticIndex.partitioned_edges``), each in a fresh process:
   peak RSS above the start, time, ranges, and identical edges. ``--only-index-memory`` runs this
   section alone (its RESULT fields only).

    flock /tmp/realsyn-bench.lock .venv/bin/python bench/bench_dedup.py
    flock /tmp/realsyn-bench.lock .venv/bin/python bench/bench_dedup.py --only-index-memory --max-index-gb 0.02
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

from realsyn import layout
from realsyn.dedup import (
    UnionFind,
    auto_index_factory,
    component_labels,
    hamming_edges,
    hamming_edges_brute_force,
    mih_chunks,
)
from realsyn.runtime import l2_normalize
from realsyn.stats import StepStats
from realsyn.storage import Storage

# -- 1. pHash ------------------------------------------------------------------------------------


def planted_hashes(n: int, seed: int, blank: int) -> np.ndarray:
    """pHash-like 64-bit hashes (32 bits set, as the median threshold gives); 5% are copies of
    earlier hashes with 0..8 bits flipped; ``blank`` rows hash to 0 (blank images)."""
    rng = np.random.default_rng(seed)
    bits = np.argsort(rng.random((n, 64)), axis=1)[:, :32].astype(np.uint64)
    h = np.bitwise_or.reduce(np.uint64(1) << bits, axis=1)
    k = n // 20
    dst, src = rng.choice(n, size=k, replace=False), rng.integers(0, n, size=k)
    flips = np.zeros(k, np.uint64)
    for j, nflip in enumerate(rng.integers(0, 9, size=k)):
        if nflip:
            flips[j] = np.bitwise_or.reduce(np.uint64(1) << rng.choice(64, size=nflip, replace=False).astype(np.uint64))
    h[dst] = h[src] ^ flips
    h[rng.choice(n, size=blank, replace=False)] = 0
    return h


def bench_phash(n: int, n_large: int, d: int, seed: int) -> dict:
    h = planted_hashes(n, seed, blank=n // 200)
    t0 = time.perf_counter()
    brute = hamming_edges_brute_force(h, d)
    t_brute = time.perf_counter() - t0
    print(f"\n[pHash] n={n} max_distance={d} (brute force: faiss IndexBinaryFlat, {os.cpu_count()} threads; MIH: numpy, 1 thread)")
    print(f"{'method':<34}{'seconds':>9}{'speedup':>9}{'pairs':>10}{'equal':>7}")
    print(f"{'brute force (faiss binary flat)':<34}{t_brute:9.2f}{1.0:8.1f}x{len(brute):10d}{'-':>7}")
    out = {"phash_n": n, "phash_pairs": len(brute)}
    for label, chunks in [(f"MIH m=d+1={d + 1}", d + 1), (f"MIH m={mih_chunks(n, d)} (auto)", None)]:
        t0 = time.perf_counter()
        got = hamming_edges(h, d, chunks=chunks)
        t = time.perf_counter() - t0
        equal = np.array_equal(got, brute)
        print(f"{label:<34}{t:9.2f}{t_brute / t:8.1f}x{len(got):10d}{str(equal):>7}")
        assert equal, f"{label} disagrees with brute force"
        out["mih_d1" if chunks else "mih_auto"] = t_brute / t
    t0 = time.perf_counter()
    span = hamming_edges(h, d, all_pairs=False)
    t = time.perf_counter() - t0
    same = np.array_equal(component_labels(n, span), component_labels(n, brute))
    print(f"{'MIH auto, spanning edges (stage)':<34}{t:9.2f}{t_brute / t:8.1f}x{len(span):10d}{'comp ' + str(same):>7}")
    assert same
    # MIH alone at a larger N: brute force would take (n_large / n)^2 times as long
    hl = planted_hashes(n_large, seed + 1, blank=n_large // 200)
    t0 = time.perf_counter()
    span_l = hamming_edges(hl, d, all_pairs=False)
    t_l = time.perf_counter() - t0
    est_brute = t_brute * (n_large / n) ** 2
    print(
        f"MIH spanning at n={n_large} (m={mih_chunks(n_large, d)}): {t_l:.2f}s, {len(span_l)} edges; "
        f"brute force extrapolated (n^2): {est_brute:.0f}s ({est_brute / t_l:.0f}x)"
    )
    out.update(mih_spanning=t_brute / t, mih_large_n=n_large, mih_large_s=t_l, mih_large_vs_brute_est=est_brute / t_l)
    return out


# -- 2. sentence stage: columnar vs the old list-based path ---------------------------------------

LEGACY_ASSET = "legacy_sentence_dedup"


def legacy_exact_duplicate_edges(keys):
    first: dict[str, int] = {}
    pairs: list[tuple[int, int]] = []
    for i, key in enumerate(keys):
        if not key:
            continue
        j = first.setdefault(key, i)
        if j != i:
            pairs.append((j, i))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def legacy_dedup_sentences(storage: Storage, shards: list[str]) -> StepStats:
    """The list-based stage as it was (exact + normalised keys; semantic off), writing LEGACY_ASSET."""
    from realsyn.decisions import decision_table

    stats = StepStats(LEGACY_ASSET)
    with stats.timed():
        tables = [storage.reader(layout.SENTENCE_EMBEDDINGS, s).read_parquet(layout.EMBEDDING_INDEX_FILE) for s in shards]
        sizes = [t.num_rows for t in tables]

        def column(name):
            return [x for t in tables for x in t.column(name).to_pylist()]

        ids, sha, norm = column("sentence_id"), column("text_sha"), column("norm_key")
        edges = [legacy_exact_duplicate_edges(sha), legacy_exact_duplicate_edges(norm)]
        n = len(ids)
        all_edges = np.concatenate([np.zeros((0, 2), np.int64), *edges]).astype(np.int64)
        uf = UnionFind(n)
        uf.union_edges(all_edges)
        reps = uf.labels()
        reasons = [
            None
            if int(reps[i]) == i
            else "exact_duplicate"
            if sha[i] == sha[int(reps[i])]
            else "perceptual_duplicate"
            if norm[i] == norm[int(reps[i])]
            else "semantic_duplicate"
            for i in range(n)
        ]
        stats.add("rows_in", n)
        stats.add("rows_out", int((reps == np.arange(n)).sum()))
        stats.add("edges", len(all_edges))
        stats.drop_reasons(reasons)
        with storage.writer(LEGACY_ASSET) as w:
            offset = 0
            for s, size in zip(shards, sizes):
                sl = slice(offset, offset + size)
                w.write_parquet(layout.decisions_file(s), decision_table(ids[sl], reasons[sl], [ids[j] for j in reps[sl]]))
                offset += size
    return stats


def write_sentence_corpus(storage: Storage, n: int, n_shards: int, seed: int) -> list[str]:
    """index.parquet shards as the embed stage writes them: 10% exact copies, 5% normalised copies."""
    rng = np.random.default_rng(seed)
    text_of = np.arange(n)
    exact_dst = rng.choice(n, size=n // 10, replace=False)
    text_of[exact_dst] = rng.integers(0, n, size=len(exact_dst))
    norm_of = text_of.copy()
    norm_dst = rng.choice(n, size=n // 20, replace=False)
    norm_of[norm_dst] = rng.integers(0, n, size=len(norm_dst))
    shards, per = [f"shard-{k:03d}" for k in range(n_shards)], -(-n // n_shards)
    for k, shard in enumerate(shards):
        rows = range(k * per, min(n, (k + 1) * per))
        table = pa.table(
            {
                "sentence_id": [f"{shard}-doc{i // 8:07d}-s{i % 8}" for i in rows],
                "text_sha": [hashlib.sha1(f"text {text_of[i]}".encode()).hexdigest() for i in rows],
                "norm_key": [hashlib.sha1(f"norm {norm_of[i]}".encode()).hexdigest() for i in rows],
            }
        )
        with storage.writer(layout.SENTENCE_EMBEDDINGS, shard) as w:
            w.write_parquet(layout.EMBEDDING_INDEX_FILE, table)
            w.write_json(layout.MODEL_FILE, {"model_id": "bench", "dim": 4, "random_weights": False})
    return shards


def _status_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since exec: ru_maxrss would carry the parent's peak over)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(variant: str, root: str, shards: list[str]) -> None:
    """One variant in this fresh process: peak RSS above the RSS before it ran."""
    from realsyn.stages.dedup import dedup_sentences

    storage = Storage(root)
    # warm-up common to both paths: Arrow's allocator and reader threads, the lazy imports
    import scipy.sparse.csgraph  # noqa: F401

    from realsyn.decisions import decision_table

    decision_table(["x"], [None], ["x"])
    storage.reader(layout.SENTENCE_EMBEDDINGS, shards[0]).read_parquet(layout.EMBEDDING_INDEX_FILE)
    before = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    if variant == "columnar":
        stats = dedup_sentences(storage, shards, semantic_threshold=None)
    else:
        stats = legacy_dedup_sentences(storage, shards)
    seconds = time.perf_counter() - t0
    peak = _status_bytes("VmHWM")
    print(json.dumps({"peak_delta": peak - before, "seconds": seconds, "dropped": stats.dropped}))


def _run_stage(n: int, n_shards: int, seed: int) -> dict:
    """Both paths on one corpus, each in a fresh process; their decision files must be identical."""
    root = tempfile.mkdtemp(prefix="bench-dedup-")
    storage = Storage(root)
    shards = write_sentence_corpus(storage, n, n_shards, seed)
    res = {}
    for variant in ("legacy", "columnar"):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", variant, "--root", root, "--shards", ",".join(shards)],
            capture_output=True,
            text=True,
            check=True,
        )
        res[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    same = all(
        storage.reader(layout.SENTENCE_DEDUP)
        .read_parquet(layout.decisions_file(s))
        .equals(storage.reader(LEGACY_ASSET).read_parquet(layout.decisions_file(s)))
        for s in shards
    )
    assert same and res["columnar"]["dropped"] == res["legacy"]["dropped"], "columnar and list-based decisions differ"
    shutil.rmtree(root)
    return res


def bench_stage(n: int, shard_rows: int, seed: int) -> dict:
    """At n/2 and n sentences (shards of shard_rows): peak bytes per sentence, and the marginal
    bytes per extra sentence (the fixed overhead of the process and of Arrow cancels out)."""
    print(f"\n[sentence dedup stage] semantic off; shards of {shard_rows} rows; each path in a fresh process; peak RSS above the start")
    print(f"{'path':<26}{'n':>9}{'seconds':>9}{'peak MiB':>10}{'B/sentence':>12}{'marginal B':>12}")
    runs = {size: _run_stage(size, -(-size // shard_rows), seed) for size in (n // 2, n)}
    out = {"stage_n": n}
    for variant, label in (("legacy", "legacy (Python lists)"), ("columnar", "columnar (numpy)")):
        half, full = runs[n // 2][variant], runs[n][variant]
        marginal = (full["peak_delta"] - half["peak_delta"]) / (n - n // 2)
        for size, r in ((n // 2, half), (n, full)):
            extra = f"{marginal:12.1f}" if size == n else ""
            print(f"{label:<26}{size:9d}{r['seconds']:9.2f}{r['peak_delta'] / 2**20:10.1f}{r['peak_delta'] / size:12.1f}{extra}")
        out[f"{variant}_bytes_per_item"] = full["peak_delta"] / n
        out[f"{variant}_marginal"] = marginal
    print(f"decisions identical at both sizes; dropped at n={n}: {runs[n]['columnar']['dropped']}")
    out["memory_ratio"] = out["legacy_bytes_per_item"] / out["columnar_bytes_per_item"]
    out["stage_speedup"] = runs[n]["legacy"]["seconds"] / runs[n]["columnar"]["seconds"]
    return out


# -- 3. components ---------------------------------------------------------------------------------


def bench_components(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    graphs = {
        "10% random dup edges": rng.integers(0, n, size=(n // 10, 2)),
        "50% random edges": rng.integers(0, n, size=(n // 2, 2)),
        "long chains (n/4)": (lambda p: np.stack([p[:-1], p[1:]], axis=1)[: n // 4])(rng.permutation(n)),
    }
    print(f"\n[components] n={n} nodes")
    print(f"{'graph':<24}{'edges':>9}{'csgraph s':>11}{'union-find s':>14}{'uf/cs':>7}")
    ratios = []
    for name, edges in graphs.items():
        t0 = time.perf_counter()
        a = component_labels(n, edges, "csgraph")
        t_cs = time.perf_counter() - t0
        t0 = time.perf_counter()
        b = component_labels(n, edges, "union_find")
        t_uf = time.perf_counter() - t0
        assert np.array_equal(a, b)
        ratios.append(t_uf / t_cs)
        print(f"{name:<24}{len(edges):9d}{t_cs:11.3f}{t_uf:14.3f}{t_uf / t_cs:7.2f}")
    return {"uf_over_csgraph": float(np.exp(np.mean(np.log(ratios))))}


# -- 4. semantic ------------------------------------------------------------------------------------


def planted_vectors(n: int, dim: int, dup_fraction: float, noise: float, seed: int) -> np.ndarray:
    """Random unit vectors; a fraction of rows are noisy copies of earlier rows."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    n_dup = int(n * dup_fraction)
    copies = rng.choice(n, size=n_dup, replace=False)
    sources = rng.integers(0, n, size=n_dup)
    x[copies] = x[sources] + rng.normal(scale=noise, size=(n_dup, dim)).astype(np.float32)
    return l2_normalize(x)


def _codes(edges: np.ndarray, n: int) -> np.ndarray:
    return np.unique(edges[:, 0].astype(np.int64) * n + edges[:, 1])


def bench_semantic(n: int, dim: int, threshold: float, nprobe: int, n_shards: int, seed: int) -> dict:
    import faiss

    from realsyn.stages.dedup import _Corpus, _semantic_edges

    x = planted_vectors(n, dim, 0.05, 0.04, seed)
    root = tempfile.mkdtemp(prefix="bench-semantic-")
    storage = Storage(root)
    shards, per = [f"shard-{k:03d}" for k in range(n_shards)], -(-n // n_shards)
    for k, shard in enumerate(shards):
        rows = np.arange(k * per, min(n, (k + 1) * per))
        with storage.writer(layout.SENTENCE_EMBEDDINGS, shard) as w:
            w.write_numpy(layout.EMBEDDINGS_FILE, x[rows])
            w.write_parquet(layout.EMBEDDING_INDEX_FILE, pa.table({"sentence_id": [str(i) for i in rows]}))
            w.write_json(layout.MODEL_FILE, {"model_id": "bench", "dim": dim, "random_weights": False})
    corpus = _Corpus(storage, layout.SENTENCE_EMBEDDINGS, shards)
    print(f"\n[semantic] n={n} dim={dim} threshold={threshold} nprobe={nprobe}, {n_shards} shards, the stage's path (_semantic_edges)")
    print(f"faiss {faiss.omp_get_max_threads()} threads; truth = Flat (exact inner products, the old default)")
    print(f"{'method':<28}{'seconds':>9}{'speedup':>9}{'edges':>9}{'recall':>9}{'precision':>11}{'candidates':>12}")
    res, truth = {}, None
    for label, factory in [("Flat", "Flat"), (f"auto = {auto_index_factory(n)}", "auto")]:
        stats = StepStats("bench")
        t0 = time.perf_counter()
        got = _codes(_semantic_edges(corpus, threshold, factory, nprobe, stats), n)
        t = time.perf_counter() - t0
        truth = got if truth is None else truth
        tp = len(np.intersect1d(got, truth))
        res[factory] = (t, tp / max(len(truth), 1), tp / max(len(got), 1))
        cand = stats.counts.get("semantic_candidates", "-")
        print(f"{label:<28}{t:9.2f}{res['Flat'][0] / t:8.2f}x{len(got):9d}{res[factory][1]:9.4f}{res[factory][2]:11.4f}{cand:>12}")
    shutil.rmtree(root)
    return {
        "semantic_n": n,
        "sq8_vs_flat": res["Flat"][0] / res["auto"][0],
        "sq8_recall": res["auto"][1],
        "sq8_precision": res["auto"][2],
    }


# -- 5. semantic dedup in bounded memory -----------------------------------------------------------


def semantic_child(root: str, shards: list[str], params: dict) -> None:
    """``_semantic_edges`` in this fresh process: peak RSS above the RSS before it ran; edges saved."""
    import faiss  # noqa: F401  (warm-up common to both paths: the lazy imports)

    import realsyn.clustering  # noqa: F401
    from realsyn.dedup import SemanticIndex
    from realsyn.stages.dedup import _Corpus, _semantic_edges

    corpus = _Corpus(Storage(root), layout.SENTENCE_EMBEDDINGS, shards)
    before = _status_bytes("VmRSS")
    phases = {}
    train = SemanticIndex.train

    def train_then_reset_peak(self, sample):
        """Split the peak: training (quantiser + codes, on the bounded sample), then the index and its queries."""
        train(self, sample)
        phases["train_peak_delta"] = _status_bytes("VmHWM") - before
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS

    SemanticIndex.train = train_then_reset_peak
    stats = StepStats("bench")
    t0 = time.perf_counter()
    edges = _semantic_edges(corpus, params["threshold"], "auto", params["nprobe"], stats, params["max_index_gb"])
    seconds = time.perf_counter() - t0
    index_peak = _status_bytes("VmHWM") - before
    np.save(params["out"], edges)
    peak = max(index_peak, phases["train_peak_delta"])
    print(json.dumps({"peak_delta": peak, "index_peak_delta": index_peak, **phases, "seconds": seconds, "stats": stats.as_dict()}))


def write_vector_corpus(storage: Storage, n: int, dim: int, n_shards: int, seed: int) -> list[str]:
    """``planted_vectors`` shard by shard (5% noisy copies of rows of the same or an earlier shard),
    so the parent never holds the corpus either."""
    rng = np.random.default_rng(seed)
    shards, per = [f"shard-{k:03d}" for k in range(n_shards)], -(-n // n_shards)
    previous = None
    for k, shard in enumerate(shards):
        m = min(per, n - k * per)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        n_dup = m // 20
        copies = rng.choice(m, size=n_dup, replace=False)
        pool = x if previous is None else np.concatenate([previous, x])
        sources = rng.integers(0, len(pool), size=n_dup)
        x[copies] = pool[sources] + rng.normal(scale=0.04, size=(n_dup, dim)).astype(np.float32)
        x = l2_normalize(x)
        rows = np.arange(k * per, k * per + m)
        with storage.writer(layout.SENTENCE_EMBEDDINGS, shard) as w:
            w.write_numpy(layout.EMBEDDINGS_FILE, x)
            w.write_parquet(layout.EMBEDDING_INDEX_FILE, pa.table({"sentence_id": [str(i) for i in rows]}))
            w.write_json(layout.MODEL_FILE, {"model_id": "bench", "dim": dim, "random_weights": False})
        previous = x
    return shards


def bench_index_memory(n: int, dim: int, threshold: float, nprobe: int, n_shards: int, max_index_gb: float, seed: int) -> dict:
    """One global index vs IVF list ranges within ``max_index_gb``, each in a fresh process."""
    root = tempfile.mkdtemp(prefix="bench-index-memory-")
    storage = Storage(root)
    shards = write_vector_corpus(storage, n, dim, n_shards, seed)
    factory = auto_index_factory(n)
    print(f"\n[semantic index memory] n={n} dim={dim} threshold={threshold} nprobe={nprobe} {factory}, {n_shards} shards")
    print("each path in a fresh process (_semantic_edges); peak RSS above the start (VmHWM - VmRSS before), split at the end of training")
    print(f"{'path':<30}{'seconds':>9}{'peak MiB':>10}{'train MiB':>11}{'index MiB':>11}{'ranges':>8}{'edges':>10}{'candidates':>12}")
    res = {}
    for label, budget in (("one global index", None), (f"list ranges <= {max_index_gb} GiB", max_index_gb)):
        out = os.path.join(root, f"edges-{budget}.npy")
        params = {"threshold": threshold, "nprobe": nprobe, "max_index_gb": budget, "out": out}
        proc = subprocess.run(
            [sys.executable, __file__, "--child", "semantic", "--root", root, "--shards", ",".join(shards), "--params", json.dumps(params)],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["codes"] = _codes(np.load(out), n)
        res[budget] = r
        st = r["stats"]
        ranges, cand = st.get("semantic_index_ranges", 1), st.get("semantic_candidates", "-")
        mib = [r[k] / 2**20 for k in ("peak_delta", "train_peak_delta", "index_peak_delta")]
        print(f"{label:<30}{r['seconds']:9.2f}{mib[0]:10.1f}{mib[1]:11.1f}{mib[2]:11.1f}{ranges:8d}{st['semantic_edges']:10d}{cand:>12}")
    one, part = res[None], res[max_index_gb]
    same = np.array_equal(one["codes"], part["codes"]) and one["stats"].get("semantic_candidates") == part["stats"].get(
        "semantic_candidates"
    )
    print(f"identical edges and candidate counts: {same}; index codes + ids of the global index: {n * (dim + 8) / 2**20:.0f} MiB")
    assert same, "list ranges and the global index disagree"
    shutil.rmtree(root)
    return {
        "index_mem_n": n,
        "index_mem_dim": dim,
        "max_index_gb": max_index_gb,
        "index_ranges": part["stats"]["semantic_index_ranges"],
        "global_index_peak_MiB": one["peak_delta"] / 2**20,
        "ranges_peak_MiB": part["peak_delta"] / 2**20,
        "train_peak_MiB": part["train_peak_delta"] / 2**20,
        "global_index_phase_MiB": one["index_peak_delta"] / 2**20,
        "ranges_index_phase_MiB": part["index_peak_delta"] / 2**20,
        "global_index_s": one["seconds"],
        "ranges_s": part["seconds"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phash-n", type=int, default=200_000)
    ap.add_argument("--phash-large-n", type=int, default=2_000_000)
    ap.add_argument("--max-distance", type=int, default=6)
    ap.add_argument("--stage-n", type=int, default=1_000_000)
    ap.add_argument("--stage-shard-rows", type=int, default=125_000)
    ap.add_argument("--components-n", type=int, default=2_000_000)
    ap.add_argument("--semantic-n", type=int, default=150_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--semantic-shards", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-index-gb", type=float, help="section 5: the semantic index budget (GiB) to compare with one global index")
    ap.add_argument("--index-memory-n", type=int, default=1_000_000)
    ap.add_argument("--index-memory-dim", type=int, default=128)
    ap.add_argument("--index-memory-shards", type=int, default=8)
    ap.add_argument("--only-index-memory", action="store_true", help="run section 5 alone")
    ap.add_argument("--child", choices=["legacy", "columnar", "semantic"], help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "semantic":
        semantic_child(args.root, args.shards.split(","), json.loads(args.params))
        return
    if args.child:
        child(args.child, args.root, args.shards.split(","))
        return

    if args.only_index_memory and args.max_index_gb is None:
        ap.error("--only-index-memory needs --max-index-gb")
    if not args.only_index_memory:
        out = bench_phash(args.phash_n, args.phash_large_n, args.max_distance, args.seed)
        out.update(bench_stage(args.stage_n, args.stage_shard_rows, args.seed))
        out.update(bench_components(args.components_n, args.seed))
        out.update(bench_semantic(args.semantic_n, args.dim, args.threshold, args.nprobe, args.semantic_shards, args.seed))
    memory = {}
    if args.max_index_gb is not None:
        memory = bench_index_memory(
            args.index_memory_n, args.index_memory_dim, args.threshold, args.nprobe, args.index_memory_shards, args.max_index_gb, args.seed
        )
    memory_fields = " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in memory.items())
    if args.only_index_memory:
        print(f"RESULT {memory_fields}")
        return
    print(
        "RESULT "
        f"phash_n={out['phash_n']} phash_pairs={out['phash_pairs']} mih_d1_speedup={out['mih_d1']:.1f} "
        f"mih_auto_speedup={out['mih_auto']:.1f} mih_spanning_speedup={out['mih_spanning']:.1f} "
        f"mih_{out['mih_large_n']}_s={out['mih_large_s']:.1f} mih_{out['mih_large_n']}_vs_brute_est={out['mih_large_vs_brute_est']:.0f} "
        f"stage_n={out['stage_n']} legacy_B_per_sentence={out['legacy_bytes_per_item']:.0f} "
        f"columnar_B_per_sentence={out['columnar_bytes_per_item']:.0f} legacy_marginal_B={out['legacy_marginal']:.0f} "
        f"columnar_marginal_B={out['columnar_marginal']:.0f} memory_ratio={out['memory_ratio']:.1f} "
        f"stage_speedup={out['stage_speedup']:.2f} uf_over_csgraph={out['uf_over_csgraph']:.2f} "
        f"semantic_n={out['semantic_n']} sq8_vs_flat={out['sq8_vs_flat']:.1f} "
        f"sq8_recall={out['sq8_recall']:.4f} sq8_precision={out['sq8_precision']:.4f}" + (f" {memory_fields}" if memory else "")
    )


if __name__ == "__main__":
    main()
