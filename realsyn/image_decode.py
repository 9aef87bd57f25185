"""The one way the package decodes image bytes: allowed formats only, a pixel limit, a memory budget.

- Only JPEG, PNG, WebP, GIF (its first frame), BMP and TIFF are opened (``Image.open(...,
  formats=...)``): EPS/PS bytes are never identified as EPS, so they never reach Ghostscript, and
  no other Pillow plug-in (PSD, ICO, DDS, ...) parses untrusted bytes.
- A pixel limit is checked on the header, before any pixel is decoded: ``DEFAULT_MAX_PIXELS``
  (40M, below Pillow's 89M) at ingest, configurable there (``max_image_pixels``) up to
  ``MAX_PIXELS_CEILING`` (Pillow's own default), which later decoders (pHash, CLIP, export
  re-encode) enforce, so whatever ingest accepted decodes downstream.
- Decoding concurrency is bounded by memory: every decode reserves ``width * height * 4`` bytes
  (more where it also converts) from one process-wide ``DecodeBudget`` and waits while the budget is
  spent; an image larger than the whole budget decodes alone. Default 1 GiB, or
  ``REALSYN_DECODE_BUDGET_BYTES``.
"""

from __future__ import annotations

import io
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
DEFAULT_MAX_PIXELS = 40_000_000
MAX_PIXELS_CEILING = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS default: 1 GiB / 4 bytes / 3
DEFAULT_DECODE_BUDGET_BYTES = 1 << 30
BYTES_PER_PIXEL = 4  # Pillow keeps RGB and RGBA pixels in 4 bytes
_MAX_ERROR_CHARS = 300
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


class UndecodableImageError(ValueError):
    """Image bytes that are not decoded: garbage, truncated, a format not allowed, or over the pixel limit."""


class DecodeBudget:
    """Bytes of decoded pixels allowed in memory at once across threads.

    ``reserve(n)`` waits until ``n`` more bytes fit; a request larger than the whole budget waits
    until nothing else is reserved and then runs alone (so it never deadlocks). ``peak`` is the
    largest total ever reserved at once (for tests and benchmarks).
    """

    def __init__(self, budget_bytes: int):
        if budget_bytes <= 0:
            raise ValueError(f"decode budget must be > 0 bytes, got {budget_bytes}")
        self.budget = int(budget_bytes)
        self.in_use = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        nbytes = max(0, int(nbytes))
        with self._cond:
            self._cond.wait_for(lambda: self.in_use == 0 or self.in_use + nbytes <= self.budget)
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= nbytes
                self._cond.notify_all()


_budget = DecodeBudget(int(os.environ.get("REALSYN_DECODE_BUDGET_BYTES", DEFAULT_DECODE_BUDGET_BYTES)))


def decode_budget() -> DecodeBudget:
    return _budget


def set_decode_budget(budget_bytes: int) -> DecodeBudget:
    """Replace the process-wide budget (decodes already running keep the old one)."""
    global _budget
    _budget = DecodeBudget(budget_bytes)
    return _budget


def describe_error(e: BaseException) -> str:
    """``Type: message`` without memory addresses (reruns agree), capped."""
    return _OBJECT_REPR.sub("data", f"{type(e).__name__}: {e}")[:_MAX_ERROR_CHARS]


@contextmanager
def open_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS, bytes_per_pixel: int = BYTES_PER_PIXEL) -> Iterator[Any]:
    """An opened (not yet decoded) PIL image of an allowed format within ``max_pixels``, while its
    decode budget is reserved: decode and convert inside the ``with``.

    Raises ``UndecodableImageError`` when the bytes are not an allowed format or are over the limit
    (``too_many_pixels``); errors raised inside the block are the caller's.
    """
    from PIL import Image

    limit = MAX_PIXELS_CEILING if max_pixels is None else int(max_pixels)
    try:
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Exception as e:  # UnidentifiedImageError, DecompressionBombError, OSError, SyntaxError, ...
        raise UndecodableImageError(describe_error(e)) from e
    with im:
        width, height = im.size
        if width <= 0 or height <= 0:
            raise UndecodableImageError(f"no usable size: {width}x{height}")
        if width * height > limit:
            raise UndecodableImageError(f"too_many_pixels: {width}x{height} > {limit} pixels")
        with _budget.reserve(width * height * bytes_per_pixel):
            yield im


def probe_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int, str]:
    """(width, height, lower-case format) of fully decoded image bytes (the first frame).

    Raises ``UndecodableImageError`` for garbage, truncated data, a format not allowed, or more
    than ``max_pixels`` pixels (checked before decoding).
    """
    with open_image(data, max_pixels) as im:
        width, height = im.size
        fmt = (im.format or "").lower()
        try:
            im.load()  # decodes the pixels, so truncated files fail here rather than later
        except Exception as e:  # PIL raises many types on bad input (OSError, SyntaxError, ValueError, ...)
            raise UndecodableImageError(describe_error(e)) from e
    if not fmt:
        raise UndecodableImageError(f"no usable format: {width}x{height}")
    return width, height, fmt
