"""The graph as four jobs, in the order the data flows: per shard, global, per shard, global."""

import dagster as dg

from assets.partitions import shard_partitions
from realsyn import layout

prepare_shards_job = dg.define_asset_job(
    "prepare_shards",
    selection=dg.AssetSelection.assets(*layout.PREPARE_SHARDS),
    partitions_def=shard_partitions,
    description="Per shard: image/sentence DBs, filters, perplexity, CLIP embeddings.",
)
dedup_and_cluster_job = dg.define_asset_job(
    "dedup_and_cluster",
    selection=dg.AssetSelection.assets(*layout.DEDUP_AND_CLUSTER),
    description="Global: image and sentence dedup, sentence K-means and bank.",
)
caption_shards_job = dg.define_asset_job(
    "caption_shards",
    selection=dg.AssetSelection.assets(*layout.CAPTION_SHARDS),
    partitions_def=shard_partitions,
    description="Per shard: hierarchical retrieval, LLM fusion captions, similarity band.",
)
sample_and_export_job = dg.define_asset_job(
    "sample_and_export",
    selection=dg.AssetSelection.assets(*layout.SAMPLE_AND_EXPORT),
    description="Global: image K-means, balanced splits, WebDataset/Parquet export.",
)

JOBS_IN_ORDER = [prepare_shards_job, dedup_and_cluster_job, caption_shards_job, sample_and_export_job]
PARTITIONED_JOBS = {prepare_shards_job.name, caption_shards_job.name}
