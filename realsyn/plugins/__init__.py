"""Plug-ins by kind, chosen in config as ``{name, params}``.

``name`` is a short name registered below or a dotted path ``package.module:Class`` to a user's own
class, so a team adds a filter without forking. Registered entries are dotted paths too, so choosing
a plug-in imports only its module (torch, faiss and transformers stay unloaded until a step needs
them). ``params`` are validated against the class's typed ``__init__`` signature; an error names the
kind, the plug-in and the field.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from functools import cache
from typing import Any

import pydantic

from realsyn.plugins.kinds import KINDS, Plugin

REGISTRY: dict[str, dict[str, str]] = {
    "input_reader": {
        "obelics": "realsyn.readers.obelics:ObelicsReader",
        "mmc4": "realsyn.readers.mmc4:Mmc4Reader",
    },
    "image_filter": {
        "rules": "realsyn.filters.image_rules:ImageRuleFilter",
    },
    "sentence_filter": {
        "rules": "realsyn.filters.sentence_rules:SentenceRuleFilter",
        "cat": "realsyn.filters.cat:CatFilter",
    },
    "embedder": {
        "open_clip": "realsyn.embedding.open_clip_embedder:OpenClipEmbedder",
    },
    "perplexity_scorer": {
        "causal_lm": "realsyn.curation.perplexity:CausalLMPerplexityScorer",
    },
    "tagger": {
        "clip_vocabulary": "realsyn.generation.tagging:ClipVocabularyTagger",
    },
    "generation_backend": {
        "transformers": "realsyn.generation.transformers_backend:TransformersBackend",
        "vllm": "realsyn.generation.vllm_backend:VllmOpenAIBackend",
    },
    "captioner": {
        "none": "realsyn.captioning:NoCaptioner",
        "vllm": "realsyn.captioning.vllm_captioner:VllmCaptioner",
        "hf": "realsyn.captioning.hf_captioner:HFCaptioner",
    },
    "sampler": {
        "cluster_cap": "realsyn.samplers.cluster_cap:ClusterCapSampler",
        "metaclip": "realsyn.samplers.metaclip:MetaClipSampler",
        "points_perplexity": "realsyn.samplers.points:PointsPerplexitySampler",
    },
}


class PluginConfigError(ValueError):
    """A plug-in name that resolves to nothing, or parameters its class does not accept."""


class PluginSpec(pydantic.BaseModel):
    """What config says of one plug-in: which one, and its parameters."""

    model_config = pydantic.ConfigDict(extra="forbid")

    name: str
    params: dict[str, Any] = {}


def _import(dotted: str) -> Any:
    module_name, _, attr = dotted.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def plugin_class(kind: str, name: str) -> type:
    """The class of a registered short name or of a ``package.module:Class`` path."""
    if kind not in KINDS:
        raise PluginConfigError(f"no plug-in kind {kind!r}; known: {sorted(KINDS)}")
    registered = REGISTRY.get(kind, {})
    dotted = registered.get(name)
    if dotted is None:
        if ":" not in name:
            raise PluginConfigError(
                f"no {kind} plug-in named {name!r}; known: {sorted(registered)}, or a dotted path 'package.module:Class'"
            )
        dotted = name
    try:
        cls = _import(dotted)
    except (ImportError, AttributeError) as exc:
        raise PluginConfigError(f"{kind} {name!r}: cannot import {dotted}: {exc}") from None
    if not isinstance(cls, type):
        raise PluginConfigError(f"{kind} {name!r}: {dotted} is not a class")
    missing = [m for m in KINDS[kind].required if not hasattr(cls, m)]
    if missing:
        raise PluginConfigError(
            f"{kind} {name!r}: {dotted} lacks {', '.join(missing)} of the {KINDS[kind].__name__} contract (realsyn.plugins.kinds)"
        )
    return cls


@cache
def params_model(cls: type) -> type[pydantic.BaseModel]:
    """A pydantic model of the class's keyword parameters, from its annotated ``__init__``."""
    signature = inspect.signature(cls.__init__)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: accept any value of that name
        hints = {}
    fields: dict[str, Any] = {}
    for pname, p in list(signature.parameters.items())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = ... if p.default is p.empty else p.default
        fields[pname] = (hints.get(pname, Any), default)
    config = pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    return pydantic.create_model(f"{cls.__name__}Params", __config__=config, **fields)


def validate_params(kind: str, name: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """The parameters as the class will receive them (types coerced, defaults filled)."""
    cls = plugin_class(kind, name)
    try:
        model = params_model(cls).model_validate(dict(params or {}))
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"field {'.'.join(str(x) for x in e['loc']) or '?'}: {e['msg']}" for e in exc.errors())
        raise PluginConfigError(f"{kind} {name!r}: {problems}") from None
    return {k: getattr(model, k) for k in model.model_fields}


def build_plugin(kind: str, spec: PluginSpec | dict[str, Any] | str, **extra: Any) -> Any:
    """An instance from ``{name, params}`` (or a bare name); ``extra`` are runtime objects the config cannot carry."""
    if isinstance(spec, str):
        spec = PluginSpec(name=spec)
    elif isinstance(spec, dict):
        try:
            spec = PluginSpec.model_validate(spec)
        except pydantic.ValidationError as exc:
            raise PluginConfigError(f"{kind} config must be {{name, params}}: {exc.errors()[0]['msg']} ({spec!r})") from None
    cls = plugin_class(kind, spec.name)
    params = validate_params(kind, spec.name, spec.params)
    try:
        return cls(**params, **extra)
    except (ValueError, TypeError) as exc:
        raise PluginConfigError(f"{kind} {spec.name!r}: {exc}") from None


__all__ = [
    "REGISTRY",
    "KINDS",
    "Plugin",
    "PluginConfigError",
    "PluginSpec",
    "build_plugin",
    "params_model",
    "plugin_class",
    "validate_params",
]
