"""Production captioner: a vision-language model served by vLLM's OpenAI-compatible API.

Each image is one chat request whose user message holds the prompt and the image as a base64 data
URL (``{"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}}``), the form vLLM
accepts for multimodal models (e.g. ``vllm serve Qwen/Qwen2-VL-2B-Instruct``). Transport, retries,
deadlines, the API key and redaction are the generation client's (``VllmOpenAIBackend``).
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Sequence
from typing import Any

from realsyn.captioning import captioner_fingerprint, image_mime
from realsyn.generation.base import clean_caption
from realsyn.generation.prompts import DEFAULT_CONCISE_CAPTION_PROMPT
from realsyn.generation.vllm_backend import VllmOpenAIBackend, VllmRequestError
from realsyn.image_decode import describe_error
from realsyn.plugins.kinds import Captioner, CaptionFailure

log = logging.getLogger(__name__)

DEFAULT_CAPTIONER_API_KEY_ENV = "REALSYN_CAPTIONER_API_KEY"


def image_data_url(image: Any) -> str:
    """``data:{mime};base64,...`` of encoded image bytes as they are, or of a PIL image as PNG."""
    if not isinstance(image, (bytes, bytearray, memoryview)):
        buf = io.BytesIO()
        image.save(buf, format="PNG")  # a PIL image
        data, mime = buf.getvalue(), "image/png"
    else:
        data = bytes(image)
        mime = image_mime(data)
        if mime is None:
            raise ValueError(f"not an image of a known format (first bytes {data[:8]!r})")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


class VllmCaptioner(Captioner):
    """``POST {base_url}/v1/chat/completions`` per image, ``max_concurrency`` in flight.

    Per image: the cleaned caption; ``captioner_rejected`` when the server refuses that request
    (400/413/422, e.g. an image the model cannot take), ``captioner_error`` when it keeps failing after
    ``retries``, ``undecodable_image`` for bytes that are no known image format, ``empty_caption``.
    A server that does not serve ``model`` raises (one line naming model and server).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        prompt: str = DEFAULT_CONCISE_CAPTION_PROMPT,
        max_new_tokens: int = 48,
        temperature: float = 0.0,
        batch_size: int = 64,
        api_key_env: str = DEFAULT_CAPTIONER_API_KEY_ENV,
        timeout_s: float = 120,
        max_concurrency: int = 16,
        retries: int = 3,
        seed: int = 0,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        verify_model: bool = True,
    ):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not prompt.strip():
            raise ValueError("prompt must not be empty")
        self.client = VllmOpenAIBackend(
            base_url,
            model,
            api_key_env=api_key_env,
            timeout_s=timeout_s,
            max_concurrency=max_concurrency,
            retries=retries,
            seed=seed,
            backoff_s=backoff_s,
            max_backoff_s=max_backoff_s,
            verify_model=verify_model,
        )
        self.prompt = prompt
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.batch_size = int(batch_size)
        self.model_id = model
        self.captioner_id = captioner_fingerprint(
            "vllm", model, prompt=prompt, max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=int(seed)
        )

    def use_api_key(self, key: str | None) -> None:
        """A resolved key handed over at run time (see ``VllmOpenAIBackend.use_api_key``)."""
        self.client.use_api_key(key)

    def check(self) -> list[str]:
        """Served model ids; raises unless this captioner's model is among them."""
        return self.client.check()

    def close(self) -> None:
        self.client.close()

    def payload(self, image: Any) -> dict[str, Any]:
        """The chat-completions request for one image."""
        return {
            "model": self.model_id,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": self.prompt},
                        {"type": "image_url", "image_url": {"url": image_data_url(image)}},
                    ],
                }
            ],
            "max_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "seed": self.client.seed,
        }

    def _caption_one(self, image: Any) -> str | CaptionFailure:
        client = self.client
        try:
            payload = self.payload(image)
        except (ValueError, OSError) as exc:
            return CaptionFailure("undecodable_image", describe_error(exc))
        try:
            response = client.request("POST", client.completions_url, payload)
        except VllmRequestError as exc:
            return CaptionFailure("captioner_error", str(exc))
        if not response.ok:
            return CaptionFailure("captioner_rejected", client.redact_text(f"HTTP {response.status}: {response.text[:300]}"))
        try:
            content = response.json()["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return CaptionFailure("captioner_error", client.redact_text(f"malformed completion: {response.text[:300]}"))
        text = clean_caption(content)
        return text if text else CaptionFailure("empty_caption")

    def caption(self, images: Sequence[Any]) -> list[str | CaptionFailure]:
        if not images:
            return []
        self.client.ensure_model()  # a model the server lacks fails here, once, not once per image
        pool = self.client.pool()
        futures = [pool.submit(self._caption_one, image) for image in images]
        return [f.result() for f in futures]

    def __enter__(self) -> VllmCaptioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
