"""Counts at each stage of a finished graph, read back from storage (for the CLI and the README)."""

from __future__ import annotations

from collections.abc import Sequence

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


def _kept(storage: Storage, asset: str, shard: str) -> int:
    try:
        t = storage.reader(asset).read_parquet(f"{shard}.parquet", columns=["kept"])
    except (MissingOutputError, FileNotFoundError):
        return 0
    return int(sum(t.column("kept").to_pylist()))


def stage_counts(storage: Storage, shards: Sequence[str]) -> dict:
    counts: dict = {
        "shards": len(shards),
        "documents": 0,
        "images_in_db": sum(_rows(storage, "image_db", s, "images.parquet") for s in shards),
        "images_after_rules": sum(_rows(storage, "filtered_images", s, "images.parquet") for s in shards),
        "images_after_dedup": sum(_kept(storage, "image_dedup", s) for s in shards),
        "sentences_in_db": sum(_rows(storage, "sentence_db", s, "sentences.parquet") for s in shards),
        "sentences_after_rules_cat": sum(_rows(storage, "sentence_candidates", s, "sentences.parquet") for s in shards),
        "sentences_after_perplexity": sum(_rows(storage, "filtered_sentences", s, "sentences.parquet") for s in shards),
        "sentences_after_dedup": sum(_kept(storage, "sentence_dedup", s) for s in shards),
        "images_with_retrievals": sum(_rows(storage, "retrievals", s, "retrievals.parquet") for s in shards),
        "synthetic_captions": sum(_rows(storage, "synthetic_captions", s, "captions.parquet") for s in shards),
    }
    kept_pairs = 0
    for s in shards:
        try:
            t = storage.reader("filtered_pairs", s).read_parquet("pairs.parquet", columns=["kept"])
            kept_pairs += int(sum(t.column("kept").to_pylist()))
        except MissingOutputError:
            pass
    counts["pairs_after_similarity"] = kept_pairs
    try:
        infos = [storage.reader("image_db", s).info for s in shards]
        malformed = sum(int(i.get("dropped_malformed_document", 0)) for i in infos)
        counts["documents"] = sum(int(i.get("documents_in", 0)) for i in infos) - malformed
        counts["documents_malformed_skipped"] = malformed
    except MissingOutputError:
        counts["documents"] = 0
    try:
        reader = storage.reader("exported_splits")
        summary = reader.read_json("summary.json")
        counts["splits"] = {name: int(v.get("rows_out", 0)) for name, v in summary.items()}
        counts["export_location"] = reader.uri("")
    except MissingOutputError:
        counts["splits"] = {}
    return counts
