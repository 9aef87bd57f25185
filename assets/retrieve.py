"""Retrieve stage: per shard, the top-k real sentences of each kept image from the global sentence bank."""

import dagster as dg

from assets.configs import RetrievalConfig
from assets.execution import GPU_BACKFILL, GPU_POOL, GPU_STEP_TAGS, NIGHTLY_REBUILD
from assets.metadata import merged, stats_metadata
from assets.partitions import shard_partitions
from realsyn import layout
from realsyn.stages import retrieve as stage
from resources import StorageResource


@dg.asset(
    automation_condition=NIGHTLY_REBUILD,
    deps=[layout.IMAGE_EMBEDDINGS, layout.IMAGE_DEDUP, layout.SENTENCE_CLUSTERS],
    partitions_def=shard_partitions,
    group_name=layout.RETRIEVE,
    op_tags=GPU_STEP_TAGS,
    pool=GPU_POOL,
    backfill_policy=GPU_BACKFILL,
    description="Hierarchical retrieval: for each kept image, nearest sentence centroids, then search inside those clusters; top-k real sentences with scores.",
)
def retrievals(context: dg.AssetExecutionContext, config: RetrievalConfig, storage: StorageResource) -> dg.MaterializeResult:
    stats = [stage.retrieve_for_shard(storage.get(), shard, k=config.k, n_probe=config.n_probe) for shard in context.partition_keys]
    return dg.MaterializeResult(
        metadata=stats_metadata(merged(stats), k=config.k, n_probe=config.n_probe, path=storage.get().uri(layout.RETRIEVALS))
    )
