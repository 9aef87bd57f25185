"""MetaCLIP matcher: conformance with MetaCLIP's own outputs, and speed against plain pyahocorasick loops.

(a) Conformance: our matcher on alt_texts/test_10000.parquet (column TEXT) with the partial
    WordNet metadata, compared text by text with MetaCLIP's substr_matching outputs
    (metaclip/img2dataset10k_matches_metaclip_aho.jsonl) and its entry counts.
(b) Speed, CPU seconds of this process (texts/s/core), interleaved rounds on the 10k texts
    replicated --replicate times, three implementations producing the same sorted id lists
    (identical=1 when they all agree on every text):
    - boundary loop: automaton over the raw entries; per text: spacing, iter(), keep the hits
      with a space on both sides (the straightforward way);
    - MetaCLIP loop (the plain pyahocorasick loop with MetaCLIP's rules): MetaCLIP's own per-text
      code (automaton over " entry " keys, set, sorted);
    - ours: MetaClipMatcher.match_batch (substrings between spaces, hashed and looked up with numpy,
      a chunk of texts at a time; no pyahocorasick).

    flock /tmp/realsyn-bench.lock .venv/bin/python bench/bench_metaclip.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import pyarrow.parquet as pq

from realsyn.curation.metaclip import MetaClipMatcher, entry_counts, load_metadata, metaclip_spacing
from realsyn.io import iter_jsonl

DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


def boundary_loop_matcher(metadata: list[str]):
    """Raw entries in the automaton; word boundaries checked per hit in Python."""
    import ahocorasick

    automaton = ahocorasick.Automaton()
    for idx, entry in enumerate(metadata):
        automaton.add_word(entry, (idx, len(entry)))
    automaton.make_automaton()

    def match_all(texts: list[str]) -> list[list[int]]:
        out = []
        for text in texts:
            spaced = metaclip_spacing(text)
            found = set()
            for end, (idx, length) in automaton.iter(spaced):
                start = end - length + 1
                if spaced[start - 1] == " " and end + 1 < len(spaced) and spaced[end + 1] == " ":
                    found.add(idx)
            out.append(sorted(found))
        return out

    return match_all


def metaclip_loop_matcher(metadata: list[str]):
    """MetaCLIP v1's substr_matching, one text at a time (plus sorted(), our output format)."""
    import ahocorasick

    automaton = ahocorasick.Automaton()
    for idx, key in enumerate(f" {entry} " for entry in metadata):
        automaton.add_word(key, (idx, key))
    automaton.make_automaton()

    def match_all(texts: list[str]) -> list[list[int]]:
        out = []
        for text in texts:
            matched = set()
            for _end, (entry_id, _key) in automaton.iter(metaclip_spacing(text)):
                matched.add(entry_id)
            out.append(sorted(matched))
        return out

    return match_all


def conformance(matcher: MetaClipMatcher, texts: list[str], reference: list[list[int]], ref_counts: np.ndarray, n_entries: int) -> int:
    batched = matcher.match_batch(texts)
    single = [matcher.match(t) for t in texts]
    bad_batch = [i for i, (a, b) in enumerate(zip(batched, reference)) if a != b]
    bad_single = [i for i, (a, b) in enumerate(zip(single, reference)) if a != b]
    counts = entry_counts(batched, n_entries)
    print("== (a) conformance with MetaCLIP's substr_matching (pyahocorasick) ==")
    print(f"texts: {len(texts)}  reference rows: {len(reference)}")
    print(f"mismatching texts: match_batch {len(bad_batch)}, match {len(bad_single)}")
    for i in (bad_batch + bad_single)[:10]:
        print(f"  row {i}: ours {batched[i]} / {single[i]} vs MetaCLIP {reference[i]}: {texts[i]!r}")
    print(f"texts with a match: ours {sum(1 for m in batched if m)}, MetaCLIP {sum(1 for m in reference if m)}")
    print(f"(text, entry) matches: ours {sum(map(len, batched))}, MetaCLIP {sum(map(len, reference))}")
    print(f"entry counts equal to entry_count_img2dataset10k.npy: {bool(np.array_equal(counts, ref_counts))}")
    return len(bad_batch) + len(bad_single) + int(not np.array_equal(counts, ref_counts))


def speed(implementations: dict, texts: list[str], rounds: int) -> dict[str, float]:
    """Median texts per CPU second per implementation, rounds interleaved so load drifts hit all alike."""
    seconds: dict[str, list[float]] = {name: [] for name in implementations}
    outputs = {}
    for _ in range(rounds):
        for name, fn in implementations.items():
            start = time.process_time()
            outputs[name] = fn(texts)
            seconds[name].append(time.process_time() - start)
    first = next(iter(outputs.values()))
    identical = all(out == first for out in outputs.values())
    return {name: len(texts) / statistics.median(s) for name, s in seconds.items()}, seconds, identical


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--replicate", type=int, default=20, help="copies of the 10k texts for the speed test")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=4096, help="texts per automaton scan in match_batch")
    args = parser.parse_args()

    d = os.path.abspath(args.data_dir)
    metadata = load_metadata(os.path.join(d, "metaclip", "metadata_wordnet_part_plus_0_99.json"))
    texts = pq.read_table(os.path.join(d, "alt_texts", "test_10000.parquet"), columns=["TEXT"]).column("TEXT").to_pylist()
    reference = [
        sorted(r["matched_entry_ids"])
        for r in iter_jsonl(os.path.join(d, "metaclip", "img2dataset10k_matches_metaclip_aho.jsonl"), strict=True)
    ]
    ref_counts = np.load(os.path.join(d, "metaclip", "entry_count_img2dataset10k.npy"))

    start = time.process_time()
    matcher = MetaClipMatcher(metadata, chunk_size=args.chunk_size)
    print(f"metadata: {len(metadata)} entries; automaton built in {time.process_time() - start:.2f} s CPU")
    failures = conformance(matcher, texts, reference, ref_counts, len(metadata))

    big = texts * args.replicate
    implementations = {
        "boundary loop (raw keys + boundary check)": boundary_loop_matcher(metadata),
        "MetaCLIP loop (spaced keys, per text)": metaclip_loop_matcher(metadata),
        "ours (MetaClipMatcher.match_batch)": matcher.match_batch,
    }
    rates, seconds, identical = speed(implementations, big, args.rounds)
    print(f"\n== (b) speed: {len(big)} texts ({len(texts)} x {args.replicate}), {args.rounds} interleaved rounds, CPU time, one thread ==")
    ours = rates["ours (MetaClipMatcher.match_batch)"]
    for name, rate in rates.items():
        per_round = [len(big) / s for s in seconds[name]]
        print(
            f"{name:45s} {rate:10,.0f} texts/s/core (rounds: {', '.join(f'{r:,.0f}' for r in per_round)})  ours / this = {ours / rate:.2f}x"
        )
    ours_s = seconds["ours (MetaClipMatcher.match_batch)"]
    for name in list(implementations)[:2]:
        ratios = [b / o for b, o in zip(seconds[name], ours_s)]
        print(f"per-round speed-up vs {name}: min {min(ratios):.2f}x, median {statistics.median(ratios):.2f}x, max {max(ratios):.2f}x")
    plain = rates["MetaCLIP loop (spaced keys, per text)"]
    print(f"identical matches (all three, every text): {int(identical)}")
    print(
        f"RESULT texts={len(big)} plain_pyahocorasick_texts_per_s={plain:.0f} ours_texts_per_s={ours:.0f} "
        f"ratio_vs_plain={ours / plain:.2f} identical={int(identical)} conformance_mismatches={failures}"
    )
    if failures or not identical:
        raise SystemExit(f"conformance failed: {failures} mismatch(es), identical={int(identical)}")


if __name__ == "__main__":
    main()
