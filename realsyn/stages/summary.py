"""Counts at each stage of a finished graph, read back from storage (for the CLI and the README), and
the bad input: per shard, the rows dropped as malformed and why."""

from __future__ import annotations

from collections.abc import Sequence

from realsyn import layout
from realsyn.decisions import kept_mask
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
    return int(kept_mask(t).sum())


def _retrieved(storage: Storage, shard: str) -> int:
    """Images of the shard with retrievals (0 when the global retrieval pass has not covered it)."""
    from realsyn.stages.common import read_retrievals

    try:
        return read_retrievals(storage, shard, columns=["image_id"]).num_rows
    except FileNotFoundError:  # MissingOutputError included
        return 0


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
        "images_with_retrievals": sum(_retrieved(storage, s) for s in shards),
        "synthetic_captions": sum(_rows(storage, layout.SYNTHETIC_CAPTIONS, s, layout.CAPTIONS_FILE) for s in shards),
        "pairs_after_similarity": sum(_kept(storage, layout.FILTERED_PAIRS, s, layout.DECISIONS_FILE) for s in shards),
    }
    try:
        infos = [storage.reader(layout.IMAGE_DB, s).info for s in shards]
        malformed = sum(int(i.get("dropped_malformed_document", 0)) for i in infos)
        invalid = sum(int(i.get("dropped_invalid_text", 0)) for i in infos)
        counts["documents"] = sum(int(i.get("documents_in", 0)) for i in infos) - malformed - invalid
        counts["documents_malformed_skipped"] = malformed
        counts["documents_invalid_text_skipped"] = invalid
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


DOCUMENT_DROPS = ("malformed_document", "invalid_text")  # image_db info: documents the reader skipped
PARAGRAPH_DROPS = ("sentence_split_failed", "invalid_text")  # sentence_db info: paragraphs skipped


def bad_input(storage: Storage, shards: Sequence[str], since: float | None = None) -> dict[str, dict]:
    """Per shard that lost input: ``{documents_in, documents: {reason: n}, malformed: {why: n}, paragraphs: {reason: n}}``.

    Read from the ingest manifests (``image_db``: the reader's counts; ``sentence_db``: the splitter's);
    shards without a committed ingest output (committed at or after ``since``, when given), or that
    lost nothing, are not listed.
    """
    out: dict[str, dict] = {}
    for shard in shards:
        try:
            reader = storage.reader(layout.IMAGE_DB, shard)
        except MissingOutputError:
            continue
        if since is not None and (reader.committed_at or 0.0) < since:
            continue  # an older run's ingest (this run's failed, or did not run)
        info = reader.info
        try:
            sentence_info = storage.reader(layout.SENTENCE_DB, shard).info
        except MissingOutputError:
            sentence_info = {}
        documents = {r: int(info.get(f"dropped_{r}", 0)) for r in DOCUMENT_DROPS if info.get(f"dropped_{r}")}
        malformed = {k.removeprefix("malformed_"): int(v) for k, v in sorted(info.items()) if k.startswith("malformed_") and v}
        paragraphs = {r: int(sentence_info.get(f"dropped_{r}", 0)) for r in PARAGRAPH_DROPS if sentence_info.get(f"dropped_{r}")}
        if documents or paragraphs:
            out[shard] = {
                "documents_in": int(info.get("documents_in", 0)),
                "documents": documents,
                "malformed": malformed,
                "paragraphs": paragraphs,
            }
    return out


def bad_input_lines(report: dict[str, dict]) -> list[str]:
    """One line per shard of ``bad_input``: what was dropped and why."""
    lines = []
    for shard, r in sorted(report.items()):
        parts = []
        if r["documents"]:
            dropped = sum(r["documents"].values())
            why = ", ".join(f"{k} {v}" for k, v in r["documents"].items())
            detail = ", ".join(f"{k} {v}" for k, v in r["malformed"].items())
            parts.append(f"{dropped} of {r['documents_in']} rows dropped ({why}{'; ' + detail if detail else ''})")
        if r["paragraphs"]:
            parts.append(
                f"{sum(r['paragraphs'].values())} paragraphs dropped ({', '.join(f'{k} {v}' for k, v in r['paragraphs'].items())})"
            )
        lines.append(f"{shard}: {'; '.join(parts)}")
    return lines
