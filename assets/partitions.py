"""One input shard is one partition; the new-shard sensor and `realsyn run` register them."""

import dagster as dg

SHARDS = "shards"
shard_partitions = dg.DynamicPartitionsDefinition(name=SHARDS)
