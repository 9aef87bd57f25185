"""Per-step counters: rows in/out, ``dropped_<reason>``, seconds. Merged across shards."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class StepStats:
    step: str
    counts: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += int(n)

    def drop(self, reason: str, n: int = 1) -> None:
        self.counts[f"dropped_{reason}"] += int(n)

    def drop_reasons(self, reasons: Iterable[str | None]) -> None:
        """Count every non-None reason of a per-row reason list."""
        for reason in reasons:
            if reason is not None:
                self.drop(reason)

    @property
    def dropped(self) -> dict[str, int]:
        return {k.removeprefix("dropped_"): v for k, v in sorted(self.counts.items()) if k.startswith("dropped_")}

    @contextmanager
    def timed(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def merge(self, other: StepStats) -> StepStats:
        self.counts.update(other.counts)
        self.seconds += other.seconds
        return self

    def as_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = dict(sorted(self.counts.items()))
        out["seconds"] = round(self.seconds, 3)
        return out
