"""The Dagster code location: `dagster dev -w workspace.yaml` loads `defs` from here."""

from __future__ import annotations

import os

import dagster as dg

from assets import ALL_ASSETS, ALL_CHECKS
from assets.jobs import JOBS_IN_ORDER
from resources import build_resources
from sensors import new_shards_sensor, realsyn_automation, run_failure_alert


def build_definitions(env: str | None = None, *, input_uri: str | None = None, storage_root: str | None = None, resource_overrides: dict | None = None) -> dg.Definitions:
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
