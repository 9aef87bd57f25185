"""The graph as six jobs, in the order the data flows: per shard, global, per shard, global, per shard, global."""

import dagster as dg

from assets.partitions import shard_partitions
from realsyn import layout

# (name, assets (realsyn.layout), runs per shard, description)
_JOB_TABLE = [
    ("prepare_shards", layout.PREPARE_SHARDS, True, "Per shard: image/sentence DBs, filters, perplexity, CLIP embeddings."),
    (
        "dedup_and_cluster",
        layout.DEDUP_AND_CLUSTER,
        False,
        "Global: image and sentence dedup, sentence K-means and bank, the cluster-ordered retrieval pass.",
    ),
    ("caption_shards", layout.CAPTION_SHARDS, True, "Per shard: LLM fusion captions, similarity band."),
    ("sample_splits", layout.SAMPLE_SPLITS, False, "Global: image K-means, balanced splits."),
    (
        "export_shards",
        layout.EXPORT_SHARDS,
        True,
        "Per shard: every split's WebDataset tars, sizes.json and Parquet, in one pass over the shard's images.",
    ),
    (
        "publish_export",
        layout.PUBLISH_EXPORT,
        False,
        "Global: one folder per split (the per-shard tars copied in, sizes.json, train_data.txt) that open_clip trains from.",
    ),
]

JOBS_IN_ORDER = [
    dg.define_asset_job(
        name,
        selection=dg.AssetSelection.assets(*assets),
        partitions_def=shard_partitions if per_shard else None,
        description=description,
    )
    for name, assets, per_shard, description in _JOB_TABLE
]
JOBS = {job.name: job for job in JOBS_IN_ORDER}
PARTITIONED_JOBS = {name for name, _, per_shard, _ in _JOB_TABLE if per_shard}
