"""One input shard is one partition; the new-shard sensor and `realsyn run` register them."""

import json

import dagster as dg

SHARDS = "shards"
shard_partitions = dg.DynamicPartitionsDefinition(name=SHARDS)

# a global step reads every shard of its per-shard inputs
ALL_SHARDS = dg.AllPartitionMapping()

# Run tag (a JSON list of shard keys) that leaves shards out of a global step: `realsyn run` sets it
# to the shards whose per-shard steps failed, so the global steps cover the good ones.
EXCLUDED_SHARDS_TAG = "realsyn/excluded_shards"


def excluded_shards(context: dg.AssetExecutionContext) -> set[str]:
    raw = context.run.tags.get(EXCLUDED_SHARDS_TAG)
    if not raw:
        return set()
    value = json.loads(raw)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"run tag {EXCLUDED_SHARDS_TAG} must be a JSON list of shard keys, got {raw[:200]!r}")
    return set(value)


def registered_shards(context: dg.AssetExecutionContext, shard_source) -> list[str]:
    """The dataset a global step covers: registered partitions whose shard is under this input location,
    less the shards the run tag ``realsyn/excluded_shards`` leaves out (failed shards of `realsyn run`)."""
    registered = set(context.instance.get_dynamic_partitions(SHARDS))
    listed = set(shard_source.list_shards())
    if registered - listed:
        context.log.info(f"{len(registered - listed)} registered shards are not under {shard_source.input_uri}; left out")
    excluded = excluded_shards(context) & registered & listed
    if excluded:
        head = ", ".join(sorted(excluded)[:5]) + (" ..." if len(excluded) > 5 else "")
        context.log.warning(f"{len(excluded)} shards left out of this run (their per-shard steps failed): {head}")
    return sorted((registered & listed) - excluded)
