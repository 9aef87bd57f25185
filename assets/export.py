"""Export stage: per shard, every split's WebDataset tars and Parquet; then one folder per split (the published dataset)."""

import dagster as dg
from pydantic import Field, field_validator

from assets.configs import ExportConfig, effective_config
from assets.execution import NIGHTLY_GLOBAL_REBUILD, shard_asset
from assets.metadata import global_result, partition_results, stats_metadata
from assets.partitions import ALL_SHARDS, registered_shards
from assets.profiles import step_options
from realsyn import datacard, layout
from realsyn.stages import export as stage
from resources import ShardSourceResource, StorageResource


@shard_asset(
    layout.EXPORTED_SHARDS,
    deps=[layout.SAMPLED_SPLITS, layout.FILTERED_IMAGES, layout.RETRIEVALS, layout.SYNTHETIC_CAPTIONS],
    profile="cpu-io",
    rebuild_nightly=True,
    description="Every split's samples of one shard in one pass over its images: {split}/{split}-{shard}-NNNNNN.tar, {split}/sizes.json, {split}/parquet.parquet, {split}/facts.json (content hash, data-card histograms).",
)
def exported_shards(context: dg.AssetExecutionContext, config: ExportConfig, storage: StorageResource) -> dg.MaterializeResult:
    config = effective_config(context, config)
    per_shard = {}
    for shard in context.partition_keys:
        result = stage.export_shard(
            storage.get(),
            shard,
            samples_per_shard=config.samples_per_shard,
            image_format=config.image_format,
            real_text_members=config.real_text_members,
            jpeg_quality=config.jpeg_quality,
        )
        meta = {f"{split}/{k}": v for split, st in result.items() for k, v in stats_metadata(st).items() if not k.startswith("dagster/")}
        per_shard[shard] = {**meta, "dagster/row_count": sum(int(st.counts["rows_out"]) for st in result.values())}
    return partition_results(context, layout.EXPORTED_SHARDS, storage.get(), per_shard)


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
    automation_condition=NIGHTLY_GLOBAL_REBUILD,
    deps=[layout.SAMPLED_SPLITS, dg.AssetDep(layout.EXPORTED_SHARDS, partition_mapping=ALL_SHARDS)],
    group_name=layout.EXPORT,
    **step_options(layout.EXPORTED_SPLITS, "cpu-io"),
    description="One folder per split that open_clip trains from: the per-shard tars copied in, sizes.json over all of them, train_data.txt (the tar URIs for --train-data), {split}/parquet/{shard}.parquet and the data card (README.md, datacard.json); each split also published at _exports/{split}/v{N}/ with latest.json (a new version only for new content).",
)
def exported_splits(
    context: dg.AssetExecutionContext, config: PublishConfig, storage: StorageResource, shard_source: ShardSourceResource
) -> dg.MaterializeResult:
    config = effective_config(context, config)
    shards = registered_shards(context, shard_source)
    result = stage.publish_splits(storage.get(), shards, input_uri=shard_source.input_uri)
    reader = storage.get().reader(layout.EXPORTED_SPLITS)
    meta: dict = {}
    for name, st in result.items():
        published = reader.read_json(f"{name}/published.json")
        card = reader.read_json(f"{name}/{datacard.DATACARD_FILE}")
        meta[f"{name}/samples"] = int(st.counts["rows_out"])
        meta[f"{name}/tar_shards"] = int(st.counts["tar_shards"])
        meta[f"{name}/version"] = int(published["version"])
        meta[f"{name}/new_version"] = bool(st.counts.get("new_version", 0))
        meta[f"{name}/data_version"] = published["data_version"]
        meta[f"{name}/published"] = dg.MetadataValue.path(published["uri"])
        meta[f"{name}/data_card"] = dg.MetadataValue.md(datacard.render_markdown(card["facts"], card.get("evaluation")))
    meta["location"] = dg.MetadataValue.path(reader.uri(""))
    return global_result(context, layout.EXPORTED_SPLITS, storage.get(), meta, shards=shards)
