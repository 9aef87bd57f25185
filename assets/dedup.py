"""Global dedup and sentence clustering: read every shard's compact outputs, write per-shard decisions."""

import dagster as dg

from assets.configs import ImageDedupConfig, SentenceClustersConfig, SentenceDedupConfig
from assets.execution import NIGHTLY_REBUILD, GLOBAL_STEP_TAGS
from assets.metadata import stats_metadata
from assets.partitions import SHARDS
from realsyn.stages import dedup as dedup_stage
from realsyn.stages import retrieve as retrieve_stage
from resources import ShardSourceResource, StorageResource

ALL_SHARDS = dg.AllPartitionMapping()

def registered_shards(context: dg.AssetExecutionContext, shard_source: ShardSourceResource) -> list[str]:
    """The dataset a global step covers: registered partitions whose shard is under this input location."""
    registered = set(context.instance.get_dynamic_partitions(SHARDS))
    listed = set(shard_source.list_shards())
    if registered - listed:
        context.log.info(f"{len(registered - listed)} registered shards are not under {shard_source.input_uri}; left out")
    return sorted(registered & listed)

@dg.asset(automation_condition=NIGHTLY_REBUILD, deps=[dg.AssetDep("image_embeddings", partition_mapping=ALL_SHARDS)], group_name="dedup", op_tags=GLOBAL_STEP_TAGS, description="Per shard: which images survive exact, perceptual (pHash) and semantic (CLIP) dedup; one representative per Union-Find component.")
def image_dedup(context: dg.AssetExecutionContext, config: ImageDedupConfig, storage: StorageResource, shard_source: ShardSourceResource) -> dg.MaterializeResult:
    stats = dedup_stage.dedup_images(storage.get(), registered_shards(context, shard_source), **config.model_dump())
    return dg.MaterializeResult(metadata=stats_metadata(stats, path=storage.get().uri(dedup_stage.IMAGE_DEDUP)))

@dg.asset(automation_condition=NIGHTLY_REBUILD, deps=[dg.AssetDep("sentence_embeddings", partition_mapping=ALL_SHARDS)], group_name="dedup", op_tags=GLOBAL_STEP_TAGS, description="Per shard: which sentences survive exact, normalised-text and semantic dedup.")
def sentence_dedup(context: dg.AssetExecutionContext, config: SentenceDedupConfig, storage: StorageResource, shard_source: ShardSourceResource) -> dg.MaterializeResult:
    stats = dedup_stage.dedup_sentences(storage.get(), registered_shards(context, shard_source), **config.model_dump())
    return dg.MaterializeResult(metadata=stats_metadata(stats, path=storage.get().uri(dedup_stage.SENTENCE_DEDUP)))

@dg.asset(automation_condition=NIGHTLY_REBUILD, deps=["sentence_dedup", dg.AssetDep("sentence_embeddings", partition_mapping=ALL_SHARDS)], group_name="retrieval", op_tags=GLOBAL_STEP_TAGS, description="Sentence K-means (faiss, trained on a sample): centroids, every sentence's cluster, and the sentence bank laid out cluster by cluster.")
def sentence_clusters(context: dg.AssetExecutionContext, config: SentenceClustersConfig, storage: StorageResource, shard_source: ShardSourceResource) -> dg.MaterializeResult:
    stats = retrieve_stage.cluster_sentences(storage.get(), registered_shards(context, shard_source), **config.model_dump())
    return dg.MaterializeResult(metadata=stats_metadata(stats, path=storage.get().uri(retrieve_stage.SENTENCE_CLUSTERS)))
