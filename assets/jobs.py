"""The graph as six jobs, in the order the data flows: per shard, global, per shard, global, per shard, global."""

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
    description="Global: image and sentence dedup, sentence K-means and bank, the cluster-ordered retrieval pass.",
)
caption_shards_job = dg.define_asset_job(
    "caption_shards",
    selection=dg.AssetSelection.assets(*layout.CAPTION_SHARDS),
    partitions_def=shard_partitions,
    description="Per shard: LLM fusion captions, similarity band.",
)
sample_splits_job = dg.define_asset_job(
    "sample_splits",
    selection=dg.AssetSelection.assets(*layout.SAMPLE_SPLITS),
    description="Global: image K-means, balanced splits.",
)
export_shards_job = dg.define_asset_job(
    "export_shards",
    selection=dg.AssetSelection.assets(*layout.EXPORT_SHARDS),
    partitions_def=shard_partitions,
    description="Per shard: every split's WebDataset tars, sizes.json and Parquet, in one pass over the shard's images.",
)
publish_export_job = dg.define_asset_job(
    "publish_export",
    selection=dg.AssetSelection.assets(*layout.PUBLISH_EXPORT),
    description="Global: one folder per split (the per-shard tars copied in, sizes.json, train_data.txt) that open_clip trains from.",
)

JOBS_IN_ORDER = [prepare_shards_job, dedup_and_cluster_job, caption_shards_job, sample_splits_job, export_shards_job, publish_export_job]
PARTITIONED_JOBS = {prepare_shards_job.name, caption_shards_job.name, export_shards_job.name}
