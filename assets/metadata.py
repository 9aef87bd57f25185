"""StepStats -> Dagster materialization metadata (rows in/out, dropped_<reason>, seconds, the folder written).

Every partition's materialization carries its own counts and versions: a run over several shards
(a backfill in one run) adds each shard's metadata to that shard's event (``add_asset_metadata``),
never the merged totals. ``dagster/uri`` is the generation folder the partition committed.
"""

from typing import Any

import dagster as dg

from assets.versions import VersionIndex, data_version_of, record_partition
from realsyn.stats import StepStats


def stats_metadata(stats: StepStats, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {k: v for k, v in stats.as_dict().items()}
    if "rows_out" in stats.counts:
        meta["dagster/row_count"] = int(stats.counts["rows_out"])
    if stats.dropped:
        meta["dropped_by_reason"] = dg.MetadataValue.md(
            "\n".join(["| reason | rows |", "|---|---|"] + [f"| {r} | {n} |" for r, n in stats.dropped.items()])
        )
    for k, v in extra.items():
        meta[k] = dg.MetadataValue.path(v) if k == "path" else v
    return meta


def partition_results(
    context: dg.AssetExecutionContext,
    key: str,
    storage: Any,
    per_shard: dict[str, dict[str, Any]],
    *,
    metadata: dict[str, Any] | None = None,
    shard_source: Any = None,
) -> dg.MaterializeResult:
    """A per-shard asset's result: each shard's own metadata and versions on its own event; ``metadata`` on all.

    The data version is set when the run materializes one shard (Dagster takes one per output);
    in a multi-shard run each event still carries its own ``realsyn/data_version``.
    """
    data_version = None
    index = VersionIndex(context.instance)
    uris = shard_source.list_shards() if shard_source is not None else {}
    for shard, meta in per_shard.items():
        versions = record_partition(context, storage, key, shard, index=index, shard_uris=uris)
        context.add_asset_metadata({**meta, **versions}, asset_key=key, partition_key=shard)
        if len(per_shard) == 1:
            data_version = data_version_of(versions)
    return dg.MaterializeResult(asset_key=key, metadata=metadata or {}, data_version=data_version)


def global_result(
    context: dg.AssetExecutionContext, key: str, storage: Any, metadata: dict[str, Any], *, shards: list[str]
) -> dg.MaterializeResult:
    """A global asset's result: its metadata plus its content hash, per-shard slices and the inputs it read."""
    versions = record_partition(context, storage, key, None, shards=shards)
    return dg.MaterializeResult(asset_key=key, metadata={**metadata, **versions}, data_version=data_version_of(versions))
