"""Dagster resources: thin handles that build the core's storage and plug-ins from typed config.

The environment is chosen once (``REALSYN_ENV``: ``local``, the default, or ``production``) in
``build_resources``; every asset receives the same resource names in both.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Optional

import dagster as dg
from pydantic import Field

DEFAULT_STORAGE_ROOT = "demo_output/storage"
DEFAULT_INPUT = "demo_output/corpus"


@lru_cache(maxsize=8)
def _storage(root: str):
    from realsyn.storage import Storage

    return Storage(root)


class StorageResource(dg.ConfigurableResource):
    """The one storage root of every asset: a local folder, or s3://bucket/prefix (AWS_ENDPOINT_URL for MinIO/moto)."""

    root: str = Field(default=DEFAULT_STORAGE_ROOT, description="Local folder or s3://bucket/prefix holding every asset's files.")

    def get(self):
        return _storage(self.root)


class ShardSourceResource(dg.ConfigurableResource):
    """Where the input shards (OBELICS-layout Parquet/JSONL) live; one shard is one partition."""

    input_uri: str = Field(default=DEFAULT_INPUT, description="Folder or s3://bucket/prefix of input shards (*.parquet, *.jsonl, *.jsonl.gz).")

    def list_shards(self) -> dict[str, str]:
        """Partition key -> shard URI, for every shard under input_uri."""
        from realsyn.documents import list_input_shards, shard_key

        shards = list_input_shards(self.input_uri)
        out: dict[str, str] = {}
        for uri in shards:
            key = shard_key(uri, self.input_uri)
            if key in out:
                raise ValueError(f"two input shards map to partition key {key!r}: {out[key]} and {uri}")
            out[key] = uri
        return out

    def shard_uri(self, key: str) -> str:
        shards = self.list_shards()
        if key not in shards:
            raise KeyError(f"partition {key!r} has no shard under {self.input_uri}")
        return shards[key]


class ClipEmbedderResource(dg.ConfigurableResource):
    """The CLIP model of stages 4-10 (paper: EVA02-CLIP E/14-plus). Falls back to a small random-weight model, with a warning, when weights cannot be had."""

    model_name: str = Field(default="EVA02-E-14-plus", description="open_clip architecture name.")
    pretrained: Optional[str] = Field(default="laion2b_s9b_b144k", description="open_clip pretrained tag or a local weights file.")
    fallback_model: Optional[str] = Field(default="RealSyn-Tiny", description="Architecture built with random weights when the weights cannot be loaded; null to fail instead.")
    device: str = Field(default="auto", description="auto, cpu or cuda.")
    batch_size: int = Field(default=32, description="Images or texts per forward pass.")

    def get(self):
        return _embedder(self.model_name, self.pretrained, self.fallback_model, self.device, self.batch_size)


@lru_cache(maxsize=4)
def _embedder(model_name, pretrained, fallback_model, device, batch_size):
    from realsyn.plugins import create_plugin

    return create_plugin("embedder", "open_clip", model_name=model_name, pretrained=pretrained, fallback_model=fallback_model, device=device, batch_size=batch_size)


class GenerationBackendResource(dg.ConfigurableResource):
    """The LLM that fuses retrieved texts, caption and tags. Production: a vLLM server; embedded: SmolLM2-135M-Instruct on CPU."""

    backend: str = Field(default="transformers", description="transformers (in-process) or vllm (OpenAI-compatible vLLM server).")
    model: str = Field(default="embedded:smollm2-135m-instruct", description="Model name or path; for vllm, the served model name.")
    base_url: Optional[str] = Field(default=None, description="vLLM server URL, e.g. http://vllm.realsyn.svc:8000 (vllm backend).")
    api_key: Optional[str] = Field(default=None, description="Bearer token for the vLLM server; use dg.EnvVar.")
    device: str = Field(default="auto", description="transformers backend: auto, cpu or cuda.")
    max_concurrency: int = Field(default=16, description="vllm backend: requests in flight.")
    timeout_s: float = Field(default=120.0, description="vllm backend: per-request timeout.")

    def get(self):
        return _backend(self.backend, self.model, self.base_url, self.api_key, self.device, self.max_concurrency, self.timeout_s)


@lru_cache(maxsize=4)
def _backend(backend, model, base_url, api_key, device, max_concurrency, timeout_s):
    from realsyn.plugins import create_plugin

    if backend == "vllm":
        if not base_url:
            raise ValueError("generation backend 'vllm' needs base_url (the vLLM server's URL)")
        return create_plugin("generation_backend", "vllm", base_url=base_url, model=model, api_key=api_key, timeout_s=timeout_s, max_concurrency=max_concurrency)
    return create_plugin("generation_backend", backend, model=model, device=device)


class PerplexityScorerResource(dg.ConfigurableResource):
    """Causal LM perplexity (RealSyn stage 5d band; POINTS selection). Embedded: SmolLM2-135M-Instruct."""

    enabled: bool = Field(default=True, description="Score sentences; when false the perplexity band is skipped.")
    model: str = Field(default="embedded:smollm2-135m-instruct", description="Hugging Face causal LM name or path.")
    device: str = Field(default="auto", description="auto, cpu or cuda.")
    batch_size: int = Field(default=16, description="Texts per forward pass.")

    def get(self):
        return _scorer(self.model, self.device, self.batch_size) if self.enabled else None


@lru_cache(maxsize=2)
def _scorer(model, device, batch_size):
    from realsyn.plugins import create_plugin

    return create_plugin("perplexity_scorer", "causal_lm", model=model, device=device, batch_size=batch_size)


def build_resources(env: str | None = None, *, input_uri: str | None = None, storage_root: str | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The resources of one environment; explicit arguments win over environment variables, ``overrides`` (resource -> fields) over both."""
    resources = _environment_resources(env, input_uri, storage_root)
    for name, fields in (overrides or {}).items():
        if name not in resources:
            raise ValueError(f"unknown resource {name!r} in overrides; known: {sorted(resources)}")
        current = resources[name]
        resources[name] = type(current)(**{**current.model_dump(), **fields})
    return resources


def _environment_resources(env: str | None, input_uri: str | None, storage_root: str | None) -> dict[str, Any]:
    env = env or os.environ.get("REALSYN_ENV", "local")
    input_uri = input_uri or os.environ.get("REALSYN_INPUT", DEFAULT_INPUT)
    storage_root = storage_root or os.environ.get("REALSYN_STORAGE_ROOT", DEFAULT_STORAGE_ROOT)
    if env == "production":
        return {
            "storage": StorageResource(root=storage_root),
            "shard_source": ShardSourceResource(input_uri=input_uri),
            "clip": ClipEmbedderResource(device="cuda", batch_size=256, fallback_model=None),
            "generator": GenerationBackendResource(
                backend="vllm",
                model=os.environ.get("REALSYN_VLLM_MODEL", "realsyn-fusion-llama3-8b"),
                base_url=os.environ.get("REALSYN_VLLM_URL", "http://vllm.realsyn.svc.cluster.local:8000"),
                api_key=dg.EnvVar("REALSYN_VLLM_API_KEY").get_value(),
                max_concurrency=64,
            ),
            "perplexity": PerplexityScorerResource(model=os.environ.get("REALSYN_PPL_MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct"), device="cuda", batch_size=128),
        }
    if env != "local":
        raise ValueError(f"REALSYN_ENV must be 'local' or 'production', not {env!r}")
    return {
        "storage": StorageResource(root=storage_root),
        "shard_source": ShardSourceResource(input_uri=input_uri),
        "clip": ClipEmbedderResource(),
        "generator": GenerationBackendResource(),
        "perplexity": PerplexityScorerResource(),
    }
