"""Growth of every step from dedup to export on an embedding-level synthetic corpus.

The corpus is written to a storage root as the per-shard steps would leave it (filtered images with
small real JPEG bytes, image and sentence embeddings with their dedup keys, filtered sentences);
no image is decoded and no LLM runs: the caption step writes a synthetic caption per image and the
similarity band embeds captions with a hashing embedder. Every step then runs in its own process,
as a pod would (per-shard steps: one process per shard), and prints

    STEP name n=ITEMS seconds=S cpu_seconds=C peak_rss_mb=R

(seconds summed over a step's processes, peak RSS the largest of them; cpu_seconds the processes'
user + system time, the steadier figure when other work shares the cores). Run it at two sizes and
compare: per-item time and peak RSS should stay flat when the corpus grows.

    python bench/bench_scale.py --sentences 1000000 --images 240000
    python bench/bench_scale.py --sentences 4000000 --images 960000
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The parent imports nothing heavy: a child's peak RSS counts pages it inherits at fork, so the
# corpus is written by a child too and every step's figure is its own.

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _jpeg(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    # a gradient with light noise (~2.8 KB): at 4M sentences the exported and published splits of
    # pure-noise images (~14 KB each) did not fit this machine's disk
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:128, 0:160]
    base = np.stack([x * 255 // 160, y * 255 // 128, np.full_like(x, (seed * 37) % 255)], axis=-1)
    pixels = np.clip(base + rng.integers(-8, 8, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


class HashingTextEmbedder:
    """Deterministic unit vectors from text hashes: a stand-in text tower that costs no model."""

    model_id = "bench-hashing"
    random_weights = False

    def __init__(self, dim: int):
        self.dim = dim

    def embed_texts(self, texts):
        import numpy as np

        from realsyn.runtime import l2_normalize

        out = np.empty((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
            out[i] = np.random.default_rng(seed).standard_normal(self.dim)
        return l2_normalize(out)


def write_corpus(root: str, n_sentences: int, n_images: int, n_shards: int, dim: int, n_topics: int, seed: int) -> list[str]:
    """Per-shard outputs of ingest..embed at embedding level, with planted exact and near duplicates."""
    import numpy as np
    import pyarrow as pa

    from realsyn import layout
    from realsyn.runtime import l2_normalize
    from realsyn.storage import Storage

    storage = Storage(root)
    rng = np.random.default_rng(seed)
    topics = l2_normalize(rng.standard_normal((n_topics, dim)).astype(np.float32))
    jpegs = [_jpeg(seed + i) for i in range(16)]
    shards = [f"part-{i:05d}" for i in range(n_shards)]
    s_bounds = np.linspace(0, n_sentences, n_shards + 1).astype(np.int64)
    i_bounds = np.linspace(0, n_images, n_shards + 1).astype(np.int64)
    for s, shard in enumerate(shards):
        # sentences: noisy copies of topics; 2% exact repeats of an earlier sentence
        ns = int(s_bounds[s + 1] - s_bounds[s])
        ids = [f"{shard}/doc{j // 8}#{j % 8}.0" for j in range(ns)]
        words = rng.integers(0, 5000, (ns, 9))
        texts = [" ".join(f"w{w}" for w in row) for row in words]
        repeat = rng.random(ns) < 0.02
        for j in np.flatnonzero(repeat):
            texts[j] = texts[rng.integers(0, max(1, j))] if j else texts[j]
        emb = l2_normalize(topics[rng.integers(0, n_topics, ns)] + 0.6 * rng.standard_normal((ns, dim)).astype(np.float32))
        with storage.writer(layout.FILTERED_SENTENCES, shard) as w:
            w.write_parquet(layout.SENTENCES_FILE, pa.table({"sentence_id": ids, "text": texts}))
        sha = [hashlib.sha1(t.encode()).hexdigest() for t in texts]
        with storage.writer(layout.SENTENCE_EMBEDDINGS, shard) as w:
            w.write_numpy(layout.EMBEDDINGS_FILE, emb)
            w.write_parquet(layout.EMBEDDING_INDEX_FILE, pa.table({"sentence_id": ids, "text_sha": sha, "norm_key": sha}))
            w.write_json(layout.MODEL_FILE, {"model_id": "bench", "dim": dim, "random_weights": False})
        # images: one per topic draw; 1% byte-identical copies, 1% pHash near copies
        ni = int(i_bounds[s + 1] - i_bounds[s])
        image_ids = [f"{shard}/img{j // 4}#{j % 4}" for j in range(ni)]
        which = rng.integers(0, len(jpegs), ni)
        sha_img = [hashlib.sha256(f"{shard}:{j}".encode()).hexdigest() for j in range(ni)]
        phash = rng.integers(0, 2**63, ni, dtype=np.int64).astype(np.uint64)
        for j in np.flatnonzero(rng.random(ni) < 0.01)[1:]:
            sha_img[j] = sha_img[j - 1]
        for j in np.flatnonzero(rng.random(ni) < 0.01)[1:]:
            phash[j] = phash[j - 1] ^ np.uint64(1 << int(rng.integers(0, 64)))
        images = pa.table(
            {
                "image_id": image_ids,
                "shard": [shard] * ni,
                "doc_id": [i.split("#")[0] for i in image_ids],
                "position": pa.array(np.zeros(ni, np.int32)),
                "source": ["bench"] * ni,
                "image_bytes": pa.array([jpegs[k] for k in which], pa.binary()),
                "width": pa.array(np.full(ni, 160, np.int32)),
                "height": pa.array(np.full(ni, 128, np.int32)),
                "format": ["jpeg"] * ni,
                "sha256": sha_img,
                "status": ["ok"] * ni,
                "error": pa.nulls(ni, pa.string()),
            }
        )
        with storage.writer(layout.FILTERED_IMAGES, shard) as w:
            w.write_parquet(layout.IMAGES_FILE, images)
        emb = l2_normalize(topics[rng.integers(0, n_topics, ni)] + 0.6 * rng.standard_normal((ni, dim)).astype(np.float32))
        with storage.writer(layout.IMAGE_EMBEDDINGS, shard) as w:
            w.write_numpy(layout.EMBEDDINGS_FILE, emb)
            w.write_parquet(
                layout.EMBEDDING_INDEX_FILE,
                pa.table(
                    {
                        "image_id": image_ids,
                        "sha256": sha_img,
                        "phash": pa.array(phash, pa.uint64()),
                        "pixels": pa.array(np.full(ni, 160 * 128, np.int64)),
                    }
                ),
            )
            w.write_json(layout.MODEL_FILE, {"model_id": "bench", "dim": dim, "random_weights": False})
    return shards


def write_synthetic_captions(storage, shard: str) -> int:
    """The caption step without an LLM: the first retrieved text is the caption."""
    import pyarrow as pa

    from realsyn import layout
    from realsyn.stages.common import read_retrievals

    r = read_retrievals(storage, shard, columns=["image_id", "texts"])
    ids = r.column("image_id").to_pylist()
    caps = [(t[0] if t else "") + " (synthetic)" for t in r.column("texts").to_pylist()]
    n = len(ids)
    table = pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "synthetic_caption": pa.array(caps, pa.string()),
            "prompt_sha": pa.array([""] * n, pa.string()),
            "backend": pa.array(["bench"] * n, pa.string()),
            "model": pa.array(["bench"] * n, pa.string()),
            "status": pa.array(["ok" if c.strip() else "empty" for c in caps], pa.string()),
            "tags": pa.array([[]] * n, pa.list_(pa.string())),
        }
    )
    with storage.writer(layout.SYNTHETIC_CAPTIONS, shard) as w:
        w.write_parquet(layout.CAPTIONS_FILE, table)
    return n


def run_step(name: str, root: str, shards: list[str], shard: str | None, args: dict) -> int:
    """One step in this process; returns the number of items it handled."""
    from realsyn.storage import Storage

    storage = Storage(root)
    if name == "write_corpus":
        write_corpus(root, args["sentences"], args["images"], len(shards), args["dim"], args["topics"], args["seed"])
        return args["sentences"] + args["images"]
    if name == "image_dedup":
        from realsyn.stages.dedup import dedup_images

        return int(dedup_images(storage, shards, max_index_gb=args.get("max_index_gb")).counts["rows_in"])
    if name == "sentence_dedup":
        from realsyn.stages.dedup import dedup_sentences

        return int(dedup_sentences(storage, shards, max_index_gb=args.get("max_index_gb")).counts["rows_in"])
    if name == "sentence_clusters":
        from realsyn.stages.cluster import cluster_sentences

        return int(
            cluster_sentences(
                storage,
                shards,
                niter=args["niter"],
                sample_rows=args.get("sample_rows", 4_000_000),
                bank_dtype=args.get("bank_dtype", "float32"),
            ).counts["sentences"]
        )
    if name == "retrievals":
        from realsyn.stages.retrieve import retrieve_all

        return int(retrieve_all(storage, shards, max_image_gb=args.get("max_image_gb")).counts["images"])
    if name == "synthetic_captions":
        return write_synthetic_captions(storage, shard)
    if name == "filtered_pairs":
        from realsyn.stages.caption import filter_pairs

        return int(filter_pairs(storage, shard, HashingTextEmbedder(args["dim"]), low=-1.0, high=1.0).counts["rows_in"])
    if name == "image_clusters":
        from realsyn.stages.cluster import cluster_images

        return int(cluster_images(storage, shards, niter=args["niter"], sample_rows=args.get("sample_rows", 4_000_000)).counts["images"])
    if name == "sampled_splits":
        from realsyn.plugins import PluginSpec
        from realsyn.stages.sample import SplitSpec, sample_splits

        splits = [SplitSpec(f"cap{c}", [PluginSpec(name="cluster_cap", params={"cap": c})]) for c in (20, 35, 180)]
        return int(sum(s.counts["rows_in"] for s in sample_splits(storage, shards, splits).values()))
    if name == "exported_shards":
        from realsyn.stages.export import export_shard

        return int(sum(s.counts["rows_out"] for s in export_shard(storage, shard).values()))
    if name == "exported_splits":
        from realsyn.stages.export import publish_splits

        return int(sum(s.counts["rows_out"] for s in publish_splits(storage, shards).values()))
    raise ValueError(f"unknown step {name}")


GLOBAL = {"image_dedup", "sentence_dedup", "sentence_clusters", "retrievals", "image_clusters", "sampled_splits", "exported_splits"}
STEPS = [
    "image_dedup",
    "sentence_dedup",
    "sentence_clusters",
    "retrievals",
    "synthetic_captions",
    "filtered_pairs",
    "image_clusters",
    "sampled_splits",
    "exported_shards",
    "exported_splits",
]


def _child(name: str, root: str, shards: list[str], shard: str | None, args: dict) -> tuple[int, float, float, float]:
    """Run one step in a fresh process: (items, wall seconds, peak RSS MB, CPU seconds of that process)."""
    spec = json.dumps({"name": name, "root": root, "shards": shards, "shard": shard, "args": args})
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", spec], stdout=subprocess.PIPE, cwd=REPO)
    out = proc.stdout.read()
    status = proc.wait()
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"step {name} ({shard or 'global'}) failed with status {status}")
    # the child's own peak (wait4's figure also carries the peaks of earlier children on Linux)
    lines = out.decode().strip().splitlines()
    items, maxrss_kb = lines[-1].split()
    cpu = float(lines[-2].split()[1])
    return int(items), seconds, int(maxrss_kb) / 1024, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sentences", type=int, default=1_000_000)
    p.add_argument("--images", type=int, default=240_000)
    p.add_argument("--shards", type=int, default=0, help="0 = one shard per 250k sentences (at least 4)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--topics", type=int, default=20_000)
    p.add_argument("--niter", type=int, default=10, help="K-means iterations (the graph's default is 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-rows", type=int, default=4_000_000, help="K-means sample budget of both cluster steps (the stages' default)")
    p.add_argument(
        "--max-index-gb", type=float, default=None, help="both dedup steps: semantic index codes held per list range (default: one index)"
    )
    p.add_argument(
        "--max-image-gb", type=float, default=None, help="retrievals: image vectors held per round (default: all kept images held)"
    )
    p.add_argument("--bank-dtype", choices=("float32", "float16"), default="float32", help="sentence_clusters: how the bank is stored")
    p.add_argument("--root", help="storage root (default: a temporary folder, removed at the end)")
    p.add_argument("--steps", help="comma-separated subset of the steps to run, in the usual order (default: all)")
    p.add_argument("--reuse-corpus", action="store_true", help="with --root: keep the corpus and outputs already there")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        import resource

        spec = json.loads(a.child)
        n = run_step(spec["name"], spec["root"], spec["shards"], spec["shard"], spec["args"])
        usage = resource.getrusage(resource.RUSAGE_SELF)
        print("CPU", usage.ru_utime + usage.ru_stime)
        print(n, usage.ru_maxrss)
        return
    root = a.root or tempfile.mkdtemp(prefix="realsyn-scale-")
    n_shards = a.shards or max(4, a.sentences // 250_000)
    shards = [f"part-{i:05d}" for i in range(n_shards)]
    args = {"dim": a.dim, "niter": a.niter, "sentences": a.sentences, "images": a.images, "topics": a.topics, "seed": a.seed}
    args.update(sample_rows=a.sample_rows, max_image_gb=a.max_image_gb, max_index_gb=a.max_index_gb, bank_dtype=a.bank_dtype)
    steps = STEPS if not a.steps else [s for s in STEPS if s in a.steps.split(",")]
    if a.steps and len(steps) != len(a.steps.split(",")):
        raise SystemExit(f"--steps: unknown step in {a.steps!r}; steps are {', '.join(STEPS)}")
    if a.reuse_corpus and not a.root:
        raise SystemExit("--reuse-corpus needs --root")
    try:
        if not a.reuse_corpus:
            _, seconds, rss, _ = _child("write_corpus", root, shards, None, args)
            print(
                f"corpus: {a.sentences} sentences, {a.images} images, {n_shards} shards, D={a.dim} written in {seconds:.0f}s (peak {rss:.0f} MB)"
            )
        totals = {}
        for name in steps:
            runs = [_child(name, root, shards, None, args)] if name in GLOBAL else [_child(name, root, shards, s, args) for s in shards]
            n, seconds, rss, cpu = sum(r[0] for r in runs), sum(r[1] for r in runs), max(r[2] for r in runs), sum(r[3] for r in runs)
            totals[name] = (n, seconds, rss, cpu)
            print(
                f"STEP {name} n={n} seconds={seconds:.1f} cpu_seconds={cpu:.1f} peak_rss_mb={rss:.0f} "
                f"us_per_item={1e6 * seconds / max(n, 1):.1f} cpu_us_per_item={1e6 * cpu / max(n, 1):.1f}",
                flush=True,
            )
        print(
            "RESULT "
            + " ".join(
                f"{k}_us_per_item={1e6 * v[1] / max(v[0], 1):.1f} {k}_cpu_us_per_item={1e6 * v[3] / max(v[0], 1):.1f} {k}_rss_mb={v[2]:.0f}"
                for k, v in totals.items()
            )
        )
    finally:
        if not a.root:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
