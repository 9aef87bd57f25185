"""Cluster stage: global sentence K-means (with the cluster-ordered bank) and image K-means of the kept pairs."""

import dagster as dg

from assets.configs import ImageClustersConfig, SentenceClustersConfig, effective_config
from assets.execution import NIGHTLY_GLOBAL_REBUILD
from assets.metadata import global_result, stats_metadata
from assets.partitions import ALL_SHARDS, registered_shards
from assets.profiles import step_options
from realsyn import layout
from realsyn.stages import cluster as stage
from resources import ShardSourceResource, StorageResource


@dg.asset(
    automation_condition=NIGHTLY_GLOBAL_REBUILD,
    deps=[layout.SENTENCE_DEDUP, dg.AssetDep(layout.SENTENCE_EMBEDDINGS, partition_mapping=ALL_SHARDS)],
    group_name=layout.CLUSTER,
    **step_options(layout.SENTENCE_CLUSTERS, "gpu-bigmem"),
    description="Sentence K-means (faiss, trained on a bounded sample): centroids, every sentence's cluster, and the sentence bank laid out cluster by cluster (external sort into parts of bank_part_rows).",
)
def sentence_clusters(
    context: dg.AssetExecutionContext, config: SentenceClustersConfig, storage: StorageResource, shard_source: ShardSourceResource
) -> dg.MaterializeResult:
    config = effective_config(context, config)
    shards = registered_shards(context, shard_source)
    stats = stage.cluster_sentences(storage.get(), shards, **config.model_dump())
    return global_result(context, layout.SENTENCE_CLUSTERS, storage.get(), stats_metadata(stats), shards=shards)


@dg.asset(
    automation_condition=NIGHTLY_GLOBAL_REBUILD,
    deps=[
        dg.AssetDep(layout.FILTERED_PAIRS, partition_mapping=ALL_SHARDS),
        dg.AssetDep(layout.IMAGE_EMBEDDINGS, partition_mapping=ALL_SHARDS),
    ],
    group_name=layout.CLUSTER,
    **step_options(layout.IMAGE_CLUSTERS, "gpu-bigmem"),
    description="K-means of the kept pairs' image embeddings (trained on a bounded sample): centroids, per-shard assignments, cluster sizes.",
)
def image_clusters(
    context: dg.AssetExecutionContext, config: ImageClustersConfig, storage: StorageResource, shard_source: ShardSourceResource
) -> dg.MaterializeResult:
    config = effective_config(context, config)
    shards = registered_shards(context, shard_source)
    stats = stage.cluster_images(storage.get(), shards, **config.model_dump())
    return global_result(context, layout.IMAGE_CLUSTERS, storage.get(), stats_metadata(stats), shards=shards)
