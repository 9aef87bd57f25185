"""The one keep/drop record: ``{id, kept, reason, detail}``, a row per item a step considered.

Filters, dedup (detail: the representative), the similarity band (detail: the cosine) and every
sampler of a split chain (reason: the sampler's own, detail: which sampler) write it through
``decision_table``; ``StepStats.drop_reasons`` counts the same reasons for the UI.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from realsyn.layout import DECISION_SCHEMA


def decision_table(
    ids: Sequence[str] | pa.Array | pa.ChunkedArray,
    reasons: Sequence[str | None],
    details: Sequence[str | None] | pa.Array | pa.ChunkedArray | None = None,
) -> pa.Table:
    """A row per item: ``kept`` is ``reason is None``; ``detail`` says more (representative, score, ...)."""
    n = len(reasons)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} reasons")
    if details is None:
        detail = pa.nulls(n, pa.string())
    elif isinstance(details, (pa.Array, pa.ChunkedArray)):
        detail = details.cast(pa.string())
    else:
        detail = pa.array([None if d is None else str(d) for d in details], pa.string())
    ids = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids, pa.string())
    return pa.table(
        {
            "id": ids.cast(pa.string()),
            "kept": pa.array([r is None for r in reasons], pa.bool_()),
            "reason": pa.array(list(reasons), pa.string()),
            "detail": detail,
        },
        schema=DECISION_SCHEMA,
    )


def kept_mask(decisions: pa.Table) -> np.ndarray:
    return decisions.column("kept").to_numpy(zero_copy_only=False).astype(bool)


def kept_ids(decisions: pa.Table) -> list[str]:
    return decisions.column("id").filter(decisions.column("kept")).to_pylist()


def reason_counts(decisions: pa.Table) -> Counter:
    """Dropped items by reason."""
    return Counter(r for r, k in zip(decisions.column("reason").to_pylist(), decisions.column("kept").to_pylist()) if not k)
