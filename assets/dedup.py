"""Dedup stage: global image and sentence dedup over every shard's compact outputs; per-shard decisions."""

import dagster as dg

from assets.configs import ImageDedupConfig, SentenceDedupConfig, effective_config
from assets.execution import global_asset
from assets.metadata import global_result, stats_metadata
from assets.partitions import ALL_SHARDS, registered_shards
from realsyn import layout
from realsyn.stages import dedup as stage
from resources import ShardSourceResource, StorageResource


@global_asset(
    layout.IMAGE_DEDUP,
    profile="gpu-bigmem",
    deps=[dg.AssetDep(layout.IMAGE_EMBEDDINGS, partition_mapping=ALL_SHARDS)],
    description="Per shard: which images survive exact, perceptual (pHash) and semantic (CLIP) dedup; one representative per Union-Find component (decisions/{shard}.parquet).",
)
def image_dedup(
    context: dg.AssetExecutionContext, config: ImageDedupConfig, storage: StorageResource, shard_source: ShardSourceResource
) -> dg.MaterializeResult:
    config = effective_config(context, config)
    shards = registered_shards(context, shard_source)
    stats = stage.dedup_images(storage.get(), shards, **config.model_dump())
    return global_result(context, layout.IMAGE_DEDUP, storage.get(), stats_metadata(stats), shards=shards)


@global_asset(
    layout.SENTENCE_DEDUP,
    profile="gpu-bigmem",
    deps=[dg.AssetDep(layout.SENTENCE_EMBEDDINGS, partition_mapping=ALL_SHARDS)],
    description="Per shard: which sentences survive exact, normalised-text and semantic dedup (decisions/{shard}.parquet).",
)
def sentence_dedup(
    context: dg.AssetExecutionContext, config: SentenceDedupConfig, storage: StorageResource, shard_source: ShardSourceResource
) -> dg.MaterializeResult:
    config = effective_config(context, config)
    shards = registered_shards(context, shard_source)
    stats = stage.dedup_sentences(storage.get(), shards, **config.model_dump())
    return global_result(context, layout.SENTENCE_DEDUP, storage.get(), stats_metadata(stats), shards=shards)
