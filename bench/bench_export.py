"""Export: the old single-process, row-at-a-time export vs the per-shard export + publish, side by side.

Synthetic shards in a local storage root (tmpfs by default, so storage latency is out of the
numbers): per shard a filtered_images table of real JPEG bytes (~20-50 KB, PIL-encoded gradients
with noise, optimized Huffman tables; 256 encodes made distinct by a 16-byte comment segment),
retrievals (3 real texts, scores, sentence ids), synthetic captions, and a sampled_splits
generation with three splits of 15/168,
30/168 and 100/168 of each shard's images (the paper's 15M/30M/100M out of 168M), in image order as
the samplers write them. Then, in one run:

- old: ``export_splits_single_process`` (what the exported_splits asset ran before): per split, every
  shard's images re-read, one Python row per sample, tars cut across shards;
- new: ``export_shard`` for every shard (what exported_shards runs per partition: the shard's images
  streamed once in batches of 1,024 rows, every split written from each batch), then
  ``publish_splits`` (what exported_splits now runs: copies the tars and Parquet tables into one
  folder per split), timed apart;
- new, one split only (the 100/168 one): the same per-shard step with nothing shared between splits,
  the conservative per-sample rate.

Both write tars and Parquet of the same samples (per sample: the image, ``json``, ``real0.txt`` ..
``real2.txt`` and ``txt``; the Parquet image column a ``datasets`` Image); the run checks that every
tar member of every split is identical, in the same order. The per-shard step also hashes each
split's content (images by the ``sha256`` filtered_images carries from ingest) and collects the data
card's histograms; publish also writes the data card and the versioned folder ``_exports/{split}/v1/``
(hard links on a local root; the repeats publish the same content, so no new version). samples/s counts samples written (all splits) per second of one
process; Arrow's CPU and I/O pools are set to ``--threads`` (default 1: per core).

    flock /tmp/realsyn-bench.lock .venv/bin/python bench/bench_export.py --shards 4 --images 2500
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import time

import numpy as np
import pyarrow as pa

from realsyn import layout
from realsyn.stages import export as stage
from realsyn.stages.common import write_retrievals
from realsyn.storage import Storage

SPLITS = {"cap20": 15 / 168, "cap35": 30 / 168, "cap180": 100 / 168}


def jpegs(n: int, seed: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        w, h = int(rng.integers(300, 420)), int(rng.integers(240, 360))
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([(x * rng.uniform(0.2, 1) + y * rng.uniform(0.2, 1)) % 256 for _ in range(3)], -1)
        img = np.clip(base + rng.normal(0, rng.uniform(8, 22), (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=85, optimize=True)
        if 20_000 <= len(buf.getvalue()) <= 50_000:
            out.append(buf.getvalue())
    return out


def unique(jpeg: bytes, rng) -> bytes:
    return jpeg[:2] + b"\xff\xfe\x00\x12" + rng.bytes(16) + jpeg[2:]


def words(rng, n: int) -> str:
    vocab = ["a", "dog", "runs", "across", "the", "green", "field", "near", "old", "stone", "bridge", "under", "blue", "sky", "while"]
    return " ".join(vocab[i] for i in rng.integers(0, len(vocab), n))


def build(storage: Storage, shards: list[str], n: int, pool: list[bytes], splits: dict[str, float], seed: int) -> int:
    rng = np.random.default_rng(seed)
    image_bytes = 0
    all_retrievals = {}
    for k, shard in enumerate(shards):
        ids = [f"{shard}/doc-{i // 4}#{i % 4}" for i in range(n)]
        # every image distinct: a 16-byte comment segment (COM) right after the start-of-image marker
        data = [unique(pool[(k * n + i) % len(pool)], rng) for i in range(n)]
        image_bytes += sum(map(len, data))
        images = pa.table(
            {
                "image_id": pa.array(ids, pa.string()),
                "image_bytes": pa.array(data, pa.binary()),
                "format": pa.array(["jpeg"] * n, pa.string()),
                "width": pa.array(rng.integers(300, 420, n), pa.int32()),
                "height": pa.array(rng.integers(240, 360, n), pa.int32()),
                "doc_id": pa.array([f"{shard}/doc-{i // 4}" for i in range(n)], pa.string()),
                "source": pa.array([f"https://example.org/{shard}/{i}.jpg" for i in range(n)], pa.string()),
                # image_db's hash of the fetched bytes (filtered_images keeps it): the export's content hash reuses it
                "sha256": pa.array([hashlib.sha256(d).hexdigest() for d in data], pa.string()),
            }
        )
        retrievals = pa.table(
            {
                "image_id": pa.array(ids, pa.string()),
                "sentence_ids": pa.array([[f"{shard}-s{i}-{j}" for j in range(3)] for i in range(n)], pa.list_(pa.string())),
                "texts": pa.array([[words(rng, 14) for _ in range(3)] for _ in range(n)], pa.list_(pa.string())),
                "scores": pa.array(np.sort(rng.uniform(0.2, 0.6, (n, 3)), axis=1)[:, ::-1].tolist(), pa.list_(pa.float32())),
            }
        )
        captions = pa.table({"image_id": pa.array(ids, pa.string()), "synthetic_caption": pa.array([words(rng, 20) for _ in range(n)])})
        all_retrievals[shard] = retrievals
        for asset, name, table in (
            (layout.FILTERED_IMAGES, layout.IMAGES_FILE, images),
            (layout.SYNTHETIC_CAPTIONS, layout.CAPTIONS_FILE, captions),
        ):
            with storage.writer(asset, shard) as w:
                w.write_parquet(name, table)
    write_retrievals(storage, all_retrievals)  # the retrievals asset: one global generation, a file per shard
    sample(storage, shards, n, splits, seed)
    return image_bytes


def sample(storage: Storage, shards: list[str], n: int, splits: dict[str, float], seed: int) -> None:
    rng = np.random.default_rng(seed + 1)
    with storage.writer(layout.SAMPLED_SPLITS) as w:
        for split, fraction in splits.items():
            for shard in shards:
                ids = (
                    storage.reader(layout.FILTERED_IMAGES, shard).read_parquet(layout.IMAGES_FILE, columns=["image_id"]).column("image_id")
                )
                keep = np.sort(rng.permutation(n)[: round(fraction * n)])
                w.write_parquet(
                    layout.split_selection_file(split, shard),
                    pa.table({"image_id": ids.take(pa.array(keep)), "cluster": pa.array(keep % 97, pa.int32())}),
                )
        w.write_json(layout.SUMMARY_FILE, {split: {} for split in splits})
        w.commit(info={"shards": list(shards)})


def split_digest(reader, split: str) -> tuple[int, str]:
    """(samples, sha256 over every member name and content of the split's tars in sizes.json order)."""
    h = hashlib.sha256()
    sizes = reader.read_json(layout.export_sizes_file(split))
    for name in sizes:
        with reader.open(f"{split}/{name}") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                h.update(m.name.encode())
                h.update(tar.extractfile(m).read())
    return sum(sizes.values()), h.hexdigest()


def timed(fn):
    """((wall s, CPU s of this process), result)."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - w0, time.process_time() - c0), out


def best_of(repeat: int, fn) -> tuple[float, float]:
    """(wall s, CPU s) of the run with the least CPU time."""
    return min((timed(fn)[0] for _ in range(max(repeat, 1))), key=lambda t: t[1])


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--images", type=int, default=2500, help="images per shard")
    ap.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar")
    ap.add_argument("--threads", type=int, default=1, help="Arrow CPU and I/O threads")
    ap.add_argument("--root", default="/dev/shm" if os.path.isdir("/dev/shm") else None, help="parent folder of the temporary storage root")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each new path (best kept); the old path runs once")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    pa.set_cpu_count(args.threads)
    pa.set_io_thread_count(args.threads)

    tmp = tempfile.mkdtemp(prefix="bench-export-", dir=args.root)
    try:
        # repeats replace generations at once (no retention): the tmpfs root stays the size of one run
        storage = Storage(os.path.join(tmp, "store"), retention=1, grace_s=0)
        shards = [f"shard-{i:05d}" for i in range(args.shards)]
        t0 = time.perf_counter()
        pool = jpegs(256, args.seed)
        image_bytes = build(storage, shards, args.images, pool, SPLITS, args.seed)
        setup_s = time.perf_counter() - t0
        images_file = storage.reader(layout.FILTERED_IMAGES, shards[0]).path(layout.IMAGES_FILE)
        zstd_ratio = os.path.getsize(images_file) * args.shards / image_bytes
        load_before = os.getloadavg()

        old_t, old = timed(
            lambda: stage.export_splits_single_process(storage, shards, samples_per_shard=args.samples_per_shard, asset="old_export")
        )

        def export_all():
            for shard in shards:
                stage.export_shard(storage, shard, samples_per_shard=args.samples_per_shard)

        shards_t = best_of(args.repeat, export_all)
        publish_t, new = timed(lambda: stage.publish_splits(storage, shards))
        publish_t = min(publish_t, best_of(args.repeat - 1, lambda: stage.publish_splits(storage, shards)), key=lambda t: t[1])
        load_after = os.getloadavg()

        samples = sum(int(st.counts["rows_out"]) for st in new.values())
        assert samples == sum(int(st.counts["rows_out"]) for st in old.values())
        identical = all(
            split_digest(storage.reader(layout.EXPORTED_SPLITS), split) == split_digest(storage.reader("old_export"), split)
            for split in SPLITS
        )
        published = storage.reader(layout.EXPORTED_SPLITS)
        copied_bytes = folder_bytes(published.gen_dir) - sum(
            len(published.read_bytes(f)) for f in published.files if not f.endswith(("tar", "parquet"))
        )
        tars = sum(int(st.counts["tar_shards"]) for st in new.values())

        shutil.rmtree(storage.path("old_export"))  # free the tmpfs memory before the last measurement
        # one split only: nothing shared between splits (a fresh sampled_splits generation)
        big = "cap180"
        sample(storage, shards, args.images, {big: SPLITS[big]}, args.seed + 7)
        one_t = best_of(args.repeat, export_all)
        one_samples = sum(sum(storage.reader(layout.EXPORTED_SHARDS, s).read_json(layout.export_sizes_file(big)).values()) for s in shards)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    out_mb = copied_bytes / 1e6
    rows = [
        ("old: one process, row at a time", old_t, samples),
        ("new: per-shard export, all shards", shards_t, samples),
        ("new: publish (copy into splits)", publish_t, samples),
        ("new: export + publish", (shards_t[0] + publish_t[0], shards_t[1] + publish_t[1]), samples),
        (f"new: one split only ({big})", one_t, one_samples),
    ]
    mb = image_bytes / 1e6 / (args.shards * args.images)
    print(
        f"data: {args.shards} shards x {args.images} images (JPEG, mean {mb * 1000:.1f} KB, stored zstd at {zstd_ratio:.2f} of raw), splits "
        + ", ".join(f"{k} {v:.3f}" for k, v in SPLITS.items())
        + f"; {samples} samples written per path ({one_samples} one split), {args.samples_per_shard} per tar; Arrow threads {args.threads}"
    )
    print(
        f"root {tmp}; setup {setup_s:.1f} s; load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (2-core machine, shared)"
    )
    print(f"per core = samples / CPU seconds of this process; new paths best of {args.repeat}\n")
    print(f"{'path':<36}{'wall s':>8}{'cpu s':>8}{'samples/s':>11}{'per core':>10}{'MB/s/core':>11}")
    for label, (wall, cpu), n in rows:
        print(f"{label:<36}{wall:>8.2f}{cpu:>8.2f}{n / wall:>11.0f}{n / cpu:>10.0f}{out_mb * n / samples / cpu:>11.0f}")
    per_core = {label: n / cpu for label, (_, cpu), n in rows}
    new_rate, old_rate = per_core[rows[1][0]], per_core[rows[0][0]]
    print(f"\npublish copied {tars} tars + Parquet tables, {out_mb:.0f} MB in {publish_t[0]:.2f} s; identical tar members: {identical}")
    print(
        f"RESULT per_core_new={new_rate:.0f} per_core_old={old_rate:.0f} speedup={new_rate / old_rate:.1f} "
        f"per_core_with_publish={per_core[rows[3][0]]:.0f} per_core_one_split={per_core[rows[4][0]]:.0f} "
        f"wall_new={samples / shards_t[0]:.0f} wall_old={samples / old_t[0]:.0f} publish_s={publish_t[0]:.2f} "
        f"publish_mb_per_s={out_mb / publish_t[0]:.0f} samples={samples} shards={args.shards} images_per_shard={args.images} "
        f"threads={args.threads} identical={identical} load={load_before[0]:.2f}/{load_after[0]:.2f}"
    )


if __name__ == "__main__":
    main()
