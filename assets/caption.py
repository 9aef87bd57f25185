"""Caption stage: per shard, LLM fusion captions (cached) and the image-caption similarity band."""

import dagster as dg

from assets.configs import GenerationConfig, SimilarityBandConfig, effective_config
from assets.execution import shard_asset
from assets.metadata import partition_results, stats_metadata
from realsyn import layout
from realsyn.stages import caption as stage
from resources import CaptionerResource, EmbedderResource, GenerationBackendResource, StorageResource


@shard_asset(
    layout.SYNTHETIC_CAPTIONS,
    # it reads the kept images' embeddings (tags) and the dedup decisions beside the retrieved texts; with a captioner, the images
    deps=[layout.RETRIEVALS, layout.IMAGE_EMBEDDINGS, layout.IMAGE_DEDUP, layout.FILTERED_IMAGES],
    description="One synthetic caption per image: an LLM fuses the retrieved real texts, the image's tags and (with a captioner) a concise caption of the image. Cached by (image, prompt) so reruns never regenerate.",
    profile="cpu-model",  # the LLM runs on the vLLM server; CLIP only embeds the tag vocabulary
    rebuild_nightly=True,
)
def synthetic_captions(
    context: dg.AssetExecutionContext,
    config: GenerationConfig,
    storage: StorageResource,
    generator: GenerationBackendResource,
    embedder: EmbedderResource,
    captioner: CaptionerResource,
) -> dg.MaterializeResult:
    config = effective_config(context, config)
    backend = generator.get()
    concise = captioner.get()
    tagger, model = None, None
    if config.tagger is not None:
        from realsyn.plugins import build_plugin

        tagger, model = build_plugin("tagger", config.tagger.spec()), embedder.get()
    per_shard = {
        shard: stats_metadata(
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
                captioner=concise,
            )
        )
        for shard in context.partition_keys
    }
    common = {"backend": generator.name, "model": backend.model_id, "captioner": concise.captioner_id}
    return partition_results(context, layout.SYNTHETIC_CAPTIONS, storage.get(), per_shard, metadata=common)


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
    config = effective_config(context, config)
    model = embedder.get()
    per_shard = {
        shard: stats_metadata(stage.filter_pairs(storage.get(), shard, model, low=config.low, high=config.high))
        for shard in context.partition_keys
    }
    return partition_results(context, layout.FILTERED_PAIRS, storage.get(), per_shard)
