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
def _widen(typingctx, value):
    """A bank element as float32: float32 as is, a uint16 as the IEEE half it holds (numba has no
    float16 arithmetic on CPUs; LLVM turns ``fpext half`` into F16C's vectorised ``vcvtph2ps``)."""
    if value == types.float32:
        return types.float32(types.float32), lambda context, builder, signature, args: args[0]
    if value == types.uint16:

        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return types.float32(types.uint16), codegen
    return None


# The top-k insertion is written out in each kernel: a jitted helper taking the arrays costs ~30 ns
# per call (reference counting of its array arguments), more than scoring a bank row.


@nb.njit(nogil=True, fastmath=_FAST, cache=True)
def _scan(bank, x, pair_lo, pair_hi, row_lo, row_hi, row_base, cand_ids, cand_scores):
    d, k = bank.shape[1], cand_scores.shape[1]
    row = np.empty(d, np.float32)
    for c in range(len(pair_lo)):
        p0, p1 = pair_lo[c], pair_hi[c]
        for i in range(row_lo[c], row_hi[c]):
            if p1 - p0 > 1:  # several pairs: widen the row once, into L1
                for j in range(d):
                    row[j] = _widen(bank[i, j])
            for q in range(p0, p1):
                s = np.float32(0.0)
                if p1 - p0 > 1:
                    for j in range(d):
                        s += row[j] * x[q, j]
                else:
                    for j in range(d):
                        s += _widen(bank[i, j]) * x[q, j]
                if s > cand_scores[q, k - 1]:  # False for NaN: never kept
                    j = k - 1
                    while j > 0 and s > cand_scores[q, j - 1]:
                        cand_scores[q, j] = cand_scores[q, j - 1]
                        cand_ids[q, j] = cand_ids[q, j - 1]
                        j -= 1
                    cand_scores[q, j] = s
                    cand_ids[q, j] = row_base + i


@nb.njit(nogil=True, cache=True)
def _keep_block(scores, pair0, row0, cand_ids, cand_scores):
    k = cand_scores.shape[1]
    for r in range(scores.shape[0]):
        for q in range(scores.shape[1]):
            s, p = scores[r, q], pair0 + q
            if s > cand_scores[p, k - 1]:
                j = k - 1
                while j > 0 and s > cand_scores[p, j - 1]:
                    cand_scores[p, j] = cand_scores[p, j - 1]
                    cand_ids[p, j] = cand_ids[p, j - 1]
                    j -= 1
                cand_scores[p, j] = s
                cand_ids[p, j] = row0 + r


@nb.njit(nogil=True, cache=True)
def _widen_rows(bank, lo, hi, out):
    d = bank.shape[1]
    for i in range(lo, hi):
        for j in range(d):
            out[i - lo, j] = _widen(bank[i, j])


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
    if bank.dtype not in (np.float32, np.float16):
        raise TypeError(f"bank rows must be float32 or float16, got {bank.dtype}")
    _scan(bank.view(np.uint16) if bank.dtype == np.float16 else bank, *args)


def widen_f16(bank: np.ndarray, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
    """Rows [lo, hi) of a float16 bank as float32, written into ``out`` (hi - lo, D) (numpy's cast is ~5x slower)."""
    if bank.dtype != np.float16:
        raise TypeError(f"expected a float16 bank, got {bank.dtype}")
    _widen_rows(bank.view(np.uint16), np.int64(lo), np.int64(hi), out)
    return out


def keep_block(scores: np.ndarray, pair0: int, row0: int, cand_ids: np.ndarray, cand_scores: np.ndarray) -> None:
    """Merge a (rows, pairs) float32 score block (bank rows ``row0``.., pairs ``pair0``..) into the pairs' running top k."""
    _keep_block(scores, np.int64(pair0), np.int64(row0), cand_ids, cand_scores)
