"""MetaCLIP balancing as a split sampler (matching and balancing live in ``realsyn.curation.metaclip``)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from realsyn.curation.metaclip import (
    EntryCounter,
    MetaClipMatcher,
    distribution_table,
    epoch_hash_seed,
    keep_probability_csr,
    load_metadata,
    plot_cumulative,
)
from realsyn.plugins.kinds import Sampler
from realsyn.samplers import uniform_keys
from realsyn.stats import StepStats


class MetaClipSampler(Sampler):
    """MetaCLIP balancing as a two-phase split sampler (see realsyn.plugins.kinds.Sampler).

    A sample's text is the union of the matches of each configured column (list columns: every
    element). ``fit`` counts entries over all batches and returns ``counts`` and ``counts_after``;
    ``select`` keeps a row when its hash draw (``uniform_keys(image_id, seed)``, so independent of
    batching) falls below its keep probability.

    Texts are matched once. ``fit`` keeps every batch's matches (4 bytes per row and per match, plus 8
    per matched row for the draws) and ``reasons`` reuses them: its n-th call after ``fit`` (with the
    state ``fit`` returned) takes the n-th fitted batch's matches when the batch has the same rows (the
    same ids in the same order and the same text lengths), and frees them. Feeding ``reasons`` the
    fitted batches in fitting order, as ``realsyn.stages.sample`` does, matches no text twice; any
    other batch is matched afresh (and ends the reuse), so results never depend on the order.
    """

    name = "metaclip"

    def __init__(
        self,
        metadata_path: str,
        t: int = 20000,
        seed: int = 0,
        text_columns: Sequence[str] = ("real_texts", "synthetic_caption"),
        id_column: str = "image_id",
        epoch: int | None = None,
    ):
        if t <= 0:
            raise ValueError(f"t must be positive, got {t}")
        if not text_columns:
            raise ValueError("text_columns must name at least one column")
        self.metadata_path = metadata_path
        self.t, self.seed, self.epoch = int(t), int(seed), epoch
        self.text_columns = tuple(text_columns)
        self.id_column = id_column
        self.stats = StepStats(f"sample_{self.name}")
        self._metadata: list[str] | None = None
        self._matcher: MetaClipMatcher | None = None
        self._fitted: list[_FittedBatch | None] = []  # matches of the batches fit saw, in order
        self._fitted_state: dict[str, np.ndarray] | None = None  # the state they belong to
        self._next_fitted = 0

    @property
    def required_columns(self) -> tuple[str, ...]:
        return (self.id_column, *self.text_columns)

    @property
    def metadata(self) -> list[str]:
        if self._metadata is None:
            self._metadata = load_metadata(self.metadata_path)
        return self._metadata

    @property
    def matcher(self) -> MetaClipMatcher:
        if self._matcher is None:
            self._matcher = MetaClipMatcher(self.metadata)
        return self._matcher

    def row_matches(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """CSR (offsets, entry ids) per row: union over the text columns, nulls skipped."""
        texts: list[Any] = []
        text_row: list[int] = []
        for name in self.text_columns:
            column = batch.column(name)
            values = column.to_pylist()
            if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                for row, items in enumerate(values):
                    if items:
                        texts.extend(items)
                        text_row.extend([row] * len(items))
            else:
                texts.extend(values)
                text_row.extend(range(len(values)))
        offsets, ids = self.matcher.match_batch_csr(texts)
        rows = np.repeat(np.asarray(text_row, dtype=np.int64), np.diff(offsets))
        key = np.unique(rows * (self.matcher.n_entries + 1) + ids)
        rows, ids = np.divmod(key, self.matcher.n_entries + 1)
        out = np.zeros(batch.num_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=batch.num_rows), out=out[1:])
        return out, ids

    def _draws(self, batch: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(uniform draw per row, valid id mask); null ids get draw 1.0 (never kept)."""
        ids = batch.column(self.id_column).to_pylist()
        valid = np.array([i is not None for i in ids], dtype=bool)
        draws = np.ones(len(ids), dtype=np.float64)
        draws[valid] = uniform_keys([i for i in ids if i is not None], epoch_hash_seed(self.seed, self.epoch))
        return draws, valid

    def _fingerprint(self, batch: pa.Table, draws: np.ndarray) -> bytes:
        """Digest of a batch's rows: its per-id draws (so ids and their order) and its texts' null counts and lengths."""
        digest = hashlib.blake2b(draws.tobytes(), digest_size=16)
        for name in self.text_columns:
            column = batch.column(name)
            values = pc.list_flatten(column) if pa.types.is_list(column.type) or pa.types.is_large_list(column.type) else column
            lengths = pc.binary_length(values) if len(values) else pa.array([], pa.int32())
            digest.update(np.asarray([len(values), values.null_count, pc.sum(lengths).as_py() or 0], dtype=np.int64).tobytes())
            if values is not column:
                digest.update(pc.list_value_length(column).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
        return digest.digest()

    def fit(self, batches: Iterable[pa.Table]) -> dict[str, np.ndarray]:
        counter = EntryCounter(self.matcher.n_entries)
        self._fitted, self._fitted_state, self._next_fitted = [], None, 0
        held_draws: list[np.ndarray] = []
        for batch in batches:
            offsets, ids = self.row_matches(batch)
            draws, valid = self._draws(batch)
            lengths = np.diff(offsets)
            ids = ids[np.repeat(valid, lengths)]  # rows without an id are never selected: not counted either
            lengths[~valid] = 0
            counter.update_flat(ids)
            self._fitted.append(_FittedBatch(self._fingerprint(batch, draws), lengths.astype(np.int32), ids.astype(np.int32)))
            held_draws.append(draws[lengths > 0])
            self.stats.add("fit_rows", batch.num_rows)
            self.stats.add("fit_null_image_id", int((~valid).sum()))
        counts = counter.counts
        lengths = np.concatenate([f.lengths for f in self._fitted]) if self._fitted else np.zeros(0, np.int32)
        lengths = lengths[lengths > 0].astype(np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.concatenate([f.ids for f in self._fitted]).astype(np.int64) if self._fitted else np.zeros(0, np.int64)
        draws = np.concatenate(held_draws) if held_draws else np.zeros(0)
        kept = draws < keep_probability_csr(offsets, ids, counts, self.t)
        counts_after = np.bincount(ids[np.repeat(kept, lengths)], minlength=len(counts)).astype(np.int64)
        state = {"counts": counts, "counts_after": counts_after, "t": np.asarray(self.t, dtype=np.int64)}
        self._fitted_state = state
        return state

    def _reused_matches(self, batch: pa.Table, draws: np.ndarray, state: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
        """The next fitted batch's (offsets, entry ids) when ``batch`` is that batch, else None (and no more reuse)."""
        if state is not self._fitted_state or self._next_fitted >= len(self._fitted):
            return None
        fitted = self._fitted[self._next_fitted]
        self._fitted[self._next_fitted] = None  # freed: each fitted batch is reused at most once
        self._next_fitted += 1
        if fitted is None or len(fitted.lengths) != batch.num_rows or fitted.fingerprint != self._fingerprint(batch, draws):
            self._fitted, self._fitted_state = [], None
            return None
        offsets = np.zeros(len(fitted.lengths) + 1, dtype=np.int64)
        np.cumsum(fitted.lengths, out=offsets[1:])
        return offsets, fitted.ids.astype(np.int64)

    def reasons(self, batch: pa.Table, state: dict[str, np.ndarray]) -> list[str | None]:
        counts = np.asarray(state["counts"], dtype=np.int64)
        if len(counts) != self.matcher.n_entries:
            raise ValueError(f"state has {len(counts)} entry counts, metadata has {self.matcher.n_entries} entries")
        draws, valid = self._draws(batch)
        reused = self._reused_matches(batch, draws, state)
        if reused is None:
            offsets, ids = self.row_matches(batch)
            self.stats.add("rematched_rows", batch.num_rows)
        else:
            offsets, ids = reused  # rows without an id hold no matches: they are dropped as null_image_id anyway
        prob = keep_probability_csr(offsets, ids, counts, self.t)
        matched = np.diff(offsets) > 0
        mask = valid & (draws < prob)
        self.stats.drop("null_image_id", int((~valid).sum()))
        self.stats.drop("no_metadata_match", int((valid & ~matched).sum()))
        self.stats.drop("balanced_out", int((valid & matched & ~mask).sum()))
        self.stats.add("selected", int(mask.sum()))
        return [
            None if k else "null_image_id" if not v else "no_metadata_match" if not m else "balanced_out"
            for k, v, m in zip(mask, valid, matched)
        ]

    def report(self, state: dict[str, np.ndarray]) -> dict[str, pa.Table | bytes]:
        """Transparency outputs: the entry distribution (Parquet) and the cumulative plot (PNG)."""
        before, after = state["counts"], state["counts_after"]
        return {
            "metaclip_distribution.parquet": distribution_table(before, after, self.metadata, self.t),
            "metaclip_cumulative.png": plot_cumulative(before, after, self.t),
        }


@dataclass
class _FittedBatch:
    """What ``fit`` keeps of one batch for ``reasons``: a digest of its rows and its matches (rows without an id: none)."""

    fingerprint: bytes
    lengths: np.ndarray  # int32 per row: matched entries
    ids: np.ndarray  # int32 entry ids, row by row
