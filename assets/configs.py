"""Typed run config of each asset. Defaults are the paper's; each field says what it does."""

from typing import Optional

import dagster as dg
from pydantic import Field

class IngestConfig(dg.Config):
    fetch_timeout_s: float = Field(default=10.0, description="Per-image download timeout (URL image slots).")
    max_image_bytes: int = Field(default=20_000_000, description="Larger downloads are dropped as fetch_failed.")

class ImageFilterConfig(dg.Config):
    min_short_side: int = Field(default=100, description="Drop images whose short side is under this many pixels.")
    max_aspect_ratio: float = Field(default=3.0, description="Drop images with aspect ratio above this or below its inverse.")

class SentenceFilterConfig(dg.Config):
    filters: list[str] = Field(default=["rules", "cat"], description="Sentence filters in order: rules (emoji, URL, word count), cat (complexity + action).")
    min_words: int = Field(default=3, description="rules: fewer words is dropped.")
    max_words: int = Field(default=81, description="rules: more words is dropped.")
    cat_min_complexity: int = Field(default=1, description="cat: minimum CAT complexity (C1: an object tied to an attribute or relation).")
    cat_require_action: bool = Field(default=True, description="cat: require an action (a verb).")

class PerplexityBandConfig(dg.Config):
    low: Optional[float] = Field(default=None, description="Keep perplexity >= low; null = the scorer's default band (paper: 30 for its model).")
    high: Optional[float] = Field(default=None, description="Keep perplexity <= high; null = the scorer's default band (paper: 200 for its model).")

class ImageDedupConfig(dg.Config):
    exact: bool = Field(default=True, description="Collapse byte-identical images.")
    perceptual_max_distance: Optional[int] = Field(default=6, description="pHash Hamming distance for perceptual duplicates; null disables.")
    semantic_threshold: Optional[float] = Field(default=0.95, description="CLIP cosine for semantic duplicates; null disables.")
    semantic_on_random_weights: bool = Field(default=False, description="Apply the semantic threshold even to random-weight embeddings (not semantic: off by default).")
    index_factory: str = Field(default="Flat", description="faiss index for the global near-neighbour search (Flat; IVF-SQ8 such as 'IVF65536,SQ8' at scale: PQ similarities are too coarse for a tight threshold).")

class SentenceDedupConfig(dg.Config):
    exact: bool = Field(default=True, description="Collapse identical sentences.")
    normalized: bool = Field(default=True, description="Collapse sentences equal after case/punctuation/space normalisation (perceptual).")
    semantic_threshold: Optional[float] = Field(default=0.95, description="CLIP cosine for semantic duplicates; null disables.")
    semantic_on_random_weights: bool = Field(default=False, description="Apply the semantic threshold even to random-weight embeddings.")
    index_factory: str = Field(default="Flat", description="faiss index factory string.")

class SentenceClustersConfig(dg.Config):
    n_clusters: Optional[int] = Field(default=None, description="K of the sentence K-means; null = sentences / sentences_per_cluster.")
    sentences_per_cluster: int = Field(default=420, description="Paper: 840M sentences into 2M clusters.")
    max_points_per_centroid: int = Field(default=256, description="Training sample size per centroid.")
    niter: int = Field(default=20, description="K-means iterations.")
    seed: int = Field(default=0, description="Sampling and K-means seed.")
    bank_parts: int = Field(default=1, description="Cluster-ordered sentence bank split into this many parts (memory bound at scale).")

class RetrievalConfig(dg.Config):
    k: int = Field(default=3, description="Real sentences retrieved per image (paper ablation: 3 best).")
    n_probe: int = Field(default=1, description="Nearest sentence clusters searched per image.")

class GenerationConfig(dg.Config):
    instruction: Optional[str] = Field(default=None, description="Fusion instruction; null = the built-in RealSyn/CapsFusion instruction.")
    max_new_tokens: int = Field(default=64, description="Tokens generated per caption.")
    temperature: float = Field(default=0.0, description="0 = greedy.")
    batch_size: int = Field(default=8, description="Prompts per generation batch.")
    use_tags: bool = Field(default=True, description="Add open-set tags from the CLIP vocabulary tagger to the prompt.")
    tag_top_k: int = Field(default=5, description="Tags per image.")

class SimilarityBandConfig(dg.Config):
    low: Optional[float] = Field(default=None, description="Drop pairs below; null = the model's default (EVA02-CLIP E/14-plus: 0.51).")
    high: Optional[float] = Field(default=None, description="Drop pairs above; null = the model's default (EVA02-CLIP E/14-plus: 0.61).")

class ImageClustersConfig(dg.Config):
    n_clusters: Optional[int] = Field(default=None, description="K of the image K-means; null = images / images_per_cluster.")
    images_per_cluster: int = Field(default=168, description="Paper: 168M images into 1M centres.")
    max_points_per_centroid: int = Field(default=256, description="Training sample size per centroid.")
    niter: int = Field(default=20, description="K-means iterations.")
    seed: int = Field(default=0, description="Sampling and K-means seed.")

_SAMPLER_PARAMS = {
    "cluster_cap": ("cap", "seed"),
    "metaclip": ("metadata_path", "t", "seed", "text_columns"),
    "points_perplexity": ("keep_fraction",),
}

class SamplerConfig(dg.Config):
    name: str = Field(default="cluster_cap", description="cluster_cap (RealSyn), metaclip (MetaCLIP balancing) or points_perplexity (POINTS).")
    cap: Optional[int] = Field(default=None, description="cluster_cap: samples kept per image cluster (paper: 20 / 35 / 180).")
    seed: int = Field(default=0, description="Sampling seed.")
    t: Optional[int] = Field(default=None, description="metaclip: balancing threshold per entry (20k for a 400M pool).")
    metadata_path: Optional[str] = Field(default=None, description="metaclip: JSON list of metadata entries.")
    text_columns: Optional[list[str]] = Field(default=None, description="metaclip: which texts are matched (real_texts, synthetic_caption).")
    keep_fraction: Optional[float] = Field(default=None, description="points_perplexity: lowest-perplexity fraction kept (paper: 0.2).")

    def to_spec(self):
        from realsyn.stages.sample import SamplerSpec

        if self.name not in _SAMPLER_PARAMS:
            raise ValueError(f"unknown sampler {self.name!r}; known: {sorted(_SAMPLER_PARAMS)}")
        params = {k: getattr(self, k) for k in _SAMPLER_PARAMS[self.name] if getattr(self, k) is not None}
        if "text_columns" in params:
            params["text_columns"] = tuple(params["text_columns"])
        return SamplerSpec(self.name, params)

class SplitConfig(dg.Config):
    name: str = Field(description="Split name (a folder of the export).")
    samplers: list[SamplerConfig] = Field(description="Samplers applied in order, each fitted on what the previous kept.")

def _paper_splits() -> list[SplitConfig]:
    return [SplitConfig(name=f"cap{c}", samplers=[SamplerConfig(name="cluster_cap", cap=c)]) for c in (20, 35, 180)]

class SampledSplitsConfig(dg.Config):
    splits: list[SplitConfig] = Field(default_factory=_paper_splits, description="One split per entry (paper: cluster caps 20 / 35 / 180 for 15M / 30M / 100M).")

class ExportConfig(dg.Config):
    samples_per_shard: int = Field(default=1000, description="Samples per WebDataset tar shard.")

