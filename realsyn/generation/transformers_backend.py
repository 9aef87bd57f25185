"""Generation with a local transformers causal LM (embedded default: SmolLM2-135M-Instruct on CPU)."""

from __future__ import annotations

from typing import Any

from realsyn.generation.base import clean_caption
from realsyn.models.causal_lm import EMBEDDED_SMOLLM2
from realsyn.plugins.kinds import GenerationBackend


class TransformersBackend(GenerationBackend):
    """Left-padded batched ``model.generate`` over chat-templated prompts.

    Greedy when temperature == 0; otherwise sampling, reseeded from ``seed`` at every ``generate``
    call so a call is reproducible given its batch.
    """

    def __init__(
        self,
        model: str = EMBEDDED_SMOLLM2,
        gguf_file: str | None = None,
        device: str = "auto",
        batch_size: int = 8,
        seed: int = 0,
        dtype: str = "auto",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_name = model
        self.gguf_file = gguf_file
        self.device = device
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.dtype = dtype
        self.model_id = model if gguf_file is None else f"{model}#{gguf_file}"

    def _loaded(self) -> tuple[Any, Any]:
        from realsyn.models.causal_lm import load_causal_lm

        return load_causal_lm(self.model_name, gguf_file=self.gguf_file, device=self.device, dtype=self.dtype)

    def render(self, messages: list[dict]) -> str:
        """The exact prompt text the model sees for one chat."""
        _, tokenizer = self._loaded()
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(self, batch: list[list[dict]], max_new_tokens: int = 64, temperature: float = 0.0) -> list[str]:
        import torch

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not batch:
            return []
        model, tokenizer = self._loaded()
        if temperature > 0:
            torch.manual_seed(self.seed)
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": float(temperature), "top_k": 0, "top_p": 1.0}
            if temperature > 0
            else {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
        )
        out: list[str] = []
        for start in range(0, len(batch), self.batch_size):
            prompts = [self.render(m) for m in batch[start : start + self.batch_size]]
            # The chat template already holds the special tokens; adding them again would double BOS.
            enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
            enc = enc.to(model.device)
            with torch.inference_mode():
                generated = model.generate(
                    **enc,
                    max_new_tokens=int(max_new_tokens),
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    **sampling,
                )
            new_tokens = generated[:, enc["input_ids"].shape[1] :]
            out.extend(clean_caption(t) for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        return out
