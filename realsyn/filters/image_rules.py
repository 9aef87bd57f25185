"""RealSyn image filter (stage 3): drop failed, undecodable, too small and too elongated images."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from realsyn.plugins.kinds import ImageFilter


class ImageRuleFilter(ImageFilter):
    """Rules on image_db rows (keys ``status``, ``width``, ``height``).

    Reasons, first match wins: ``fetch_failed``, ``fetch_refused`` (the fetch policy forbade it),
    ``opted_out`` (X-Robots-Tag noai etc.), ``undecodable`` (status not ``ok`` or no usable
    size), ``short_side`` (min(w, h) < ``min_short_side``), ``aspect_ratio`` (w/h above
    ``max_aspect_ratio`` or below its inverse). Both edges are kept: a 100 px short side and a
    3.0 ratio pass.
    """

    name = "image_rules"

    def __init__(self, min_short_side: int = 100, max_aspect_ratio: float = 3.0):
        if min_short_side < 0 or max_aspect_ratio < 1.0:
            raise ValueError(f"need min_short_side >= 0 and max_aspect_ratio >= 1, got {min_short_side}, {max_aspect_ratio}")
        self.min_short_side = min_short_side
        self.max_aspect_ratio = float(max_aspect_ratio)

    def reason(self, row: Mapping[str, Any]) -> str | None:
        status = row.get("status")
        if status in ("fetch_failed", "fetch_refused", "opted_out"):  # not fetched: the status is the reason
            return status
        width, height = row.get("width"), row.get("height")
        if status != "ok" or not width or not height or width <= 0 or height <= 0:
            return "undecodable"
        if min(width, height) < self.min_short_side:
            return "short_side"
        # Cross-multiplied, so the 3.0 edge is exact (no division rounding).
        if width > self.max_aspect_ratio * height or height > self.max_aspect_ratio * width:
            return "aspect_ratio"
        return None

    def reasons(self, items: Sequence[Mapping[str, Any]]) -> list[str | None]:
        return [self.reason(row) for row in items]
