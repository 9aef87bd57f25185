"""Filter stage: image filters, sentence filters, perplexity scoring and its band (per shard)."""

import dagster as dg

from assets.configs import ImageFilterConfig, PerplexityBandConfig, SentenceFilterConfig, effective_config
from assets.execution import shard_asset
from assets.metadata import partition_results, stats_metadata
from realsyn import layout
from realsyn.stages import filter as stage
from resources import PerplexityScorerResource, StorageResource


def _filter_shards(
    context: dg.AssetExecutionContext, storage: StorageResource, asset: str, kind: str, configs, run
) -> dg.MaterializeResult:
    """Build the configured filter chain once, run it over each partition, report drops by reason."""
    from realsyn.plugins import build_plugin

    filters = [build_plugin(kind, c.spec()) for c in configs]
    per_shard = {shard: stats_metadata(run(storage.get(), shard, filters)) for shard in context.partition_keys}
    return partition_results(context, asset, storage.get(), per_shard, metadata={"filters": ", ".join(c.name for c in configs)})


@shard_asset(
    layout.FILTERED_IMAGES,
    deps=[layout.IMAGE_DB],
    description="Images kept by the image filters (rules: short side, aspect ratio; undecodable and unfetchable dropped), plus decisions.parquet with each reason.",
)
def filtered_images(context: dg.AssetExecutionContext, config: ImageFilterConfig, storage: StorageResource) -> dg.MaterializeResult:
    config = effective_config(context, config)
    return _filter_shards(context, storage, layout.FILTERED_IMAGES, "image_filter", config.filters, stage.filter_images)


@shard_asset(
    layout.SENTENCE_CANDIDATES,
    deps=[layout.SENTENCE_DB],
    description="Sentences kept by the sentence filters (rules: emoji, URL, 3..81 words; CAT: complexity >= C1 with an action), plus decisions.parquet.",
)
def sentence_candidates(context: dg.AssetExecutionContext, config: SentenceFilterConfig, storage: StorageResource) -> dg.MaterializeResult:
    config = effective_config(context, config)
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
    per_shard = {shard: stats_metadata(stage.score_sentence_perplexity(storage.get(), shard, scorer)) for shard in context.partition_keys}
    common = {"scorer": scorer.model_id if scorer else "disabled"}
    return partition_results(context, layout.SENTENCE_PERPLEXITY, storage.get(), per_shard, metadata=common)


@shard_asset(
    layout.FILTERED_SENTENCES,
    deps=[layout.SENTENCE_PERPLEXITY],
    description="Sentences whose perplexity lies in the band (paper: [30, 200] for its model; per scorer), plus decisions.parquet.",
)
def filtered_sentences(
    context: dg.AssetExecutionContext, config: PerplexityBandConfig, storage: StorageResource, perplexity: PerplexityScorerResource
) -> dg.MaterializeResult:
    config = effective_config(context, config)
    band = None
    if perplexity.enabled:
        from realsyn.filters.perplexity_band import PerplexityBandFilter, default_band

        low, high = default_band(perplexity.resolved_params().get("model"))
        band = PerplexityBandFilter(
            low=config.low if config.low is not None else low, high=config.high if config.high is not None else high
        )
    else:
        context.log.warning("perplexity scorer disabled: the perplexity band is skipped")
    per_shard = {
        shard: stats_metadata(stage.filter_sentences_by_perplexity(storage.get(), shard, band)) for shard in context.partition_keys
    }
    extra = {"band_low": band.low, "band_high": band.high} if band else {"band": "disabled"}
    return partition_results(context, layout.FILTERED_SENTENCES, storage.get(), per_shard, metadata=extra)
