"""Ingest stage: an input shard -> image DB + sentence DB, read by the configured input reader."""

import dagster as dg

from assets.configs import IngestConfig, effective_config
from assets.execution import SHARD_BACKFILL
from assets.metadata import partition_results, stats_metadata
from assets.partitions import shard_partitions
from assets.profiles import step_options
from realsyn import layout
from realsyn.stages import ingest as stage
from resources import ShardSourceResource, StorageResource

source_documents = dg.AssetSpec(
    layout.SOURCE_DOCUMENTS,
    partitions_def=shard_partitions,
    group_name=layout.INGEST,
    description="Input shards of interleaved documents (OBELICS or MMC4 layout, chosen by the shard source's reader), Parquet or JSONL. Registered by the new-shard sensor or `realsyn run`.",
)


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            layout.IMAGE_DB,
            deps=[source_documents],
            group_name=layout.INGEST,
            description="Every image slot: bytes, width, height, source document, position, fetch/decode status.",
        ),
        dg.AssetSpec(
            layout.SENTENCE_DB,
            deps=[source_documents],
            group_name=layout.INGEST,
            description="Every paragraph split into sentences with NLTK Punkt, with its source document.",
        ),
    ],
    partitions_def=shard_partitions,
    **step_options("document_databases", "cpu-io"),
    backfill_policy=SHARD_BACKFILL,
)
def document_databases(
    context: dg.AssetExecutionContext, config: IngestConfig, storage: StorageResource, shard_source: ShardSourceResource
):
    config = effective_config(context, config)
    image_stats, sentence_stats = {}, {}
    for shard in context.partition_keys:
        i, s = stage.ingest_shard(
            storage.get(),
            shard,
            shard_source.shard_uri(shard),
            reader=shard_source.reader.spec(),
            fetch_timeout_s=config.fetch_timeout_s,
            max_image_bytes=config.max_image_bytes,
            max_image_pixels=config.max_image_pixels,
            input_uri=shard_source.input_uri,
            fetch_policy=config.fetch_policy_options(),
        )
        image_stats[shard] = stats_metadata(i)
        sentence_stats[shard] = stats_metadata(s)
    common = {"reader": shard_source.reader.name}
    for key, per_shard in ((layout.IMAGE_DB, image_stats), (layout.SENTENCE_DB, sentence_stats)):
        yield partition_results(context, key, storage.get(), per_shard, metadata=common, shard_source=shard_source)
