"""POINTS' selection: the lowest-perplexity fraction of samples (scores from ``sentence_perplexity``'s scorer)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from realsyn.plugins.kinds import Sampler
from realsyn.stats import StepStats


def tie_break_keys(ids: Sequence[Any]) -> np.ndarray:
    """uint32 per row id (blake2b of its UTF-8 text), fixed across runs and batchings; None -> ''."""
    out = np.empty(len(ids), dtype=np.uint32)
    for i, row_id in enumerate(ids):
        data = ("" if row_id is None else str(row_id)).encode("utf-8")
        out[i] = int.from_bytes(hashlib.blake2b(data, digest_size=4).digest(), "little")
    return out


def _sortable_score_bits(scores: np.ndarray) -> np.ndarray:
    """uint32 whose unsigned order equals the float32 order of ``scores`` (no nan)."""
    bits = np.ascontiguousarray(scores, dtype=np.float32).view(np.uint32)
    negative = (bits & np.uint32(0x80000000)) != 0
    return np.where(negative, ~bits, bits | np.uint32(0x80000000))


class PointsPerplexitySampler(Sampler):
    """POINTS' selection: keep the ``keep_fraction`` of samples with the lowest text perplexity.

    Two-phase sampler. ``fit`` collects one uint64 key per scored sample (float32 score bits
    high, a hash of the row id low: 8 bytes per sample) and finds the key of rank
    ``round_half_up(keep_fraction * n_valid)``; ``select`` keeps rows at or below it. The id hash
    breaks score ties, so exactly that many are kept whatever the batching, unless two tied rows
    share a 32-bit id hash (then they are kept or dropped together). Nan or null scores are never kept.
    """

    name = "points_perplexity"

    def __init__(self, keep_fraction: float = 0.2, score_column: str = "text_perplexity", id_column: str = "image_id"):
        if not 0.0 <= keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction}")
        self.keep_fraction = float(keep_fraction)
        self.score_column = score_column
        self.id_column = id_column
        self.required_columns = (score_column, id_column)
        self.stats = StepStats(f"sample_{self.name}")

    def _keys(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(uint64 sort key per row, bool valid per row); invalid rows have nan/null scores."""
        scores = batch.column(self.score_column).to_numpy(zero_copy_only=False)
        scores = np.asarray(scores, dtype=np.float64).astype(np.float32)  # nulls arrive as nan
        valid = ~np.isnan(scores)
        high = _sortable_score_bits(np.where(valid, scores, np.float32(0))).astype(np.uint64)
        low = tie_break_keys(batch.column(self.id_column).to_pylist()).astype(np.uint64)
        return (high << np.uint64(32)) | low, valid

    def fit(self, batches: Iterable[pa.Table]) -> dict[str, np.ndarray]:
        parts = []
        for batch in batches:
            keys, valid = self._keys(batch)
            self.stats.add("fit_rows", len(valid))
            self.stats.add("fit_missing_score", int((~valid).sum()))
            parts.append(keys[valid])
        keys = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)
        n_valid = len(keys)
        keep_count = min(n_valid, math.floor(self.keep_fraction * n_valid + 0.5))
        threshold = np.partition(keys, keep_count - 1)[keep_count - 1] if keep_count else np.uint64(0)
        threshold_perplexity = _score_from_bits(np.uint32(int(threshold) >> 32)) if keep_count else np.nan
        return {
            "threshold_key": np.array([threshold], dtype=np.uint64),
            "keep_count": np.array([keep_count], dtype=np.int64),
            "n_valid": np.array([n_valid], dtype=np.int64),
            "threshold_perplexity": np.array([threshold_perplexity], dtype=np.float32),
        }

    def reasons(self, batch: pa.Table, state: dict[str, np.ndarray]) -> list[str | None]:
        """Per row: None when kept, else ``perplexity_missing`` or ``perplexity_above_points_cut``."""
        keys, valid = self._keys(batch)
        keep = self._keep(keys, valid, state)
        self.stats.add("selected", int(keep.sum()))
        self.stats.drop("perplexity_missing", int((~valid).sum()))
        self.stats.drop("perplexity_above_points_cut", int((valid & ~keep).sum()))
        return [None if kept else ("perplexity_above_points_cut" if scored else "perplexity_missing") for kept, scored in zip(keep, valid)]

    @staticmethod
    def _keep(keys: np.ndarray, valid: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
        if int(state["keep_count"][0]) == 0:
            return np.zeros(len(keys), dtype=bool)
        return valid & (keys <= state["threshold_key"][0])


def _score_from_bits(sortable: np.uint32) -> float:
    """Inverse of `_sortable_score_bits` for one value."""
    value = int(sortable)
    bits = value & 0x7FFFFFFF if value & 0x80000000 else ~value & 0xFFFFFFFF
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])
