"""MetaCLIP curation: substring matching against a metadata list, balancing, transparency.

Matching follows MetaCLIP v1 (``metaclip/substr_matching.py``) exactly: the text is padded with
spaces, only ``, . ; : ? !`` and the backtick are wrapped in spaces, tabs and newlines become
spaces, and every entry ``e`` is searched case-sensitively as `` {e} `` (MetaCLIP uses an Aho-Corasick
automaton), so all overlapping entries match and an entry never matches inside a longer word.
``MetaClipMatcher`` finds exactly those matches without an automaton: vectorised substring hashing
between spaces, every hit checked byte by byte (see its docstring).

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
    """MetaCLIP's matching as exact substring tests between spaces, vectorised with numpy.

    Every occurrence of the key `` {e} `` in the spaced text ``S`` starts at a space ``p`` and ends at
    a space ``q`` with ``S[p + 1 : q] == e``; the spaces strictly between ``p`` and ``q`` are those of
    ``e``. So the matches of a text are exactly the entries equal to ``S[p + 1 : q]`` where ``q`` is the
    ``k``-th space after ``p`` and ``k - 1`` the number of spaces in the entry. A batch is joined into
    one UTF-8 buffer (texts separated by `` X ``, ``X`` a control byte no key contains), spaced once,
    and scanned level by level: level 1 looks up every substring between consecutive spaces, level
    ``k + 1`` only extends those whose level-``k`` substring is an entry's prefix up to one of its
    spaces. Lookups hash the substrings (polynomial hash mod 2**64 from prefix sums, one open-addressing
    table over entries and prefixes); each hit is then compared byte by byte with its entry, so a hash
    collision can never create a match. A substring across a text boundary contains ``X`` and no key
    does, so it never matches. Results equal MetaCLIP's Aho-Corasick search (pyahocorasick) exactly.

    Entry id = position in ``metadata``; for a duplicated entry the last position wins, as in
    MetaCLIP (``add_word`` replaces the value). Batches are scanned in chunks of ``chunk_size`` texts
    (and at most ``max_chunk_bytes`` joined bytes, unless one text is longer); the scan holds about 40 bytes
    per byte of the largest chunk.
    """

    def __init__(self, metadata: Sequence[Any], chunk_size: int = 4096, max_chunk_bytes: int = 1 << 22):
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        self.max_chunk_bytes = int(max_chunk_bytes)
        self.n_entries = len(metadata)
        last: dict[str, int] = {}
        for entry_id, entry in enumerate(metadata):
            last[f"{entry}"] = entry_id  # f" {entry} " is MetaCLIP's key
        keys_chars = set("".join(last))
        free = [c for c in _SEPARATOR_CANDIDATES if c not in keys_chars]
        self._separator = free[0] if free else None  # None: no safe separator, batches go text by text
        self._sep_byte = ord(self._separator) if free else -1
        self._joiner = f" {self._separator} " if free else ""
        encoded = [key.encode("utf-8", "surrogatepass") for key in last]
        self._index = _KeyIndex(encoded, np.fromiter(last.values(), dtype=np.int64, count=len(last)), self.n_entries)

    def match(self, text: Any) -> list[int]:
        """Sorted unique entry ids matched in ``text``; [] for a null or non-string text."""
        if not isinstance(text, str):
            return []
        _, ids = self._index.scan(_spaced_bytes(text.encode("utf-8", "surrogatepass")), -1)
        return ids.tolist()

    def match_batch(self, texts: Sequence[Any]) -> list[list[int]]:
        """``[match(t) for t in texts]``, computed with one scan per chunk of texts."""
        return csr_to_lists(*self.match_batch_csr(texts))

    def match_batch_csr(self, texts: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """Matches of a batch as CSR: (offsets int64 (n + 1,), entry ids int64, sorted within each row)."""
        texts = texts if isinstance(texts, list) else list(texts)
        n = len(texts)
        row_parts: list[np.ndarray] = []
        id_parts: list[np.ndarray] = []
        # Chunks keep the joined buffer and the per-byte arrays small enough to stay in cache.
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
        if self._separator is not None and texts:
            try:
                joined = self._joiner.join(texts).encode("utf-8", "surrogatepass")
            except TypeError:  # a text is not a str
                joined = None
            if joined is not None and joined.count(self._sep_byte) == len(texts) - 1:
                if len(joined) > self.max_chunk_bytes and len(texts) > 1:
                    half = len(texts) // 2
                    (rows_a, ids_a), (rows_b, ids_b) = self._match_chunk(texts[:half]), self._match_chunk(texts[half:])
                    return np.concatenate([rows_a, rows_b + half]), np.concatenate([ids_a, ids_b])
                return self._index.scan(_spaced_bytes(joined), self._sep_byte)
        # Slow path: non-string texts (no match) or texts that contain the separator (matched alone).
        batchable = [i for i, t in enumerate(texts) if isinstance(t, str) and self._separator is not None and self._separator not in t]
        lone = [i for i, t in enumerate(texts) if isinstance(t, str) and (self._separator is None or self._separator in t)]
        rows_list, ids_list = [], []
        if batchable:
            rows, ids = self._match_chunk([texts[i] for i in batchable])
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


def _spaced_bytes(data: bytes) -> bytes:
    """metaclip_spacing on UTF-8 bytes (ASCII bytes never occur inside a multi-byte character, so
    byte replacement equals character replacement, and bytes.replace is much faster than str's)."""
    data = data.translate(_SPACE_TABLE)
    for punct, wrapped in _WRAP_BYTES:
        data = data.replace(punct, wrapped)
    return b" " + data + b" "


_U64 = np.uint64
_BASES = (0x9E3779B97F4A7C15, 0xD6E8FEB86659FD93, 0xA0761D6478BD642F, 0xE7037ED1A0B428DB)  # odd: invertible mod 2**64
_LENGTH_MIX = _U64(0xC2B2AE3D27D4EB4F)
_SLOT_MIX = _U64(0x9E3779B97F4A7C15)  # Fibonacci hashing: every bit of a hash reaches the slot's top bits


class _KeyIndex:
    """Hashes of the keys (entries) and of their prefixes up to each inner space, in one open-addressing
    table (uint64 hash -> code: (entry id + 1) * 2 when the string is an entry, | 1 when it is a prefix)."""

    def __init__(self, keys: list[bytes], entry_ids: np.ndarray, n_entries: int):
        self.n_entries = n_entries
        data = b"".join(keys)
        lengths = np.fromiter(map(len, keys), dtype=np.int64, count=len(keys))
        starts = np.zeros(len(keys) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        self._key_bytes = np.frombuffer(data, dtype=np.uint8) if data else np.zeros(0, np.uint8)
        self._key_start = np.zeros(n_entries, dtype=np.int64)
        self._key_start[entry_ids] = starts[:-1]
        inner = np.flatnonzero(self._key_bytes == 32)
        owner = np.searchsorted(starts, inner, side="right") - 1
        self.max_level = int(np.bincount(owner, minlength=len(keys)).max()) + 1 if len(keys) else 1
        # Every string indexed is a range of the keys' bytes: each key whole, and each key up to each inner space.
        range_start = np.concatenate([starts[:-1], starts[owner]])
        range_end = np.concatenate([starts[1:], inner])
        codes = np.concatenate([(entry_ids + 1) * 2, np.ones(len(inner), dtype=np.int64)])
        for base in _BASES:
            self._set_base(base, len(data))
            prefix = self._prefix_sums(self._key_bytes)
            hashes = self._space_led_hashes(prefix, range_start, range_end)
            unique = self._merge_equal_strings(data, hashes, range_start, range_end, codes)
            if unique is not None:
                break
        else:  # pragma: no cover - four independent 64-bit hashes colliding on a metadata list
            raise ValueError("metadata: no collision-free hash base found")
        self._build_table(*unique)

    def _space_led_hashes(self, prefix: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        """Hash of b" " + keys[start:end], as ``scan`` computes it for a substring that starts at a space."""
        with np.errstate(over="ignore"):
            plain = (prefix.take(end) - prefix.take(start)) * self._inv.take(start)
            return _U64(32) + plain * self._base + (end - start + 1).astype(_U64) * _LENGTH_MIX

    @staticmethod
    def _merge_equal_strings(
        data: bytes, hashes: np.ndarray, start: np.ndarray, end: np.ndarray, codes: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(unique hashes, OR-ed codes) with equal strings merged ("new york" is an entry and a prefix);
        None when two different strings share a hash or a hash is 0 (the table's empty mark)."""
        order = np.argsort(hashes, kind="stable")
        hashes, start, end, codes = hashes[order], start[order], end[order], codes[order]
        if len(hashes) and hashes[0] == 0:
            return None
        first = np.ones(len(hashes), dtype=bool)
        first[1:] = hashes[1:] != hashes[:-1]
        run_first = np.maximum.accumulate(np.where(first, np.arange(len(hashes)), 0))
        for i in np.flatnonzero(~first).tolist():  # same hash as the run's first string: must be the same string
            j = run_first[i]
            if data[start[i] : end[i]] != data[start[j] : end[j]]:
                return None
        runs = np.flatnonzero(first)
        return hashes[runs], np.bitwise_or.reduceat(codes, runs) if len(runs) else codes[:0]

    def _set_base(self, base: int, length: int) -> None:
        self._base, self._base_inv = _U64(base), _U64(pow(base, -1, 1 << 64))
        self._pow = np.ones(1, dtype=_U64)
        self._inv = np.ones(1, dtype=_U64)
        self._grow(length)

    def _grow(self, length: int) -> None:
        """Powers of the base and of its inverse for positions 0 .. length (at least)."""
        if len(self._pow) > length:
            return
        size = max(length + 1, 2 * len(self._pow))
        self._pow = _powers(self._base, size)
        self._inv = _powers(self._base_inv, size)

    def _prefix_sums(self, buf: np.ndarray) -> np.ndarray:
        """P[i] = sum_{j < i} buf[j] * base**j (mod 2**64), length len(buf) + 1."""
        self._grow(len(buf))
        out = np.empty(len(buf) + 1, dtype=_U64)
        out[0] = 0
        with np.errstate(over="ignore"):
            np.cumsum(buf * self._pow[: len(buf)], out=out[1:])
        return out

    @staticmethod
    def _combine(prefix_start: np.ndarray, prefix_end: np.ndarray, inv_start: np.ndarray, length: np.ndarray) -> np.ndarray:
        """Hash of buf[start:end], wherever it sits: (P[end] - P[start]) / base**start, mixed with its length."""
        with np.errstate(over="ignore"):
            return (prefix_end - prefix_start) * inv_start + length.astype(_U64) * _LENGTH_MIX

    def _slots(self, hashes: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return ((hashes * _SLOT_MIX) >> self._shift).astype(np.intp)

    def _build_table(self, hashes: np.ndarray, codes: np.ndarray) -> None:
        bits = max(4, int(np.ceil(np.log2(max(len(hashes), 1) * 8))))  # load <= 1/8: most lookups end at the home slot
        self._mask, self._shift = (1 << bits) - 1, _U64(64 - bits)
        self._table_hash = np.zeros(1 << bits, dtype=_U64)  # 0 = empty (no key hashes to 0)
        self._table_code = np.zeros(1 << bits, dtype=np.int64)
        slots = self._slots(hashes)
        pending = np.arange(len(hashes))
        while len(pending):  # linear probing, vectorised: per round, the first key aiming at a free slot takes it
            target = slots[pending]
            free = self._table_hash[target] == 0
            _, first = np.unique(np.where(free, target, -1), return_index=True)
            won = np.zeros(len(pending), dtype=bool)
            won[first] = True
            won &= free
            self._table_hash[target[won]] = hashes[pending[won]]
            self._table_code[target[won]] = codes[pending[won]]
            pending = pending[~won]
            slots[pending] = (slots[pending] + 1) & self._mask

    def _lookup(self, hashes: np.ndarray) -> np.ndarray:
        """Code per hash (0 when absent)."""
        slots = self._slots(hashes)
        found = self._table_hash.take(slots)
        hit = found == hashes
        codes = np.where(hit, self._table_code.take(slots), 0)
        again = np.flatnonzero(~hit & (found != 0))
        while len(again):
            slots[again] = (slots[again] + 1) & self._mask
            found = self._table_hash.take(slots[again])
            hit = found == hashes[again]
            codes[again[hit]] = self._table_code.take(slots[again[hit]])
            again = again[~hit & (found != 0)]
        return codes

    def scan(self, data: bytes, separator: int) -> tuple[np.ndarray, np.ndarray]:
        """(text index, entry id) of every distinct match in a spaced buffer, sorted; texts are
        separated by `` X `` (``X`` = the ``separator`` byte; -1: one text)."""
        buf = np.frombuffer(data, dtype=np.uint8)
        spaces = np.flatnonzero(buf == 32)
        if len(spaces) < 2:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        # Keys are hashed with their leading space: " e" = buf[p:q] for spaces p < q.
        prefix_at = self._prefix_sums(buf).take(spaces)
        inv_at = self._inv.take(spaces)
        length = np.diff(spaces)
        codes = self._lookup(self._combine(prefix_at[:-1], prefix_at[1:], inv_at[:-1], length))
        hit = np.flatnonzero(codes >= 2)
        found_start, found_len, found_id = [spaces[hit] + 1], [length[hit] - 1], [(codes[hit] >> 1) - 1]
        candidates = np.flatnonzero(codes & 1)  # index of the space each prefix starts at
        level = 1
        while len(candidates) and level < self.max_level:
            level += 1
            candidates = candidates[candidates + level < len(spaces)]
            start, end = spaces.take(candidates), spaces.take(candidates + level)
            length = end - start
            codes = self._lookup(
                self._combine(prefix_at.take(candidates), prefix_at.take(candidates + level), inv_at.take(candidates), length)
            )
            hit = np.flatnonzero(codes >= 2)
            found_start.append(start[hit] + 1)
            found_len.append(length[hit] - 1)
            found_id.append((codes[hit] >> 1) - 1)
            candidates = candidates[(codes & 1).astype(bool)]
        start, length, entry = np.concatenate(found_start), np.concatenate(found_len), np.concatenate(found_id)
        exact = self._verify(buf, start, length, entry)
        start, entry = start[exact], entry[exact]
        text = np.searchsorted(np.flatnonzero(buf == separator), start) if separator >= 0 and len(start) else np.zeros(len(start), np.int64)
        key = text.astype(np.int64) * (self.n_entries + 1) + entry
        key.sort()
        if len(key):
            distinct = np.empty(len(key), dtype=bool)
            distinct[0] = True
            np.not_equal(key[1:], key[:-1], out=distinct[1:])
            key = key[distinct]
        return np.divmod(key, self.n_entries + 1)

    def _verify(self, buf: np.ndarray, start: np.ndarray, length: np.ndarray, entry: np.ndarray) -> np.ndarray:
        """Per hash hit: its bytes equal its entry's (a 64-bit hash collision is never a match)."""
        total = int(length.sum())
        ok = np.ones(len(start), dtype=bool)
        if total == 0:
            return ok
        first = np.cumsum(length) - length  # where each hit's bytes begin in the flat comparison
        flat = np.arange(total, dtype=np.int64)
        text_at = flat + np.repeat(start - first, length)
        key_at = flat + np.repeat(self._key_start[entry] - first, length)
        differs = buf.take(text_at) != self._key_bytes.take(key_at)
        if differs.any():
            ok[np.searchsorted(first, np.flatnonzero(differs), side="right") - 1] = False
        return ok


def _powers(base: np.uint64, size: int, block: int = 4096) -> np.ndarray:
    """base**0 .. base**(size - 1) mod 2**64: powers within a block times powers of base**block (no long sequential scan)."""
    with np.errstate(over="ignore"):
        small = np.empty(block, dtype=_U64)
        small[0] = 1
        np.cumprod(np.full(block - 1, base, dtype=_U64), out=small[1:])
        blocks = -(-size // block)
        big = np.empty(blocks, dtype=_U64)
        big[0] = 1
        if blocks > 1:
            np.cumprod(np.full(blocks - 1, small[-1] * base, dtype=_U64), out=big[1:])
        return np.multiply.outer(big, small).ravel()[:size]


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
