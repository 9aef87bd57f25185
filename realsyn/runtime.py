"""Model runtime shared by the embedders, language models and faiss indexes: which device, whether
the Hugging Face hub may be reached, whether faiss may use a GPU, unit-length rows, and numeric settings read from the environment.

torch and faiss are imported only when a function needs them.
"""

from __future__ import annotations

import os

import numpy as np

_TRUTHY = ("1", "true", "yes", "on")
GPU_CHOICES = ("auto", "always", "never")


def resolve_device(device: str = "auto") -> str:
    """``device`` itself, or for "auto" ``cuda`` when torch sees a GPU, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def env_number(name: str, default: float, *, integer: bool = False, minimum: float | None = None) -> float:
    """A numeric setting from the environment: ``default`` when unset or blank, else the parsed value.

    Raises ``ValueError`` naming the variable for text that is not a number (not an integer, with
    ``integer``) and for a value below ``minimum``.
    """
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError as e:
        raise ValueError(f"{name}={raw!r} is not {'an integer' if integer else 'a number'}") from e
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set (1/true/yes/on, any case): no download may be attempted."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY


def faiss_gpu_count() -> int:
    """GPUs faiss can use: 0 with faiss-cpu, or when the build lacks GPU support."""
    import faiss

    if not (hasattr(faiss, "index_cpu_to_all_gpus") and hasattr(faiss, "get_num_gpus")):
        return 0
    return int(faiss.get_num_gpus())


def faiss_use_gpu(use_gpu: str) -> bool:
    """Whether a faiss index or K-means runs on GPU: ``use_gpu`` is "auto" (if faiss sees one),
    "always" (RuntimeError without one) or "never"."""
    if use_gpu not in GPU_CHOICES:
        raise ValueError(f"use_gpu must be one of {GPU_CHOICES}, got {use_gpu!r}")
    if use_gpu == "never":
        return False
    gpus = faiss_gpu_count()
    if use_gpu == "always" and gpus == 0:
        raise RuntimeError("use_gpu='always' but faiss sees no GPU (is faiss-gpu installed?)")
    return gpus > 0


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit length (zero rows stay zero: norms below 1e-12 count as 1e-12)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
