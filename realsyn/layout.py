"""Where every asset lives: its key, its stage (asset group), its file names and shared schemas.

The stage runners, the Dagster assets (``deps``, jobs, checks) and the summary all name assets and
files through this module, so renaming one is one edit. Per-shard assets live under
``{root}/{asset}/{shard}/``, global ones under ``{root}/{asset}/_global/`` (see ``realsyn.storage``).
"""

from __future__ import annotations

import pyarrow as pa

# Stages, in data-flow order: each is one core module ``realsyn/stages/<stage>.py``, one Dagster
# module ``assets/<stage>.py`` and one asset group.
INGEST, FILTER, EMBED, DEDUP, CLUSTER, RETRIEVE, CAPTION, SAMPLE, EXPORT, EVALUATE = STAGES = (
    "ingest",
    "filter",
    "embed",
    "dedup",
    "cluster",
    "retrieve",
    "caption",
    "sample",
    "export",
    "evaluate",
)

# Asset keys.
SOURCE_DOCUMENTS = "source_documents"
IMAGE_DB = "image_db"
SENTENCE_DB = "sentence_db"
FILTERED_IMAGES = "filtered_images"
SENTENCE_CANDIDATES = "sentence_candidates"
SENTENCE_PERPLEXITY = "sentence_perplexity"
FILTERED_SENTENCES = "filtered_sentences"
IMAGE_EMBEDDINGS = "image_embeddings"
SENTENCE_EMBEDDINGS = "sentence_embeddings"
IMAGE_DEDUP = "image_dedup"
SENTENCE_DEDUP = "sentence_dedup"
SENTENCE_CLUSTERS = "sentence_clusters"
IMAGE_CLUSTERS = "image_clusters"
RETRIEVALS = "retrievals"
SYNTHETIC_CAPTIONS = "synthetic_captions"
FILTERED_PAIRS = "filtered_pairs"
SAMPLED_SPLITS = "sampled_splits"
EXPORTED_SHARDS = "exported_shards"
EXPORTED_SPLITS = "exported_splits"
EVALUATIONS = "evaluations"  # partitioned by split, not by shard

STAGE_OF: dict[str, str] = {
    SOURCE_DOCUMENTS: INGEST,
    IMAGE_DB: INGEST,
    SENTENCE_DB: INGEST,
    FILTERED_IMAGES: FILTER,
    SENTENCE_CANDIDATES: FILTER,
    SENTENCE_PERPLEXITY: FILTER,
    FILTERED_SENTENCES: FILTER,
    IMAGE_EMBEDDINGS: EMBED,
    SENTENCE_EMBEDDINGS: EMBED,
    IMAGE_DEDUP: DEDUP,
    SENTENCE_DEDUP: DEDUP,
    SENTENCE_CLUSTERS: CLUSTER,
    IMAGE_CLUSTERS: CLUSTER,
    RETRIEVALS: RETRIEVE,
    SYNTHETIC_CAPTIONS: CAPTION,
    FILTERED_PAIRS: CAPTION,
    SAMPLED_SPLITS: SAMPLE,
    EXPORTED_SHARDS: EXPORT,
    EXPORTED_SPLITS: EXPORT,
    EVALUATIONS: EVALUATE,
}

# The graph runs as seven jobs in data-flow order: per shard, global, per shard, global, per shard, global, per split.
PREPARE_SHARDS = (
    IMAGE_DB,
    SENTENCE_DB,
    FILTERED_IMAGES,
    SENTENCE_CANDIDATES,
    SENTENCE_PERPLEXITY,
    FILTERED_SENTENCES,
    IMAGE_EMBEDDINGS,
    SENTENCE_EMBEDDINGS,
)
DEDUP_AND_CLUSTER = (IMAGE_DEDUP, SENTENCE_DEDUP, SENTENCE_CLUSTERS, RETRIEVALS)
CAPTION_SHARDS = (SYNTHETIC_CAPTIONS, FILTERED_PAIRS)
SAMPLE_SPLITS = (IMAGE_CLUSTERS, SAMPLED_SPLITS)
EXPORT_SHARDS = (EXPORTED_SHARDS,)  # per shard: every split's tars and Parquet in one pass
PUBLISH_EXPORT = (EXPORTED_SPLITS,)  # global: one folder per split (copied tars + sizes.json)
EVALUATE_SPLITS = (EVALUATIONS,)  # per split: a small model trained with each objective, then scored

# File names inside an asset's generation folder.
IMAGES_FILE = "images.parquet"  # image_db, filtered_images
SENTENCES_FILE = "sentences.parquet"  # sentence_db, sentence_candidates, sentence_perplexity, filtered_sentences
DECISIONS_FILE = "decisions.parquet"  # every step that drops anything (per shard)
DECISIONS_DIR = "decisions"  # global steps: decisions/{shard}.parquet
EMBEDDINGS_FILE = "embeddings.npy"
EMBEDDING_INDEX_FILE = "index.parquet"  # rows aligned with embeddings.npy
MODEL_FILE = "model.json"  # which model made the embeddings
SUMMARY_FILE = "summary.json"
CENTROIDS_FILE = "centroids.npy"
CLUSTER_COUNTS_FILE = "counts.npy"
ASSIGNMENTS_DIR = "assignments"  # assignments/{shard}.parquet
CLUSTER_LAYOUT_FILE = "clusters.parquet"  # sentence bank: cluster -> (part, start, end)
RETRIEVALS_DIR = "shards"  # retrievals (global): shards/{shard}.parquet
CAPTIONS_FILE = "captions.parquet"
SIMILARITY_FILE = "similarity.parquet"  # filtered_pairs: image_id, similarity (scores apart from the band)
BAND_FILE = "band.json"
SIZES_FILE = "sizes.json"  # exported split: tar name -> samples (open_clip reads it)
TRAIN_DATA_FILE = "train_data.txt"  # exported_splits: the split's tar URIs joined by "::" (open_clip --train-data)
# Published splits, outside every generation (a leading "_": never an asset, never swept): {root}/_exports/{split}/v{N}/
PUBLISHED_EXPORTS_DIR = "_exports"
PUBLISHED_LATEST_FILE = "latest.json"  # _exports/{split}/latest.json: the version trainers read by default
PUBLISHED_MANIFEST_FILE = "manifest.json"  # written last into v{N}/: the version is complete
EVALUATION_FILE = "evaluation.json"  # evaluations: per objective the metrics, with the split's data version
TRAINING_CURVE_FILE = "curve.parquet"  # evaluations: objective, step, loss, lr
TRAINING_CURVE_PLOT = "curve.png"
EVALUATION_HISTORY_DIR = "_history/evaluations"  # {split}.jsonl: every evaluation of a split, outside any generation
CAPTION_CACHE_DIR = "_cache/synthetic_captions"  # {shard}/part-{n:06d}.parquet, append-only, outside any generation: survives reruns
CONCISE_CAPTION_CACHE_DIR = "_cache/concise_captions"  # {shard}/part-{n:06d}.parquet, keyed by (image_id, captioner_id)

# One keep/drop record for every step that drops anything (see realsyn.decisions).
DECISION_SCHEMA = pa.schema([("id", pa.string()), ("kept", pa.bool_()), ("reason", pa.string()), ("detail", pa.string())])

RETRIEVAL_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("sentence_ids", pa.list_(pa.string())),
        ("texts", pa.list_(pa.string())),
        ("scores", pa.list_(pa.float32())),
    ]
)


def assignments_file(shard: str) -> str:
    return f"{ASSIGNMENTS_DIR}/{shard}.parquet"


def bank_part_file(part: int, ext: str) -> str:
    """sentence_clusters: one part of the cluster-ordered sentence bank, ``npy`` (embeddings) or ``parquet`` (sentence_id, text, cluster)."""
    return f"bank/part-{part:05d}.{ext}"


def retrievals_file(shard: str) -> str:
    """retrievals (one global pass): the top-k real texts of the kept images of ``shard`` (RETRIEVAL_SCHEMA)."""
    return f"{RETRIEVALS_DIR}/{shard}.parquet"


def decisions_file(shard: str) -> str:
    """A global step's decisions of one shard."""
    return f"{DECISIONS_DIR}/{shard}.parquet"


def split_selection_file(split: str, shard: str) -> str:
    """sampled_splits: the samples of ``split`` chosen from ``shard`` (image_id, cluster)."""
    return f"{split}/{shard}.parquet"


def split_decisions_file(split: str, shard: str) -> str:
    return f"{split}/{DECISIONS_DIR}/{shard}.parquet"


def export_tar_name(split: str, shard: str, index: int) -> str:
    """A tar of ``split`` written from ``shard`` (the same name in exported_shards and exported_splits)."""
    return f"{split}-{shard}-{index:06d}.tar"


def export_sizes_file(split: str) -> str:
    """exported_shards and exported_splits: {tar name: samples} of ``split`` (open_clip reads it beside the tars)."""
    return f"{split}/{SIZES_FILE}"


def export_shard_parquet_file(split: str) -> str:
    """exported_shards: the samples of ``split`` from this shard as one Parquet table."""
    return f"{split}/parquet.parquet"


def export_facts_file(split: str) -> str:
    """exported_shards: ``split``'s content hash and data-card histograms of this shard."""
    return f"{split}/facts.json"


def export_parquet_file(split: str, shard: str) -> str:
    """exported_splits: the copy of ``shard``'s Parquet table of ``split``."""
    return f"{split}/parquet/{shard}.parquet"
