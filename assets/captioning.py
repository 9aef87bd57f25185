"""Per-shard retrieval, generation and similarity filtering (depend on the global clusters and dedup)."""

import dagster as dg

from assets.configs import GenerationConfig, RetrievalConfig, SimilarityBandConfig
from assets.execution import NIGHTLY_REBUILD, GPU_BACKFILL, GPU_POOL, GPU_STEP_TAGS
from assets.metadata import merged, stats_metadata
from assets.partitions import shard_partitions
from realsyn.stages import generate as gen_stage
from realsyn.stages import retrieve as retrieve_stage
from resources import ClipEmbedderResource, GenerationBackendResource, StorageResource

@dg.asset(automation_condition=NIGHTLY_REBUILD, deps=["image_embeddings", "image_dedup", "sentence_clusters"], partitions_def=shard_partitions, group_name="retrieval", op_tags=GPU_STEP_TAGS, pool=GPU_POOL, backfill_policy=GPU_BACKFILL, description="Hierarchical retrieval: for each kept image, nearest sentence centroids, then search inside those clusters; top-k real sentences with scores.")
def retrievals(context: dg.AssetExecutionContext, config: RetrievalConfig, storage: StorageResource) -> dg.MaterializeResult:
    stats = [retrieve_stage.retrieve_for_shard(storage.get(), shard, k=config.k, n_probe=config.n_probe) for shard in context.partition_keys]
    return dg.MaterializeResult(metadata=stats_metadata(merged(stats), k=config.k, n_probe=config.n_probe, path=storage.get().uri(retrieve_stage.RETRIEVALS)))

@dg.asset(automation_condition=NIGHTLY_REBUILD, deps=["retrievals"], partitions_def=shard_partitions, group_name="generation", op_tags=GPU_STEP_TAGS, pool=GPU_POOL, backfill_policy=GPU_BACKFILL, description="One synthetic caption per image: an LLM fuses the retrieved real texts and the image's tags. Cached by (image, prompt) so reruns never regenerate.")
def synthetic_captions(context: dg.AssetExecutionContext, config: GenerationConfig, storage: StorageResource, generator: GenerationBackendResource, clip: ClipEmbedderResource) -> dg.MaterializeResult:
    backend = generator.get()
    tagger, embedder = None, None
    if config.use_tags:
        from realsyn.plugins import create_plugin

        tagger, embedder = create_plugin("tagger", "clip_vocabulary", top_k=config.tag_top_k), clip.get()
    stats = [
        gen_stage.generate_captions(storage.get(), shard, backend, instruction=config.instruction, max_new_tokens=config.max_new_tokens, temperature=config.temperature, batch_size=config.batch_size, tagger=tagger, embedder=embedder)
        for shard in context.partition_keys
    ]
    return dg.MaterializeResult(metadata=stats_metadata(merged(stats), backend=generator.backend, model=backend.model_id, path=storage.get().uri(gen_stage.SYNTHETIC_CAPTIONS)))

@dg.asset(automation_condition=NIGHTLY_REBUILD, deps=["synthetic_captions", "image_embeddings"], partitions_def=shard_partitions, group_name="generation", op_tags=GPU_STEP_TAGS, pool=GPU_POOL, backfill_policy=GPU_BACKFILL, description="Image vs synthetic-caption cosine; pairs outside the band dropped (EVA02-CLIP E/14-plus: 0.51..0.61).")
def filtered_pairs(context: dg.AssetExecutionContext, config: SimilarityBandConfig, storage: StorageResource, clip: ClipEmbedderResource) -> dg.MaterializeResult:
    embedder = clip.get()
    stats = [gen_stage.filter_pairs(storage.get(), shard, embedder, low=config.low, high=config.high) for shard in context.partition_keys]
    return dg.MaterializeResult(metadata=stats_metadata(merged(stats), path=storage.get().uri(gen_stage.FILTERED_PAIRS)))
