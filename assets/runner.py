"""Materialize the whole graph for every shard under an input location: what `realsyn run` does.

The jobs run in data-flow order against one Dagster instance (persistent when DAGSTER_HOME is set,
so the UI shows every materialization). A stage's shards all run before the next stage starts.

Only what is stale runs (``assets.versions``): a partition whose materialization is missing, whose
code version (algorithm + the knobs that change its output) changed, whose committed output is not
the one recorded, or whose inputs' versions changed since it ran. Per shard and per global job, the
runner selects the stale assets (and everything below them in the same job) and runs only those; a
job with nothing stale does not run. ``force=True`` (``realsyn run --force``) runs everything.

A bad shard fails only its partition: a shard whose per-shard job fails is left out of every later
job, and the global steps cover the good shards only. The runner tells them which shards to leave
out with the run tag ``realsyn/excluded_shards`` (a JSON list; ``assets.partitions.registered_shards``
reads it), so no resource config changes between runs. A failed global step stops the graph (nothing
after it can run). Failed asset checks are failures too. The report names every failed shard.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import yaml

from assets.jobs import JOBS_IN_ORDER, PARTITIONED_JOBS, SPLIT_JOBS
from assets.partitions import EXCLUDED_SHARDS_TAG, SHARDS
from assets.versions import VersionIndex, parents_of, stale_reason


@dataclass
class Failure:
    job: str
    shard: str | None
    asset: str
    message: str
    check: str | None = None  # the asset check that failed, when this is a failed check

    def __str__(self) -> str:
        where = f"shard {self.shard}" if self.shard else "all shards (global step)"
        if self.check:
            return f"asset check {self.check!r} of {self.asset!r} failed for {where} (job {self.job}): {self.message}"
        return f"asset {self.asset!r} failed for {where} (job {self.job}): {self.message}"


@dataclass
class RunReport:
    shards: list[str]
    runs: int = 0
    failures: list[Failure] = field(default_factory=list)
    failed_shards: dict[str, str] = field(default_factory=dict)  # shard -> the job it failed in (left out after it)
    stopped_at: str | None = None  # the job the graph stopped at (a global step failed, or no shard was left)
    ran: dict[str, list[str | None]] = field(default_factory=dict)  # asset -> partitions it ran for (None: global)
    fresh_runs: int = 0  # job runs skipped because every asset in them was fresh

    @property
    def success(self) -> bool:
        return not self.failures and self.stopped_at is None

    @property
    def good_shards(self) -> list[str]:
        """Shards every job ran for (what the global steps and the export cover)."""
        return [s for s in self.shards if s not in self.failed_shards]


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


class StalePlanner:
    """Which assets of a job must run for one partition: the stale ones and, in the same run, everything below them."""

    def __init__(self, defs: dg.Definitions, instance: dg.DagsterInstance, shard_uris: dict[str, str]):
        self.defs, self.graph = defs, defs.resolve_asset_graph()
        self.index = VersionIndex(instance)
        storage = defs.resources.get("storage")
        self.storage = storage.get() if storage is not None and hasattr(storage, "get") else None
        self.shard_uris = shard_uris

    def _source_uri(self, shard: str) -> str:
        return self.shard_uris[shard]

    def plan(self, job_def: dg.JobDefinition, partition: str | None, shards: list[str]) -> dict[str, str]:
        """asset -> why it runs, in topological order; empty when the job has nothing stale for this partition."""
        in_job = set(job_def.asset_layer.executable_asset_keys)
        order = [k for k in self.graph.toposorted_asset_keys if k in in_job]
        why: dict[str, str] = {}
        for key in order:
            name = key.to_user_string()
            parents = parents_of(self.graph, name)
            upstream = [p.key for p in parents if p.key in why]
            if upstream:
                why[name] = f"{upstream[0]} reruns"
                continue
            reason = stale_reason(
                self.index,
                self.storage,
                name,
                partition,
                self.graph.get(key).code_version,
                parents,
                shards=shards,
                source_uri=self._source_uri,
            )
            if reason:
                why[name] = reason
                for sibling in self.defs.resolve_assets_def(name).keys:  # a multi-asset (image_db + sentence_db) runs whole
                    why.setdefault(sibling.to_user_string(), f"runs with {name}")
        return why

    def ran(self, assets: list[str]) -> None:
        self.index.invalidate(assets)


def _failures(result: dg.ExecuteInProcessResult, job: str, shard: str | None) -> list[Failure]:
    from realsyn.redact import redact  # a failure message may quote a URL with credentials or a token

    out = []
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            err = event.event_specific_data.error
            message = (err.message.strip() if err else "unknown error").splitlines()[-1]
            if err and err.cause:
                message = err.cause.message.strip().splitlines()[-1]
            out.append(Failure(job, shard, event.step_key, redact(message)))
    return out or [Failure(job, shard, "?", "run failed before any step")]


def _check_failures(result: dg.ExecuteInProcessResult, job: str, shard: str | None) -> list[Failure]:
    """Every asset check of the run that did not pass (a non-blocking check does not fail its run)."""
    out = []
    for event in result.all_events:
        if event.event_type_value != "ASSET_CHECK_EVALUATION":
            continue
        evaluation = event.event_specific_data
        if evaluation.passed:
            continue
        meta = ", ".join(f"{k}={getattr(v, 'value', v)}" for k, v in sorted(evaluation.metadata.items()))
        out.append(
            Failure(job, shard, evaluation.asset_key.to_user_string(), f"did not pass ({meta or 'no metadata'})", evaluation.check_name)
        )
    return out


def _validate_step_configs(defs: dg.Definitions, configs: dict[str, Any], config_path: str | None) -> None:
    """Build every configured step's typed config before anything runs (split names, plug-in params, ...),
    so a bad config fails the command at once instead of the step hours later."""
    import inspect

    from pydantic import BaseModel, ValidationError

    for job in JOBS_IN_ORDER:
        for node in defs.resolve_job_def(job.name).graph.node_defs:
            if node.name not in configs:
                continue
            param = inspect.signature(node.compute_fn.decorated_fn).parameters.get("config")
            cls = param.annotation if param is not None else None
            if isinstance(cls, type) and issubclass(cls, BaseModel):
                try:
                    cls(**(configs[node.name] or {}))
                except ValidationError as e:
                    errors = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
                    raise ValueError(f"{config_path}: assets.{node.name}: {errors}") from e
                except (ValueError, TypeError) as e:
                    raise ValueError(f"{config_path}: assets.{node.name}: {e}") from e


def run_graph(
    input_uri: str,
    storage_root: str,
    *,
    config_path: str | None = None,
    env: str | None = None,
    instance: dg.DagsterInstance | None = None,
    log=print,
    log_level: str = "WARNING",
    force: bool = False,
) -> RunReport:
    from definitions import build_definitions

    # the definitions hold the run config (code versions, job defaults): the same YAML as the UI's REALSYN_CONFIG
    config_path = config_path or os.environ.get("REALSYN_CONFIG") or None
    cfg = load_run_config(config_path)
    with_config = {"asset_configs": cfg["assets"]} if config_path else {}
    try:
        defs = build_definitions(env, input_uri=input_uri, storage_root=storage_root, resource_overrides=cfg["resources"], **with_config)
    except ValueError as e:  # a step config that does not validate (its code version cannot be computed)
        raise ValueError(f"{config_path}: {e}" if config_path else str(e)) from e
    if instance is None:
        instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    source = defs.resources["shard_source"]
    shard_uris = source.list_shards()
    shards = sorted(shard_uris)
    known = set(instance.get_dynamic_partitions(SHARDS))
    new = [s for s in shards if s not in known]
    if new:
        instance.add_dynamic_partitions(SHARDS, new)
    log(f"{len(shards)} shards under {input_uri} ({len(new)} new); storage root {storage_root}")
    all_ops = {n.name for j in JOBS_IN_ORDER for n in defs.resolve_job_def(j.name).graph.node_defs}
    unknown = sorted(set(cfg["assets"]) - all_ops)
    if unknown:
        raise ValueError(f"{config_path}: no asset step named {unknown}; known: {sorted(all_ops)}")
    _validate_step_configs(defs, cfg["assets"], config_path)
    report = RunReport(shards=shards)
    planner = None if force else StalePlanner(defs, instance, shard_uris)
    for job in JOBS_IN_ORDER:
        job_def = defs.resolve_job_def(job.name)
        ops = {n.name for n in job_def.graph.node_defs}
        run_config = {
            "ops": {op: {"config": c} for op, c in cfg["assets"].items() if op in ops},
            "loggers": {"console": {"config": {"log_level": log_level}}},
        }
        if not report.good_shards:
            report.stopped_at = job.name
            log(f"  {job.name}: skipped, no shard left (every shard failed)")
            break
        tags = {EXCLUDED_SHARDS_TAG: json.dumps(sorted(report.failed_shards))} if report.failed_shards else {}
        if job.name in SPLIT_JOBS:  # once per published split (assets.evaluate registers them as partitions)
            from assets.evaluate import register_published_splits

            keys = register_published_splits(instance, defs.resources["storage"].get())
        else:
            keys = report.good_shards if job.name in PARTITIONED_JOBS else [None]
        global_failed = False
        for key in keys:
            where = f"{job.name}{' [' + key + ']' if key else ''}"
            all_assets = [k.to_user_string() for k in job_def.asset_layer.executable_asset_keys]
            why = {a: "forced" for a in all_assets} if planner is None else planner.plan(job_def, key, report.good_shards)
            if not why:
                report.fresh_runs += 1
                log(f"  {where}: fresh")
                continue
            selection = None if set(why) >= set(all_assets) else [dg.AssetKey(a) for a in why]
            log(f"  {where}: {'; '.join(f'{a} ({r})' for a, r in why.items())} ...")
            result = job_def.execute_in_process(
                run_config=run_config, instance=instance, partition_key=key, raise_on_error=False, tags=tags, asset_selection=selection
            )
            report.runs += 1
            for a in why:
                report.ran.setdefault(a, []).append(key)
            if planner is not None:
                planner.ran(list(why))
            if not result.success:
                report.failures.extend(_failures(result, job.name, key))
                if key is None:
                    global_failed = True
                elif job.name not in SPLIT_JOBS:  # a failed split evaluation fails that split only
                    report.failed_shards[key] = job.name
            report.failures.extend(_check_failures(result, job.name, key))
        if global_failed:
            report.stopped_at = job.name
            break
    return report
