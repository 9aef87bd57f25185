"""Retrieve stage: one global pass, the top-k real sentences of every kept image of every shard from the sentence bank."""

import dagster as dg

from assets.configs import RetrievalConfig
from assets.execution import global_asset
from assets.metadata import stats_metadata
from assets.partitions import ALL_SHARDS, registered_shards
from realsyn import layout
from realsyn.stages import retrieve as stage
from resources import ShardSourceResource, StorageResource


@global_asset(
    layout.RETRIEVALS,
    deps=[dg.AssetDep(layout.IMAGE_EMBEDDINGS, partition_mapping=ALL_SHARDS), layout.IMAGE_DEDUP, layout.SENTENCE_CLUSTERS],
    description="Hierarchical retrieval in one pass: every kept image assigned to its nearest sentence centroids, the bank streamed once in cluster order (one product per cluster); top-k real sentences with scores per image (shards/{shard}.parquet).",
)
def retrievals(
    context: dg.AssetExecutionContext, config: RetrievalConfig, storage: StorageResource, shard_source: ShardSourceResource
) -> dg.MaterializeResult:
    stats = stage.retrieve_all(storage.get(), registered_shards(context, shard_source), **config.model_dump())
    return dg.MaterializeResult(
        metadata=stats_metadata(
            stats, k=config.k, n_probe=config.n_probe, threads=config.threads, path=storage.get().uri(layout.RETRIEVALS)
        )
    )
