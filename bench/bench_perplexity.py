"""Real COCO captions vs the same captions with their words shuffled, scored by a causal LM.

Prints perplexity percentiles of both, the fraction of pairs where the real caption scores lower,
the share of each kept by a perplexity band, and throughput (batched vs batch_size=1).

    python bench/bench_perplexity.py --captions ../shared/data/coco_mini/captions.jsonl --n 500
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from realsyn.curation.perplexity import EMBEDDED_SCORER, CausalLMPerplexityScorer  # noqa: E402
from realsyn.filters.perplexity_band import EMBEDDED_SCORER_BAND  # noqa: E402
from realsyn.io import iter_jsonl  # noqa: E402

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def read_captions(path: Path, n: int) -> list[str]:
    """First ``n`` captions in file order (each line: one image with a ``captions`` list)."""
    captions: list[str] = []
    for record in iter_jsonl(str(path), strict=True):
        for caption in record["captions"]:
            caption = " ".join(caption.split())
            if caption:
                captions.append(caption)
            if len(captions) == n:
                return captions
    return captions


def read_cupl(path: Path, n: int, seed: int, min_words: int = 8) -> list[str]:
    """``n`` seeded-random GPT-3 class descriptions (clip_benchmark ``cupl_prompts.json``) of at least
    ``min_words`` words: fluent prose (the file also holds short "a photo of a X." templates)."""
    with open(path, encoding="utf-8") as f:
        by_dataset = json.load(f)
    texts = (" ".join(s.split()) for classes in by_dataset.values() for texts in classes.values() for s in texts)
    sentences = sorted({s for s in texts if len(s.split()) >= min_words})
    rng = np.random.default_rng(seed)
    return [sentences[i] for i in rng.choice(len(sentences), size=min(n, len(sentences)), replace=False)]


def shuffle_words(texts: list[str], seed: int) -> list[str]:
    """Same words in a seeded random order, never the original order (unless all words are equal)."""
    rng = np.random.default_rng(seed)
    out = []
    for text in texts:
        words = text.split()
        shuffled = words
        for _ in range(20):
            shuffled = [words[i] for i in rng.permutation(len(words))]
            if shuffled != words:
                break
        out.append(" ".join(shuffled))
    return out


def timed_score(scorer: CausalLMPerplexityScorer, texts: list[str]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    scores = scorer.score(texts)
    return scores, time.perf_counter() - start


def percentile_row(name: str, scores: np.ndarray) -> str:
    values = np.nanpercentile(scores, PERCENTILES)
    cells = " ".join(f"{v:8.1f}" for v in values)
    return f"{name:<10} {cells} {np.nanmean(scores):9.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=Path, default=REPO / "../shared/data/coco_mini/captions.jsonl")
    parser.add_argument("--n", type=int, default=500, help="number of captions (file order)")
    parser.add_argument("--model", default=EMBEDDED_SCORER)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cupl", type=Path, default=None, help="optional cupl_prompts.json: percentiles on prose too")
    parser.add_argument("--cupl-n", type=int, default=300)
    parser.add_argument("--single-n", type=int, default=64, help="captions timed at batch_size=1")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--band", type=float, nargs=2, default=EMBEDDED_SCORER_BAND, metavar=("LOW", "HIGH"))
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    real = read_captions(args.captions, args.n)
    shuffled = shuffle_words(real, args.seed)

    batched = CausalLMPerplexityScorer(args.model, device=args.device, batch_size=args.batch_size)
    start = time.perf_counter()
    batched.score(real[:2])  # loads the model (cached per process) and warms up
    load_s = time.perf_counter() - start
    real_ppl, real_s = timed_score(batched, real)
    shuffled_ppl, shuffled_s = timed_score(batched, shuffled)

    single = CausalLMPerplexityScorer(args.model, device=args.device, batch_size=1)
    single_texts = real[: args.single_n]
    single_ppl, single_s = timed_score(single, single_texts)
    rel_diff = np.abs(single_ppl - real_ppl[: len(single_texts)]) / real_ppl[: len(single_texts)]

    low, high = args.band
    valid = ~(np.isnan(real_ppl) | np.isnan(shuffled_ppl))
    print(f"model {batched.model_id}  device {args.device}  torch threads {torch.get_num_threads()}  load+warmup {load_s:.1f}s")
    print(f"{len(real)} COCO captions from {args.captions}; words shuffled with seed {args.seed}")
    print(f"{'':<10} " + " ".join(f"{'p' + str(p):>8}" for p in PERCENTILES) + f" {'mean':>9}")
    print(percentile_row("real", real_ppl))
    print(percentile_row("shuffled", shuffled_ppl))
    ratio = shuffled_ppl[valid] / real_ppl[valid]
    print(f"median perplexity  real {np.nanmedian(real_ppl):.1f}  shuffled {np.nanmedian(shuffled_ppl):.1f}")
    print(f"mean perplexity    real {np.nanmean(real_ppl):.1f}  shuffled {np.nanmean(shuffled_ppl):.1f}")
    print(
        f"pairs real < shuffled: {np.mean(real_ppl[valid] < shuffled_ppl[valid]):.4f} of {valid.sum()}; "
        f"median shuffled/real ratio {np.median(ratio):.2f}"
    )
    in_band = lambda s: np.mean((s >= low) & (s <= high))  # noqa: E731
    print(f"band [{low:g}, {high:g}] keeps real {in_band(real_ppl):.3f}, shuffled {in_band(shuffled_ppl):.3f}")
    n_batched = len(real) + len(shuffled)
    print(
        f"throughput batch_size={args.batch_size}: {n_batched / (real_s + shuffled_s):.1f} sentences/s "
        f"({n_batched} in {real_s + shuffled_s:.1f}s)"
    )
    print(f"throughput batch_size=1: {len(single_texts) / single_s:.1f} sentences/s ({len(single_texts)} in {single_s:.1f}s)")
    print(f"batched vs single max relative difference: {np.nanmax(rel_diff):.2e}")
    if args.cupl is not None:
        prose = read_cupl(args.cupl, args.cupl_n, args.seed)
        prose_ppl = batched.score(prose)
        prose_shuffled_ppl = batched.score(shuffle_words(prose, args.seed))
        print(f"{len(prose)} CuPL descriptions from {args.cupl}")
        print(percentile_row("prose", prose_ppl))
        print(percentile_row("shuffled", prose_shuffled_ppl))
        print(f"band [{low:g}, {high:g}] keeps prose {in_band(prose_ppl):.3f}, shuffled {in_band(prose_shuffled_ppl):.3f}")


if __name__ == "__main__":
    main()
