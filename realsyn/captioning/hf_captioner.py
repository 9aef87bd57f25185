"""In-process captioner: any Hugging Face image-to-text model in a local directory.

Loaded with ``AutoModelForImageTextToText`` (vision-encoder-decoder, BLIP, GIT, Florence-2, ...) and,
for preprocessing, the directory's processor, or its image processor and tokenizer when it has no
combined processor (a vision-encoder-decoder saved from parts). Loaded once per process.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from realsyn.captioning import captioner_fingerprint
from realsyn.generation.base import clean_caption
from realsyn.image_decode import MAX_PIXELS_CEILING, UndecodableImageError, describe_error, open_image
from realsyn.plugins.kinds import Captioner, CaptionFailure


class CaptionerLoadError(ValueError):
    """A captioning model that cannot be found or loaded; the message says which and why."""


_CACHE: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}
_CACHE_LOCK = threading.Lock()


def load_image_to_text(path: str, device: str, dtype: str) -> tuple[Any, Any, Any]:
    """(model in eval mode on ``device``, image processor, tokenizer or processor that decodes), cached per process."""
    key = (path, device, dtype)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = _load(path, device, dtype)
        return _CACHE[key]


def _load(path: str, device: str, dtype: str) -> tuple[Any, Any, Any]:
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError) as exc:
        raise CaptionerLoadError(f"cannot load image-to-text model {path!r}: {exc}") from exc
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError):
        processor = None
    if processor is not None and hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
        images, decoder = processor, processor
    else:
        try:
            images, decoder = AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, KeyError) as exc:
            raise CaptionerLoadError(f"{path!r} has neither a processor nor an image processor and tokenizer: {exc}") from exc
    model.to(device)
    model.eval()
    return model, images, decoder


class HFCaptioner(Captioner):
    """Batched greedy (or beam) ``generate`` over decoded RGB images.

    ``model`` is a local directory (production loads every model from a path); a missing one fails
    when the plug-in is built. ``prompt`` is the text a conditional captioner starts from (BLIP: "a
    picture of", Florence-2: "<CAPTION>"); None for an unconditional one. Per image: the cleaned
    caption, ``undecodable_image`` for bytes that do not decode, ``empty_caption``.
    """

    def __init__(
        self,
        model: str,
        prompt: str | None = None,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        batch_size: int = 16,
        device: str = "auto",
        dtype: str = "auto",
    ):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        local = Path(model).expanduser()
        if not local.is_dir():
            raise CaptionerLoadError(f"captioning model directory {str(local)!r} does not exist")
        if not (local / "config.json").is_file():
            raise CaptionerLoadError(f"captioning model directory {str(local)!r} has no config.json")
        self.path = str(local.resolve())
        self.prompt = prompt
        self.max_new_tokens = int(max_new_tokens)
        self.num_beams = int(num_beams)
        self.batch_size = int(batch_size)
        self.device = device
        self.dtype = dtype
        self.model_id = model
        # not the path (pods mount models in different places) and not the weights (GBs to hash): the
        # directory's name and config; retrained weights belong in a new directory
        config_sha = hashlib.sha256((local / "config.json").read_bytes()).hexdigest()
        self.captioner_id = captioner_fingerprint(
            "hf", local.name, config=config_sha, prompt=prompt, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams
        )

    def _loaded(self) -> tuple[Any, Any, Any]:
        from realsyn.models.causal_lm import resolve_dtype
        from realsyn.runtime import resolve_device

        device = resolve_device(self.device)
        return load_image_to_text(self.path, device, resolve_dtype(self.dtype, device))

    @staticmethod
    def _rgb(image: Any) -> Any:
        if not isinstance(image, (bytes, bytearray, memoryview)):
            return image.convert("RGB")  # a PIL image
        with open_image(bytes(image), max_pixels=MAX_PIXELS_CEILING) as im:
            try:
                return im.convert("RGB")
            except Exception as exc:  # truncated data surfaces only when the pixels are decoded
                raise UndecodableImageError(describe_error(exc)) from exc

    def caption(self, images: Sequence[Any]) -> list[str | CaptionFailure]:
        out: list[str | CaptionFailure | None] = [None] * len(images)
        decoded: list[tuple[int, Any]] = []
        for i, image in enumerate(images):
            try:
                decoded.append((i, self._rgb(image)))
            except UndecodableImageError as exc:
                out[i] = CaptionFailure("undecodable_image", str(exc))
        for start in range(0, len(decoded), self.batch_size):
            part = decoded[start : start + self.batch_size]
            for (i, _), text in zip(part, self._generate([im for _, im in part])):
                out[i] = text if text else CaptionFailure("empty_caption")
        return [o if o is not None else CaptionFailure("captioner_error", "no output") for o in out]

    def _generate(self, images: list[Any]) -> list[str]:
        import torch

        model, processor, decoder = self._loaded()
        if self.prompt is not None:
            if processor is not decoder:
                raise CaptionerLoadError(f"{self.path!r} has no processor that takes a text prompt; leave prompt unset for this model")
            inputs = processor(images=images, text=[self.prompt] * len(images), return_tensors="pt", padding=True)
        else:
            inputs = processor(images=images, return_tensors="pt")
        inputs = {
            k: (v.to(model.device, dtype=model.dtype) if k == "pixel_values" else v.to(model.device))
            for k, v in inputs.items()
            if hasattr(v, "to")
        }
        with torch.inference_mode():
            generated = model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False)
        if not model.config.is_encoder_decoder and "input_ids" in inputs:
            generated = generated[:, inputs["input_ids"].shape[1] :]  # a decoder-only captioner echoes its prompt
        return [clean_caption(t) for t in decoder.batch_decode(generated, skip_special_tokens=True)]
