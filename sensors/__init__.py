"""Sensors: register new input shards as partitions; report failed runs."""

import json
import os

import dagster as dg

from assets.jobs import JOBS
from assets.partitions import SHARDS, shard_partitions
from resources import ShardSourceResource


@dg.sensor(
    job=JOBS["prepare_shards"],
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Lists the input location (local or S3); each new shard becomes a partition and gets a prepare_shards run.",
)
def new_shards_sensor(context: dg.SensorEvaluationContext, shard_source: ShardSourceResource) -> dg.SensorResult:
    listed = shard_source.list_shards()
    known = set(context.instance.get_dynamic_partitions(SHARDS))
    new = sorted(k for k in listed if k not in known)
    cursor = json.dumps({"listed": len(listed), "last_new": new[-1] if new else None})
    if not new:
        return dg.SensorResult(skip_reason=f"no new shards among {len(listed)} under {shard_source.input_uri}", cursor=cursor)
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=k, run_key=f"prepare-{k}") for k in new],
        dynamic_partitions_requests=[shard_partitions.build_add_request(new)],
        cursor=cursor,
    )


# evaluates the assets' automation conditions (the nightly rebuild); started from the UI when wanted
realsyn_automation = dg.AutomationConditionSensorDefinition(
    "realsyn_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.STOPPED,
    minimum_interval_seconds=300,
    description="Runs the nightly rebuild of global steps and captioning once new shards are prepared.",
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
