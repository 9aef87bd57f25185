"""Filter interface: a filter returns, per item, None to keep it or a short drop reason."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class Filter(Protocol):
    name: str

    def reasons(self, items: Sequence[Any]) -> list[str | None]:
        """One entry per item: None keeps it, a string names why it is dropped."""
        ...


def apply_filters(filters: Sequence[Filter], items: Sequence[Any]) -> tuple[np.ndarray, list[str | None]]:
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
            raise ValueError(f"filter {f.name!r} returned {len(got)} reasons for {len(alive)} items")
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
