"""Cluster stage: global sentence K-means (with the cluster-ordered bank) and image K-means of the kept pairs."""

import dagster as dg

from assets.configs import ImageClustersConfig, SentenceClustersConfig
from assets.execution import GLOBAL_STEP_TAGS, NIGHTLY_REBUILD
from assets.metadata import stats_metadata
from assets.partitions import ALL_SHARDS, registered_shards
from realsyn import layout
from realsyn.stages import cluster as stage
from resources import ShardSourceResource, StorageResource


@dg.asset(
    automation_condition=NIGHTLY_REBUILD,
    deps=[layout.SENTENCE_DEDUP, dg.AssetDep(layout.SENTENCE_EMBEDDINGS, partition_mapping=ALL_SHARDS)],
    group_name=layout.CLUSTER,
    op_tags=GLOBAL_STEP_TAGS,
    description="Sentence K-means (faiss, trained on a bounded sample): centroids, every sentence's cluster, and the sentence bank laid out cluster by cluster (external sort into parts of bank_part_rows).",
)
def sentence_clusters(
    context: dg.AssetExecutionContext, config: SentenceClustersConfig, storage: StorageResource, shard_source: ShardSourceResource
) -> dg.MaterializeResult:
    stats = stage.cluster_sentences(storage.get(), registered_shards(context, shard_source), **config.model_dump())
    return dg.MaterializeResult(metadata=stats_metadata(stats, path=storage.get().uri(layout.SENTENCE_CLUSTERS)))


@dg.asset(
    automation_condition=NIGHTLY_REBUILD,
    deps=[
        dg.AssetDep(layout.FILTERED_PAIRS, partition_mapping=ALL_SHARDS),
        dg.AssetDep(layout.IMAGE_EMBEDDINGS, partition_mapping=ALL_SHARDS),
    ],
    group_name=layout.CLUSTER,
    op_tags=GLOBAL_STEP_TAGS,
    description="K-means of the kept pairs' image embeddings (trained on a bounded sample): centroids, per-shard assignments, cluster sizes.",
)
def image_clusters(
    context: dg.AssetExecutionContext, config: ImageClustersConfig, storage: StorageResource, shard_source: ShardSourceResource
) -> dg.MaterializeResult:
    stats = stage.cluster_images(storage.get(), registered_shards(context, shard_source), **config.model_dump())
    return dg.MaterializeResult(metadata=stats_metadata(stats, path=storage.get().uri(layout.IMAGE_CLUSTERS)))
