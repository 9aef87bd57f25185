"""Sensors: register new input shards and backfill them; the nightly rebuild; report failed runs."""

import json
import os

import dagster as dg
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset  # what RunRequest.for_asset_graph_subset takes

from assets.execution import REBUILD_CRON
from assets.partitions import SHARDS, shard_partitions
from realsyn import layout
from resources import ShardSourceResource

NEW_SHARDS_TAG = "realsyn/new_shards"


PREPARE_SELECTION = dg.AssetSelection.assets(*layout.PREPARE_SHARDS)


def prepare_backfill(shards: list[str]) -> dg.RunRequest:
    """One backfill of the prepare_shards assets over ``shards``; their backfill policy cuts it into runs
    of ``REALSYN_SHARDS_PER_RUN`` shards each (one bad shard fails only its run)."""
    subset = shard_partitions.empty_subset().with_partition_keys(shards)
    graph_subset = AssetGraphSubset(partitions_subsets_by_asset_key={dg.AssetKey(k): subset for k in layout.PREPARE_SHARDS})
    return dg.RunRequest.for_asset_graph_subset(graph_subset, tags={NEW_SHARDS_TAG: str(len(shards))})


@dg.sensor(
    asset_selection=PREPARE_SELECTION,
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Lists the input location (local or S3); new shards become partitions and one backfill of the prepare_shards assets over them.",
)
def new_shards_sensor(context: dg.SensorEvaluationContext, shard_source: ShardSourceResource) -> dg.SensorResult:
    listed = shard_source.list_shards()
    known = set(context.instance.get_dynamic_partitions(SHARDS))
    new = sorted(k for k in listed if k not in known)
    cursor = json.dumps({"listed": len(listed), "last_new": new[-1] if new else None})
    if not new:
        return dg.SensorResult(skip_reason=f"no new shards among {len(listed)} under {shard_source.input_uri}", cursor=cursor)
    # the partitions are added before the backfill is submitted (the daemon handles them first)
    return dg.SensorResult(
        run_requests=[prepare_backfill(new)],
        dynamic_partitions_requests=[shard_partitions.build_add_request(new)],
        cursor=cursor,
    )


# evaluates the assets' automation conditions (assets.execution: the nightly rebuild); started from the UI when wanted
realsyn_automation = dg.AutomationConditionSensorDefinition(
    "realsyn_automation",
    target=dg.AssetSelection.all() | dg.AssetSelection.all_asset_checks(),
    default_status=dg.DefaultSensorStatus.STOPPED,
    minimum_interval_seconds=300,
    description=(
        f"Nightly rebuild, cron {REBUILD_CRON!r} (REALSYN_REBUILD_CRON): after each tick, every stale global step and the per-shard "
        "steps below it, once no input partition is missing or in progress and the blocking checks above them passed."
    ),
)


@dg.run_failure_sensor(
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Logs every failed run with its failing steps; posts to REALSYN_ALERT_WEBHOOK when set.",
)
def run_failure_alert(context: dg.RunFailureSensorContext) -> None:
    steps = [e.step_key for e in context.get_step_failure_events()]
    from realsyn.redact import redact

    # the failure text can carry a URL with user:pass@ or a token: never log or post it as is
    message = redact(
        f"RealSyn run {context.dagster_run.run_id} ({context.dagster_run.job_name}) failed at {steps or 'run level'}: {context.failure_event.message}"
    )
    context.log.error(message)
    url = os.environ.get("REALSYN_ALERT_WEBHOOK")
    if url:
        import requests

        try:
            requests.post(url, json={"text": message}, timeout=10)
        except requests.RequestException as e:  # the webhook URL is itself a secret (Slack, Teams): never echo it
            context.log.error(f"alert webhook failed: {type(e).__name__}")
