"""Sample stage: one split per configured sampler chain, fitted globally, decided per shard."""

import base64

import dagster as dg

from assets.configs import SampledSplitsConfig, effective_config
from assets.execution import global_asset
from assets.metadata import global_result, stats_metadata
from assets.partitions import ALL_SHARDS, registered_shards
from realsyn import layout
from realsyn.stages import sample as stage
from resources import PerplexityScorerResource, ShardSourceResource, StorageResource


@global_asset(
    layout.SAMPLED_SPLITS,
    deps=[
        layout.IMAGE_CLUSTERS,
        dg.AssetDep(layout.RETRIEVALS, partition_mapping=ALL_SHARDS),
        dg.AssetDep(layout.SYNTHETIC_CAPTIONS, partition_mapping=ALL_SHARDS),
    ],
    description="One split per configured sampler chain (RealSyn cluster caps 20/35/180 by default; MetaCLIP and POINTS as alternatives), seeded; every sampler's own drop reason in {split}/decisions/.",
)
def sampled_splits(
    context: dg.AssetExecutionContext,
    config: SampledSplitsConfig,
    storage: StorageResource,
    perplexity: PerplexityScorerResource,
    shard_source: ShardSourceResource,
) -> dg.MaterializeResult:
    config = effective_config(context, config)
    # the scorer loads only if a sampler asks for text_perplexity
    shards = registered_shards(context, shard_source)
    result = stage.sample_splits(storage.get(), shards, [s.spec() for s in config.splits], perplexity_scorer=perplexity.get)
    meta = {}
    for name, st in result.items():
        meta.update({f"{name}/{k}": v for k, v in stats_metadata(st).items()})
    # sampler reports (e.g. MetaCLIP's cumulative entry distribution) shown inline in the UI
    reader = storage.get().reader(layout.SAMPLED_SPLITS)
    for f in reader.files:
        if f.endswith(".png"):
            png = base64.b64encode(reader.read_bytes(f)).decode()
            meta[f.replace("/", ": ")] = dg.MetadataValue.md(f"![{f}](data:image/png;base64,{png})")
    return global_result(context, layout.SAMPLED_SPLITS, storage.get(), {**meta, "splits": ", ".join(result)}, shards=shards)
