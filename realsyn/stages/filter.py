"""Stages 3 and 5a-d: image rule filters, sentence filters (rules, CAT), perplexity scoring and band.

Each filter step writes the kept rows plus ``decisions.parquet`` (``realsyn.decisions``): every
input row with kept, the first filter's drop reason and a detail.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from realsyn import layout
from realsyn.decisions import decision_table
from realsyn.filters.base import apply_filters
from realsyn.io import batched
from realsyn.plugins.kinds import ImageFilter, PerplexityScorer, SentenceFilter
from realsyn.progress import track
from realsyn.stats import StepStats
from realsyn.storage import Storage

PERPLEXITY_CHUNK = 8192  # distinct texts per scorer call: one progress step

IMAGE_FILTER_COLUMNS = ["status", "width", "height", "format"]


def _write_filtered(
    storage: Storage,
    asset: str,
    shard: str,
    name: str,
    table: pa.Table,
    keep: np.ndarray,
    reasons: list[str | None],
    id_column: str,
    detail_column: str | None,
    stats: StepStats,
) -> None:
    stats.add("rows_in", table.num_rows)
    stats.add("rows_out", int(keep.sum()))
    stats.drop_reasons(reasons)
    details = None
    if detail_column:
        # the detail says why only where something was dropped
        details = pa.array(
            [None if r is None else d for r, d in zip(reasons, table.column(detail_column).cast(pa.string()).to_pylist())], pa.string()
        )
    with storage.writer(asset, shard) as w:
        w.write_parquet(name, table.filter(pa.array(keep)))
        w.write_parquet(layout.DECISIONS_FILE, decision_table(table.column(id_column), reasons, details))


def filter_images(storage: Storage, shard: str, filters: Sequence[ImageFilter]) -> StepStats:
    stats = StepStats(layout.FILTERED_IMAGES)
    with stats.timed():
        table = storage.reader(layout.IMAGE_DB, shard).read_parquet(layout.IMAGES_FILE)
        keep, reasons = apply_filters(filters, table.select(IMAGE_FILTER_COLUMNS).to_pylist())
        _write_filtered(storage, layout.FILTERED_IMAGES, shard, layout.IMAGES_FILE, table, keep, reasons, "image_id", "error", stats)
    return stats


def filter_sentence_candidates(storage: Storage, shard: str, filters: Sequence[SentenceFilter]) -> StepStats:
    """Stage 5a-c: emoji/URL, word count and CAT; perplexity comes after (it costs a model)."""
    stats = StepStats(layout.SENTENCE_CANDIDATES)
    with stats.timed():
        table = storage.reader(layout.SENTENCE_DB, shard).read_parquet(layout.SENTENCES_FILE)
        keep, reasons = apply_filters(filters, table.column("text").to_pylist())
        _write_filtered(
            storage, layout.SENTENCE_CANDIDATES, shard, layout.SENTENCES_FILE, table, keep, reasons, "sentence_id", "text", stats
        )
    return stats


def score_sentence_perplexity(storage: Storage, shard: str, scorer: PerplexityScorer | None) -> StepStats:
    """Stage 5d scoring, stored as a column so a band change never rescores. ``scorer=None`` stores NaN.

    Each distinct text of the shard is scored once and its score broadcast to every copy
    (``rows_scored``: distinct texts scored; ``duplicates_not_rescored``: the other rows)."""
    stats = StepStats(layout.SENTENCE_PERPLEXITY)
    with stats.timed():
        table = storage.reader(layout.SENTENCE_CANDIDATES, shard).read_parquet(layout.SENTENCES_FILE)
        if scorer is None:
            scores = np.full(table.num_rows, np.nan, dtype=np.float32)
            model = ""
            stats.add("rows_scored", 0)
            stats.add("duplicates_not_rescored", 0)
        else:
            # exact text dedup inside the shard; nulls stay one entry, as the scorer saw them before
            encoded = table.column("text").combine_chunks().dictionary_encode(null_encoding="encode")
            texts = encoded.dictionary.to_pylist()  # scored in chunks so the run log shows progress (the scorer batches inside)
            chunks = track(
                batched(texts, PERPLEXITY_CHUNK), f"{layout.SENTENCE_PERPLEXITY} {shard}", total=len(texts), unit="texts", size=len
            )
            distinct = np.asarray([x for chunk in chunks for x in scorer.score(list(chunk))], dtype=np.float32)
            scores = distinct[encoded.indices.to_numpy(zero_copy_only=False)]
            model = scorer.model_id
            stats.add("rows_scored", len(encoded.dictionary))
            stats.add("duplicates_not_rescored", table.num_rows - len(encoded.dictionary))
        out = table.append_column("perplexity", pa.array(scores, pa.float32())).append_column(
            "perplexity_model", pa.array([model] * table.num_rows, pa.string())
        )
        with storage.writer(layout.SENTENCE_PERPLEXITY, shard) as w:
            w.write_parquet(layout.SENTENCES_FILE, out)
    return stats


def filter_sentences_by_perplexity(storage: Storage, shard: str, band_filter=None) -> StepStats:
    """The band on the stored scores (``realsyn.filters.perplexity_band``); None keeps everything."""
    stats = StepStats(layout.FILTERED_SENTENCES)
    with stats.timed():
        table = storage.reader(layout.SENTENCE_PERPLEXITY, shard).read_parquet(layout.SENTENCES_FILE)
        if band_filter is None:
            keep, reasons = np.ones(table.num_rows, dtype=bool), [None] * table.num_rows
        else:
            keep, reasons = apply_filters([band_filter], table.select(["perplexity"]).to_pylist())
        _write_filtered(
            storage, layout.FILTERED_SENTENCES, shard, layout.SENTENCES_FILE, table, keep, reasons, "sentence_id", "perplexity", stats
        )
    return stats
