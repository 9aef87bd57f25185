"""Export stage: per shard, every split's WebDataset tars and Parquet; then one folder per split (the published dataset)."""

import dagster as dg
from pydantic import Field, field_validator

from assets.configs import ExportConfig
from assets.execution import CPU_STEP_TAGS, NIGHTLY_REBUILD, shard_asset
from assets.metadata import merged, stats_metadata
from assets.partitions import ALL_SHARDS, registered_shards
from realsyn import layout
from realsyn.stages import export as stage
from resources import ShardSourceResource, StorageResource


@shard_asset(
    layout.EXPORTED_SHARDS,
    deps=[layout.SAMPLED_SPLITS, layout.FILTERED_IMAGES, layout.RETRIEVALS, layout.SYNTHETIC_CAPTIONS],
    rebuild_nightly=True,
    description="Every split's samples of one shard in one pass over its images: {split}/{split}-{shard}-NNNNNN.tar, {split}/sizes.json, {split}/parquet.parquet.",
)
def exported_shards(context: dg.AssetExecutionContext, config: ExportConfig, storage: StorageResource) -> dg.MaterializeResult:
    results = [stage.export_shard(storage.get(), shard, samples_per_shard=config.samples_per_shard) for shard in context.partition_keys]
    meta: dict = {}
    for split in results[0]:
        st = merged([r[split] for r in results])
        meta.update({f"{split}/{k}": v for k, v in stats_metadata(st).items() if not k.startswith("dagster/")})
    rows = sum(int(st.counts["rows_out"]) for r in results for st in r.values())
    return dg.MaterializeResult(
        metadata={**meta, "dagster/row_count": rows, "path": dg.MetadataValue.path(storage.get().uri(layout.EXPORTED_SHARDS))}
    )


class PublishConfig(dg.Config):
    """exported_splits has no knobs of its own: the tars are cut by exported_shards."""

    samples_per_shard: int | None = Field(
        default=None, description="Not here: set samples_per_shard on exported_shards, which writes the tars."
    )

    @field_validator("samples_per_shard")
    @classmethod
    def _moved(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError(f"samples_per_shard moved to {layout.EXPORTED_SHARDS} (the per-shard step writes the tars); set it there")
        return value


# Copies only (server-side on S3): a CPU pod, not the big-memory global profile.
@dg.asset(
    automation_condition=NIGHTLY_REBUILD,
    deps=[layout.SAMPLED_SPLITS, dg.AssetDep(layout.EXPORTED_SHARDS, partition_mapping=ALL_SHARDS)],
    group_name=layout.EXPORT,
    op_tags=CPU_STEP_TAGS,
    description="One folder per split that open_clip trains from: the per-shard tars copied in, sizes.json over all of them, train_data.txt (the tar URIs for --train-data), and {split}/parquet/{shard}.parquet.",
)
def exported_splits(
    context: dg.AssetExecutionContext, config: PublishConfig, storage: StorageResource, shard_source: ShardSourceResource
) -> dg.MaterializeResult:
    result = stage.publish_splits(storage.get(), registered_shards(context, shard_source))
    reader = storage.get().reader(layout.EXPORTED_SPLITS)
    meta = {f"{name}/samples": int(st.counts["rows_out"]) for name, st in result.items()}
    meta.update({f"{name}/tar_shards": int(st.counts["tar_shards"]) for name, st in result.items()})
    meta["location"] = dg.MetadataValue.path(reader.uri(""))
    return dg.MaterializeResult(metadata=meta)
