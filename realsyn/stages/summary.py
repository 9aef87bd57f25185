"""Counts at each stage of a finished graph, read back from storage (for the CLI and the README)."""

from __future__ import annotations

from collections.abc import Sequence

from realsyn import layout
from realsyn.storage import MissingOutputError, Storage


def _rows(storage: Storage, asset: str, shard: str | None, name: str) -> int:
    import pyarrow.parquet as pq

    try:
        reader = storage.reader(asset, shard)
    except MissingOutputError:
        return 0
    if not reader.has(name):
        return 0
    with reader.open(name) as f:
        return pq.ParquetFile(f).metadata.num_rows


def _kept(storage: Storage, asset: str, shard: str | None, name: str) -> int:
    """Rows kept in a decision record (``realsyn.decisions``)."""
    try:
        t = storage.reader(asset, shard).read_parquet(name, columns=["kept"])
    except (MissingOutputError, FileNotFoundError):
        return 0
    return int(sum(t.column("kept").to_pylist()))


def stage_counts(storage: Storage, shards: Sequence[str]) -> dict:
    counts: dict = {
        "shards": len(shards),
        "documents": 0,
        "images_in_db": sum(_rows(storage, layout.IMAGE_DB, s, layout.IMAGES_FILE) for s in shards),
        "images_after_rules": sum(_rows(storage, layout.FILTERED_IMAGES, s, layout.IMAGES_FILE) for s in shards),
        "images_after_dedup": sum(_kept(storage, layout.IMAGE_DEDUP, None, layout.decisions_file(s)) for s in shards),
        "sentences_in_db": sum(_rows(storage, layout.SENTENCE_DB, s, layout.SENTENCES_FILE) for s in shards),
        "sentences_after_rules_cat": sum(_rows(storage, layout.SENTENCE_CANDIDATES, s, layout.SENTENCES_FILE) for s in shards),
        "sentences_after_perplexity": sum(_rows(storage, layout.FILTERED_SENTENCES, s, layout.SENTENCES_FILE) for s in shards),
        "sentences_after_dedup": sum(_kept(storage, layout.SENTENCE_DEDUP, None, layout.decisions_file(s)) for s in shards),
        "images_with_retrievals": sum(_rows(storage, layout.RETRIEVALS, s, layout.RETRIEVALS_FILE) for s in shards),
        "synthetic_captions": sum(_rows(storage, layout.SYNTHETIC_CAPTIONS, s, layout.CAPTIONS_FILE) for s in shards),
        "pairs_after_similarity": sum(_kept(storage, layout.FILTERED_PAIRS, s, layout.DECISIONS_FILE) for s in shards),
    }
    try:
        infos = [storage.reader(layout.IMAGE_DB, s).info for s in shards]
        malformed = sum(int(i.get("dropped_malformed_document", 0)) for i in infos)
        counts["documents"] = sum(int(i.get("documents_in", 0)) for i in infos) - malformed
        counts["documents_malformed_skipped"] = malformed
    except MissingOutputError:
        counts["documents"] = 0
    try:
        reader = storage.reader(layout.EXPORTED_SPLITS)
        summary = reader.read_json(layout.SUMMARY_FILE)
        counts["splits"] = {name: int(v.get("rows_out", 0)) for name, v in summary.items()}
        counts["export_location"] = reader.uri("")
    except MissingOutputError:
        counts["splits"] = {}
    return counts
