"""StepStats -> Dagster materialization metadata (rows in/out, dropped_<reason>, seconds, where)."""

from typing import Any

import dagster as dg

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


def merged(stats_list: list[StepStats]) -> StepStats:
    out = StepStats(stats_list[0].step)
    for s in stats_list:
        out.merge(s)
    return out
