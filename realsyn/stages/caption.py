"""Stages 8-9: image-semantic-augmented generation (cached), then the image-text similarity band."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pyarrow as pa

from realsyn import layout
from realsyn.decisions import decision_table
from realsyn.plugins.kinds import Captioner, Embedder, GenerationBackend, Tagger
from realsyn.progress import Progress
from realsyn.stages.common import kept_image_embeddings, read_retrievals
from realsyn.stats import StepStats
from realsyn.storage import Storage

log = logging.getLogger("realsyn")


def generate_captions(
    storage: Storage,
    shard: str,
    backend: GenerationBackend,
    *,
    instruction: str | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    batch_size: int = 8,
    tagger: Tagger | None = None,
    embedder: Embedder | None = None,
    captioner: Captioner | None = None,
) -> StepStats:
    """One synthetic caption per image fused from its retrieved texts (and tags when a tagger is set,
    and a concise caption of the image when a captioner is: ``realsyn.captioning``, cached per
    (image_id, captioner id); an image the captioner fails on is fused without one, its reason counted).

    Finished captions are cached by (image_id, prompt hash) under ``_cache/``, appended as a small part
    file after every batch (``CaptionCacheStore``), so a rerun or a retry after a crash never regenerates them.
    """
    from realsyn.generation.cache import CaptionCacheStore, generate_with_cache
    from realsyn.generation.prompts import DEFAULT_FUSION_INSTRUCTION, build_fusion_messages, prompt_sha

    stats = StepStats(layout.SYNTHETIC_CAPTIONS)
    with stats.timed():
        retrievals = read_retrievals(storage, shard)
        image_ids = retrievals.column("image_id").to_pylist()
        texts = retrievals.column("texts").to_pylist()
        tags: list[list[str] | None] = [None] * len(image_ids)
        if tagger is not None:
            ids, emb = kept_image_embeddings(storage, shard)
            by_id = dict(zip(ids, range(len(ids))))
            if embedder is not None:
                tagger.fit(embedder.embed_texts)
            got = tagger.tags(emb[[by_id[i] for i in image_ids]]) if image_ids else []
            tags = list(got)
        concise = _concise_captions(storage, shard, image_ids, captioner, stats)
        params = {"max_new_tokens": max_new_tokens, "temperature": temperature}
        messages = [
            build_fusion_messages(t, c if isinstance(c, str) else None, g, instruction=instruction or DEFAULT_FUSION_INSTRUCTION)
            for t, c, g in zip(texts, concise, tags)
        ]
        shas = [prompt_sha(m, backend.model_id, params) for m in messages]
        cache_store = CaptionCacheStore(storage, shard)
        cache = cache_store.load()
        progress = Progress(
            f"{layout.SYNTHETIC_CAPTIONS} {shard}", sum(cache.get(i, s) is None for i, s in zip(image_ids, shas)), unit="captions"
        )
        try:
            # the whole shard at once, so a server backend keeps its max_concurrency requests in flight
            # across batches; the cache is appended every batch_size captions
            captions, n_cached, n_generated = generate_with_cache(
                list(zip(image_ids, messages)),
                backend,
                cache,
                backend.model_id,
                params,
                batch_size,
                on_batch=lambda: (cache_store.append(cache), progress.advance(batch_size)),
                shard=shard,
            )
            stats.add("cached", n_cached)
            stats.add("generated", n_generated)
            progress.advance(max(n_generated - progress.done, 0))  # the last, partial batch
            progress.finish()
        finally:
            # a failed batch's finished completions (and anything not yet flushed) survive the failure
            cache_store.append(cache)
        status = ["ok" if c.strip() else "empty" for c in captions]
        stats.drop_reasons([None if s == "ok" else "empty_caption" for s in status])
        table = pa.table(
            {
                "image_id": pa.array(image_ids, pa.string()),
                "synthetic_caption": pa.array(captions, pa.string()),
                "prompt_sha": pa.array(shas, pa.string()),
                "backend": pa.array([type(backend).__name__] * len(image_ids), pa.string()),
                "model": pa.array([backend.model_id] * len(image_ids), pa.string()),
                "status": pa.array(status, pa.string()),
                "tags": pa.array(tags, pa.list_(pa.string())),
                "concise_caption": pa.array([c if isinstance(c, str) else None for c in concise], pa.string()),
                "concise_status": pa.array(["ok" if isinstance(c, str) else c.reason for c in concise], pa.string()),
                "captioner": pa.array([_captioner_id(captioner)] * len(image_ids), pa.string()),
            }
        )
        stats.add("rows_out", table.num_rows)
        with storage.writer(layout.SYNTHETIC_CAPTIONS, shard) as w:
            w.write_parquet(layout.CAPTIONS_FILE, table)
    return stats


def _captioner_id(captioner: Captioner | None) -> str:
    from realsyn.captioning import NO_CAPTIONER, is_active

    return captioner.captioner_id if is_active(captioner) else NO_CAPTIONER


def _concise_captions(storage: Storage, shard: str, image_ids: list[str], captioner: Captioner | None, stats: StepStats) -> list:
    """Per image its concise caption, or a ``CaptionFailure`` (``no_captioner`` for every image without a captioner)."""
    from realsyn.captioning import CaptionFailure, is_active
    from realsyn.captioning.concise import ConciseCaptionStore, concise_captions, iter_shard_images

    if not is_active(captioner):
        return [CaptionFailure("no_captioner")] * len(image_ids)
    got = concise_captions(
        captioner, image_ids, lambda wanted: iter_shard_images(storage, shard, wanted), ConciseCaptionStore(storage, shard), stats
    )
    return [got[i] for i in image_ids]


def _pair_key(image_vector: np.ndarray, caption: str) -> str:
    """What a pair's cosine depends on, besides the model: the image vector and the caption text."""
    h = hashlib.blake2b(np.ascontiguousarray(image_vector, np.float32).tobytes(), digest_size=16)
    h.update(caption.encode("utf-8"))
    return h.hexdigest()


def _committed_scores(storage: Storage, shard: str, model_id: str) -> dict[str, float]:
    """pair_key -> cosine of this shard's committed scores, when they came from the same model."""
    if not storage.has(layout.FILTERED_PAIRS, shard):
        return {}
    reader = storage.reader(layout.FILTERED_PAIRS, shard)
    if not (reader.has(layout.SIMILARITY_FILE) and reader.has(layout.BAND_FILE)):
        return {}
    if reader.read_json(layout.BAND_FILE).get("model_id") != model_id:
        return {}
    table = reader.read_parquet(layout.SIMILARITY_FILE)
    if "pair_key" not in table.column_names:  # written before scores were keyed
        return {}
    return dict(zip(table.column("pair_key").to_pylist(), table.column("similarity").to_pylist()))


def filter_pairs(storage: Storage, shard: str, embedder: Embedder, *, low: float | None = None, high: float | None = None) -> StepStats:
    """Cosine between each image and its synthetic caption; drop pairs outside the band."""
    from realsyn.similarity import band_reasons, default_band, pair_cosine

    stats = StepStats(layout.FILTERED_PAIRS)
    with stats.timed():
        captions = storage.reader(layout.SYNTHETIC_CAPTIONS, shard).read_parquet(
            layout.CAPTIONS_FILE, columns=["image_id", "synthetic_caption", "status"]
        )
        ids, emb = kept_image_embeddings(storage, shard)
        by_id = dict(zip(ids, range(len(ids))))
        cap_ids = captions.column("image_id").to_pylist()
        img = emb[[by_id[i] for i in cap_ids]] if cap_ids else np.zeros((0, emb.shape[1]), np.float32)
        texts = captions.column("synthetic_caption").to_pylist()
        keys = [_pair_key(img[i], t) for i, t in enumerate(texts)]
        sim = np.zeros(len(cap_ids), np.float32)
        # a changed band, or a new shard elsewhere, re-judges pairs without re-embedding them: the
        # committed scores of identical pairs (same image vector, caption and model) are reused
        known = _committed_scores(storage, shard, embedder.model_id)
        todo = [i for i, k in enumerate(keys) if k not in known]
        for i, k in enumerate(keys):
            if k in known:
                sim[i] = known[k]
        if todo:
            txt = embedder.embed_texts([texts[i] for i in todo])
            sim[todo] = pair_cosine(img[todo], txt)
        stats.add("scores_reused", len(cap_ids) - len(todo))
        if low is None or high is None:
            band = default_band(embedder.model_id, embedder.random_weights)
            if band is None:
                log.warning(
                    "filtered_pairs: no calibrated similarity band for %s; set low/high in config. Passing every pair.", embedder.model_id
                )
                band = (-1.0, 1.0)
            low = band[0] if low is None else low
            high = band[1] if high is None else high
        reasons = band_reasons(sim, low, high)
        reasons = [("empty_caption" if s != "ok" else r) for s, r in zip(captions.column("status").to_pylist(), reasons)]
        keep = np.array([r is None for r in reasons], dtype=bool)
        stats.add("rows_in", len(cap_ids))
        stats.add("rows_out", int(keep.sum()))
        stats.drop_reasons(reasons)
        with storage.writer(layout.FILTERED_PAIRS, shard) as w:
            # scores kept apart from the band that judged them
            w.write_parquet(
                layout.SIMILARITY_FILE,
                pa.table(
                    {
                        "image_id": pa.array(cap_ids, pa.string()),
                        "similarity": pa.array(sim, pa.float32()),
                        "pair_key": pa.array(keys, pa.string()),
                    }
                ),
            )
            w.write_parquet(layout.DECISIONS_FILE, decision_table(cap_ids, reasons, [f"{float(x):.4f}" for x in sim]))
            w.write_json(layout.BAND_FILE, {"low": low, "high": high, "model_id": embedder.model_id})
    return stats
