"""Per-shard ingest: documents -> image DB + sentence DB -> image filter, sentence filters, perplexity."""

import dagster as dg

from assets.configs import ImageFilterConfig, IngestConfig, PerplexityBandConfig, SentenceFilterConfig
from assets.execution import CPU_STEP_TAGS, GPU_BACKFILL, GPU_POOL, GPU_STEP_TAGS
from assets.metadata import merged, stats_metadata
from assets.partitions import shard_partitions
from realsyn.stages import ingest as stage
from resources import PerplexityScorerResource, ShardSourceResource, StorageResource

source_documents = dg.AssetSpec(
    "source_documents",
    partitions_def=shard_partitions,
    group_name="ingest",
    description="Input shards of interleaved documents (OBELICS layout: parallel `images` and `texts` lists), Parquet or JSONL. Registered by the new-shard sensor or `realsyn run`.",
)

@dg.multi_asset(
    specs=[
        dg.AssetSpec("image_db", deps=[source_documents], description="Every image slot: bytes, width, height, source document, position, fetch/decode status.", group_name="ingest"),
        dg.AssetSpec("sentence_db", deps=[source_documents], description="Every paragraph split into sentences with NLTK Punkt, with its source document.", group_name="ingest"),
    ],
    partitions_def=shard_partitions,
    op_tags=CPU_STEP_TAGS,
)
def document_databases(context: dg.AssetExecutionContext, config: IngestConfig, storage: StorageResource, shard_source: ShardSourceResource):
    image_stats, sentence_stats = [], []
    for shard in context.partition_keys:
        i, s = stage.ingest_shard(storage.get(), shard, shard_source.shard_uri(shard), fetch_timeout_s=config.fetch_timeout_s, max_image_bytes=config.max_image_bytes)
        image_stats.append(i)
        sentence_stats.append(s)
    yield dg.MaterializeResult(asset_key="image_db", metadata=stats_metadata(merged(image_stats), path=storage.get().uri(stage.IMAGE_DB)))
    yield dg.MaterializeResult(asset_key="sentence_db", metadata=stats_metadata(merged(sentence_stats), path=storage.get().uri(stage.SENTENCE_DB)))

@dg.asset(deps=["image_db"], partitions_def=shard_partitions, group_name="filter", op_tags=CPU_STEP_TAGS, description="Images kept by the rule filter (short side, aspect ratio; undecodable and unfetchable dropped), plus excluded.parquet with each reason.")
def filtered_images(context: dg.AssetExecutionContext, config: ImageFilterConfig, storage: StorageResource) -> dg.MaterializeResult:
    from realsyn.plugins import create_plugin

    f = create_plugin("image_filter", "rules", min_short_side=config.min_short_side, max_aspect_ratio=config.max_aspect_ratio)
    stats = [stage.filter_images(storage.get(), shard, [f]) for shard in context.partition_keys]
    return dg.MaterializeResult(metadata=stats_metadata(merged(stats), path=storage.get().uri(stage.FILTERED_IMAGES)))

def sentence_filters(config: SentenceFilterConfig) -> list:
    from realsyn.plugins import create_plugin

    params = {
        "rules": {"min_words": config.min_words, "max_words": config.max_words},
        "cat": {"min_complexity": config.cat_min_complexity, "require_action": config.cat_require_action},
    }
    unknown = [n for n in config.filters if n not in params]
    if unknown:
        raise ValueError(f"unknown sentence filters {unknown}; known: {sorted(params)} (perplexity has its own asset)")
    return [create_plugin("sentence_filter", n, **params[n]) for n in config.filters]

@dg.asset(deps=["sentence_db"], partitions_def=shard_partitions, group_name="filter", op_tags=CPU_STEP_TAGS, description="Sentences kept by the rule filters (emoji, URL, 3..81 words) and CAT (complexity >= C1 with an action), plus excluded.parquet.")
def sentence_candidates(context: dg.AssetExecutionContext, config: SentenceFilterConfig, storage: StorageResource) -> dg.MaterializeResult:
    filters = sentence_filters(config)
    stats = [stage.filter_sentence_candidates(storage.get(), shard, filters) for shard in context.partition_keys]
    return dg.MaterializeResult(metadata=stats_metadata(merged(stats), filters=", ".join(config.filters), path=storage.get().uri(stage.SENTENCE_CANDIDATES)))

@dg.asset(deps=["sentence_candidates"], partitions_def=shard_partitions, group_name="filter", op_tags=GPU_STEP_TAGS, pool=GPU_POOL, backfill_policy=GPU_BACKFILL, description="Language-model perplexity of each candidate sentence, stored as a column (a band change never rescores).")
def sentence_perplexity(context: dg.AssetExecutionContext, storage: StorageResource, perplexity: PerplexityScorerResource) -> dg.MaterializeResult:
    scorer = perplexity.get()
    stats = [stage.score_sentence_perplexity(storage.get(), shard, scorer) for shard in context.partition_keys]
    return dg.MaterializeResult(metadata=stats_metadata(merged(stats), scorer=scorer.model_id if scorer else "disabled", path=storage.get().uri(stage.SENTENCE_PERPLEXITY)))

@dg.asset(deps=["sentence_perplexity"], partitions_def=shard_partitions, group_name="filter", op_tags=CPU_STEP_TAGS, description="Sentences whose perplexity lies in the band (paper: [30, 200] for its model; per scorer), plus excluded.parquet.")
def filtered_sentences(context: dg.AssetExecutionContext, config: PerplexityBandConfig, storage: StorageResource, perplexity: PerplexityScorerResource) -> dg.MaterializeResult:
    band = None
    if perplexity.enabled:
        from realsyn.filters.perplexity_band import PerplexityBandFilter, default_band

        low, high = default_band(perplexity.model)
        band = PerplexityBandFilter(low=config.low if config.low is not None else low, high=config.high if config.high is not None else high)
    else:
        context.log.warning("perplexity scorer disabled: the perplexity band is skipped")
    stats = [stage.filter_sentences_by_perplexity(storage.get(), shard, band) for shard in context.partition_keys]
    extra = {"band_low": band.low, "band_high": band.high} if band else {"band": "disabled"}
    return dg.MaterializeResult(metadata=stats_metadata(merged(stats), **extra, path=storage.get().uri(stage.FILTERED_SENTENCES)))
