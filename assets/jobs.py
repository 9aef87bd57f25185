"""The graph as four jobs, in the order the data flows: per shard, global, per shard, global."""

import dagster as dg

from assets.partitions import shard_partitions

PREPARE_SHARDS = ["image_db", "sentence_db", "filtered_images", "sentence_candidates", "sentence_perplexity", "filtered_sentences", "image_embeddings", "sentence_embeddings"]
DEDUP_AND_CLUSTER = ["image_dedup", "sentence_dedup", "sentence_clusters"]
CAPTION_SHARDS = ["retrievals", "synthetic_captions", "filtered_pairs"]
SAMPLE_AND_EXPORT = ["image_clusters", "sampled_splits", "exported_splits"]

prepare_shards_job = dg.define_asset_job("prepare_shards", selection=dg.AssetSelection.assets(*PREPARE_SHARDS), partitions_def=shard_partitions, description="Per shard: image/sentence DBs, filters, perplexity, CLIP embeddings.")
dedup_and_cluster_job = dg.define_asset_job("dedup_and_cluster", selection=dg.AssetSelection.assets(*DEDUP_AND_CLUSTER), description="Global: image and sentence dedup, sentence K-means and bank.")
caption_shards_job = dg.define_asset_job("caption_shards", selection=dg.AssetSelection.assets(*CAPTION_SHARDS), partitions_def=shard_partitions, description="Per shard: hierarchical retrieval, LLM fusion captions, similarity band.")
sample_and_export_job = dg.define_asset_job("sample_and_export", selection=dg.AssetSelection.assets(*SAMPLE_AND_EXPORT), description="Global: image K-means, balanced splits, WebDataset/Parquet export.")

JOBS_IN_ORDER = [prepare_shards_job, dedup_and_cluster_job, caption_shards_job, sample_and_export_job]
PARTITIONED_JOBS = {prepare_shards_job.name, caption_shards_job.name}
