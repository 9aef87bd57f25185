"""Running a chain of filters (image or sentence filters, ``realsyn.plugins.kinds``) over items."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def apply_filters(filters: Sequence[Any], items: Sequence[Any]) -> tuple[np.ndarray, list[str | None]]:
    """Run filters in order; an item dropped by one filter is not shown to the next.

    Returns (keep mask, reason per item); the first filter that drops an item names the reason.
    """
    reasons: list[str | None] = [None] * len(items)
    alive = list(range(len(items)))
    for f in filters:
        if not alive:
            break
        got = f.reasons([items[i] for i in alive])
        if len(got) != len(alive):
            raise ValueError(f"filter {getattr(f, 'name', type(f).__name__)!r} returned {len(got)} reasons for {len(alive)} items")
        still = []
        for i, r in zip(alive, got):
            if r is None:
                still.append(i)
            else:
                reasons[i] = r
        alive = still
    keep = np.zeros(len(items), dtype=bool)
    keep[alive] = True
    return keep, reasons
