"""Stages 10-11: image K-means, semantic balanced splits (pluggable samplers), export for trainers."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from realsyn.plugins import create_plugin
from realsyn.stages.common import require_partitions
from realsyn.stages.embed import IMAGE_EMBEDDINGS
from realsyn.stages.generate import FILTERED_PAIRS, SYNTHETIC_CAPTIONS
from realsyn.stages.ingest import FILTERED_IMAGES
from realsyn.stages.retrieve import RETRIEVALS
from realsyn.stats import StepStats
from realsyn.storage import Storage

log = logging.getLogger("realsyn")

IMAGE_CLUSTERS = "image_clusters"
SAMPLED_SPLITS = "sampled_splits"
EXPORTED_SPLITS = "exported_splits"


@dataclass
class SamplerSpec:
    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class SplitSpec:
    """A split is a chain of samplers: each one is fitted on what the previous ones kept."""

    name: str
    samplers: list[SamplerSpec]


def paper_splits(caps: Sequence[int] = (20, 35, 180), seed: int = 0) -> list[SplitSpec]:
    """RealSyn's 15M / 30M / 100M splits: cluster caps 20, 35, 180."""
    return [SplitSpec(f"cap{c}", [SamplerSpec("cluster_cap", {"cap": c, "seed": seed})]) for c in caps]


def _kept_pairs(storage: Storage, shard: str) -> list[str]:
    t = storage.reader(FILTERED_PAIRS, shard).read_parquet("pairs.parquet", columns=["image_id", "kept"])
    return t.column("image_id").filter(t.column("kept")).to_pylist()


def _embeddings_of(storage: Storage, shard: str, image_ids: Sequence[str]) -> np.ndarray:
    reader = storage.reader(IMAGE_EMBEDDINGS, shard)
    all_ids = reader.read_parquet("index.parquet", columns=["image_id"]).column("image_id").to_pylist()
    pos = {x: i for i, x in enumerate(all_ids)}
    return np.asarray(reader.read_numpy("embeddings.npy"), dtype=np.float32)[[pos[i] for i in image_ids]]


def cluster_images(storage: Storage, shards: Sequence[str], *, n_clusters: int | None = None, images_per_cluster: int = 168, max_points_per_centroid: int = 256, niter: int = 20, seed: int = 0) -> StepStats:
    """K-means of the kept pairs' image embeddings (paper: 168M images into 1M centres)."""
    from realsyn.clustering import ReservoirSample, assign, train_kmeans

    stats = StepStats(IMAGE_CLUSTERS)
    with stats.timed():
        shards = require_partitions(storage, FILTERED_PAIRS, shards)
        kept = {s: _kept_pairs(storage, s) for s in shards}
        n = sum(len(v) for v in kept.values())
        if n == 0:
            raise ValueError("image_clusters: no image-text pair survived the similarity filter")
        k = min(n, n_clusters or max(1, round(n / images_per_cluster)))
        dim = int(storage.reader(IMAGE_EMBEDDINGS, shards[0]).read_json("model.json")["dim"])
        sample = ReservoirSample(capacity=k * max_points_per_centroid, dim=dim, seed=seed)
        for s in shards:
            sample.add(_embeddings_of(storage, s, kept[s]))
        centroids = np.asarray(train_kmeans(sample.array(), k, niter=niter, seed=seed), dtype=np.float32)
        counts = np.zeros(len(centroids), np.int64)
        with storage.writer(IMAGE_CLUSTERS) as w:
            w.write_numpy("centroids.npy", centroids)
            for s in shards:
                ids, _ = assign(_embeddings_of(storage, s, kept[s]), centroids, 1)
                counts += np.bincount(ids[:, 0], minlength=len(centroids))
                w.write_parquet(f"assignments/{s}.parquet", pa.table({"image_id": pa.array(kept[s], pa.string()), "cluster": pa.array(ids[:, 0].astype(np.int32))}))
            w.write_numpy("counts.npy", counts)
            stats.add("images", n)
            stats.add("clusters", len(centroids))
            stats.add("largest_cluster", int(counts.max()))
            w.write_json("summary.json", stats.as_dict())
    return stats


class _Candidates:
    """Per-shard candidate tables for the samplers: image_id, cluster, real_texts, synthetic_caption[, text_perplexity]."""

    def __init__(self, storage: Storage, shards: Sequence[str], perplexity_scorer=None):
        self.storage, self.shards, self.scorer = storage, list(shards), perplexity_scorer
        self._perplexity: dict[str, np.ndarray] = {}

    def table(self, shard: str, need: Sequence[str]) -> pa.Table:
        assigned = self.storage.reader(IMAGE_CLUSTERS).read_parquet(f"assignments/{shard}.parquet")
        ids = assigned.column("image_id").to_pylist()
        retr = self.storage.reader(RETRIEVALS, shard).read_parquet("retrievals.parquet", columns=["image_id", "texts"])
        caps = self.storage.reader(SYNTHETIC_CAPTIONS, shard).read_parquet("captions.parquet", columns=["image_id", "synthetic_caption"])
        rpos = {x: i for i, x in enumerate(retr.column("image_id").to_pylist())}
        cpos = {x: i for i, x in enumerate(caps.column("image_id").to_pylist())}
        table = assigned.append_column("real_texts", retr.column("texts").take(pa.array([rpos[i] for i in ids], pa.int64())))
        table = table.append_column("synthetic_caption", caps.column("synthetic_caption").take(pa.array([cpos[i] for i in ids], pa.int64())))
        if "text_perplexity" in need:
            if self.scorer is None:
                raise ValueError("a sampler needs text_perplexity but no perplexity scorer is configured")
            if shard not in self._perplexity:
                self._perplexity[shard] = np.asarray(self.scorer.score(table.column("synthetic_caption").to_pylist()), np.float32)
            table = table.append_column("text_perplexity", pa.array(self._perplexity[shard]))
        return table


def sample_splits(storage: Storage, shards: Sequence[str], splits: Sequence[SplitSpec], *, perplexity_scorer=None) -> dict[str, StepStats]:
    """Fit each split's sampler chain on compact per-shard tables, then select shard by shard."""
    if not splits:
        raise ValueError("sampled_splits: no split configured")
    shards = require_partitions(storage, FILTERED_PAIRS, shards)
    cands = _Candidates(storage, shards, perplexity_scorer)
    all_stats: dict[str, StepStats] = {}
    with storage.writer(SAMPLED_SPLITS) as w:
        summary = {}
        for split in splits:
            stats = StepStats(f"{SAMPLED_SPLITS}:{split.name}")
            with stats.timed():
                masks = {s: None for s in shards}
                dropped_by: dict[str, np.ndarray] = {}
                for i, spec in enumerate(split.samplers):
                    sampler = create_plugin("sampler", spec.name, **spec.params)
                    need = tuple(getattr(sampler, "required_columns", ()))

                    def batches(masks=masks, need=need) -> Iterator[pa.Table]:
                        for s in shards:
                            t = cands.table(s, need)
                            yield t if masks[s] is None else t.filter(pa.array(masks[s]))

                    state = sampler.fit(batches())
                    buf = io.BytesIO()
                    np.savez(buf, **{k: np.asarray(v) for k, v in state.items()})
                    w.write_bytes(f"{split.name}/state-{i}-{spec.name}.npz", buf.getvalue())
                    for name, blob in (sampler.report(state).items() if hasattr(sampler, "report") else []):
                        if isinstance(blob, pa.Table):
                            w.write_parquet(f"{split.name}/report-{i}-{name}", blob)
                        else:
                            w.write_bytes(f"{split.name}/report-{i}-{name}", blob)
                    before = 0
                    for s in shards:
                        t = cands.table(s, need)
                        prev = np.ones(t.num_rows, bool) if masks[s] is None else masks[s]
                        sel = np.zeros(t.num_rows, bool)
                        sub = t.filter(pa.array(prev))
                        sel[np.flatnonzero(prev)] = np.asarray(sampler.select(sub, state), dtype=bool)
                        before += int(prev.sum())
                        reasons = dropped_by.setdefault(s, np.full(t.num_rows, None, dtype=object))
                        reasons[prev & ~sel] = spec.name
                        masks[s] = sel
                    stats.drop(spec.name, before - sum(int(m.sum()) for m in masks.values()))
                total_in = 0
                for s in shards:
                    t = cands.table(s, ())
                    total_in += t.num_rows
                    w.write_parquet(f"{split.name}/{s}.parquet", t.select(["image_id", "cluster"]).filter(pa.array(masks[s])))
                    # which sampler of the chain dropped each excluded sample
                    out = ~masks[s]
                    w.write_parquet(f"{split.name}/excluded/{s}.parquet", pa.table({"image_id": t.column("image_id").filter(pa.array(out)), "reason": pa.array(list(dropped_by[s][out]), pa.string())}))
                stats.add("rows_in", total_in)
                stats.add("rows_out", sum(int(m.sum()) for m in masks.values()))
            all_stats[split.name] = stats
            summary[split.name] = {"samplers": [{"name": sp.name, **sp.params} for sp in split.samplers], **stats.as_dict()}
        w.write_json("summary.json", summary)
        w.commit(info={"shards": list(shards)})  # readers find each split's per-shard selections by name
    return all_stats


def export_splits(storage: Storage, shards: Sequence[str], *, samples_per_shard: int = 1000) -> dict[str, StepStats]:
    """Each split as WebDataset tar shards (+ sizes.json, as open_clip reads them) and Parquet."""
    from realsyn.export import make_sample, samples_to_parquet_table, write_webdataset

    splits_reader = storage.reader(SAMPLED_SPLITS)
    split_names = sorted(splits_reader.read_json("summary.json"))
    out: dict[str, StepStats] = {}
    with storage.writer(EXPORTED_SPLITS) as w:
        for split in split_names:
            stats = StepStats(f"{EXPORTED_SPLITS}:{split}")
            with stats.timed():

                def samples(split=split) -> Iterator[dict]:
                    for s in shards:
                        chosen = splits_reader.read_parquet(f"{split}/{s}.parquet").column("image_id").to_pylist()
                        if not chosen:
                            continue
                        imgs = storage.reader(FILTERED_IMAGES, s).read_parquet("images.parquet", columns=["image_id", "image_bytes", "format", "width", "height", "doc_id", "source"])
                        retr = storage.reader(RETRIEVALS, s).read_parquet("retrievals.parquet")
                        caps = storage.reader(SYNTHETIC_CAPTIONS, s).read_parquet("captions.parquet", columns=["image_id", "synthetic_caption"])
                        ipos = {x: i for i, x in enumerate(imgs.column("image_id").to_pylist())}
                        rpos = {x: i for i, x in enumerate(retr.column("image_id").to_pylist())}
                        cpos = {x: i for i, x in enumerate(caps.column("image_id").to_pylist())}
                        shard_samples = []
                        for image_id in chosen:
                            img = imgs.slice(ipos[image_id], 1).to_pylist()[0]
                            r = retr.slice(rpos[image_id], 1).to_pylist()[0]
                            synthetic = caps.column("synthetic_caption")[cpos[image_id]].as_py()
                            sample = make_sample(image_id, img["image_bytes"], img["format"], r["texts"], r["scores"], [synthetic], img["width"], img["height"], img["doc_id"], img["source"])
                            sample["json"].update(real_sentence_ids=r["sentence_ids"], shard=s)
                            shard_samples.append(sample)
                            yield sample
                        w.write_parquet(f"{split}/parquet/{s}.parquet", samples_to_parquet_table(shard_samples))

                sizes = write_webdataset(samples(), lambda name, split=split: w.open(f"{split}/{name}", "wb"), samples_per_shard=samples_per_shard, split=split, stats=stats)
                w.write_json(f"{split}/sizes.json", sizes)  # open_clip reads the sample counts from here
                stats.add("rows_out", sum(sizes.values()))
                stats.add("tar_shards", len(sizes))
            out[split] = stats
        w.write_json("summary.json", {k: v.as_dict() for k, v in out.items()})
    return out
