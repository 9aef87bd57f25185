"""Global image clustering, balanced split sampling and export."""

import base64

import dagster as dg

from assets.configs import ExportConfig, ImageClustersConfig, SampledSplitsConfig
from assets.dedup import ALL_SHARDS, registered_shards
from assets.execution import NIGHTLY_REBUILD, GLOBAL_STEP_TAGS
from assets.metadata import stats_metadata
from realsyn.stages import sample as stage
from resources import PerplexityScorerResource, ShardSourceResource, StorageResource

@dg.asset(automation_condition=NIGHTLY_REBUILD, deps=[dg.AssetDep("filtered_pairs", partition_mapping=ALL_SHARDS), dg.AssetDep("image_embeddings", partition_mapping=ALL_SHARDS)], group_name="sampling", op_tags=GLOBAL_STEP_TAGS, description="K-means of the kept pairs' image embeddings: centroids, per-shard assignments, cluster sizes.")
def image_clusters(context: dg.AssetExecutionContext, config: ImageClustersConfig, storage: StorageResource, shard_source: ShardSourceResource) -> dg.MaterializeResult:
    stats = stage.cluster_images(storage.get(), registered_shards(context, shard_source), **config.model_dump())
    return dg.MaterializeResult(metadata=stats_metadata(stats, path=storage.get().uri(stage.IMAGE_CLUSTERS)))

@dg.asset(automation_condition=NIGHTLY_REBUILD, deps=["image_clusters", dg.AssetDep("retrievals", partition_mapping=ALL_SHARDS), dg.AssetDep("synthetic_captions", partition_mapping=ALL_SHARDS)], group_name="sampling", op_tags=GLOBAL_STEP_TAGS, description="One split per configured sampler chain (RealSyn cluster caps 20/35/180 by default; MetaCLIP and POINTS as alternatives), seeded.")
def sampled_splits(context: dg.AssetExecutionContext, config: SampledSplitsConfig, storage: StorageResource, perplexity: PerplexityScorerResource, shard_source: ShardSourceResource) -> dg.MaterializeResult:
    specs = [stage.SplitSpec(s.name, [c.to_spec() for c in s.samplers]) for s in config.splits]
    needs_ppl = any(sp.name == "points_perplexity" for s in specs for sp in s.samplers)
    result = stage.sample_splits(storage.get(), registered_shards(context, shard_source), specs, perplexity_scorer=perplexity.get() if needs_ppl else None)
    meta = {}
    for name, st in result.items():
        meta.update({f"{name}/{k}": v for k, v in st.as_dict().items()})
    # sampler reports (e.g. MetaCLIP's cumulative entry distribution) shown inline in the UI
    reader = storage.get().reader(stage.SAMPLED_SPLITS)
    for f in reader.files:
        if f.endswith(".png"):
            png = base64.b64encode(reader.read_bytes(f)).decode()
            meta[f.replace("/", ": ")] = dg.MetadataValue.md(f"![{f}](data:image/png;base64,{png})")
    return dg.MaterializeResult(metadata={**meta, "splits": ", ".join(result), "path": dg.MetadataValue.path(storage.get().uri(stage.SAMPLED_SPLITS))})

@dg.asset(automation_condition=NIGHTLY_REBUILD, deps=["sampled_splits", dg.AssetDep("filtered_images", partition_mapping=ALL_SHARDS)], group_name="export", op_tags=GLOBAL_STEP_TAGS, description="Each split as WebDataset tar shards with sizes.json (open_clip reads them directly) and as Parquet; every sample carries its image, ranked real texts and synthetic texts.")
def exported_splits(context: dg.AssetExecutionContext, config: ExportConfig, storage: StorageResource, shard_source: ShardSourceResource) -> dg.MaterializeResult:
    result = stage.export_splits(storage.get(), registered_shards(context, shard_source), samples_per_shard=config.samples_per_shard)
    reader = storage.get().reader(stage.EXPORTED_SPLITS)
    meta = {f"{name}/samples": int(st.counts["rows_out"]) for name, st in result.items()}
    meta.update({f"{name}/tar_shards": int(st.counts["tar_shards"]) for name, st in result.items()})
    meta["location"] = dg.MetadataValue.path(reader.uri(""))
    return dg.MaterializeResult(metadata=meta)
