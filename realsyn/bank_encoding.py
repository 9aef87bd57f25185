"""How the sentence bank's vectors are stored: float32, or IEEE float16 (half the bytes).

The bank holds unit vectors (components in [-1, 1]), well inside float16's range; rounding to its 11
significant bits moves a dot product with a unit query by ~1e-5 typically and under 1e-4 in the worst
case at D=512, so the same rows are retrieved except between sentences whose scores differ by that.
"""

from __future__ import annotations

import numpy as np

BANK_DTYPES = ("float32", "float16")
FLOAT16_MAX = float(np.finfo(np.float16).max)


def encode_bank(x: np.ndarray, dtype: str, block_rows: int = 65_536) -> np.ndarray:
    """Bank rows as stored. float16 refuses finite values beyond its range (they would become inf);
    it is converted ``block_rows`` at a time, so the only full-size allocation is the output."""
    if dtype == "float32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if dtype != "float16":
        raise ValueError(f"bank dtype must be one of {BANK_DTYPES}, got {dtype!r}")
    x = np.asarray(x)
    out = np.empty(x.shape, np.float16)
    for a in range(0, len(x), block_rows):
        block = out[a : a + block_rows]
        block[...] = x[a : a + block_rows]
        overflow = np.isinf(block)
        if overflow.any() and np.isfinite(x[a : a + block_rows][overflow]).any():
            raise ValueError(
                f"bank rows hold values beyond float16's range ({FLOAT16_MAX}); store them as float32 (are they unit vectors?)"
            )
    return out


def bank_rows(part: np.ndarray) -> np.ndarray:
    """A stored bank part as the search takes it: float16 kept as is, anything else as float32."""
    part = np.asarray(part)
    return np.ascontiguousarray(part) if part.dtype == np.float16 else np.ascontiguousarray(part, dtype=np.float32)
