"""Stage 4/5e/6 inputs: CLIP embeddings of kept images and sentences, with their dedup keys."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from realsyn import layout
from realsyn.io import batched
from realsyn.plugins.kinds import Embedder
from realsyn.progress import track
from realsyn.stats import StepStats
from realsyn.storage import Storage

EMBED_CHUNK = 512  # rows per embedder call: bounds memory of decoded images


def _write_embeddings(storage: Storage, asset: str, shard: str, emb: np.ndarray, index: pa.Table, embedder: Embedder) -> None:
    """Vectors, their aligned index, and which model made them (dedup reads random_weights)."""
    with storage.writer(asset, shard) as w:
        w.write_numpy(layout.EMBEDDINGS_FILE, emb.astype(np.float32))
        w.write_parquet(layout.EMBEDDING_INDEX_FILE, index)
        w.write_json(layout.MODEL_FILE, {"model_id": embedder.model_id, "dim": embedder.dim, "random_weights": embedder.random_weights})


def _embed_in_chunks(embed, items: list, chunk: int, dim: int, what: str = "embedding") -> np.ndarray:
    parts = [embed(list(c)) for c in track(batched(items, chunk), what, total=len(items), unit="rows", size=len)]
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def embed_images(storage: Storage, shard: str, embedder: Embedder) -> StepStats:
    """Embeddings (N, D) aligned with index.parquet: image_id, sha256, phash, pixels."""
    from realsyn.dedup import perceptual_hash

    stats = StepStats(layout.IMAGE_EMBEDDINGS)
    with stats.timed():
        table = storage.reader(layout.FILTERED_IMAGES, shard).read_parquet(
            layout.IMAGES_FILE, columns=["image_id", "image_bytes", "sha256", "width", "height"]
        )
        blobs = table.column("image_bytes").to_pylist()
        emb = _embed_in_chunks(embedder.embed_images, blobs, EMBED_CHUNK, embedder.dim, f"{layout.IMAGE_EMBEDDINGS} {shard}")
        phash = np.array([perceptual_hash(b) for b in blobs], dtype=np.uint64)
        pixels = np.asarray(table.column("width").to_numpy(zero_copy_only=False), np.int64) * np.asarray(
            table.column("height").to_numpy(zero_copy_only=False), np.int64
        )
        index = pa.table(
            {
                "image_id": table.column("image_id"),
                "sha256": table.column("sha256"),
                "phash": pa.array(phash, pa.uint64()),
                "pixels": pa.array(pixels, pa.int64()),
            }
        )
        stats.add("rows_embedded", len(blobs))
        _write_embeddings(storage, layout.IMAGE_EMBEDDINGS, shard, emb, index, embedder)
    return stats


def embed_sentences(storage: Storage, shard: str, embedder: Embedder) -> StepStats:
    """Embeddings aligned with index.parquet: sentence_id, text_sha (exact key), norm_key (perceptual key)."""
    from realsyn.dedup import normalize_text

    stats = StepStats(layout.SENTENCE_EMBEDDINGS)
    with stats.timed():
        table = storage.reader(layout.FILTERED_SENTENCES, shard).read_parquet(layout.SENTENCES_FILE, columns=["sentence_id", "text"])
        texts = table.column("text").to_pylist()
        emb = _embed_in_chunks(embedder.embed_texts, texts, EMBED_CHUNK * 4, embedder.dim, f"{layout.SENTENCE_EMBEDDINGS} {shard}")
        index = pa.table(
            {
                "sentence_id": table.column("sentence_id"),
                "text_sha": pa.array([hashlib.sha1(t.encode()).hexdigest() for t in texts], pa.string()),
                "norm_key": pa.array([hashlib.sha1(normalize_text(t).encode()).hexdigest() for t in texts], pa.string()),
            }
        )
        stats.add("rows_embedded", len(texts))
        _write_embeddings(storage, layout.SENTENCE_EMBEDDINGS, shard, emb, index, embedder)
    return stats
