"""Materialize the whole graph for every shard under an input location: what `realsyn run` does.

The four jobs run in data-flow order against one Dagster instance (persistent when DAGSTER_HOME is
set, so the UI shows every materialization). A stage's shards all run before the next stage starts;
a failure stops the graph after that stage and names the failing asset and shard.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import yaml

from assets.jobs import JOBS_IN_ORDER, PARTITIONED_JOBS
from assets.partitions import SHARDS


@dataclass
class Failure:
    job: str
    shard: str | None
    asset: str
    message: str

    def __str__(self) -> str:
        where = f"shard {self.shard}" if self.shard else "all shards (global step)"
        return f"asset {self.asset!r} failed for {where} (job {self.job}): {self.message}"


@dataclass
class RunReport:
    shards: list[str]
    runs: int = 0
    failures: list[Failure] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return not self.failures


def load_run_config(path: str | None) -> dict[str, Any]:
    """YAML with optional `assets:` (op name -> config) and `resources:` (resource name -> fields)."""
    if not path:
        return {"assets": {}, "resources": {}}
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    unknown = set(raw) - {"assets", "resources"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}; use 'assets' and 'resources'")
    return {"assets": raw.get("assets") or {}, "resources": raw.get("resources") or {}}


def _failures(result: dg.ExecuteInProcessResult, job: str, shard: str | None) -> list[Failure]:
    out = []
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            err = event.event_specific_data.error
            message = (err.message.strip() if err else "unknown error").splitlines()[-1]
            if err and err.cause:
                message = err.cause.message.strip().splitlines()[-1]
            out.append(Failure(job, shard, event.step_key, message))
    return out or [Failure(job, shard, "?", "run failed before any step")]


def run_graph(
    input_uri: str,
    storage_root: str,
    *,
    config_path: str | None = None,
    env: str | None = None,
    instance: dg.DagsterInstance | None = None,
    log=print,
    log_level: str = "WARNING",
) -> RunReport:
    from definitions import build_definitions

    cfg = load_run_config(config_path)
    defs = build_definitions(env, input_uri=input_uri, storage_root=storage_root, resource_overrides=cfg["resources"])
    if instance is None:
        instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    source = defs.resources["shard_source"]
    shards = sorted(source.list_shards())
    known = set(instance.get_dynamic_partitions(SHARDS))
    new = [s for s in shards if s not in known]
    if new:
        instance.add_dynamic_partitions(SHARDS, new)
    log(f"{len(shards)} shards under {input_uri} ({len(new)} new); storage root {storage_root}")
    all_ops = {n.name for j in JOBS_IN_ORDER for n in defs.resolve_job_def(j.name).graph.node_defs}
    unknown = sorted(set(cfg["assets"]) - all_ops)
    if unknown:
        raise ValueError(f"{config_path}: no asset step named {unknown}; known: {sorted(all_ops)}")
    report = RunReport(shards=shards)
    for job in JOBS_IN_ORDER:
        job_def = defs.resolve_job_def(job.name)
        ops = {n.name for n in job_def.graph.node_defs}
        run_config = {
            "ops": {op: {"config": c} for op, c in cfg["assets"].items() if op in ops},
            "loggers": {"console": {"config": {"log_level": log_level}}},
        }
        keys = shards if job.name in PARTITIONED_JOBS else [None]
        for key in keys:
            log(f"  {job.name}{' [' + key + ']' if key else ''} ...")
            result = job_def.execute_in_process(run_config=run_config, instance=instance, partition_key=key, raise_on_error=False)
            report.runs += 1
            if not result.success:
                report.failures.extend(_failures(result, job.name, key))
        if report.failures:
            break
    return report
