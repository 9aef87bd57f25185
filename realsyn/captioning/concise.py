"""A shard's concise captions: streamed image bytes in, captions cached per (image_id, captioner_id) out.

The cache reuses the fusion cache's append-only part files (``CaptionCacheStore``) under its own
folder; its ``prompt_sha`` column holds the captioner id, ``synthetic_caption`` the concise caption.
A rerun asks the captioner only for images without a cached caption. One image the captioner fails
on is counted with its reason (``concise_failed_<reason>``) and gets no caption; a captioner that fails
on every image it was asked about fails the shard (a dead server, a wrong model).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence

import pyarrow.parquet as pq

from realsyn import layout
from realsyn.generation.base import clean_caption
from realsyn.generation.cache import CaptionCacheStore
from realsyn.image_decode import describe_error
from realsyn.io import batched
from realsyn.plugins.kinds import Captioner, CaptionFailure
from realsyn.stats import StepStats
from realsyn.storage import Storage

log = logging.getLogger("realsyn")

CAPTION_CHUNK = 32  # images per captioner call unless it has a batch_size (bounds bytes in memory); the cache is appended after each
FAIL_FAST_AFTER = 64  # this many errors before any caption: the captioner itself is broken (a dead server), stop asking
IMAGE_READ_ROWS = 256  # image rows read from Parquet at once


class CaptionerFailedError(RuntimeError):
    """The captioner failed on every image it was asked about."""


class ConciseCaptionStore(CaptionCacheStore):
    """A shard's concise-caption cache: ``{layout.CONCISE_CAPTION_CACHE_DIR}/{shard}/part-{n:06d}.parquet``."""

    def __init__(self, storage: Storage, shard: str, max_parts: int = 64):
        super().__init__(storage, shard, max_parts)
        self.rel_dir = f"{layout.CONCISE_CAPTION_CACHE_DIR}/{shard}"
        self.legacy_rel = f"{layout.CONCISE_CAPTION_CACHE_DIR}/{shard}.parquet"  # never written; keeps the parent's read path harmless


def _checked(captioner: Captioner, results: object, n: int) -> list[str | CaptionFailure]:
    if not isinstance(results, list) or len(results) != n:
        got = len(results) if isinstance(results, list) else type(results).__name__
        raise RuntimeError(f"captioner {captioner.captioner_id!r} returned {got} results for {n} images")
    for r in results:
        if not isinstance(r, (str, CaptionFailure)):
            raise TypeError(f"captioner {captioner.captioner_id!r} returned a {type(r).__name__}; expected str or CaptionFailure")
    return results


def caption_images(captioner: Captioner, images: Sequence[bytes]) -> list[str | CaptionFailure]:
    """The captioner's answer per image, cleaned; a call that raises is retried one image at a time,
    so one bad image costs only its own caption (``captioner_error`` with the exception as detail)."""
    if not images:
        return []
    try:
        raw = captioner.caption(list(images))
    except Exception as exc:  # noqa: BLE001 - one image's failure must not cost the others their captions
        if len(images) == 1:
            return [CaptionFailure("captioner_error", describe_error(exc))]
        log.warning("captioner %s failed on %d images (%s); asking one image at a time", captioner.captioner_id, len(images), exc)
        return [r for image in images for r in caption_images(captioner, [image])]
    results = _checked(captioner, raw, len(images))  # a wrong answer shape is a bug in the captioner: fail
    out: list[str | CaptionFailure] = []
    for r in results:
        if isinstance(r, str):
            text = clean_caption(r)
            out.append(text if text else CaptionFailure("empty_caption"))
        else:
            out.append(r)
    return out


def iter_shard_images(storage: Storage, shard: str, wanted: set[str]) -> Iterator[tuple[str, bytes]]:
    """(image_id, encoded bytes) of the wanted images of a shard's ``filtered_images``, streamed in file order."""
    reader = storage.reader(layout.FILTERED_IMAGES, shard)
    with reader.open(layout.IMAGES_FILE) as raw:
        for batch in pq.ParquetFile(raw).iter_batches(batch_size=IMAGE_READ_ROWS, columns=["image_id", "image_bytes"]):
            ids = batch.column(0).to_pylist()
            for row, image_id in enumerate(ids):
                if image_id in wanted:
                    yield image_id, batch.column(1)[row].as_py()


def concise_captions(
    captioner: Captioner,
    image_ids: Sequence[str],
    images: Callable[[set[str]], Iterable[tuple[str, bytes]]],
    store: CaptionCacheStore,
    stats: StepStats,
    chunk: int | None = None,
) -> dict[str, str | CaptionFailure]:
    """Per image id, its concise caption (cached or new) or why it has none.

    ``images(wanted_ids)`` streams (image_id, bytes) of the images the cache lacks. Counts go to
    ``stats``: ``concise_cached``, ``concise_captioned``, ``concise_failed_<reason>``. ``chunk`` images
    go to one ``caption`` call (default: the captioner's ``batch_size``, else ``CAPTION_CHUNK``).
    """
    chunk = int(chunk or getattr(captioner, "batch_size", CAPTION_CHUNK))
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    cid, model = captioner.captioner_id, getattr(captioner, "model_id", captioner.captioner_id)
    cache = store.load()
    out: dict[str, str | CaptionFailure] = {}
    for image_id in image_ids:
        got = cache.get(image_id, cid)
        if got is not None:
            out[image_id] = got
    stats.add("concise_cached", len(out))
    wanted = {i for i in image_ids if i not in out}
    reasons: Counter[str] = Counter()
    n_ok = n_errors = 0
    last_error = ""
    try:
        for part in batched(iter(images(wanted)) if wanted else iter(()), chunk):
            part = list({i: b for i, b in part if i in wanted and i not in out}.items())
            results = caption_images(captioner, [b for _, b in part])
            for (image_id, _), result in zip(part, results):
                out[image_id] = result
                if isinstance(result, str):
                    cache.put(image_id, cid, result, model)
                    n_ok += 1
                else:
                    reasons[result.reason] += 1
                    if result.reason == "captioner_error":
                        n_errors += 1
                        last_error = result.detail
            store.append(cache)
            if n_ok == 0 and n_errors >= FAIL_FAST_AFTER:
                raise CaptionerFailedError(f"captioner {cid!r} failed on all of the first {n_errors} images; last error: {last_error}")
    finally:
        store.append(cache)  # what finished before a failure is kept
    for image_id in wanted - out.keys():
        out[image_id] = CaptionFailure("image_missing", f"{image_id} is not among the shard's filtered images")
        reasons["image_missing"] += 1
    asked = len(wanted) - reasons["image_missing"]
    if asked and n_ok == 0 and reasons["captioner_error"] == asked:
        raise CaptionerFailedError(
            f"captioner {cid!r} failed on every one of the {asked} images it was asked about; last error: {last_error}"
        )
    stats.add("concise_captioned", n_ok)
    for reason, n in sorted(reasons.items()):
        stats.add(f"concise_failed_{reason}", n)
        log.warning("captioner %s: no concise caption for %d images (%s)", cid, n, reason)
    return {i: out[i] for i in image_ids}
