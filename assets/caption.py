"""Caption stage: per shard, LLM fusion captions (cached) and the image-caption similarity band."""

import dagster as dg

from assets.configs import GenerationConfig, SimilarityBandConfig
from assets.execution import shard_asset
from assets.metadata import merged, stats_metadata
from realsyn import layout
from realsyn.stages import caption as stage
from resources import EmbedderResource, GenerationBackendResource, StorageResource


@shard_asset(
    layout.SYNTHETIC_CAPTIONS,
    deps=[layout.RETRIEVALS],
    description="One synthetic caption per image: an LLM fuses the retrieved real texts and the image's tags. Cached by (image, prompt) so reruns never regenerate.",
    profile="gpu",
    rebuild_nightly=True,
)
def synthetic_captions(
    context: dg.AssetExecutionContext,
    config: GenerationConfig,
    storage: StorageResource,
    generator: GenerationBackendResource,
    embedder: EmbedderResource,
) -> dg.MaterializeResult:
    backend = generator.get()
    tagger, model = None, None
    if config.tagger is not None:
        from realsyn.plugins import build_plugin

        tagger, model = build_plugin("tagger", config.tagger.spec()), embedder.get()
    stats = [
        stage.generate_captions(
            storage.get(),
            shard,
            backend,
            instruction=config.instruction,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            batch_size=config.batch_size,
            tagger=tagger,
            embedder=model,
        )
        for shard in context.partition_keys
    ]
    return dg.MaterializeResult(
        metadata=stats_metadata(
            merged(stats), backend=generator.name, model=backend.model_id, path=storage.get().uri(layout.SYNTHETIC_CAPTIONS)
        )
    )


@shard_asset(
    layout.FILTERED_PAIRS,
    deps=[layout.SYNTHETIC_CAPTIONS, layout.IMAGE_EMBEDDINGS],
    description="Image vs synthetic-caption cosine; pairs outside the band dropped (EVA02-CLIP E/14-plus: 0.51..0.61), decisions.parquet with each cosine.",
    profile="gpu",
    rebuild_nightly=True,
)
def filtered_pairs(
    context: dg.AssetExecutionContext, config: SimilarityBandConfig, storage: StorageResource, embedder: EmbedderResource
) -> dg.MaterializeResult:
    model = embedder.get()
    stats = [stage.filter_pairs(storage.get(), shard, model, low=config.low, high=config.high) for shard in context.partition_keys]
    return dg.MaterializeResult(metadata=stats_metadata(merged(stats), path=storage.get().uri(layout.FILTERED_PAIRS)))
