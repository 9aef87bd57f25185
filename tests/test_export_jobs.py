"""The export as a per-shard step between sampling and a global publish step, in the graph and the runner's jobs."""

import dagster as dg
import pytest

from assets.jobs import JOBS_IN_ORDER, PARTITIONED_JOBS
from definitions import build_definitions


def test_export_runs_per_shard_between_sampling_and_publish():
    assert [j.name for j in JOBS_IN_ORDER] == [
        "prepare_shards",
        "dedup_and_cluster",
        "caption_shards",
        "sample_splits",
        "export_shards",
        "publish_export",
        "evaluate_splits",
    ]
    assert PARTITIONED_JOBS == {"prepare_shards", "caption_shards", "export_shards"}
    defs = build_definitions("local", input_uri="/tmp/in", storage_root="/tmp/out")
    graph = defs.resolve_asset_graph()
    shards = graph.get(dg.AssetKey("exported_shards"))
    assert shards.partitions_def.name == "shards"
    assert {k.to_user_string() for k in shards.parent_keys} == {"sampled_splits", "filtered_images", "retrievals", "synthetic_captions"}
    published = graph.get(dg.AssetKey("exported_splits"))
    assert published.partitions_def is None
    assert {k.to_user_string() for k in published.parent_keys} == {"sampled_splits", "exported_shards"}
    assert {n.name for n in defs.resolve_job_def("export_shards").graph.node_defs} == {"exported_shards"}
    assert {n.name for n in defs.resolve_job_def("publish_export").graph.node_defs} == {
        "exported_splits",
        "exported_splits_exported_splits_match_sizes",
    }
    # a CPU pod for both: nothing on the GPU pool
    assert defs.resolve_assets_def("exported_shards").op.pool is None
    assert "nvidia.com/gpu" not in str(defs.resolve_assets_def("exported_splits").op.tags)


def test_samples_per_shard_on_the_publish_step_is_refused_with_where_it_went():
    from assets.export import PublishConfig
    from assets.runner import _validate_step_configs

    defs = build_definitions("local", input_uri="/tmp/in", storage_root="/tmp/out")
    with pytest.raises(ValueError, match="assets.exported_splits: samples_per_shard: .*moved to exported_shards"):
        _validate_step_configs(defs, {"exported_splits": {"samples_per_shard": 8}}, "run.yaml")
    _validate_step_configs(defs, {"exported_shards": {"samples_per_shard": 8}}, "run.yaml")
    assert PublishConfig().samples_per_shard is None


def test_export_config_defaults_and_refusals():
    from assets.configs import ExportConfig
    from assets.runner import _validate_step_configs

    config = ExportConfig()
    assert (config.samples_per_shard, config.image_format, config.real_text_members, config.jpeg_quality) == (10_000, "jpg", 3, 95)
    defs = build_definitions("local", input_uri="/tmp/in", storage_root="/tmp/out")
    with pytest.raises(ValueError, match="assets.exported_shards: image_format: .*must be jpg, png or webp, got 'gif'"):
        _validate_step_configs(defs, {"exported_shards": {"image_format": "gif"}}, "run.yaml")
    with pytest.raises(ValueError, match="assets.exported_shards: real_text_members"):
        _validate_step_configs(defs, {"exported_shards": {"real_text_members": -1}}, "run.yaml")
    _validate_step_configs(defs, {"exported_shards": {"image_format": "webp", "real_text_members": 5}}, "run.yaml")
