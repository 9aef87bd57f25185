"""Dagster assets of the RealSyn graph: thin wiring around realsyn.stages, one module per stage."""

from assets import caption, checks, cluster, dedup, embed, export, filter, ingest, retrieve, sample

ALL_ASSETS = [
    ingest.source_documents,
    ingest.document_databases,
    filter.filtered_images,
    filter.sentence_candidates,
    filter.sentence_perplexity,
    filter.filtered_sentences,
    embed.image_embeddings,
    embed.sentence_embeddings,
    dedup.image_dedup,
    dedup.sentence_dedup,
    cluster.sentence_clusters,
    cluster.image_clusters,
    retrieve.retrievals,
    caption.synthetic_captions,
    caption.filtered_pairs,
    sample.sampled_splits,
    export.exported_splits,
]

ALL_CHECKS = [checks.sentence_clusters_are_usable, checks.sampled_splits_respect_caps, checks.exported_splits_match_sizes]
