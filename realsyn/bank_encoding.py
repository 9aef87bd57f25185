"""How the sentence bank's vectors are stored: float32, or IEEE float16 (half the bytes).

The bank holds unit vectors (components in [-1, 1]), well inside float16's range; rounding to its 11
significant bits moves a dot product with a unit query by ~1e-5 typically and under 1e-4 in the worst
case at D=512, so the same rows are retrieved except between sentences whose scores differ by that.
"""

from __future__ import annotations

import numpy as np

BANK_DTYPES = ("float32", "float16")
FLOAT16_MAX = float(np.finfo(np.float16).max)


def encode_bank(x: np.ndarray, dtype: str) -> np.ndarray:
    """Bank rows as stored. float16 refuses finite values beyond its range (they would become inf)."""
    if dtype == "float32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if dtype != "float16":
        raise ValueError(f"bank dtype must be one of {BANK_DTYPES}, got {dtype!r}")
    x = np.asarray(x, dtype=np.float32)
    big = np.abs(x) > FLOAT16_MAX
    if big.any() and np.isfinite(x[big]).any():
        raise ValueError(f"bank rows hold values beyond float16's range ({FLOAT16_MAX}); store them as float32 (are they unit vectors?)")
    return np.ascontiguousarray(x, dtype=np.float16)


def bank_rows(part: np.ndarray) -> np.ndarray:
    """A stored bank part as the search takes it: float16 kept as is, anything else as float32."""
    part = np.asarray(part)
    return np.ascontiguousarray(part) if part.dtype == np.float16 else np.ascontiguousarray(part, dtype=np.float32)
