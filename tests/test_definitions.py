import json
import subprocess
import sys

import dagster as dg

from assets.jobs import JOBS_IN_ORDER
from definitions import build_definitions

REQUIRED = {"image_db", "sentence_db", "sentence_clusters", "retrievals", "synthetic_captions", "sampled_splits"}


def test_definitions_load_with_required_assets_and_lineage():
    defs = build_definitions("local", input_uri="/tmp/in", storage_root="/tmp/out")
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert REQUIRED <= keys
    assert {
        "filtered_images",
        "filtered_sentences",
        "image_embeddings",
        "image_dedup",
        "sentence_dedup",
        "filtered_pairs",
        "image_clusters",
        "exported_splits",
    } <= keys
    # lineage: the retrieval of a shard depends on the global clusters and dedup
    parents = {k.to_user_string() for k in graph.get(dg.AssetKey("retrievals")).parent_keys}
    assert parents == {"image_embeddings", "image_dedup", "sentence_clusters"}
    assert {k.to_user_string() for k in graph.get(dg.AssetKey("sampled_splits")).parent_keys} == {
        "image_clusters",
        "retrievals",
        "synthetic_captions",
    }
    # per-shard steps are partitioned by shard; global steps are not
    assert graph.get(dg.AssetKey("image_db")).partitions_def.name == "shards"
    assert graph.get(dg.AssetKey("sentence_clusters")).partitions_def is None
    # GPU steps are capped by the gpu pool and carry the pod profile
    emb = defs.resolve_assets_def("image_embeddings")
    assert emb.op.pool == "gpu"
    k8s = emb.op.tags["dagster-k8s/config"]
    k8s = json.loads(k8s) if isinstance(k8s, str) else k8s
    assert k8s["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    jobs = ("prepare_shards", "dedup_and_cluster", "caption_shards", "sample_splits", "export_shards", "publish_export", "evaluate_splits")
    assert [j.name for j in JOBS_IN_ORDER] == list(jobs) and all(defs.resolve_job_def(j) for j in jobs)
    # the evaluation of a split runs per published split, after the publish
    evaluations = graph.get(dg.AssetKey("evaluations"))
    assert evaluations.partitions_def.name == "splits" and {k.to_user_string() for k in evaluations.parent_keys} == {"exported_splits"}
    assert defs.resolve_job_def("evaluate_splits").partitions_def.name == "splits"
    checks = {c.name for c in defs.resolve_asset_graph().asset_check_keys}
    assert {"sentence_clusters_are_usable", "sampled_splits_respect_caps", "exported_splits_match_sizes"} <= checks


def test_production_definitions_use_k8s_executor_and_vllm():
    defs = build_definitions("production", input_uri="s3://bucket/in", storage_root="s3://bucket/out")
    assert defs.resolve_job_def("prepare_shards").executor_def.name == "k8s"
    generator = defs.resources["generator"]
    assert generator.name == "vllm" and generator.resolved_params()["max_concurrency"] == 64
    assert defs.resources["embedder"].resolved_params()["fallback_model"] is None  # production never falls back to random weights
    assert defs.resources["storage"].root == "s3://bucket/out"


def test_code_location_loads_fast_without_heavy_imports():
    code = "import sys, time; t=time.time(); import definitions; print(time.time()-t); print(','.join(m for m in ('torch','faiss','open_clip','transformers','vllm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[1] == ""  # heavy libraries load only inside the steps that use them
    assert float(out[0]) < 20


def test_stages_map_one_to_one_onto_asset_modules_and_groups():
    """Each stage is one core module, one Dagster module and one asset group (realsyn.layout)."""
    import importlib

    from realsyn import layout

    defs = build_definitions("local", input_uri="/tmp/in", storage_root="/tmp/out")
    graph = defs.resolve_asset_graph()
    groups = {graph.get(k).group_name for k in graph.get_all_asset_keys()}
    assert groups == set(layout.STAGES)
    for key in graph.get_all_asset_keys():
        assert graph.get(key).group_name == layout.STAGE_OF[key.to_user_string()]
    for stage in layout.STAGES:
        importlib.import_module(f"realsyn.stages.{stage}")
        importlib.import_module(f"assets.{stage}")
