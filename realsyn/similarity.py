"""Stage 9: the image / synthetic-caption cosine band (paper: keep [0.51, 0.61] for EVA02-CLIP E/14-plus)."""

from __future__ import annotations

import numpy as np

# Bounds are calibrated per CLIP model; the paper's belong to EVA02-CLIP E/14-plus only.
DEFAULT_BANDS: dict[str, tuple[float, float]] = {"EVA02-E-14-plus": (0.51, 0.61)}


def default_band(model_id: str, random_weights: bool = False) -> tuple[float, float] | None:
    """The calibrated band for a model id such as ``EVA02-E-14-plus/laion2b_s9b_b144k``, else None.

    Random weights never have a band: their similarities mean nothing.
    """
    if random_weights:
        return None
    architecture = model_id.split("/", 1)[0].split(":", 1)[0].strip().lower()
    for name, band in DEFAULT_BANDS.items():
        if name.lower() == architecture:
            return band
    return None


def pair_cosine(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Row-wise cosine of (N, D) image and text embeddings, float32; nan where a row is zero or non-finite."""
    a = np.asarray(image_emb, dtype=np.float64)
    b = np.asarray(text_emb, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"image and text embeddings must have the same (N, D) shape, got {a.shape} and {b.shape}")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.einsum("nd,nd->n", a, b) / norms
    cos[~np.isfinite(cos)] = np.nan
    return cos.astype(np.float32)


def band_reasons(similarity: np.ndarray, low: float, high: float) -> list[str | None]:
    """None inside [low, high] (bounds kept); ``similarity_below_band`` / ``similarity_above_band``
    outside; ``similarity_invalid`` for nan."""
    if low > high:
        raise ValueError(f"band low {low} exceeds high {high}")
    # Compared in float32, the dtype similarities are stored in, so a stored 0.51 is inside [0.51, ...].
    low32, high32 = np.float32(low), np.float32(high)
    out: list[str | None] = []
    for s in np.asarray(similarity, dtype=np.float32).reshape(-1):
        if np.isnan(s):
            out.append("similarity_invalid")
        elif s < low32:
            out.append("similarity_below_band")
        elif s > high32:
            out.append("similarity_above_band")
        else:
            out.append(None)
    return out
