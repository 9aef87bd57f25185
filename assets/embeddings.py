"""Per-shard CLIP embeddings of the kept images and sentences (GPU steps in production)."""

import dagster as dg

from assets.execution import GPU_BACKFILL, GPU_POOL, GPU_STEP_TAGS
from assets.metadata import merged, stats_metadata
from assets.partitions import shard_partitions
from realsyn.stages import embed as stage
from resources import ClipEmbedderResource, StorageResource

def _model_metadata(embedder) -> dict:
    return {"model_id": embedder.model_id, "dim": embedder.dim, "random_weights": embedder.random_weights}

@dg.asset(deps=["filtered_images"], partitions_def=shard_partitions, group_name="embed", op_tags=GPU_STEP_TAGS, pool=GPU_POOL, backfill_policy=GPU_BACKFILL, description="L2-normalised CLIP image embeddings (NumPy) aligned with index.parquet (image_id, sha256, pHash, pixels).")
def image_embeddings(context: dg.AssetExecutionContext, storage: StorageResource, clip: ClipEmbedderResource) -> dg.MaterializeResult:
    embedder = clip.get()
    if embedder.random_weights:
        context.log.warning(f"CLIP weights unavailable: embedding with random weights ({embedder.model_id}); retrieval and similarity are not semantic")
    stats = [stage.embed_images(storage.get(), shard, embedder) for shard in context.partition_keys]
    return dg.MaterializeResult(metadata=stats_metadata(merged(stats), **_model_metadata(embedder), path=storage.get().uri(stage.IMAGE_EMBEDDINGS)))

@dg.asset(deps=["filtered_sentences"], partitions_def=shard_partitions, group_name="embed", op_tags=GPU_STEP_TAGS, pool=GPU_POOL, backfill_policy=GPU_BACKFILL, description="L2-normalised CLIP text embeddings aligned with index.parquet (sentence_id, exact and normalised text keys).")
def sentence_embeddings(context: dg.AssetExecutionContext, storage: StorageResource, clip: ClipEmbedderResource) -> dg.MaterializeResult:
    embedder = clip.get()
    stats = [stage.embed_sentences(storage.get(), shard, embedder) for shard in context.partition_keys]
    return dg.MaterializeResult(metadata=stats_metadata(merged(stats), **_model_metadata(embedder), path=storage.get().uri(stage.SENTENCE_EMBEDDINGS)))
