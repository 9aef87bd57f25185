import io
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from assets.partitions import SHARDS
from realsyn import layout
from resources import ShardSourceResource
from sensors import NEW_SHARDS_TAG, new_shards_sensor
from tests.s3_server import moto_s3


def _shard_bytes() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"images": [[None, None]], "texts": [["A man rides a horse.", None]]}), buf)
    return buf.getvalue()


def _backfill_shards(result) -> dict[str, list[str]]:
    """The one backfill a sensor tick asks for: asset -> its sorted shards."""
    assert len(result.run_requests) == 1
    request = result.run_requests[0]
    assert request.requires_backfill_daemon()
    subset = request.asset_graph_subset
    return {k.to_user_string(): sorted(subset.partitions_subsets_by_asset_key[k].get_partition_keys()) for k in subset.asset_keys}


def test_new_shard_sensor_registers_s3_shards_and_asks_for_one_backfill():
    with moto_s3(("corpus",)):
        import s3fs

        fs = s3fs.S3FileSystem(use_listings_cache=False)
        fs.pipe("corpus/in/part-00000.parquet", _shard_bytes())
        fs.pipe("corpus/in/sub/part-00001.jsonl", b'{"images": [null], "texts": ["hello there world"]}\n')
        fs.pipe("corpus/in/README.txt", b"not a shard")
        instance = dg.DagsterInstance.ephemeral()
        source = ShardSourceResource(input_uri="s3://corpus/in")

        result = new_shards_sensor(dg.build_sensor_context(instance=instance, resources={"shard_source": source}))
        keys = ["part-00000", "sub__part-00001"]
        # one backfill of every prepare_shards asset over the new shards (not one run per shard)
        assert _backfill_shards(result) == {asset: keys for asset in layout.PREPARE_SHARDS}
        assert result.run_requests[0].tags == {NEW_SHARDS_TAG: "2"}
        assert result.dynamic_partitions_requests[0].partition_keys == keys

        # once registered, the same listing requests nothing; a new shard is picked up alone
        instance.add_dynamic_partitions(SHARDS, keys)
        again = new_shards_sensor(dg.build_sensor_context(instance=instance, resources={"shard_source": source}))
        assert not again.run_requests and "no new shards among 2" in again.skip_reason.skip_message
        fs.pipe("corpus/in/part-00002.parquet", _shard_bytes())
        third = new_shards_sensor(dg.build_sensor_context(instance=instance, resources={"shard_source": source}))
        assert _backfill_shards(third) == {asset: ["part-00002"] for asset in layout.PREPARE_SHARDS}


def test_the_backfill_becomes_runs_of_n_shards_each_through_the_whole_prepare_chain(tmp_path, monkeypatch):
    """The sensor's request passes its own selection check; the daemon adds the partitions, then the
    backfill, whose first iteration (Dagster's own planner, on the code location as the daemon loads
    it) asks for runs of REALSYN_SHARDS_PER_RUN shards, each through every prepare_shards asset."""
    import logging
    import time
    from datetime import UTC, datetime  # (dagster's record checks resolve `datetime` in the caller's frame: the class)

    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.execution.asset_backfill import AssetBackfillData, execute_asset_backfill_iteration_inner
    from dagster._core.test_utils import create_test_daemon_workspace_context
    from dagster._core.workspace.load_target import ModuleTarget

    from definitions import build_definitions

    corpus = tmp_path / "in"
    corpus.mkdir()
    for i in range(7):
        (corpus / f"part-{i:05d}.parquet").write_bytes(_shard_bytes())
    defs = build_definitions("local", input_uri=str(corpus), storage_root=str(tmp_path / "out"))
    monkeypatch.setenv("REALSYN_SHARDS_PER_RUN", "3")  # read by the code location the daemon starts
    with dg.instance_for_test() as instance:
        sensor = defs.resolve_sensor_def("new_shards_sensor")
        context = dg.build_sensor_context(instance=instance, repository_def=defs.get_repository_def(), resources=defs.resources)
        tick = sensor.evaluate_tick(context)
        assert len(tick.run_requests) == 1
        instance.add_dynamic_partitions(SHARDS, list(tick.dynamic_partitions_requests[0].partition_keys))
        backfill = AssetBackfillData.from_asset_graph_subset(tick.run_requests[0].asset_graph_subset, instance, time.time())
        root = str(Path(__file__).resolve().parents[1])  # the repository: where workspace.yaml loads `definitions` from
        with create_test_daemon_workspace_context(ModuleTarget("definitions", None, root, None), instance) as workspace:
            view = AssetGraphView(
                temporal_context=TemporalContext(effective_dt=datetime.now(UTC), last_event_id=None),
                instance=instance,
                asset_graph=workspace.create_request_context().asset_graph,
            )
            result = execute_asset_backfill_iteration_inner("b1", backfill, view, time.time(), logging.getLogger(__name__), None)
    runs = [
        (
            r.tags["dagster/asset_partition_range_start"],
            r.tags["dagster/asset_partition_range_end"],
            {k.to_user_string() for k in r.asset_selection},
        )
        for r in result.run_requests
    ]
    every = set(layout.PREPARE_SHARDS)
    assert runs == [("part-00000", "part-00002", every), ("part-00003", "part-00005", every), ("part-00006", "part-00006", every)]
