"""CLIP image and text embeddings with open_clip, L2-normalised, one cached model per process.

Weights are resolved *before* the model is built: building EVA02-E-14-plus only to find that its
weights cannot be had would allocate billions of random parameters.

Production names a local weights file (``pretrained: /models/...``) and no fallback: a missing file
fails with one line (``ModelNotFoundError``: model, path, how to provide it). The embedded test/demo
default is different on purpose: when weights are unobtainable (no network, HF_HUB_OFFLINE=1,
missing file) it builds ``fallback_model``, the small random-weight RealSyn-Tiny, seeded so that its
embeddings are deterministic, and logs a warning.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from realsyn.models.paths import ModelNotFoundError
from realsyn.plugins.kinds import Embedder
from realsyn.runtime import hub_offline, l2_normalize, resolve_device
from realsyn.stats import StepStats

logger = logging.getLogger("realsyn")

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".npz")
# the weight files of an open_clip model directory (hf-hub layout), preferred first
_DIRECTORY_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

_CACHE: dict[tuple, _LoadedModel] = {}
_CACHE_LOCK = threading.Lock()
_CONFIGS_REGISTERED = False


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights (a tag) cannot be had and no fallback model is configured; one line."""


_PRETRAINED_SETTING = "embedder.params.pretrained"


@dataclass(frozen=True)
class _ResolvedWeights:
    path: str
    label: str  # the tag or file name, used in model_id
    preprocess: dict[str, Any]  # preprocessing that belongs to the weights (mean, std, ...)
    quick_gelu: bool


@dataclass
class _LoadedModel:
    model: Any
    preprocess: Any
    tokenizer: Any
    model_id: str
    dim: int
    random_weights: bool
    device: str
    input_dtype: Any
    autocast_dtype: Any


def register_model_configs() -> None:
    """Make the bundled open_clip configs (RealSyn-Tiny) known to open_clip, once per process."""
    global _CONFIGS_REGISTERED
    if _CONFIGS_REGISTERED:
        return
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)
    _CONFIGS_REGISTERED = True


def clear_model_cache() -> None:
    """Drop every cached model (tests, or to free GPU memory)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _looks_like_path(pretrained: str) -> bool:
    return pretrained.endswith(_WEIGHT_FILE_SUFFIXES) or os.sep in pretrained or pretrained.startswith("~")


def _resolve_weights(model_name: str, pretrained: str, cache_dir: str | None) -> tuple[_ResolvedWeights | None, str]:
    """Find a local file for `pretrained` (tag or path) without building anything.

    Returns (weights, "") or (None, why they cannot be had).
    """
    from open_clip import pretrained as oc_pretrained
    from open_clip.transform import PreprocessCfg

    if _looks_like_path(pretrained):
        path = Path(pretrained).expanduser()
        if path.is_dir():  # a model directory as the hub lays it out
            path = next((path / n for n in _DIRECTORY_WEIGHT_FILES if (path / n).is_file()), path / _DIRECTORY_WEIGHT_FILES[0])
        if not path.is_file():
            return None, f"weights file {str(path)!r} does not exist"
        return _ResolvedWeights(str(path), path.name, {}, False), ""

    cfg = oc_pretrained.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        known = oc_pretrained.list_pretrained_tags_by_model(model_name)
        return None, f"{pretrained!r} is neither a weights file nor a known tag of {model_name} (tags: {known})"
    if "file" not in cfg and not (cfg.get("hf_hub") and oc_pretrained.has_hf_hub()) and hub_offline():
        # URL-only weights: urllib ignores HF_HUB_OFFLINE, so only a cached file counts offline.
        cached = Path(cache_dir or "~/.cache/clip").expanduser() / os.path.basename(cfg.get("url", ""))
        if not cfg.get("url") or not cached.is_file():
            return None, f"offline and {cached} is not cached"
    try:
        path = oc_pretrained.download_pretrained(cfg, cache_dir=cache_dir)
    except Exception as exc:  # network, auth, offline: all mean "not obtainable here"
        return None, f"download of {model_name}/{pretrained} failed: {type(exc).__name__}: {exc}"
    if not path or not os.path.isfile(path):
        return None, f"no weights file for {model_name}/{pretrained}"
    preprocess_keys = set(PreprocessCfg.__dataclass_fields__)
    preprocess = {k: v for k, v in cfg.items() if k in preprocess_keys and v is not None}
    return _ResolvedWeights(path, pretrained, preprocess, bool(cfg.get("quick_gelu", False))), ""


def _build(model_name: str, weights: _ResolvedWeights | None, device: str, precision: str, seed: int) -> _LoadedModel:
    import open_clip
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2

    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"unknown open_clip model {model_name!r}")
    # Seed only a private copy of the CPU RNG (the model is initialised on CPU, then moved), so
    # random-weight models are the same on every device and the caller's RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(
            model_name,
            pretrained=weights.path if weights else None,
            precision=precision,
            device=device,
            force_quick_gelu=weights.quick_gelu if weights else False,
            force_preprocess_cfg=weights.preprocess if weights else None,
            pretrained_text=False,  # never fetch tower weights behind our back
            cache_dir=None,
        )
    model.eval()
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    tokenizer = open_clip.get_tokenizer(model_name)
    input_dtype = next(model.visual.parameters()).dtype
    autocast_dtype = None
    if precision.startswith("amp"):
        autocast_dtype = torch.bfloat16 if "bf16" in precision else torch.float16
    model_id = f"{model_name}/{weights.label}" if weights else f"{model_name}/random-seed{seed}"
    return _LoadedModel(
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        model_id=model_id,
        dim=int(config["embed_dim"]),
        random_weights=weights is None,
        device=device,
        input_dtype=input_dtype,
        autocast_dtype=autocast_dtype,
    )


class OpenClipEmbedder(Embedder):
    """Embeds images (encoded bytes) and texts into one L2-normalised CLIP space.

    Rows that cannot be embedded (undecodable image, non-string text) come back as all-zero
    vectors and are counted in `stats` as `dropped_undecodable` / `dropped_not_text`.
    """

    def __init__(
        self,
        model_name: str = "EVA02-E-14-plus",
        pretrained: str | None = "laion2b_s9b_b144k",
        fallback_model: str | None = "RealSyn-Tiny",
        device: str = "auto",
        batch_size: int = 32,
        precision: str = "fp32",
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.model_name = model_name
        self.pretrained = pretrained
        self.fallback_model = fallback_model
        self.device = device
        self.batch_size = int(batch_size)
        self.precision = precision
        self.seed = int(seed)
        self.cache_dir = cache_dir

    # -- loading -----------------------------------------------------------------------------

    def _loaded(self) -> _LoadedModel:
        device = resolve_device(self.device)
        key = (self.model_name, self.pretrained, self.fallback_model, device, self.precision, self.seed, self.cache_dir)
        with _CACHE_LOCK:
            if key not in _CACHE:
                _CACHE[key] = self._load(device)
            return _CACHE[key]

    def _load(self, device: str) -> _LoadedModel:
        register_model_configs()
        if self.pretrained is None:
            return _build(self.model_name, None, device, self.precision, self.seed)
        weights, why = _resolve_weights(self.model_name, self.pretrained, self.cache_dir)
        if weights is not None:
            loaded = _build(self.model_name, weights, device, self.precision, self.seed)
            logger.info("loaded CLIP model %s on %s", loaded.model_id, device)
            return loaded
        if self.fallback_model is None:
            if _looks_like_path(self.pretrained):
                path = Path(self.pretrained).expanduser()
                path = path / _DIRECTORY_WEIGHT_FILES[0] if path.is_dir() else path  # a directory: name the file it lacks
                raise ModelNotFoundError(f"CLIP embedder {self.model_name}", path, _PRETRAINED_SETTING, "file")
            raise WeightsUnavailableError(
                f"CLIP embedder {self.model_name}: weights {self.pretrained!r} unavailable ({' '.join(why.split())}) and no fallback_model;"
                f" set {_PRETRAINED_SETTING} to a local weights file (production: under /models)"
            )
        logger.warning(
            "CLIP weights %s/%s unavailable (%s); using %s with RANDOM weights (seed %d): "
            "embeddings are deterministic but not semantically meaningful",
            self.model_name,
            self.pretrained,
            why,
            self.fallback_model,
            self.seed,
        )
        return _build(self.fallback_model, None, device, self.precision, self.seed)

    @property
    def model_id(self) -> str:
        return self._loaded().model_id

    @property
    def dim(self) -> int:
        return self._loaded().dim

    @property
    def random_weights(self) -> bool:
        return self._loaded().random_weights

    # -- embedding ---------------------------------------------------------------------------

    def _encode(self, loaded: _LoadedModel, encode, batch) -> np.ndarray:
        import torch

        batch = batch.to(loaded.device)
        with torch.inference_mode():
            if loaded.autocast_dtype is not None:
                device_type = "cuda" if loaded.device.startswith("cuda") else "cpu"
                with torch.autocast(device_type, dtype=loaded.autocast_dtype):
                    out = encode(batch)
            else:
                out = encode(batch)
        return out.float().cpu().numpy()

    def embed_images(self, images: Sequence[bytes], stats: StepStats | None = None) -> np.ndarray:
        """(N, dim) float32, L2-normalised; undecodable images give zero rows."""
        import torch

        from realsyn.image_decode import MAX_PIXELS_CEILING, open_image

        loaded = self._loaded()
        out = np.zeros((len(images), loaded.dim), dtype=np.float32)
        for start in range(0, len(images), self.batch_size):
            rows, tensors = [], []
            for i in range(start, min(start + self.batch_size, len(images))):
                try:
                    with open_image(images[i], max_pixels=MAX_PIXELS_CEILING) as im:  # allowed formats, pixel ceiling, memory budget
                        tensors.append(loaded.preprocess(im.convert("RGB")))
                    rows.append(i)
                except Exception:  # any decoder failure is bad data, not a bug
                    if stats is not None:
                        stats.drop("undecodable")
            if not rows:
                continue
            batch = torch.stack(tensors).to(loaded.input_dtype)
            out[rows] = l2_normalize(self._encode(loaded, loaded.model.encode_image, batch))
            if stats is not None:
                stats.add("embedded", len(rows))
        return out

    def embed_texts(self, texts: Sequence[str], stats: StepStats | None = None) -> np.ndarray:
        """(N, dim) float32, L2-normalised; non-string entries give zero rows."""
        loaded = self._loaded()
        out = np.zeros((len(texts), loaded.dim), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            rows = [i for i in range(start, min(start + self.batch_size, len(texts))) if isinstance(texts[i], str)]
            skipped = min(self.batch_size, len(texts) - start) - len(rows)
            if stats is not None and skipped:
                stats.drop("not_text", skipped)
            if not rows:
                continue
            tokens = loaded.tokenizer([texts[i] for i in rows])
            out[rows] = l2_normalize(self._encode(loaded, loaded.model.encode_text, tokens))
            if stats is not None:
                stats.add("embedded", len(rows))
        return out
