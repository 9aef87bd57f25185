"""The nightly rebuild, evaluated by Dagster on a real instance: it waits for every registered shard,
is gated by blocking checks across runs, and refreshes the per-shard steps below a changed global one."""

import datetime
import warnings

import dagster as dg
import pytest

from assets import execution
from assets.jobs import JOBS_IN_ORDER
from assets.partitions import shard_partitions
from definitions import build_definitions
from realsyn import layout

CHECK = "sentence_clusters:sentence_clusters_are_usable"


def _requested(result) -> dict[str, list[str] | None]:
    """What one evaluation requested: key -> sorted partition keys (None for a global asset or a check)."""
    out = {}
    for r in result.results:
        if r.true_subset.size:
            subset = r.true_subset
            out[r.key.to_user_string()] = sorted(subset.expensively_compute_partition_keys()) if subset.is_partitioned else None
    return out


class _Clock:
    """Evaluation times after now (materializations carry the real clock); each call one step later."""

    def __init__(self):
        self.now = datetime.datetime.now(datetime.UTC)
        self.cursor = None

    def evaluate(self, defs, instance, seconds: float):
        result = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, evaluation_time=self.now + datetime.timedelta(seconds=seconds), cursor=self.cursor
        )
        self.cursor = result.cursor
        return result


def _materialize(instance, keys, shards=(None,)):
    for key in keys:
        for shard in shards:
            instance.report_runless_asset_event(dg.AssetMaterialization(key, partition=shard))


def _check_result(instance, passed: bool):
    instance.report_runless_asset_event(
        dg.AssetCheckEvaluation(asset_key=dg.AssetKey(layout.SENTENCE_CLUSTERS), check_name="sentence_clusters_are_usable", passed=passed)
    )


@pytest.fixture
def defs():
    return build_definitions("local", input_uri="/nonexistent/in", storage_root="/nonexistent/out")


def test_global_steps_wait_for_every_registered_shard_then_rebuild_once_after_the_tick(defs):
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", ["a", "b"])
    clock = _Clock()
    clock.evaluate(defs, instance, -2 * 86400)  # the first evaluation, two nights ago
    # ticks have passed, shard a is prepared, shard b only registered: nothing global runs, the tick stays pending
    _materialize(instance, layout.PREPARE_SHARDS, ["a"])
    assert clock.evaluate(defs, instance, 30).total_requested == 0

    # shard b prepared, then re-run: while the run is in progress image_dedup waits; the sentence side
    # (whose inputs are all there and idle) goes, with the blocking check in the same run
    _materialize(instance, layout.PREPARE_SHARDS, ["b"])
    run = instance.create_run_for_job(
        defs.resolve_job_def("prepare_shards"),
        run_config={},
        tags={"dagster/partition": "b"},
        asset_selection=frozenset({dg.AssetKey(layout.IMAGE_EMBEDDINGS)}),
    )
    assert _requested(clock.evaluate(defs, instance, 60)) == {"sentence_dedup": None, "sentence_clusters": None, CHECK: None}

    # the run ends: image dedup goes; retrieval waits for its requested inputs to land
    instance.report_run_failed(run)
    assert _requested(clock.evaluate(defs, instance, 90)) == {"image_dedup": None}
    _materialize(instance, [layout.SENTENCE_DEDUP, layout.SENTENCE_CLUSTERS])
    _check_result(instance, passed=True)
    assert clock.evaluate(defs, instance, 120).total_requested == 0  # image_dedup not there yet
    _materialize(instance, [layout.IMAGE_DEDUP])
    assert _requested(clock.evaluate(defs, instance, 150)) == {"retrievals": None}
    # retrieval landed: the captioning of every shard follows; then every tick is handled
    _materialize(instance, [layout.RETRIEVALS])
    assert _requested(clock.evaluate(defs, instance, 180)) == {"synthetic_captions": ["a", "b"], "filtered_pairs": ["a", "b"]}
    assert clock.evaluate(defs, instance, 210).total_requested == 0


def test_all_shards_done_after_the_tick_rebuilds_the_chain_in_one_tick(defs):
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", ["a", "b"])
    clock = _Clock()
    clock.evaluate(defs, instance, -2 * 86400)
    assert clock.evaluate(defs, instance, -30).total_requested == 0  # ticks passed, nothing prepared: nothing runs
    _materialize(instance, layout.PREPARE_SHARDS, ["a", "b"])
    # dedup, sentence clustering with its blocking check and the retrieval pass below it: one tick, one run
    assert _requested(clock.evaluate(defs, instance, 30)) == {
        "image_dedup": None,
        "sentence_dedup": None,
        "sentence_clusters": None,
        CHECK: None,
        "retrievals": None,
    }
    assert clock.evaluate(defs, instance, 60).total_requested == 0


def test_failed_blocking_check_holds_retrievals_across_runs(defs):
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", ["a", "b"])
    _materialize(instance, layout.PREPARE_SHARDS, ["a", "b"])
    _materialize(instance, [layout.IMAGE_DEDUP, layout.SENTENCE_DEDUP])
    clock = _Clock()
    clock.evaluate(defs, instance, -2 * 86400)
    # a run outside the nightly one rebuilt the clusters and their check failed: retrieval is stale but held
    _materialize(instance, [layout.SENTENCE_CLUSTERS])
    _check_result(instance, passed=False)
    held = clock.evaluate(defs, instance, 30)
    assert "retrievals" not in _requested(held) and held.total_requested == 0
    # the check passes on a re-run: retrieval goes at the next evaluation (its tick was never handled)
    _check_result(instance, passed=True)
    assert _requested(clock.evaluate(defs, instance, 60)) == {"retrievals": None}


def test_a_changed_global_input_refreshes_every_shard_below_it_at_the_next_tick(defs):
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", ["a", "b"])
    _materialize(instance, [*layout.PREPARE_SHARDS], ["a", "b"])
    _materialize(instance, [layout.IMAGE_DEDUP, layout.SENTENCE_DEDUP, layout.SENTENCE_CLUSTERS, layout.RETRIEVALS])
    _check_result(instance, passed=True)
    _materialize(instance, [layout.SYNTHETIC_CAPTIONS, layout.FILTERED_PAIRS], ["a", "b"])
    clock = _Clock()
    clock.evaluate(defs, instance, -2 * 86400)
    # the retrieval pass is rerun (a knob changed): the older shards' captions were built on the old one
    _materialize(instance, [layout.RETRIEVALS])
    fired = _requested(clock.evaluate(defs, instance, 30))
    assert fired["synthetic_captions"] == ["a", "b"] and fired["filtered_pairs"] == ["a", "b"]
    # image clusters are stale too (their per-shard inputs are requested in the same tick); the export
    # steps wait for sampled_splits, which was never built
    assert set(fired) == {"synthetic_captions", "filtered_pairs", "image_clusters", "sampled_splits"}
    assert clock.evaluate(defs, instance, 60).total_requested == 0


def test_per_shard_jobs_share_one_backfill_policy_of_n_shards_per_run(defs, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "materializes assets with varying BackfillPolicies" would raise
        for job in JOBS_IN_ORDER:
            defs.resolve_job_def(job.name)
    graph = defs.resolve_asset_graph()
    per_shard = [graph.get(k) for k in graph.get_all_asset_keys() if graph.get(k).partitions_def == shard_partitions]
    assert {n.backfill_policy for n in per_shard if n.is_executable} == {dg.BackfillPolicy.multi_run(8)}
    monkeypatch.setenv(execution.SHARDS_PER_RUN_ENV, "32")
    assert execution.shards_per_run() == 32
    monkeypatch.setenv(execution.SHARDS_PER_RUN_ENV, "0")
    with pytest.raises(ValueError, match="REALSYN_SHARDS_PER_RUN must be >= 1"):
        execution.shards_per_run()
