"""Typed run config of each asset. Defaults are the paper's; each field says what it does.

A plug-in is configured as ``{name, params}`` everywhere (``PluginConfig``): ``name`` is a registered
short name or a dotted path ``package.module:Class`` to a user's own class, ``params`` are checked
against that class's typed ``__init__`` when the config is built, and an error names the plug-in and
the field.
"""

from typing import Any, ClassVar, Literal

import dagster as dg
from pydantic import Field, field_validator, model_validator


class PluginConfig(dg.Config):
    """One plug-in: its name (short or ``package.module:Class``) and its parameters."""

    kind: ClassVar[str] = ""
    name: str = Field(description="Registered short name or dotted path package.module:Class.")
    params: dict[str, Any | None] = Field(
        default_factory=dict, description="Parameters of the plug-in's __init__, validated against its types."
    )

    @model_validator(mode="after")
    def _validate_params(self):
        from realsyn.plugins import validate_params

        validate_params(self.kind, self.name, self.params)  # raises PluginConfigError naming plug-in and field
        return self

    def spec(self):
        from realsyn.plugins import PluginSpec

        return PluginSpec(name=self.name, params=dict(self.params))


class InputReaderConfig(PluginConfig):
    kind: ClassVar[str] = "input_reader"
    name: str = Field(
        default="obelics", description="obelics (parallel images/texts lists), mmc4 (text_list + image_info) or package.module:Class."
    )


class ImageFilterPlugin(PluginConfig):
    kind: ClassVar[str] = "image_filter"


class SentenceFilterPlugin(PluginConfig):
    kind: ClassVar[str] = "sentence_filter"


class TaggerPlugin(PluginConfig):
    kind: ClassVar[str] = "tagger"


class SamplerPlugin(PluginConfig):
    kind: ClassVar[str] = "sampler"


class IngestConfig(dg.Config):
    fetch_timeout_s: float = Field(
        default=10.0, description="Per socket operation of an image download; the whole fetch (redirects, retries included) gets 3x this."
    )
    max_image_bytes: int = Field(default=20_000_000, description="Larger downloads are dropped as fetch_failed.")
    max_image_pixels: int = Field(
        default=40_000_000,
        gt=0,
        le=89_478_485,
        description="Images with more pixels are dropped as undecodable before decoding (at most Pillow's own 89M limit).",
    )
    # Fetch policy (realsyn.fetch_policy): default deny; refusals are status fetch_refused with reason refused_*.
    allow_private_networks: bool = Field(
        default=False, description="Fetch from private (10/8, 172.16/12, 192.168/16, fc00::/7) and CGNAT addresses: trusted corpora only."
    )
    allowed_networks: list[str] = Field(
        default_factory=list, description="CIDRs fetched from whatever their range (an internal mirror, e.g. '10.2.0.0/16')."
    )
    allow_local_paths_outside_input: bool = Field(
        default=False, description="Read local image paths anywhere on disk, not only under the input folder: trusted corpora only."
    )
    allowed_local_roots: list[str] = Field(default_factory=list, description="More folders local image paths may be read from.")
    allowed_s3_prefixes: list[str] = Field(
        default_factory=list,
        description="Object-store prefixes (s3://bucket/prefix, gs://...) image refs may be read from, besides the input location itself.",
    )
    max_redirects: int = Field(default=5, ge=0, description="Redirect hops followed per image (each hop checked by the policy).")
    opt_out_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex", "none"],
        description="X-Robots-Tag directives that opt an image out (status opted_out, body not downloaded); [] honours none.",
    )

    def fetch_policy_options(self) -> dict[str, Any]:
        """Keyword arguments of realsyn.fetch_policy.FetchPolicy.for_input."""
        return {
            "allow_private_networks": self.allow_private_networks,
            "allowed_networks": tuple(self.allowed_networks),
            "allow_local_paths_outside_input": self.allow_local_paths_outside_input,
            "allowed_local_roots": tuple(self.allowed_local_roots),
            "allowed_s3_prefixes": tuple(self.allowed_s3_prefixes),
            "max_redirects": self.max_redirects,
            "opt_out_directives": tuple(self.opt_out_directives),
        }


class ImageFilterConfig(dg.Config):
    filters: list[ImageFilterPlugin] = Field(
        default_factory=lambda: [ImageFilterPlugin(name="rules")],
        description="Image filters in order, each {name, params}; rules: unfetchable, undecodable, min_short_side (100), max_aspect_ratio (3.0).",
    )


class SentenceFilterConfig(dg.Config):
    filters: list[SentenceFilterPlugin] = Field(
        default_factory=lambda: [SentenceFilterPlugin(name="rules"), SentenceFilterPlugin(name="cat")],
        description="Sentence filters in order, each {name, params}: rules (emoji, URL, min_words 3, max_words 81), cat (min_complexity 1, require_action true).",
    )


class PerplexityBandConfig(dg.Config):
    low: float | None = Field(
        default=None, description="Keep perplexity >= low; null = the scorer's default band (paper: 30 for its model)."
    )
    high: float | None = Field(
        default=None, description="Keep perplexity <= high; null = the scorer's default band (paper: 200 for its model)."
    )


class ImageDedupConfig(dg.Config):
    exact: bool = Field(default=True, description="Collapse byte-identical images.")
    perceptual_max_distance: int | None = Field(default=6, description="pHash Hamming distance for perceptual duplicates; null disables.")
    semantic_threshold: float | None = Field(default=0.95, description="CLIP cosine for semantic duplicates; null disables.")
    semantic_on_random_weights: bool = Field(
        default=False, description="Apply the semantic threshold even to random-weight embeddings (not semantic: off by default)."
    )
    index_factory: str = Field(
        default="auto",
        description="faiss index for the global near-neighbour search: 'auto' = Flat below 50,000 vectors, else 'IVF{N/256}_HNSW32,SQ8' (lists of ~256 vectors, HNSW coarse quantiser; SQ8 candidates verified by the exact inner product); or any faiss factory string (PQ similarities are too coarse for a tight threshold).",
    )
    nprobe: int = Field(default=16, description="IVF lists probed per query (recall vs time; bench/bench_dedup.py).")
    max_index_gb: float | None = Field(
        default=None,
        gt=0,
        description="Memory budget (GiB) of the semantic IVF index: null = one global index (grows with N); set, the IVF lists are indexed one contiguous range at a time within the budget, on CPU (the same edges; one more read of the shards plus two per range).",
    )


class SentenceDedupConfig(dg.Config):
    exact: bool = Field(default=True, description="Collapse identical sentences.")
    normalized: bool = Field(default=True, description="Collapse sentences equal after case/punctuation/space normalisation (perceptual).")
    semantic_threshold: float | None = Field(default=0.95, description="CLIP cosine for semantic duplicates; null disables.")
    semantic_on_random_weights: bool = Field(default=False, description="Apply the semantic threshold even to random-weight embeddings.")
    index_factory: str = Field(
        default="auto", description="faiss index factory string; 'auto' as for images (Flat when small, IVF-SQ8 when large)."
    )
    nprobe: int = Field(default=16, description="IVF lists probed per query.")
    max_index_gb: float | None = Field(
        default=None, gt=0, description="Memory budget (GiB) of the semantic IVF index; null = one global index. As for images."
    )


class SentenceClustersConfig(dg.Config):
    n_clusters: int | None = Field(default=None, description="K of the sentence K-means; null = sentences / sentences_per_cluster.")
    sentences_per_cluster: int = Field(default=420, description="Paper: 840M sentences into 2M clusters.")
    sample_rows: int = Field(
        default=4_000_000,
        description="K-means training sample budget in rows (preallocated reservoir; 4M x D=1024 float32 = 16 GiB, fits one GPU beside 2M centroids).",
    )
    max_points_per_centroid: int = Field(
        default=256, description="faiss's cap on training points per centroid: the sample is min(sample_rows, k x this)."
    )
    two_level_above: int = Field(
        default=1024,
        description="Above this many clusters, two-level K-means: ~sqrt(k) coarse cells, then each cell's share of k (~sqrt(k)/2 times less work; bench: held-out cosine -1.5% at k=1000); every row is then assigned through that tree (the centroids of its 24 nearest coarse cells, ~25 sqrt(k) products per row instead of k).",
    )
    niter: int = Field(default=20, description="K-means iterations.")
    seed: int = Field(default=0, description="Sampling and K-means seed.")
    bank_part_rows: int = Field(
        default=1_000_000,
        description="Rows per sentence bank part (a part is what retrieval holds in memory); one cluster larger than this is a part alone.",
    )
    bank_dtype: Literal["float32", "float16"] = Field(
        default="float32",
        description="Storage of the bank's vectors: float16 halves the bank's bytes (written, read by retrieval, held per part) and retrieval's memory traffic; a score moves by ~1e-5 (under 1e-4 at D=512), so only near-ties can swap. Paper scale: float16.",
    )


class RetrievalConfig(dg.Config):
    k: int = Field(default=3, description="Real sentences retrieved per image (paper ablation: 3 best).")
    n_probe: int = Field(default=1, description="Nearest sentence clusters searched per image.")
    threads: int = Field(
        default=0, ge=0, description="Worker threads of the retrieval pass (one BLAS thread each); 0 = every core of the pod."
    )
    max_image_gb: float | None = Field(
        default=None,
        gt=0,
        description="Bound on the image embeddings held at once: bank parts are searched in rounds whose gathered vectors are spilled to the pod's local disk by one more pass over the images; null = hold every kept image once.",
    )


class GenerationConfig(dg.Config):
    instruction: str | None = Field(default=None, description="Fusion instruction; null = the built-in RealSyn/CapsFusion instruction.")
    max_new_tokens: int = Field(default=64, description="Tokens generated per caption.")
    temperature: float = Field(default=0.0, description="0 = greedy.")
    batch_size: int = Field(default=8, description="Prompts per generation batch.")
    tagger: TaggerPlugin | None = Field(
        default_factory=lambda: TaggerPlugin(name="clip_vocabulary", params={"top_k": 5}),
        description="Open-set tagger {name, params} whose tags join the prompt (clip_vocabulary: top_k tags from the CLIP vocabulary); null = no tags.",
    )


class SimilarityBandConfig(dg.Config):
    low: float | None = Field(default=None, description="Drop pairs below; null = the model's default (EVA02-CLIP E/14-plus: 0.51).")
    high: float | None = Field(default=None, description="Drop pairs above; null = the model's default (EVA02-CLIP E/14-plus: 0.61).")


class ImageClustersConfig(dg.Config):
    n_clusters: int | None = Field(default=None, description="K of the image K-means; null = images / images_per_cluster.")
    images_per_cluster: int = Field(default=168, description="Paper: 168M images into 1M centres.")
    sample_rows: int = Field(default=4_000_000, description="K-means training sample budget in rows (preallocated reservoir).")
    max_points_per_centroid: int = Field(
        default=256, description="faiss's cap on training points per centroid: the sample is min(sample_rows, k x this)."
    )
    two_level_above: int = Field(
        default=1024,
        description="Above this many clusters, two-level K-means: ~sqrt(k) coarse cells, then each cell's share of k (~sqrt(k)/2 times less work; bench: held-out cosine -1.5% at k=1000); every row is then assigned through that tree (the centroids of its 24 nearest coarse cells, ~25 sqrt(k) products per row instead of k).",
    )
    niter: int = Field(default=20, description="K-means iterations.")
    seed: int = Field(default=0, description="Sampling and K-means seed.")


class SplitConfig(dg.Config):
    name: str = Field(description="Split name (a folder of the export): letters, digits, '_', '.', '-'; no '..'.")
    samplers: list[SamplerPlugin] = Field(
        description="Samplers applied in order, each {name, params} and fitted on what the previous kept: cluster_cap (cap, seed), metaclip (metadata_path, t, seed, text_columns), points_perplexity (keep_fraction) or package.module:Class."
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        from realsyn.storage import validate_name

        return validate_name(name, "split name")  # it becomes a folder and file names of the export

    def spec(self):
        from realsyn.stages.sample import SplitSpec

        return SplitSpec(self.name, [s.spec() for s in self.samplers])


def _paper_splits() -> list[SplitConfig]:
    return [SplitConfig(name=f"cap{c}", samplers=[SamplerPlugin(name="cluster_cap", params={"cap": c})]) for c in (20, 35, 180)]


class SampledSplitsConfig(dg.Config):
    splits: list[SplitConfig] = Field(
        default_factory=_paper_splits, description="One split per entry (paper: cluster caps 20 / 35 / 180 for 15M / 30M / 100M)."
    )


class ExportConfig(dg.Config):
    samples_per_shard: int = Field(default=10_000, gt=0, description="Samples per WebDataset tar shard (img2dataset's default).")
    image_format: str = Field(
        default="jpg",
        description="The one image extension of every sample (jpg, png or webp): images in another format are re-encoded, "
        "losslessly for png and webp, at jpeg_quality for jpg (web images are mostly JPEG and pass through untouched).",
    )
    jpeg_quality: int = Field(default=95, ge=1, le=100, description="JPEG quality of images re-encoded for image_format jpg.")
    real_text_members: int = Field(
        default=3, ge=0, description="real0.txt .. real{n-1}.txt members per sample (the ranked real texts; match retrievals' k)."
    )

    @field_validator("image_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in ("jpg", "png", "webp"):
            raise ValueError(f"image_format must be jpg, png or webp, got {value!r}")
        return value


# ---------------------------------------------------------------------------------------- deployment knobs
# The `assets:` section of the deployment's run config (REALSYN_CONFIG), set when the definitions load.
# Jobs carry it as default config; runs launched without it (the automation sensor's nightly rebuild,
# "Materialize" on an asset in the UI) take it from here, so every run uses the knobs the code versions
# were computed from, not the paper defaults of the Config classes.
_DEPLOYMENT_ASSET_CONFIGS: dict[str, dict[str, Any]] = {}


def set_deployment_asset_configs(asset_configs: dict[str, dict[str, Any]] | None) -> None:
    _DEPLOYMENT_ASSET_CONFIGS.clear()
    _DEPLOYMENT_ASSET_CONFIGS.update(asset_configs or {})


def effective_config(context: dg.AssetExecutionContext, config: dg.Config) -> dg.Config:
    """``config`` when the run gave this op a config; else the deployment's section for it, if any."""
    op = context.op_execution_context.op_def.name
    if op in ((context.run.run_config or {}).get("ops") or {}):
        return config
    section = _DEPLOYMENT_ASSET_CONFIGS.get(op)
    return type(config).model_validate(section) if section else config
