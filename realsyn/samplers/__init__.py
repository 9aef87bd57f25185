"""Split samplers (the ``sampler`` plug-in kind, contract in ``realsyn.plugins.kinds.Sampler``).

Random draws are hash-based per row id, so a row's fate does not depend on shard order or
batching; state is small numpy arrays saved as .npz (no pickle).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence

import numpy as np


def uniform_keys(ids: Sequence[str], seed: int) -> np.ndarray:
    """float64 in [0, 1) per id: the top 53 bits of blake2b(f"{seed}:{id}")."""
    out = np.empty(len(ids), dtype=np.float64)
    for i, row_id in enumerate(ids):
        digest = hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=8).digest()
        out[i] = (int.from_bytes(digest, "big") >> 11) * 2.0**-53
    return out


def state_to_npz(state: dict[str, np.ndarray]) -> bytes:
    """Sampler state as .npz bytes (no pickled objects)."""
    buf = io.BytesIO()
    np.savez(buf, **{name: np.asarray(value) for name, value in state.items()})
    return buf.getvalue()


def state_from_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}
