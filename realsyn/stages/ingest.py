"""Stages 1-3 and 5a-d: documents -> image DB / sentence DB -> rule filters -> perplexity band."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from realsyn.filters.base import Filter, apply_filters
from realsyn.stats import StepStats
from realsyn.storage import Storage

IMAGE_DB = "image_db"
SENTENCE_DB = "sentence_db"
FILTERED_IMAGES = "filtered_images"
SENTENCE_CANDIDATES = "sentence_candidates"
SENTENCE_PERPLEXITY = "sentence_perplexity"
FILTERED_SENTENCES = "filtered_sentences"

EXCLUSION_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


def ingest_shard(storage: Storage, shard: str, shard_uri: str, *, fetch_timeout_s: float = 10.0, max_image_bytes: int = 20_000_000) -> tuple[StepStats, StepStats]:
    """Read one input shard once; write its image DB and sentence DB."""
    from realsyn.documents import iter_documents
    from realsyn.image_db import ImageFetcher, build_image_table, build_sentence_table
    from realsyn.text.sentences import SentenceSplitter

    image_stats, sentence_stats = StepStats(IMAGE_DB), StepStats(SENTENCE_DB)
    with image_stats.timed():
        docs = list(iter_documents(shard_uri, image_stats))  # one shard fits in memory (SPEC data flow)
        images = build_image_table(docs, shard, ImageFetcher(timeout_s=fetch_timeout_s, max_bytes=max_image_bytes), image_stats)
    with sentence_stats.timed():
        sentence_stats.add("documents_in", len(docs))
        sentences = build_sentence_table(docs, shard, SentenceSplitter(), sentence_stats)
    image_stats.add("rows_out", images.num_rows)
    sentence_stats.add("rows_out", sentences.num_rows)
    with storage.writer(IMAGE_DB, shard) as w:
        w.write_parquet("images.parquet", images)
        w.commit(info=image_stats.as_dict())
    with storage.writer(SENTENCE_DB, shard) as w:
        w.write_parquet("sentences.parquet", sentences)
        w.commit(info=sentence_stats.as_dict())
    return image_stats, sentence_stats


def _write_filtered(storage: Storage, asset: str, shard: str, name: str, table: pa.Table, keep: np.ndarray, reasons: list[str | None], id_column: str, detail_column: str | None) -> None:
    dropped = np.flatnonzero(~keep)
    excluded = pa.table(
        {
            "id": table.column(id_column).take(dropped),
            "reason": pa.array([reasons[i] for i in dropped], pa.string()),
            "detail": table.column(detail_column).take(dropped).cast(pa.string()) if detail_column else pa.nulls(len(dropped), pa.string()),
        },
        schema=EXCLUSION_SCHEMA,
    )
    with storage.writer(asset, shard) as w:
        w.write_parquet(name, table.filter(pa.array(keep)))
        # datatrove-style exclusion output: every dropped row with its reason
        w.write_parquet("excluded.parquet", excluded)


def filter_images(storage: Storage, shard: str, filters: Sequence[Filter]) -> StepStats:
    stats = StepStats(FILTERED_IMAGES)
    with stats.timed():
        table = storage.reader(IMAGE_DB, shard).read_parquet("images.parquet")
        rows = table.select(["status", "width", "height"]).to_pylist()
        keep, reasons = apply_filters(filters, rows)
        stats.add("rows_in", table.num_rows)
        stats.add("rows_out", int(keep.sum()))
        stats.drop_reasons(reasons)
        _write_filtered(storage, FILTERED_IMAGES, shard, "images.parquet", table, keep, reasons, "image_id", "error")
    return stats


def filter_sentence_candidates(storage: Storage, shard: str, filters: Sequence[Filter]) -> StepStats:
    """Stage 5a-c: emoji/URL, word count and CAT; perplexity comes after (it costs a model)."""
    stats = StepStats(SENTENCE_CANDIDATES)
    with stats.timed():
        table = storage.reader(SENTENCE_DB, shard).read_parquet("sentences.parquet")
        keep, reasons = apply_filters(filters, table.column("text").to_pylist())
        stats.add("rows_in", table.num_rows)
        stats.add("rows_out", int(keep.sum()))
        stats.drop_reasons(reasons)
        _write_filtered(storage, SENTENCE_CANDIDATES, shard, "sentences.parquet", table, keep, reasons, "sentence_id", "text")
    return stats


def score_sentence_perplexity(storage: Storage, shard: str, scorer) -> StepStats:
    """Stage 5d scoring, stored as a column so a band change never rescores. ``scorer=None`` stores NaN."""
    stats = StepStats(SENTENCE_PERPLEXITY)
    with stats.timed():
        table = storage.reader(SENTENCE_CANDIDATES, shard).read_parquet("sentences.parquet")
        if scorer is None:
            scores = np.full(table.num_rows, np.nan, dtype=np.float32)
            model = ""
        else:
            scores = np.asarray(scorer.score(table.column("text").to_pylist()), dtype=np.float32)
            model = scorer.model_id
        stats.add("rows_scored", 0 if scorer is None else table.num_rows)
        out = table.append_column("perplexity", pa.array(scores, pa.float32())).append_column("perplexity_model", pa.array([model] * table.num_rows, pa.string()))
        with storage.writer(SENTENCE_PERPLEXITY, shard) as w:
            w.write_parquet("sentences.parquet", out)
    return stats


def filter_sentences_by_perplexity(storage: Storage, shard: str, band_filter: Filter | None) -> StepStats:
    stats = StepStats(FILTERED_SENTENCES)
    with stats.timed():
        table = storage.reader(SENTENCE_PERPLEXITY, shard).read_parquet("sentences.parquet")
        if band_filter is None:
            keep, reasons = np.ones(table.num_rows, dtype=bool), [None] * table.num_rows
        else:
            keep, reasons = apply_filters([band_filter], table.select(["perplexity"]).to_pylist())
        stats.add("rows_in", table.num_rows)
        stats.add("rows_out", int(keep.sum()))
        stats.drop_reasons(reasons)
        _write_filtered(storage, FILTERED_SENTENCES, shard, "sentences.parquet", table, keep, reasons, "sentence_id", "perplexity")
    return stats
