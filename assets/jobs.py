"""The graph as six jobs, in the order the data flows: per shard, global, per shard, global, per shard, global."""

import dagster as dg

from assets.evaluate import split_partitions
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


def build_jobs(asset_configs: dict | None = None) -> list:
    """The six jobs; ``asset_configs`` (op name -> config, the `assets:` of a run config) is each job's default
    config, so a run launched from the UI uses the same knobs the code versions were computed from."""
    from assets.versions import CONFIG_OP

    jobs = []
    for name, assets, per_shard, description in _JOB_TABLE:
        ops = {CONFIG_OP.get(a, a) for a in assets}
        config = {"ops": {op: {"config": c} for op, c in (asset_configs or {}).items() if op in ops}}
        jobs.append(
            dg.define_asset_job(
                name,
                selection=dg.AssetSelection.assets(*assets),
                partitions_def=shard_partitions if per_shard else None,
                description=description,
                config=config if config["ops"] else None,
            )
        )
    # then per split (partitions: the published splits): a small model trained and scored on each
    config = {"ops": {op: {"config": c} for op, c in (asset_configs or {}).items() if op in layout.EVALUATE_SPLITS}}
    jobs.append(
        dg.define_asset_job(
            "evaluate_splits",
            selection=dg.AssetSelection.assets(*layout.EVALUATE_SPLITS),
            partitions_def=split_partitions,
            description="Per split: a small model trained with CLIP, SigLIP and SuperClass objectives, scored zero-shot and by retrieval.",
            config=config if config["ops"] else None,
        )
    )
    return jobs


JOBS_IN_ORDER = build_jobs()
JOBS = {job.name: job for job in JOBS_IN_ORDER}
PARTITIONED_JOBS = {name for name, _, per_shard, _ in _JOB_TABLE if per_shard}
SPLIT_JOBS = {"evaluate_splits"}  # `realsyn run` registers the published splits and runs these once per split
