"""The Dagster code location: `dagster dev -w workspace.yaml` loads `defs` from here."""

from __future__ import annotations

import os

import dagster as dg

from assets import caption, checks, cluster, dedup, embed, export, filter, ingest, retrieve, sample
from assets.jobs import JOBS_IN_ORDER
from resources import build_resources
from sensors import new_shards_sensor, realsyn_automation, run_failure_alert

# in data-flow order, one module per stage
ALL_ASSETS = [
    ingest.source_documents,
    ingest.document_databases,
    filter.filtered_images,
    filter.sentence_candidates,
    filter.sentence_perplexity,
    filter.filtered_sentences,
    embed.image_embeddings,
    embed.sentence_embeddings,
    dedup.image_dedup,
    dedup.sentence_dedup,
    cluster.sentence_clusters,
    cluster.image_clusters,
    retrieve.retrievals,
    caption.synthetic_captions,
    caption.filtered_pairs,
    sample.sampled_splits,
    export.exported_shards,
    export.exported_splits,
]
ALL_CHECKS = [checks.sentence_clusters_are_usable, checks.sampled_splits_respect_caps, checks.exported_splits_match_sizes]


def build_definitions(
    env: str | None = None, *, input_uri: str | None = None, storage_root: str | None = None, resource_overrides: dict | None = None
) -> dg.Definitions:
    env = env or os.environ.get("REALSYN_ENV", "local")
    executor = None
    if env == "production":
        from dagster_k8s import k8s_job_executor

        executor = k8s_job_executor  # one pod per step; GPU profiles come from op_tags
    return dg.Definitions(
        assets=ALL_ASSETS,
        asset_checks=ALL_CHECKS,
        jobs=JOBS_IN_ORDER,
        sensors=[new_shards_sensor, realsyn_automation, run_failure_alert],
        resources=build_resources(env, input_uri=input_uri, storage_root=storage_root, overrides=resource_overrides),
        executor=executor,
    )


defs = build_definitions()
