"""Compiled scans of the retrieval pass for clusters probed by few images (numba, compiled once, cached).

When ~1 image probes a cluster, scoring it costs reading the cluster's bank rows, not arithmetic: an
sgemm per cluster then pays a Python call, a BLAS call, a score block and a top-k pass for a few
hundred dot products. ``scan_clusters`` takes many such clusters in one call: every bank row is read
once, dotted with the few image vectors of its cluster, and the score goes straight into each image's
running top k. A float16 bank is widened in registers (F16C ``vcvtph2ps``, emitted by LLVM for
``fpext half``), so half the bytes come from memory. The GIL is released: threads scan disjoint clusters.

Ranking is the pass's: score descending, then bank row ascending (rows are visited in ascending
order and only a strictly better score displaces a kept one); NaN and -inf scores never enter, so a
pair left short keeps padding id -1 and score -inf. Sums are reassociated (vectorised), so a score
may differ from an sgemm's in the last bits.

Imported lazily by ``realsyn.retrieval``: numba is a heavy import.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

# no "nnan"/"ninf": NaN scores must compare as NaN (they are skipped); reassociation vectorises the dots
_FAST = {"reassoc", "contract"}


@intrinsic
def _half_to_float(typingctx, bits):
    """An IEEE half given by its uint16 bits, as float32 (numba has no float16 arithmetic on CPUs)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@nb.njit(nogil=True, fastmath=_FAST, cache=True, inline="always")
def _keep(cand_ids, cand_scores, q, row_id, s):
    """Insert (row_id, s) into pair q's top k (kept best first) when s beats its worst."""
    k = cand_scores.shape[1]
    if not s > cand_scores[q, k - 1]:
        return
    j = k - 1
    while j > 0 and s > cand_scores[q, j - 1]:
        cand_scores[q, j] = cand_scores[q, j - 1]
        cand_ids[q, j] = cand_ids[q, j - 1]
        j -= 1
    cand_scores[q, j] = s
    cand_ids[q, j] = row_id


@nb.njit(nogil=True, fastmath=_FAST, cache=True)
def _scan_f32(bank, x, pair_lo, pair_hi, row_lo, row_hi, row_base, cand_ids, cand_scores):
    d = bank.shape[1]
    for c in range(len(pair_lo)):
        p0, p1 = pair_lo[c], pair_hi[c]
        for i in range(row_lo[c], row_hi[c]):
            for q in range(p0, p1):
                acc = np.float32(0.0)
                for j in range(d):
                    acc += bank[i, j] * x[q, j]
                _keep(cand_ids, cand_scores, q, row_base + i, acc)


@nb.njit(nogil=True, fastmath=_FAST, cache=True)
def _scan_f16(bank, x, pair_lo, pair_hi, row_lo, row_hi, row_base, cand_ids, cand_scores):
    d = bank.shape[1]
    for c in range(len(pair_lo)):
        p0, p1 = pair_lo[c], pair_hi[c]
        for i in range(row_lo[c], row_hi[c]):
            for q in range(p0, p1):
                acc = np.float32(0.0)
                for j in range(d):
                    acc += _half_to_float(bank[i, j]) * x[q, j]
                _keep(cand_ids, cand_scores, q, row_base + i, acc)


@nb.njit(nogil=True, cache=True)
def _widen_f16(bank, lo, hi, out):
    d = bank.shape[1]
    for i in range(lo, hi):
        for j in range(d):
            out[i - lo, j] = _half_to_float(bank[i, j])


def scan_clusters(
    bank: np.ndarray,
    x: np.ndarray,
    pair_lo: np.ndarray,
    pair_hi: np.ndarray,
    row_lo: np.ndarray,
    row_hi: np.ndarray,
    row_base: int,
    cand_ids: np.ndarray,
    cand_scores: np.ndarray,
) -> None:
    """Cluster c: bank rows [row_lo[c], row_hi[c]) against pairs [pair_lo[c], pair_hi[c]) (rows of x);
    their best rows (as ``row_base`` + row) are merged into ``cand_ids`` / ``cand_scores`` (pairs, k),
    which hold each pair's running top k, best first (-1 / -inf where short).

    ``bank``: (rows, D) float32 or float16. ``x``: (pairs, D) float32.
    """
    args = (
        x,
        np.ascontiguousarray(pair_lo, np.int64),
        np.ascontiguousarray(pair_hi, np.int64),
        np.ascontiguousarray(row_lo, np.int64),
        np.ascontiguousarray(row_hi, np.int64),
        np.int64(row_base),
        cand_ids,
        cand_scores,
    )
    if bank.dtype == np.float16:
        _scan_f16(bank.view(np.uint16), *args)
    elif bank.dtype == np.float32:
        _scan_f32(bank, *args)
    else:
        raise TypeError(f"bank rows must be float32 or float16, got {bank.dtype}")


def widen_f16(bank: np.ndarray, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
    """Rows [lo, hi) of a float16 bank as float32, written into ``out`` (hi - lo, D) (numpy's cast is ~5x slower)."""
    if bank.dtype != np.float16:
        raise TypeError(f"expected a float16 bank, got {bank.dtype}")
    _widen_f16(bank.view(np.uint16), np.int64(lo), np.int64(hi), out)
    return out
