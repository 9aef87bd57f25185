"""Embed stage: per-shard CLIP embeddings of the kept images and sentences (GPU steps in production)."""

import dagster as dg

from assets.execution import shard_asset
from assets.metadata import partition_results, stats_metadata
from realsyn import layout
from realsyn.stages import embed as stage
from resources import EmbedderResource, StorageResource


def _model_metadata(embedder) -> dict:
    return {"model_id": embedder.model_id, "dim": embedder.dim, "random_weights": embedder.random_weights}


@shard_asset(
    layout.IMAGE_EMBEDDINGS,
    deps=[layout.FILTERED_IMAGES],
    description="L2-normalised CLIP image embeddings (NumPy) aligned with index.parquet (image_id, sha256, pHash, pixels).",
    profile="gpu",
)
def image_embeddings(context: dg.AssetExecutionContext, storage: StorageResource, embedder: EmbedderResource) -> dg.MaterializeResult:
    model = embedder.get()
    if model.random_weights:
        context.log.warning(
            f"CLIP weights unavailable: embedding with random weights ({model.model_id}); retrieval and similarity are not semantic"
        )
    per_shard = {shard: stats_metadata(stage.embed_images(storage.get(), shard, model)) for shard in context.partition_keys}
    return partition_results(context, layout.IMAGE_EMBEDDINGS, storage.get(), per_shard, metadata=_model_metadata(model))


@shard_asset(
    layout.SENTENCE_EMBEDDINGS,
    deps=[layout.FILTERED_SENTENCES],
    description="L2-normalised CLIP text embeddings aligned with index.parquet (sentence_id, exact and normalised text keys).",
    profile="gpu",
)
def sentence_embeddings(context: dg.AssetExecutionContext, storage: StorageResource, embedder: EmbedderResource) -> dg.MaterializeResult:
    model = embedder.get()
    per_shard = {shard: stats_metadata(stage.embed_sentences(storage.get(), shard, model)) for shard in context.partition_keys}
    return partition_results(context, layout.SENTENCE_EMBEDDINGS, storage.get(), per_shard, metadata=_model_metadata(model))
