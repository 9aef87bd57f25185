"""The nightly rebuild: global steps fire after the cron tick once new shards were prepared, once."""

import datetime

import dagster as dg

from definitions import build_definitions


def _requested(result) -> set[str]:
    return {r.key.to_user_string() for r in result.results if r.true_subset.size}


def test_global_steps_rebuild_after_the_tick_once_shards_are_prepared():
    defs = build_definitions("local", input_uri="/nonexistent/in", storage_root="/nonexistent/out")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", ["a", "b"])
    # materializations carry the real clock, so the evaluations are placed around "now"
    now = datetime.datetime.now(datetime.UTC)
    before = dg.evaluate_automation_conditions(defs=defs, instance=instance, evaluation_time=now - datetime.timedelta(days=2))
    assert before.total_requested == 0

    # ticks have passed but nothing was prepared since: nothing runs
    quiet = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, evaluation_time=now - datetime.timedelta(seconds=30), cursor=before.cursor
    )
    assert quiet.total_requested == 0

    for key in ("image_embeddings", "sentence_embeddings"):
        for shard in ("a", "b"):
            instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=shard))
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=30)
    fired = dg.evaluate_automation_conditions(defs=defs, instance=instance, evaluation_time=later, cursor=quiet.cursor)
    # dedup, then sentence clustering and the global retrieval pass downstream of it, in the same tick
    assert _requested(fired) == {"image_dedup", "sentence_dedup", "sentence_clusters", "retrievals"}
    again = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, evaluation_time=later + datetime.timedelta(seconds=30), cursor=fired.cursor
    )
    assert again.total_requested == 0
