"""MetaCLIP curation: substring matching against a metadata list, balancing, transparency.

Matching follows MetaCLIP v1 (``metaclip/substr_matching.py``) exactly: the text is padded with
spaces, only ``, . ; : ? !`` and the backtick are wrapped in spaces, tabs and newlines become
spaces, and every entry ``e`` is searched case-sensitively as `` {e} `` with an Aho-Corasick
automaton, so all overlapping entries match and an entry never matches inside a longer word.

Balancing (MetaCLIP section 3.4): an entry matched by ``count`` texts keeps each of them with
``p = min(1, t / count)``; a text survives if any of its entries keeps it, i.e. with probability
``1 - prod(1 - p_i)``. Texts matching no entry are dropped. One uniform draw per text against that
probability gives the same distribution as MetaCLIP's one draw per (text, entry).
"""

from __future__ import annotations

import gc
import hashlib
import io
import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa

PUNCTUATION_TO_WRAP = (",", ".", ";", ":", "?", "!", "`")
CHARS_TO_SPACE = ("\t", "\n", "\r")

_WRAP_BYTES = tuple((p.encode(), f" {p} ".encode()) for p in PUNCTUATION_TO_WRAP)
_SPACE_TABLE = bytes.maketrans("".join(CHARS_TO_SPACE).encode(), b" " * len(CHARS_TO_SPACE))
# One-byte separators for batching; none is touched by the spacing rules.
_SEPARATOR_CANDIDATES = [chr(c) for c in [*range(0x00, 0x20), 0x7F] if chr(c) not in CHARS_TO_SPACE]

Matches = Sequence[Sequence[int]]


def metaclip_spacing(text: str) -> str:
    """MetaCLIP's text normalisation, verbatim in effect (`` {text} `` with punctuation wrapped)."""
    spaced = f" {text} "
    for punct in PUNCTUATION_TO_WRAP:
        spaced = spaced.replace(punct, f" {punct} ")
    for char in CHARS_TO_SPACE:
        spaced = spaced.replace(char, " ")
    return spaced


def _space_joined(joined: str) -> str:
    """metaclip_spacing of a whole batch at once, on UTF-8 bytes (ASCII bytes never occur inside a multi-byte
    character, so byte replacement equals character replacement, and bytes.replace is much faster than str's)."""
    data = joined.encode("utf-8", "surrogatepass").translate(_SPACE_TABLE)
    for punct, wrapped in _WRAP_BYTES:
        data = data.replace(punct, wrapped)
    return " " + data.decode("utf-8", "surrogatepass") + " "


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Building many small int lists triggers the cyclic GC repeatedly; they cannot form cycles."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def csr_to_lists(offsets: np.ndarray, values: np.ndarray) -> list[list[int]]:
    """Per-row Python lists from CSR (offsets of length n + 1, flat values)."""
    flat = values.tolist()
    offs = offsets.tolist()
    with _gc_paused():
        return [flat[a:b] for a, b in zip(offs, offs[1:])]


def lists_to_csr(matches: Iterable[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64 (n + 1,), flat entry ids int64) from per-row id lists."""
    rows = matches if isinstance(matches, Sequence) else list(matches)
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(offsets[-1]))
    return offsets, flat


class MetaClipMatcher:
    """Aho-Corasick automaton over `` {entry} `` keys, built once and reused for every batch.

    Entry id = position in ``metadata``; for a duplicated entry the last position wins, as in
    MetaCLIP (``add_word`` replaces the value). ``match_batch`` joins a batch into one string
    with a one-byte separator that no key contains, scans it once, and maps hits back to texts
    by counting separator hits (the separator is itself a key with a reserved value); batches are
    scanned in chunks of ``chunk_size`` texts.
    """

    def __init__(self, metadata: Sequence[Any], chunk_size: int = 4096):
        import ahocorasick  # pyahocorasick

        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        self.n_entries = len(metadata)
        self._separator_value = self.n_entries
        automaton = ahocorasick.Automaton(ahocorasick.STORE_INTS)
        keys_chars: set[str] = set()
        for entry_id, entry in enumerate(metadata):
            key = f" {entry} "
            keys_chars.update(key)
            automaton.add_word(key, entry_id)
        free = [c for c in _SEPARATOR_CANDIDATES if c not in keys_chars]
        self._separator = free[0] if free else None  # None: no safe separator, batches go text by text
        self._joiner = f" {self._separator} "
        if self._separator is not None:
            automaton.add_word(self._separator, self._separator_value)
        automaton.make_automaton()
        self._automaton = automaton

    def match(self, text: Any) -> list[int]:
        """Sorted unique entry ids matched in ``text``; [] for a null or non-string text."""
        if not isinstance(text, str):
            return []
        found = {value for _, value in self._automaton.iter(metaclip_spacing(text))}
        found.discard(self._separator_value)
        return sorted(found)

    def match_batch(self, texts: Sequence[Any]) -> list[list[int]]:
        """``[match(t) for t in texts]``, computed with one automaton scan per batch."""
        return csr_to_lists(*self.match_batch_csr(texts))

    def match_batch_csr(self, texts: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """Matches of a batch as CSR: (offsets int64 (n + 1,), entry ids int64, sorted within each row)."""
        texts = texts if isinstance(texts, list) else list(texts)
        n = len(texts)
        row_parts: list[np.ndarray] = []
        id_parts: list[np.ndarray] = []
        # Chunks keep the joined string and the hit arrays small enough to stay in cache.
        for start in range(0, n, self.chunk_size):
            rows, ids = self._match_chunk(texts[start : start + self.chunk_size])
            row_parts.append(rows + start)
            id_parts.append(ids)
        rows = np.concatenate(row_parts) if row_parts else np.zeros(0, np.int64)
        ids = np.concatenate(id_parts) if id_parts else np.zeros(0, np.int64)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=offsets[1:])
        return offsets, ids

    def _match_chunk(self, texts: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        """(row, entry id) of every distinct match, sorted by row then id."""
        sep = self._separator
        if sep is not None and texts:
            try:
                joined = self._joiner.join(texts)  # TypeError if a text is not a str
            except TypeError:
                joined = None
            if joined is not None and joined.count(sep) == len(texts) - 1:
                return self._scan_joined(joined)
        # Slow path: non-string texts (no match) or texts that contain the separator (matched alone).
        batchable = [i for i, t in enumerate(texts) if isinstance(t, str) and sep is not None and sep not in t]
        lone = [i for i, t in enumerate(texts) if isinstance(t, str) and (sep is None or sep in t)]
        rows_list, ids_list = [], []
        if batchable:
            rows, ids = self._scan_joined(self._joiner.join(texts[i] for i in batchable))
            rows_list.append(np.asarray(batchable, dtype=np.int64)[rows])
            ids_list.append(ids)
        for i in lone:
            found = np.asarray(self.match(texts[i]), dtype=np.int64)
            rows_list.append(np.full(len(found), i, dtype=np.int64))
            ids_list.append(found)
        if not rows_list:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        rows, ids = np.concatenate(rows_list), np.concatenate(ids_list)
        order = np.lexsort((ids, rows))
        return rows[order], ids[order]

    def _scan_joined(self, joined: str) -> tuple[np.ndarray, np.ndarray]:
        """(text index, entry id) of every distinct match in a separator-joined batch, sorted."""
        hits = np.fromiter(itertools.chain.from_iterable(self._automaton.iter(_space_joined(joined))), dtype=np.int64)
        values = hits[1::2]  # (end index, value) pairs, in end-index order
        is_sep = values == self._separator_value
        text_index = np.cumsum(is_sep)[~is_sep]
        key = text_index * (self.n_entries + 1) + values[~is_sep]
        key.sort(kind="stable")  # already sorted by text: runs make this cheap
        if len(key):
            distinct = np.empty(len(key), dtype=bool)
            distinct[0] = True
            np.not_equal(key[1:], key[:-1], out=distinct[1:])
            key = key[distinct]
        text_index, entry_id = np.divmod(key, self.n_entries + 1)
        return text_index, entry_id


EMBEDDED_METADATA = "embedded:visual-concepts"


def load_metadata(path: str) -> list[str]:
    """The metadata list (a JSON list of strings) from a local path or URL.

    ``embedded:visual-concepts`` is the small concept list shipped with the package (the tagger's
    vocabulary), for demos; production uses MetaCLIP's 500k WordNet + Wikipedia entries.
    """
    from realsyn.storage import filesystem_for

    if path == EMBEDDED_METADATA:
        from realsyn.generation.tagging import load_default_vocabulary

        return list(load_default_vocabulary())

    fs, p = filesystem_for(path)
    with fs.open(p, "rb") as f:
        metadata = json.load(f)
    if not isinstance(metadata, list):
        raise ValueError(f"{path}: metadata must be a JSON list, got {type(metadata).__name__}")
    return metadata


class EntryCounter:
    """Per-entry match counts, accumulated shard by shard."""

    def __init__(self, n_entries: int):
        self.counts = np.zeros(int(n_entries), dtype=np.int64)

    def update(self, batch_matches: Iterable[Sequence[int]]) -> None:
        _, flat = lists_to_csr(batch_matches)
        self.update_flat(flat)

    def update_flat(self, entry_ids: np.ndarray) -> None:
        if len(entry_ids):
            self.counts += np.bincount(entry_ids, minlength=len(self.counts))[: len(self.counts)]


def entry_counts(matches: Iterable[Sequence[int]], n_entries: int) -> np.ndarray:
    """int64 (n_entries,): how many texts matched each entry."""
    counter = EntryCounter(n_entries)
    counter.update(matches)
    return counter.counts


def entry_keep_probability(counts: np.ndarray, t: float) -> np.ndarray:
    """p_i = min(1, t / count_i) per entry (1 for unseen entries: they are tail)."""
    counts = np.asarray(counts, dtype=np.float64)
    return np.minimum(1.0, float(t) / np.maximum(counts, 1.0))


def keep_probability_csr(offsets: np.ndarray, entry_ids: np.ndarray, counts: np.ndarray, t: float) -> np.ndarray:
    """1 - prod(1 - p_i) per row over its entries; 0 for rows with none."""
    n = len(offsets) - 1
    miss = 1.0 - entry_keep_probability(counts, t)[entry_ids]
    out = np.zeros(n, dtype=np.float64)
    lengths = np.diff(offsets)
    nonempty = lengths > 0
    if nonempty.any():
        out[nonempty] = 1.0 - np.multiply.reduceat(miss, offsets[:-1][nonempty])
    return out


def keep_probability(matches: Matches, counts: np.ndarray, t: float) -> np.ndarray:
    """float64 per text: 1 - prod(1 - min(1, t / count_i)) over its matched entries; 0 if none."""
    return keep_probability_csr(*lists_to_csr(matches), counts, t)


def _epoch_seed_sequence(seed: int, epoch: int | None) -> np.random.SeedSequence:
    return np.random.SeedSequence(int(seed) if epoch is None else [int(seed), int(epoch)])


def balance(matches: Matches, counts: np.ndarray, t: float, seed: int) -> np.ndarray:
    """Bool keep-mask. Draws: ``np.random.default_rng(SeedSequence(seed)).random(n)`` in row order,
    so streaming the same rows in any batch sizes (one Generator, consumed in order) gives the same mask."""
    return balance_epoch(matches, counts, t, seed, None)


def balance_epoch(matches: Matches, counts: np.ndarray, t: float, seed: int, epoch: int | None) -> np.ndarray:
    """balance() with a fresh draw per epoch (online curation): the Generator is seeded by (seed, epoch)."""
    rng = np.random.default_rng(_epoch_seed_sequence(seed, epoch))
    prob = keep_probability(matches, counts, t)
    return rng.random(len(prob)) < prob


class StreamingBalancer:
    """balance() over batches that arrive in row order (one Generator consumed in order)."""

    def __init__(self, counts: np.ndarray, t: float, seed: int, epoch: int | None = None):
        self.counts, self.t = np.asarray(counts), float(t)
        self._rng = np.random.default_rng(_epoch_seed_sequence(seed, epoch))

    def keep_csr(self, offsets: np.ndarray, entry_ids: np.ndarray) -> np.ndarray:
        prob = keep_probability_csr(offsets, entry_ids, self.counts, self.t)
        return self._rng.random(len(prob)) < prob


# ---------------------------------------------------------------------------- transparency


def distribution_table(counts_before: np.ndarray, counts_after: np.ndarray, metadata: Sequence[Any], t: float) -> pa.Table:
    """One row per entry: entry_id, entry, count_before, count_after, is_head (count_before > t)."""
    before = np.asarray(counts_before, dtype=np.int64)
    after = np.asarray(counts_after, dtype=np.int64)
    if not len(before) == len(after) == len(metadata):
        raise ValueError(f"length mismatch: {len(before)} counts before, {len(after)} after, {len(metadata)} entries")
    return pa.table(
        {
            "entry_id": pa.array(np.arange(len(before), dtype=np.int64)),
            "entry": pa.array([e if isinstance(e, str) else str(e) for e in metadata], pa.string()),
            "count_before": pa.array(before),
            "count_after": pa.array(after),
            "is_head": pa.array(before > t),
        }
    )


def head_tail_summary(counts_before: np.ndarray, counts_after: np.ndarray, t: float) -> dict[str, int]:
    """Entry and match totals split at t (head: count > t)."""
    before = np.asarray(counts_before, dtype=np.int64)
    after = np.asarray(counts_after, dtype=np.int64)
    head = before > t
    return {
        "head_entries": int(head.sum()),
        "tail_entries": int(((before > 0) & ~head).sum()),
        "unmatched_entries": int((before == 0).sum()),
        "matches_before": int(before.sum()),
        "matches_after": int(after.sum()),
        "head_matches_before": int(before[head].sum()),
        "head_matches_after": int(after[head].sum()),
        "tail_matches_before": int(before[~head].sum()),
        "tail_matches_after": int(after[~head].sum()),
    }


def plot_cumulative(counts_before: np.ndarray, counts_after: np.ndarray, t: float, out_png_path: str | None = None) -> bytes:
    """Cumulative matches over entries sorted by count (MetaCLIP Fig. 2 style), before and after
    balancing, with the head/tail split at t marked. Returns the PNG bytes (also written if a path is given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before = np.sort(np.asarray(counts_before, dtype=np.int64))
    order = np.argsort(np.asarray(counts_before, dtype=np.int64), kind="stable")
    after = np.asarray(counts_after, dtype=np.int64)[order]  # same x axis: entries sorted by count before
    x = np.arange(len(before))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    try:
        ax.plot(x, np.cumsum(before), label="before balancing", linewidth=2)
        ax.plot(x, np.cumsum(after), label=f"after balancing (t={t:g})", linewidth=2)
        split = int(np.searchsorted(before, t, side="right"))  # first head entry
        if split < len(before):
            ax.axvline(split, color="grey", linestyle="--", linewidth=1)
            ax.text(
                split,
                ax.get_ylim()[1] * 0.95,
                f"head/tail split at t: {len(before) - split} head entries ",
                color="grey",
                va="top",
                ha="right",
            )
        ax.set_xlabel("metadata entries sorted by count")
        ax.set_ylabel("cumulative matches")
        ax.set_title("MetaCLIP entry distribution")
        ax.legend(loc="upper left")
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    png = buf.getvalue()
    if out_png_path is not None:
        from realsyn.storage import atomic_write_bytes, filesystem_for

        fs, p = filesystem_for(out_png_path)
        atomic_write_bytes(fs, p, png)
    return png


# ---------------------------------------------------------------------------- graph sampler


def epoch_hash_seed(seed: int, epoch: int | None) -> int:
    """The per-row hash seed: ``seed`` itself, or a 63-bit mix of (seed, epoch) for a per-epoch draw."""
    if epoch is None:
        return int(seed)
    digest = hashlib.blake2b(f"metaclip:{int(seed)}:{int(epoch)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
