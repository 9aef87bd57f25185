"""The Dagster code location: `dagster dev -w workspace.yaml` loads `defs` from here."""

from __future__ import annotations

import os

import dagster as dg

from assets import caption, checks, cluster, dedup, embed, evaluate, export, filter, ingest, retrieve, sample
from assets.configs import set_deployment_asset_configs
from assets.jobs import build_jobs
from assets.versions import code_versions, with_code_versions
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
    evaluate.evaluations,
]
ALL_CHECKS = [checks.sentence_clusters_are_usable, checks.sampled_splits_respect_caps, checks.exported_splits_match_sizes]


def build_definitions(
    env: str | None = None,
    *,
    input_uri: str | None = None,
    storage_root: str | None = None,
    resource_overrides: dict | None = None,
    asset_configs: dict | None = None,
) -> dg.Definitions:
    """The code location. Its run config (``asset_configs``, ``resource_overrides``) is part of it: each
    asset's code version hashes the knobs that change its output, and each job carries them as default
    config. Given neither, they come from the YAML named by ``REALSYN_CONFIG`` (as `realsyn run --config`)."""
    env = env or os.environ.get("REALSYN_ENV", "local")
    if asset_configs is None and resource_overrides is None and os.environ.get("REALSYN_CONFIG"):
        from assets.runner import load_run_config

        cfg = load_run_config(os.environ["REALSYN_CONFIG"])
        asset_configs, resource_overrides = cfg["assets"], cfg["resources"]
    resources = build_resources(env, input_uri=input_uri, storage_root=storage_root, overrides=resource_overrides)
    set_deployment_asset_configs(asset_configs)  # runs launched without run config use these knobs too
    versions = code_versions(ALL_ASSETS, asset_configs or {}, resources)
    executor = None
    if env == "production":
        from dagster_k8s import k8s_job_executor

        executor = k8s_job_executor  # one pod per step; GPU profiles come from op_tags
    return dg.Definitions(
        assets=with_code_versions(ALL_ASSETS, versions),
        asset_checks=ALL_CHECKS,
        jobs=build_jobs(asset_configs),
        sensors=[new_shards_sensor, realsyn_automation, run_failure_alert, evaluate.published_splits_sensor],
        resources=resources,
        executor=executor,
    )


defs = build_definitions()
