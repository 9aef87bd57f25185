"""Split samplers: ClusterCapSampler.fit in one pass vs the landed per-shard re-sort; MetaCLIP matched once.

(a) cluster_cap fit, microseconds per row (CPU time of this process, one thread) at 10 and at 40
    shards of --rows-per-shard rows over --clusters clusters (uniform), cap --cap: the landed fit
    (concatenate the running best rows with each shard and lexsort them all, every shard) against
    ClusterCapSampler.fit (running per-cluster thresholds, amortised compaction). Both hash every id
    (uniform_keys), which is the floor; their states must be identical.
(b) MetaClipSampler fit + reasons over --meta-shards shards fed as the sampling stage feeds them:
    reasons reusing fit's matches (now) against reasons matching every text again (before), CPU
    seconds, with identical reasons. Metadata and texts: ../shared/data/metaclip and alt_texts when
    present, else the embedded concept list and generated texts.

    flock /tmp/realsyn-bench.lock .venv/bin/python bench/bench_sampling.py
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import pyarrow as pa

from realsyn.samplers.cluster_cap import ClusterCapSampler, _grow, _rank_within_groups
from realsyn.samplers.metaclip import MetaClipSampler

DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


class LandedClusterCapSampler(ClusterCapSampler):
    """The fit as it landed: every shard re-sorts the whole running buffer."""

    def fit(self, batches):
        counts = np.zeros(0, dtype=np.int64)
        best_clusters = np.empty(0, dtype=np.int64)
        best_keys = np.empty(0, dtype=np.float64)
        for batch in batches:
            valid, keys, clusters = self._keys_and_clusters(batch)
            if len(clusters):
                counts = _grow(counts, int(clusters.max()) + 1)
                counts += np.bincount(clusters, minlength=len(counts))
            best_clusters = np.concatenate([best_clusters, clusters])
            best_keys = np.concatenate([best_keys, keys])
            order = np.lexsort((best_keys, best_clusters))
            best_clusters, best_keys = best_clusters[order], best_keys[order]
            keep = _rank_within_groups(best_clusters) < self.cap
            best_clusters, best_keys = best_clusters[keep], best_keys[keep]
        threshold = np.full(len(counts), np.inf, dtype=np.float64)
        big = counts > self.cap
        last = np.append(best_clusters[1:] != best_clusters[:-1], True) if len(best_clusters) else np.zeros(0, bool)
        group_clusters, group_max = best_clusters[last], best_keys[last]
        sel = big[group_clusters]
        threshold[group_clusters[sel]] = group_max[sel]
        return {"threshold": threshold, "counts": counts}


def shard_tables(n_shards: int, rows: int, clusters: int, seed: int = 0) -> list[pa.Table]:
    rng = np.random.default_rng(seed)
    return [
        pa.table(
            {
                "image_id": [f"s{s}-img{i}" for i in range(rows)],
                "cluster": pa.array(rng.integers(0, clusters, size=rows), pa.int64()),
            }
        )
        for s in range(n_shards)
    ]


def cluster_cap(args) -> dict[str, float]:
    print(f"== (a) cluster_cap fit: {args.rows_per_shard} rows/shard, {args.clusters} clusters, cap {args.cap}, CPU time, one thread ==")
    out: dict[str, float] = {}
    identical = True
    for n_shards in (10, 40):
        tables = shard_tables(n_shards, args.rows_per_shard, args.clusters)
        rows = n_shards * args.rows_per_shard
        states = {}
        for name, cls in (("old", LandedClusterCapSampler), ("new", ClusterCapSampler)):
            best = float("inf")
            for _ in range(args.rounds):
                sampler = cls(cap=args.cap, seed=1)
                start = time.process_time()
                states[name] = sampler.fit(iter(tables))
                best = min(best, time.process_time() - start)
            out[f"{name}_{n_shards}"] = best / rows * 1e6
        same = all(np.array_equal(states["old"][k], states["new"][k]) for k in ("threshold", "counts"))
        identical &= same
        print(
            f"{n_shards:3d} shards ({rows:,} rows): old {out[f'old_{n_shards}']:.2f} us/row, new {out[f'new_{n_shards}']:.2f} us/row, "
            f"old / new = {out[f'old_{n_shards}'] / out[f'new_{n_shards}']:.2f}x, identical state: {int(same)}"
        )
    for name in ("old", "new"):
        print(f"{name}: 40 shards / 10 shards per-row cost = {out[f'{name}_40'] / out[f'{name}_10']:.2f}x")
    out["identical"] = float(identical)
    return out


def metaclip_inputs(args, tmp: str) -> tuple[str, list[pa.Table]]:
    data = os.path.abspath(args.data_dir)
    meta_path = os.path.join(data, "metaclip", "metadata_wordnet_part_plus_0_99.json")
    texts_path = os.path.join(data, "alt_texts", "test_10000.parquet")
    if os.path.exists(meta_path) and os.path.exists(texts_path):
        import pyarrow.parquet as pq

        texts = pq.read_table(texts_path, columns=["TEXT"]).column("TEXT").to_pylist()
        source = "shared data (WordNet part metadata, 10k alt texts)"
    else:
        from realsyn.curation.metaclip import EMBEDDED_METADATA, load_metadata

        words = load_metadata(EMBEDDED_METADATA)
        rng = np.random.default_rng(0)
        texts = [" ".join(rng.choice(words, size=6)) for _ in range(10000)]
        meta_path = os.path.join(tmp, "meta.json")
        with open(meta_path, "w") as f:
            json.dump(list(words), f)
        source = "embedded concept list, generated texts"
    rng = np.random.default_rng(1)
    tables = []
    for s in range(args.meta_shards):
        n = args.meta_rows_per_shard
        pick = rng.integers(0, len(texts), size=(n, 4))
        tables.append(
            pa.table(
                {
                    "image_id": [f"s{s}-img{i}" for i in range(n)],
                    "real_texts": pa.array([[texts[j] for j in row[:3]] for row in pick], pa.list_(pa.string())),
                    "synthetic_caption": pa.array([texts[row[3]] for row in pick], pa.string()),
                }
            )
        )
    print(f"\n== (b) MetaCLIP sampler fit + reasons: {args.meta_shards} shards x {args.meta_rows_per_shard} rows, 4 texts/row; {source} ==")
    return meta_path, tables


def metaclip(args) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        meta_path, tables = metaclip_inputs(args, tmp)
        results, seconds = {}, {}
        for name in ("rematch", "reuse"):
            sampler = MetaClipSampler(meta_path, t=50, seed=0)
            assert sampler.matcher.n_entries  # built outside the timing (the same for both)
            start = time.process_time()
            state = sampler.fit(iter(tables))
            # "rematch": a state object fit did not return, so reasons matches every text again (the landed behaviour)
            decide_state = state if name == "reuse" else dict(state)
            results[name] = [sampler.reasons(t, decide_state) for t in tables]
            seconds[name] = time.process_time() - start
            print(
                f"{name:8s} fit + reasons {seconds[name]:.2f} s CPU, rows matched again in reasons: {sampler.stats.counts['rematched_rows']}"
            )
        identical = results["rematch"] == results["reuse"]
        print(f"rematch / reuse = {seconds['rematch'] / seconds['reuse']:.2f}x, identical reasons: {int(identical)}")
        return {"rematch_s": seconds["rematch"], "reuse_s": seconds["reuse"], "identical": float(identical)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows-per-shard", type=int, default=10000)
    parser.add_argument("--clusters", type=int, default=5000)
    parser.add_argument("--cap", type=int, default=180)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--meta-shards", type=int, default=10)
    parser.add_argument("--meta-rows-per-shard", type=int, default=5000)
    args = parser.parse_args()
    cap = cluster_cap(args)
    meta = metaclip(args)
    print(
        f"RESULT rows_per_shard={args.rows_per_shard} clusters={args.clusters} cap={args.cap} "
        f"old_us_per_row_10={cap['old_10']:.2f} old_us_per_row_40={cap['old_40']:.2f} "
        f"new_us_per_row_10={cap['new_10']:.2f} new_us_per_row_40={cap['new_40']:.2f} "
        f"old_over_new_40={cap['old_40'] / cap['new_40']:.2f} cluster_cap_identical={int(cap['identical'])} "
        f"metaclip_rematch_s={meta['rematch_s']:.2f} metaclip_reuse_s={meta['reuse_s']:.2f} "
        f"metaclip_speedup={meta['rematch_s'] / meta['reuse_s']:.2f} metaclip_identical={int(meta['identical'])}"
    )
    if not (cap["identical"] and meta["identical"]):
        raise SystemExit("old and new disagree")


if __name__ == "__main__":
    main()
