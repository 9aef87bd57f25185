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
def _storage(root: str, retention: int | None = None):
    from realsyn.storage import Storage

    return Storage(root, retention=retention)


@lru_cache(maxsize=8)
def _plugin(kind: str, name: str, params_json: str):
    """One instance per (kind, name, params) and process: a model loads once for many shards."""
    from realsyn.plugins import build_plugin

    return build_plugin(kind, {"name": name, "params": json.loads(params_json)})


class StorageResource(dg.ConfigurableResource):
    """The one storage root of every asset: a local folder, or s3://bucket/prefix (AWS_ENDPOINT_URL for MinIO/moto)."""

    root: str = Field(default=DEFAULT_STORAGE_ROOT, description="Local folder or s3://bucket/prefix holding every asset's files.")
    retention: int | None = Field(
        default=None,
        ge=1,
        description="Committed generations kept per partition (the current one and the last N-1 it superseded); pinned ones are always kept. Default: REALSYN_STORAGE_RETENTION, else 2.",
    )

    def get(self):
        return _storage(self.root, self.retention)


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
    """The CLIP model of stages 4-10 (paper: EVA02-CLIP E/14-plus). Production: a local weights file, no fallback. The embedded
    default falls back to a small random-weight model (RealSyn-Tiny), with a warning, when weights cannot be had."""

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
    api_key: str | None = Field(
        default=None,
        description="vllm: the server's API key as dg.EnvVar('REALSYN_VLLM_API_KEY'): config and the UI hold only the variable's name; "
        "it is resolved in the run and handed to the client, never put in params. Unset: the client reads params.api_key_env.",
    )

    def get(self):
        backend = super().get()
        if hasattr(backend, "use_api_key"):
            # in a run Dagster has resolved the EnvVar to its value; outside one (a script) it is still the name
            key = os.environ.get(self.api_key.env_var_name) if isinstance(self.api_key, dg.EnvVar) else self.api_key
            backend.use_api_key(key)
        return backend


class CaptionerResource(_PluginResource):
    """The concise captioner of stage 8 (paper: OFA). Embedded: none (no captioning weights ship; the fusion prompt then has no
    caption). Production: a vision-language model behind vLLM when REALSYN_CAPTIONER_URL is set."""

    kind: ClassVar[str] = "captioner"

    name: str = Field(
        default="none",
        description="none, vllm (a VLM behind vLLM's OpenAI-compatible API), hf (image-to-text model directory) or package.module:Class.",
    )
    params: dict[str, Any | None] = Field(
        default_factory=dict,
        description="Captioner parameters; vllm: base_url, model, prompt, max_new_tokens, max_concurrency; hf: model (a local directory), prompt, batch_size, device.",
    )
    api_key: str | None = Field(
        default=None,
        description="vllm: the server's API key as dg.EnvVar('REALSYN_CAPTIONER_API_KEY'), resolved in the run, never put in params. "
        "Unset: the client reads params.api_key_env.",
    )

    def get(self):
        captioner = super().get()
        if hasattr(captioner, "use_api_key"):
            key = os.environ.get(self.api_key.env_var_name) if isinstance(self.api_key, dg.EnvVar) else self.api_key
            captioner.use_api_key(key)
        return captioner


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
            # every model from a local path on the /models volume; a missing one fails the step with one line, no fallback
            "embedder": EmbedderResource(
                params={
                    "pretrained": os.environ.get("REALSYN_CLIP_WEIGHTS", "/models/eva02-e-14-plus/open_clip_model.safetensors"),
                    # the step profile says where its pod runs (k8s/step_profiles.yaml device): cuda, or cpu for the tagger
                    "device": os.environ.get("REALSYN_DEVICE", "cuda"),
                    "batch_size": 256,
                    "fallback_model": None,
                }
            ),
            "generator": GenerationBackendResource(
                name="vllm",
                params={
                    "model": os.environ.get("REALSYN_VLLM_MODEL", "realsyn-fusion-llama3-8b"),
                    "base_url": os.environ.get("REALSYN_VLLM_URL", "http://vllm.realsyn.svc.cluster.local:8000"),
                    "max_concurrency": 64,
                },
                api_key=dg.EnvVar("REALSYN_VLLM_API_KEY"),  # unresolved: only the name is in definitions and the UI
            ),
            "captioner": _production_captioner(),
            "perplexity": PerplexityScorerResource(
                params={
                    "model": os.environ.get("REALSYN_PPL_MODEL", "/models/smollm2-135m-instruct"),
                    "device": os.environ.get("REALSYN_DEVICE", "cuda"),
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
        "captioner": CaptionerResource(),
        "perplexity": PerplexityScorerResource(),
    }


def _production_captioner() -> CaptionerResource:
    """A VLM behind vLLM when REALSYN_CAPTIONER_URL names one, else none (said in the synthetic_captions metadata)."""
    url = os.environ.get("REALSYN_CAPTIONER_URL")
    if not url:
        return CaptionerResource()
    return CaptionerResource(
        name="vllm",
        params={"base_url": url, "model": os.environ.get("REALSYN_CAPTIONER_MODEL", "realsyn-captioner"), "max_concurrency": 64},
        api_key=dg.EnvVar("REALSYN_CAPTIONER_API_KEY"),
    )
