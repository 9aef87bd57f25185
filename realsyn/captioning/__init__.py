"""Concise image captions (RealSyn stage 8, OFA's role in the paper): one short caption per image that
joins the retrieved real texts and the tags in the fusion prompt.

Captioners (``realsyn.plugins.kinds.Captioner``): ``none`` (the embedded default: no captioning model
ships offline, so the fusion prompt has no caption), ``vllm`` (a vision-language model behind vLLM's
OpenAI-compatible API, production) and ``hf`` (any Hugging Face image-to-text model from a local
directory, in process). ``realsyn.captioning.concise`` runs one over a shard with its own cache.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from realsyn.plugins.kinds import Captioner, CaptionFailure

NO_CAPTIONER = "none"


class NoCaptioner(Captioner):
    """No captioning model: the fusion prompt omits the concise caption, and the run's metadata says ``captioner: none``."""

    captioner_id = NO_CAPTIONER
    model_id = NO_CAPTIONER

    def caption(self, images: Sequence[Any]) -> list[str | CaptionFailure]:
        return [CaptionFailure("no_captioner") for _ in images]


def is_active(captioner: Captioner | None) -> bool:
    """Whether a captioner will be asked at all (not None, not ``none``)."""
    return captioner is not None and getattr(captioner, "captioner_id", NO_CAPTIONER) != NO_CAPTIONER


def captioner_fingerprint(kind: str, model: str, **settings: Any) -> str:
    """``{kind}:{model}#{12 hex}``: readable, and different whenever a setting that changes the output does."""
    blob = json.dumps(settings, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return f"{kind}:{model}#{hashlib.sha256(blob.encode('utf-8')).hexdigest()[:12]}"


_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"GIF87a", 0, "image/gif"),
    (b"GIF89a", 0, "image/gif"),
    (b"WEBP", 8, "image/webp"),  # after RIFF....
    (b"BM", 0, "image/bmp"),
    (b"II*\x00", 0, "image/tiff"),
    (b"MM\x00*", 0, "image/tiff"),
)


def image_mime(data: bytes) -> str | None:
    """The MIME type of encoded image bytes from their magic number (the formats the image DB admits); None when unknown."""
    for magic, offset, mime in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic and (offset == 0 or data[:4] == b"RIFF"):
            return mime
    return None


__all__ = ["NO_CAPTIONER", "CaptionFailure", "NoCaptioner", "captioner_fingerprint", "image_mime", "is_active"]
