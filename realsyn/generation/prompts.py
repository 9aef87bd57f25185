"""Fusion prompts (CapsFusion / RealSyn stage 8), the concise-caption prompt, and the prompt hash that keys the caption cache.

Without a captioner (the embedded default) the fusion prompt has no "Concise caption" section.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

# Tried shorter wordings: SmolLM2-135M then drifted into "The caption is: ..." loops and meta text.
DEFAULT_FUSION_INSTRUCTION = (
    "You write image captions for a vision-language dataset. You are given real sentences retrieved "
    "for an image, possibly a short caption of the image and a list of visual tags. Fuse them into one "
    "fluent, factual description of the image in one or two sentences. Use only information found in "
    "the inputs; do not invent objects, names, numbers or events. Drop details that do not describe "
    "the image. Output only the caption, with no preamble and no quotes."
)

# What a chat vision-language model is asked for the concise caption (stage 8, OFA's role): short and
# literal, since the fusion LLM adds the detail from the real texts and the tags.
DEFAULT_CONCISE_CAPTION_PROMPT = (
    "Describe this image in one short, factual sentence of at most 20 words. "
    "Name the main objects and what they do; do not guess names, places or text. Output only the sentence."
)


def _clean_texts(texts: Sequence[Any] | None) -> list[str]:
    """Non-empty stripped strings, first occurrence kept (case-insensitive duplicates dropped)."""
    out: list[str] = []
    seen: set[str] = set()
    for t in texts or ():
        if not isinstance(t, str):
            continue
        t = " ".join(t.split())
        if t and t.lower() not in seen:
            seen.add(t.lower())
            out.append(t)
    return out


def build_fusion_messages(
    real_texts: Sequence[str] | None,
    caption: str | None = None,
    tags: Sequence[str] | None = None,
    instruction: str = DEFAULT_FUSION_INSTRUCTION,
) -> list[dict[str, str]]:
    """Chat messages asking an LLM to fuse retrieved real texts, a concise caption and tags.

    Blank and duplicate inputs are dropped; sections with nothing left are omitted.
    """
    texts = _clean_texts(real_texts)
    caption_text = " ".join(caption.split()) if isinstance(caption, str) else ""
    tag_list = _clean_texts(tags)
    parts: list[str] = []
    if texts:
        parts.append("Retrieved real texts:\n" + "\n".join(f"{i}. {t}" for i, t in enumerate(texts, 1)))
    if caption_text:
        parts.append(f"Concise caption: {caption_text}")
    if tag_list:
        parts.append("Tags: " + ", ".join(tag_list))
    if not parts:
        parts.append("No text is available for this image.")
    parts.append("Caption:")
    return [
        {"role": "system", "content": instruction},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


def _canonical(value: Any) -> Any:
    # Numbers hash by value, so temperature=0 and temperature=0.0 give the same key.
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return _canonical(value.item())
    raise TypeError(f"cannot hash a prompt parameter of type {type(value).__name__}")


def prompt_sha(messages: Sequence[Mapping[str, str]], model_id: str, params: Mapping[str, Any]) -> str:
    """SHA-256 hex of everything that determines a generation: messages, model and decoding params."""
    payload = {
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "model": model_id,
        "params": _canonical(dict(params)),
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
