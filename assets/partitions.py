"""One input shard is one partition; the new-shard sensor and `realsyn run` register them."""

import dagster as dg

SHARDS = "shards"
shard_partitions = dg.DynamicPartitionsDefinition(name=SHARDS)

# a global step reads every shard of its per-shard inputs
ALL_SHARDS = dg.AllPartitionMapping()


def registered_shards(context: dg.AssetExecutionContext, shard_source) -> list[str]:
    """The dataset a global step covers: registered partitions whose shard is under this input location."""
    registered = set(context.instance.get_dynamic_partitions(SHARDS))
    listed = set(shard_source.list_shards())
    if registered - listed:
        context.log.info(f"{len(registered - listed)} registered shards are not under {shard_source.input_uri}; left out")
    return sorted(registered & listed)
