"""Filter stage: image filters, sentence filters, perplexity scoring and its band (per shard)."""

import dagster as dg

from assets.configs import ImageFilterConfig, PerplexityBandConfig, SentenceFilterConfig
from assets.execution import shard_asset
from assets.metadata import merged, stats_metadata
from realsyn import layout
from realsyn.stages import filter as stage
from resources import PerplexityScorerResource, StorageResource


def _filter_shards(
    context: dg.AssetExecutionContext, storage: StorageResource, asset: str, kind: str, configs, run
) -> dg.MaterializeResult:
    """Build the configured filter chain once, run it over each partition, report drops by reason."""
    from realsyn.plugins import build_plugin

    filters = [build_plugin(kind, c.spec()) for c in configs]
    stats = [run(storage.get(), shard, filters) for shard in context.partition_keys]
    names = ", ".join(c.name for c in configs)
    return dg.MaterializeResult(metadata=stats_metadata(merged(stats), filters=names, path=storage.get().uri(asset)))


@shard_asset(
    layout.FILTERED_IMAGES,
    deps=[layout.IMAGE_DB],
    description="Images kept by the image filters (rules: short side, aspect ratio; undecodable and unfetchable dropped), plus decisions.parquet with each reason.",
)
def filtered_images(context: dg.AssetExecutionContext, config: ImageFilterConfig, storage: StorageResource) -> dg.MaterializeResult:
    return _filter_shards(context, storage, layout.FILTERED_IMAGES, "image_filter", config.filters, stage.filter_images)


@shard_asset(
    layout.SENTENCE_CANDIDATES,
    deps=[layout.SENTENCE_DB],
    description="Sentences kept by the sentence filters (rules: emoji, URL, 3..81 words; CAT: complexity >= C1 with an action), plus decisions.parquet.",
)
def sentence_candidates(context: dg.AssetExecutionContext, config: SentenceFilterConfig, storage: StorageResource) -> dg.MaterializeResult:
    return _filter_shards(context, storage, layout.SENTENCE_CANDIDATES, "sentence_filter", config.filters, stage.filter_sentence_candidates)


@shard_asset(
    layout.SENTENCE_PERPLEXITY,
    deps=[layout.SENTENCE_CANDIDATES],
    description="Language-model perplexity of each candidate sentence, stored as a column (a band change never rescores).",
    profile="gpu",
)
def sentence_perplexity(
    context: dg.AssetExecutionContext, storage: StorageResource, perplexity: PerplexityScorerResource
) -> dg.MaterializeResult:
    scorer = perplexity.get()
    stats = [stage.score_sentence_perplexity(storage.get(), shard, scorer) for shard in context.partition_keys]
    return dg.MaterializeResult(
        metadata=stats_metadata(
            merged(stats), scorer=scorer.model_id if scorer else "disabled", path=storage.get().uri(layout.SENTENCE_PERPLEXITY)
        )
    )


@shard_asset(
    layout.FILTERED_SENTENCES,
    deps=[layout.SENTENCE_PERPLEXITY],
    description="Sentences whose perplexity lies in the band (paper: [30, 200] for its model; per scorer), plus decisions.parquet.",
)
def filtered_sentences(
    context: dg.AssetExecutionContext, config: PerplexityBandConfig, storage: StorageResource, perplexity: PerplexityScorerResource
) -> dg.MaterializeResult:
    band = None
    if perplexity.enabled:
        from realsyn.filters.perplexity_band import PerplexityBandFilter, default_band

        low, high = default_band(perplexity.resolved_params().get("model"))
        band = PerplexityBandFilter(
            low=config.low if config.low is not None else low, high=config.high if config.high is not None else high
        )
    else:
        context.log.warning("perplexity scorer disabled: the perplexity band is skipped")
    stats = [stage.filter_sentences_by_perplexity(storage.get(), shard, band) for shard in context.partition_keys]
    extra = {"band_low": band.low, "band_high": band.high} if band else {"band": "disabled"}
    return dg.MaterializeResult(metadata=stats_metadata(merged(stats), **extra, path=storage.get().uri(layout.FILTERED_SENTENCES)))
