"""Export stage: every split as WebDataset tar shards with sizes.json, and as Parquet."""

import dagster as dg

from assets.configs import ExportConfig
from assets.execution import GLOBAL_STEP_TAGS, NIGHTLY_REBUILD
from assets.partitions import ALL_SHARDS, registered_shards
from realsyn import layout
from realsyn.stages import export as stage
from resources import ShardSourceResource, StorageResource


@dg.asset(
    automation_condition=NIGHTLY_REBUILD,
    deps=[layout.SAMPLED_SPLITS, dg.AssetDep(layout.FILTERED_IMAGES, partition_mapping=ALL_SHARDS)],
    group_name=layout.EXPORT,
    op_tags=GLOBAL_STEP_TAGS,
    description="Each split as WebDataset tar shards with sizes.json (open_clip reads them directly) and as Parquet; every sample carries its image, ranked real texts and synthetic texts.",
)
def exported_splits(
    context: dg.AssetExecutionContext, config: ExportConfig, storage: StorageResource, shard_source: ShardSourceResource
) -> dg.MaterializeResult:
    result = stage.export_splits(storage.get(), registered_shards(context, shard_source), samples_per_shard=config.samples_per_shard)
    reader = storage.get().reader(layout.EXPORTED_SPLITS)
    meta = {f"{name}/samples": int(st.counts["rows_out"]) for name, st in result.items()}
    meta.update({f"{name}/tar_shards": int(st.counts["tar_shards"]) for name, st in result.items()})
    meta["location"] = dg.MetadataValue.path(reader.uri(""))
    return dg.MaterializeResult(metadata=meta)
