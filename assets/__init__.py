"""Dagster assets of the RealSyn graph: thin wiring around realsyn.stages."""

from assets import captioning, checks, dedup, embeddings, ingest, sampling

ALL_ASSETS = [
    ingest.source_documents,
    ingest.document_databases,
    ingest.filtered_images,
    ingest.sentence_candidates,
    ingest.sentence_perplexity,
    ingest.filtered_sentences,
    embeddings.image_embeddings,
    embeddings.sentence_embeddings,
    dedup.image_dedup,
    dedup.sentence_dedup,
    dedup.sentence_clusters,
    captioning.retrievals,
    captioning.synthetic_captions,
    captioning.filtered_pairs,
    sampling.image_clusters,
    sampling.sampled_splits,
    sampling.exported_splits,
]

ALL_CHECKS = [checks.sentence_clusters_are_usable, checks.sampled_splits_respect_caps, checks.exported_splits_match_sizes]
