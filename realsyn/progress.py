"""Progress of a long loop in the run log: done / total, items per second, ETA, at a bounded rate.

A stage wraps its loop: ``for batch in track(batches, "image_embeddings shard-7", total=n, size=len)``.
Messages go to the sink of the caller: ``with progress_to(log): ...`` around a block, else the
resolver the orchestration layer registered (``use_sink_resolver``: the Dagster layer hands back the
running step's ``context.log.info``, so every loop of every step reports to its run log with no
change to the asset bodies), else the ``realsyn.progress`` Python logger. One line when the loop starts, then at most one every ``min_interval_s`` (the
``REALSYN_PROGRESS_INTERVAL_S`` environment variable, default 30 s), and one when it ends, so an
hours-long GPU step is never silent and a fast one writes three lines.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from realsyn.runtime import env_number

T = TypeVar("T")
Log = Callable[[str], None]

DEFAULT_INTERVAL_S = 30.0
_SINK: contextvars.ContextVar[Log | None] = contextvars.ContextVar("realsyn_progress_sink", default=None)
_LOGGER = logging.getLogger("realsyn.progress")
_resolver: Callable[[], Log | None] | None = None


def use_sink_resolver(resolver: Callable[[], Log | None] | None) -> None:
    """Register where a loop reports when no ``progress_to`` block is active: ``resolver()`` returns a
    log callable for the work running now, or None (then Python logging)."""
    global _resolver
    _resolver = resolver


@contextlib.contextmanager
def progress_to(log: Log) -> Iterator[None]:
    """Send the progress of every loop run inside this block to ``log`` (a callable taking one string)."""
    token = _SINK.set(log)
    try:
        yield
    finally:
        _SINK.reset(token)


def current_sink() -> Log:
    return _SINK.get() or (_resolver() if _resolver is not None else None) or _LOGGER.info


def default_interval_s() -> float:
    return env_number("REALSYN_PROGRESS_INTERVAL_S", DEFAULT_INTERVAL_S, minimum=0)


def format_duration(seconds: float) -> str:
    """``42s``, ``7m05s``, ``3h02m``: short enough for a log line."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Counts work done on one loop and reports it through ``log`` at most once per ``min_interval_s``.

    ``total`` may be None (unknown): the line then has no percentage and no ETA. Thread-safe:
    ``advance`` may be called from worker threads.
    """

    def __init__(
        self,
        what: str,
        total: int | None = None,
        *,
        unit: str = "items",
        log: Log | None = None,
        min_interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.what, self.total, self.unit = what, total, unit
        self.log = log or current_sink()
        self.min_interval_s = default_interval_s() if min_interval_s is None else float(min_interval_s)
        self.clock = clock
        self.done = 0
        self.started = self.last_report = clock()
        self.finished = False
        self._lock = threading.Lock()
        total_text = f"{total} {unit}" if total is not None else f"an unknown number of {unit}"
        self.log(f"{what}: started, {total_text}")

    def message(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        if self.total is None:
            return f"{self.what}: {self.done} {self.unit} done, {rate:.1f} {self.unit}/s, {format_duration(elapsed)} elapsed"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        left = max(self.total - self.done, 0)
        eta = format_duration(left / rate) if rate > 0 else "unknown"
        return f"{self.what}: {self.done}/{self.total} {self.unit} ({pct:.1f}%), {rate:.1f} {self.unit}/s, ETA {eta}"

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            now = self.clock()
            if now - self.last_report < self.min_interval_s:
                return
            self.last_report = now
            line = self.message(now)
        self.log(line)

    def finish(self) -> None:
        """The closing line (once): what was done, in how long, at what rate."""
        with self._lock:
            if self.finished:
                return
            self.finished = True
            now = self.clock()
            elapsed = now - self.started
            rate = f", {self.done / elapsed:.1f} {self.unit}/s" if elapsed > 0 else ""
            line = f"{self.what}: finished {self.done} {self.unit} in {format_duration(elapsed)}{rate}"
        self.log(line)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.log(f"{self.what}: stopped by {exc_type.__name__} after {self.done} {self.unit}")


def track(
    items: Iterable[T],
    what: str,
    total: int | None = None,
    *,
    unit: str = "items",
    size: Callable[[T], int] | None = None,
    log: Log | None = None,
    min_interval_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[T]:
    """Yield ``items`` unchanged, counting each one as done (``size(item)`` units, default 1) once the
    loop asks for the next; reports as ``Progress`` does. ``total`` defaults to ``len(items)`` when it has one."""
    if total is None and size is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(what, total, unit=unit, log=log, min_interval_s=min_interval_s, clock=clock) as progress:
        for item in items:
            yield item
            progress.advance(size(item) if size is not None else 1)
