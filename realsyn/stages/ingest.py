"""Stages 1-2: one input shard -> image DB (every image slot) and sentence DB (Punkt sentences)."""

from __future__ import annotations

from realsyn import layout
from realsyn.plugins import PluginSpec, build_plugin
from realsyn.progress import track
from realsyn.stats import StepStats
from realsyn.storage import Storage


def ingest_shard(
    storage: Storage,
    shard: str,
    shard_uri: str,
    *,
    reader: PluginSpec | dict | str = "obelics",
    fetch_timeout_s: float = 10.0,
    max_image_bytes: int = 20_000_000,
    max_image_pixels: int = 40_000_000,
    input_uri: str | None = None,
    fetch_policy: dict | None = None,
) -> tuple[StepStats, StepStats]:
    """Read one input shard once with the configured input reader; write its image DB and sentence DB.

    Images are fetched under ``FetchPolicy.for_input(input_uri, **fetch_policy)`` (default deny:
    public web, local paths under the input folder, objects under the input prefix); without
    ``input_uri`` the shard's own folder is the input root.
    """
    import os

    from realsyn.fetch_policy import FetchPolicy
    from realsyn.image_db import ImageFetcher, build_image_table, build_sentence_table
    from realsyn.text.sentences import SentenceSplitter

    input_reader = build_plugin("input_reader", reader)
    image_stats, sentence_stats = StepStats(layout.IMAGE_DB), StepStats(layout.SENTENCE_DB)
    with image_stats.timed():
        # one shard fits in memory (SPEC data flow)
        docs = list(track(input_reader.iter_documents(shard_uri, image_stats), f"ingest {shard}: documents read", unit="documents"))
        root = input_uri or (shard_uri.rsplit("/", 1)[0] if "://" in shard_uri else os.path.dirname(os.path.abspath(shard_uri)))
        policy = FetchPolicy.for_input(root, **(fetch_policy or {}))
        fetcher = ImageFetcher(timeout_s=fetch_timeout_s, max_bytes=max_image_bytes, policy=policy, max_pixels=max_image_pixels)
        images = build_image_table(track(docs, f"ingest {shard}: documents' images fetched", unit="documents"), shard, fetcher, image_stats)
    with sentence_stats.timed():
        sentence_stats.add("documents_in", len(docs))
        sentences = build_sentence_table(docs, shard, SentenceSplitter(), sentence_stats)
    image_stats.add("rows_out", images.num_rows)
    sentence_stats.add("rows_out", sentences.num_rows)
    with storage.writer(layout.IMAGE_DB, shard) as w:
        w.write_parquet(layout.IMAGES_FILE, images)
        w.commit(info=image_stats.as_dict())
    with storage.writer(layout.SENTENCE_DB, shard) as w:
        w.write_parquet(layout.SENTENCES_FILE, sentences)
        w.commit(info=sentence_stats.as_dict())
    return image_stats, sentence_stats
