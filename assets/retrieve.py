"""Retrieve stage: one global pass, the top-k real sentences of every kept image of every shard from the sentence bank."""

import dagster as dg

from assets.configs import RetrievalConfig, effective_config
from assets.execution import global_asset
from assets.metadata import global_result, stats_metadata
from assets.partitions import ALL_SHARDS, registered_shards
from realsyn import layout
from realsyn.stages import retrieve as stage
from resources import ShardSourceResource, StorageResource


@global_asset(
    layout.RETRIEVALS,
    profile="gpu-bigmem",  # faiss on the GPU; a deployment without one picks cpu-bigmem in step_profiles
    deps=[dg.AssetDep(layout.IMAGE_EMBEDDINGS, partition_mapping=ALL_SHARDS), layout.IMAGE_DEDUP, layout.SENTENCE_CLUSTERS],
    description="Hierarchical retrieval in one pass: every kept image assigned to its nearest sentence centroids, the bank streamed once in cluster order (one product per cluster); top-k real sentences with scores per image (shards/{shard}.parquet).",
)
def retrievals(
    context: dg.AssetExecutionContext, config: RetrievalConfig, storage: StorageResource, shard_source: ShardSourceResource
) -> dg.MaterializeResult:
    config = effective_config(context, config)
    shards = registered_shards(context, shard_source)
    stats = stage.retrieve_all(storage.get(), shards, **config.model_dump())
    meta = stats_metadata(stats, k=config.k, n_probe=config.n_probe, threads=config.threads)
    return global_result(context, layout.RETRIEVALS, storage.get(), meta, shards=shards)
