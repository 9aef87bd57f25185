"""Dagster resources: thin handles that build the core's storage and plug-ins from typed config.

Every model resource is a plug-in in config shape, ``{name, params}``: ``name`` a registered short
name or a dotted path ``package.module:Class``, ``params`` validated against that class. The
environment is chosen once (``REALSYN_ENV``: ``local``, the default, or ``production``) in
``build_resources``; every asset receives the same resource names in both.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Any, ClassVar

import dagster as dg
from pydantic import Field

from assets.configs import InputReaderConfig

DEFAULT_STORAGE_ROOT = "demo_output/storage"
DEFAULT_INPUT = "demo_output/corpus"


@lru_cache(maxsize=8)
def _storage(root: str):
    from realsyn.storage import Storage

    return Storage(root)


@lru_cache(maxsize=8)
def _plugin(kind: str, name: str, params_json: str):
    """One instance per (kind, name, params) and process: a model loads once for many shards."""
    from realsyn.plugins import build_plugin

    return build_plugin(kind, {"name": name, "params": json.loads(params_json)})


class StorageResource(dg.ConfigurableResource):
    """The one storage root of every asset: a local folder, or s3://bucket/prefix (AWS_ENDPOINT_URL for MinIO/moto)."""

    root: str = Field(default=DEFAULT_STORAGE_ROOT, description="Local folder or s3://bucket/prefix holding every asset's files.")

    def get(self):
        return _storage(self.root)


class ShardSourceResource(dg.ConfigurableResource):
    """Where the input shards live and how they are read; one shard is one partition."""

    input_uri: str = Field(
        default=DEFAULT_INPUT, description="Folder or s3://bucket/prefix of input shards (*.parquet, *.jsonl, *.jsonl.gz)."
    )
    reader: InputReaderConfig = Field(
        default_factory=InputReaderConfig,
        description="Input reader plug-in: obelics (parallel images/texts lists) or mmc4 (text_list + image_info).",
    )

    def list_shards(self) -> dict[str, str]:
        """Partition key -> shard URI, for every shard under input_uri."""
        from realsyn.readers import list_input_shards, shard_key

        out: dict[str, str] = {}
        for uri in list_input_shards(self.input_uri):
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


class _PluginResource(dg.ConfigurableResource):
    """A plug-in chosen by ``name`` with its ``params``; built once per process."""

    kind: ClassVar[str] = ""  # the plug-in kind (realsyn.plugins.kinds)
    name: str
    params: dict[str, Any | None] = Field(default_factory=dict)

    def get(self):
        return _plugin(self.kind, self.name, json.dumps(self.params, sort_keys=True))

    def resolved_params(self) -> dict[str, Any]:
        """The params as the plug-in receives them, defaults filled."""
        from realsyn.plugins import validate_params

        return validate_params(self.kind, self.name, self.params)


class EmbedderResource(_PluginResource):
    """The CLIP model of stages 4-10 (paper: EVA02-CLIP E/14-plus). open_clip falls back to a small random-weight model, with a warning, when weights cannot be had."""

    kind: ClassVar[str] = "embedder"

    name: str = Field(default="open_clip", description="Embedder plug-in: open_clip or package.module:Class.")
    params: dict[str, Any | None] = Field(
        default_factory=dict,
        description="Embedder parameters, e.g. model_name, pretrained (tag or local file), fallback_model, device, batch_size.",
    )


class GenerationBackendResource(_PluginResource):
    """The LLM that fuses retrieved texts, caption and tags. Production: a vLLM server; embedded: SmolLM2-135M-Instruct on CPU."""

    kind: ClassVar[str] = "generation_backend"

    name: str = Field(
        default="transformers", description="transformers (in-process), vllm (OpenAI-compatible server) or package.module:Class."
    )
    params: dict[str, Any | None] = Field(
        default_factory=dict,
        description="Backend parameters, e.g. model; vllm: base_url, api_key_env (name of the variable holding the key), max_concurrency, timeout_s.",
    )


class PerplexityScorerResource(_PluginResource):
    """Causal LM perplexity (RealSyn stage 5d band; POINTS selection). Embedded: SmolLM2-135M-Instruct."""

    kind: ClassVar[str] = "perplexity_scorer"

    enabled: bool = Field(default=True, description="Score sentences; when false the perplexity band is skipped.")
    name: str = Field(default="causal_lm", description="Perplexity scorer plug-in: causal_lm or package.module:Class.")
    params: dict[str, Any | None] = Field(
        default_factory=dict, description="Scorer parameters, e.g. model (HF name or path), device, batch_size."
    )

    def get(self):
        return super().get() if self.enabled else None


def build_resources(
    env: str | None = None,
    *,
    input_uri: str | None = None,
    storage_root: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The resources of one environment; explicit arguments win over environment variables, ``overrides`` (resource -> fields) over both.

    An override's ``params`` (and ``reader``) merge into the environment's, so a run config names only what it changes.
    """
    resources = _environment_resources(env, input_uri, storage_root)
    for name, fields in (overrides or {}).items():
        if name not in resources:
            raise ValueError(f"unknown resource {name!r} in overrides; known: {sorted(resources)}")
        current = resources[name].model_dump()
        merged = {**current, **fields}
        for nested in ("params", "reader"):
            if (
                isinstance(current.get(nested), dict)
                and isinstance(fields.get(nested), dict)
                and fields.get("name", current.get("name")) == current.get("name")
            ):
                merged[nested] = {**current[nested], **fields[nested]}
        resources[name] = type(resources[name])(**merged)
    return resources


def _environment_resources(env: str | None, input_uri: str | None, storage_root: str | None) -> dict[str, Any]:
    env = env or os.environ.get("REALSYN_ENV", "local")
    input_uri = input_uri or os.environ.get("REALSYN_INPUT", DEFAULT_INPUT)
    storage_root = storage_root or os.environ.get("REALSYN_STORAGE_ROOT", DEFAULT_STORAGE_ROOT)
    if env == "production":
        return {
            "storage": StorageResource(root=storage_root),
            "shard_source": ShardSourceResource(input_uri=input_uri),
            "embedder": EmbedderResource(params={"device": "cuda", "batch_size": 256, "fallback_model": None}),
            "generator": GenerationBackendResource(
                name="vllm",
                params={
                    "model": os.environ.get("REALSYN_VLLM_MODEL", "realsyn-fusion-llama3-8b"),
                    "base_url": os.environ.get("REALSYN_VLLM_URL", "http://vllm.realsyn.svc.cluster.local:8000"),
                    "api_key_env": "REALSYN_VLLM_API_KEY",  # the name only: the key is read at request time, never kept in config
                    "max_concurrency": 64,
                },
            ),
            "perplexity": PerplexityScorerResource(
                params={
                    "model": os.environ.get("REALSYN_PPL_MODEL", "HuggingFaceTB/SmolLM2-135M-Instruct"),
                    "device": "cuda",
                    "batch_size": 128,
                }
            ),
        }
    if env != "local":
        raise ValueError(f"REALSYN_ENV must be 'local' or 'production', not {env!r}")
    return {
        "storage": StorageResource(root=storage_root),
        "shard_source": ShardSourceResource(input_uri=input_uri),
        "embedder": EmbedderResource(),
        "generator": GenerationBackendResource(),
        "perplexity": PerplexityScorerResource(),
    }
