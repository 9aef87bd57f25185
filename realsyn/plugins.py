"""Plug-ins by kind, chosen by name in typed config.

Each entry is a dotted path, so choosing a plug-in imports only its module (torch, faiss and
transformers stay unloaded until a step needs them). Names are declared once, here: two plug-ins
cannot silently take the same name.
"""

from __future__ import annotations

import importlib
from typing import Any

PLUGINS: dict[str, dict[str, str]] = {
    "image_filter": {
        "rules": "realsyn.filters.image_rules:ImageRuleFilter",
    },
    "sentence_filter": {
        "rules": "realsyn.filters.sentence_rules:SentenceRuleFilter",
        "cat": "realsyn.filters.cat:CatFilter",
        "perplexity_band": "realsyn.filters.perplexity_band:PerplexityBandFilter",
    },
    "embedder": {
        "open_clip": "realsyn.embedding.open_clip_embedder:OpenClipEmbedder",
    },
    "generation_backend": {
        "transformers": "realsyn.generation.transformers_backend:TransformersBackend",
        "vllm": "realsyn.generation.vllm_backend:VllmOpenAIBackend",
    },
    "tagger": {
        "clip_vocabulary": "realsyn.generation.tagging:ClipVocabularyTagger",
    },
    "sampler": {
        "cluster_cap": "realsyn.sampling:ClusterCapSampler",
        "metaclip": "realsyn.curation.metaclip:MetaClipSampler",
        "points_perplexity": "realsyn.curation.perplexity:PointsPerplexitySampler",
    },
    "perplexity_scorer": {
        "causal_lm": "realsyn.curation.perplexity:CausalLMPerplexityScorer",
    },
}


class UnknownPluginError(ValueError):
    pass


def plugin_class(kind: str, name: str) -> type:
    try:
        dotted = PLUGINS[kind][name]
    except KeyError:
        known = sorted(PLUGINS.get(kind, {}))
        raise UnknownPluginError(f"no {kind} plug-in named {name!r}; known: {known}") from None
    module_name, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def create_plugin(kind: str, name: str, **params: Any) -> Any:
    return plugin_class(kind, name)(**params)
