"""Export of a split: WebDataset tar shards (what open_clip trains from) and a Parquet table.

A sample is a dict with ``key`` (a safe ``__key__``), ``image_bytes``, ``image_format``, ``txt``
(the caption a trainer sees) and ``json`` (all texts: real ones ranked with scores, synthetic ones,
size, source document); ``make_sample`` builds one. Tars are written deterministically (fixed
mtime, owner and member order), so a rerun produces byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, BinaryIO

import pyarrow as pa

from realsyn.image_db import UndecodableImageError
from realsyn.io import json_default
from realsyn.stats import StepStats

# image_format (as image_db records it) -> tar member extension open_clip reads.
IMAGE_EXTENSIONS = {"jpeg": "jpg", "jpg": "jpg", "png": "png", "webp": "webp"}
REENCODE_JPEG_QUALITY = 95
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")

PARQUET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image_id", pa.string()),
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("image_bytes", pa.binary()),
        ("image_format", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("txt", pa.string()),
        ("real_texts", pa.list_(pa.string())),
        ("real_scores", pa.list_(pa.float32())),
        ("synthetic_texts", pa.list_(pa.string())),
    ]
)


def safe_key(image_id: str) -> str:
    """A WebDataset ``__key__`` for an image id: readable prefix plus a hash (no dots, no slashes)."""
    prefix = _UNSAFE_KEY_CHARS.sub("_", image_id)[:64]
    digest = hashlib.blake2b(image_id.encode(), digest_size=8).hexdigest()
    return f"{prefix}-{digest}"


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key or any(c in key for c in "./\\") or any(c.isspace() for c in key):
        raise ValueError(f"unsafe sample key {key!r}: use realsyn.export.safe_key")
    return key


def training_caption(real_texts: Sequence[str], synthetic_texts: Sequence[str]) -> str | None:
    """The caption a trainer sees: the first synthetic text, else the top real text."""
    for text in (*synthetic_texts, *real_texts):
        if text and text.strip():
            return text
    return None


def make_sample(
    image_id: str,
    image_bytes: bytes,
    image_format: str,
    real_texts: Sequence[str],
    real_scores: Sequence[float],
    synthetic_texts: Sequence[str],
    width: int,
    height: int,
    doc_id: str,
    source: str | None = None,
) -> dict[str, Any]:
    """One export sample (see the module docstring)."""
    real_texts, synthetic_texts = list(real_texts), [t for t in synthetic_texts if t]
    return {
        "key": safe_key(image_id),
        "image_bytes": image_bytes,
        "image_format": image_format,
        "txt": training_caption(real_texts, synthetic_texts),
        "json": {
            "image_id": image_id,
            "real_texts": real_texts,
            "real_scores": [float(s) for s in real_scores],
            "synthetic_texts": synthetic_texts,
            "width": int(width),
            "height": int(height),
            "doc_id": doc_id,
            "source": source,
        },
    }


def normalize_image(image_bytes: bytes, image_format: str | None) -> tuple[bytes, str]:
    """(bytes, extension): jpeg/png/webp pass through; anything else is re-encoded to JPEG."""
    ext = IMAGE_EXTENSIONS.get((image_format or "").lower())
    if ext is not None:
        return image_bytes, ext
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image_bytes)) as im:
            im.load()
            rgb = _to_rgb(im)
    except Exception as e:  # Pillow raises many types for bad data
        raise UndecodableImageError(f"cannot decode {image_format!r} image: {e}") from e
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=REENCODE_JPEG_QUALITY)
    return out.getvalue(), "jpg"


def _to_rgb(im):
    from PIL import Image

    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        # JPEG has no alpha: flatten onto white rather than dropping alpha (which can leave black).
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


def _prepared(samples: Iterable[dict[str, Any]], stats: StepStats) -> Iterator[tuple[dict[str, Any], bytes, str]]:
    """(sample, image bytes, extension) for every exportable sample; the rest are counted and skipped."""
    for sample in samples:
        stats.add("samples_in")
        _check_key(sample.get("key"))
        if not sample.get("image_bytes"):
            stats.drop("missing_image")
            continue
        if not isinstance(sample.get("txt"), str) or not sample["txt"].strip():
            stats.drop("missing_txt")
            continue
        image_format = sample.get("image_format")
        try:
            data, ext = normalize_image(sample["image_bytes"], image_format)
        except UndecodableImageError:
            stats.drop("undecodable_image")
            continue
        if (image_format or "").lower() not in IMAGE_EXTENSIONS:
            stats.add("reencoded_jpeg")
        yield sample, data, ext


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(
    samples: Iterable[dict[str, Any]],
    open_shard: Callable[[str], BinaryIO],
    samples_per_shard: int = 1000,
    shard_pattern: str = "{split}-{index:06d}.tar",
    split: str = "train",
    stats: StepStats | None = None,
) -> dict[str, int]:
    """Write samples into tar shards opened with ``open_shard(name)`` (closed here when full).

    Returns {shard name: sample count}, the content of the ``sizes.json`` open_clip reads.
    Members per sample, in name order: ``{key}.jpg|png|webp``, ``{key}.json``, ``{key}.txt``.
    """
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    stats = stats if stats is not None else StepStats("export_webdataset")
    sizes: dict[str, int] = {}
    file: BinaryIO | None = None
    tar: tarfile.TarFile | None = None
    name = ""

    def close() -> None:
        if tar is not None:
            tar.close()
        if file is not None:
            file.close()

    try:
        for sample, data, ext in _prepared(samples, stats):
            if tar is None or sizes[name] >= samples_per_shard:
                close()
                name = shard_pattern.format(split=split, index=len(sizes))
                file = open_shard(name)
                # Stream mode: writes strictly forward, so any writable file object (S3 too) works.
                tar = tarfile.open(fileobj=file, mode="w|", format=tarfile.PAX_FORMAT)
                sizes[name] = 0
            key = sample["key"]
            meta = json.dumps(sample.get("json") or {}, sort_keys=True, ensure_ascii=False, default=json_default)
            members = {f"{key}.{ext}": data, f"{key}.json": meta.encode("utf-8"), f"{key}.txt": sample["txt"].encode("utf-8")}
            for member in sorted(members):
                _add_member(tar, member, members[member])
            sizes[name] += 1
            stats.add("samples_written")
    finally:
        close()
    stats.add("shards_written", len(sizes))
    return sizes


def samples_to_parquet_table(samples: Iterable[dict[str, Any]], stats: StepStats | None = None) -> pa.Table:
    """The same samples as one Parquet-ready table (image bytes included, texts as list columns)."""
    stats = stats if stats is not None else StepStats("export_parquet")
    rows: dict[str, list[Any]] = {field.name: [] for field in PARQUET_SCHEMA}
    for sample, data, ext in _prepared(samples, stats):
        meta = sample.get("json") or {}
        rows["key"].append(sample["key"])
        rows["image_id"].append(meta.get("image_id"))
        rows["doc_id"].append(meta.get("doc_id"))
        rows["source"].append(meta.get("source"))
        rows["image_bytes"].append(data)
        rows["image_format"].append("jpeg" if ext == "jpg" else ext)
        rows["width"].append(meta.get("width"))
        rows["height"].append(meta.get("height"))
        rows["txt"].append(sample["txt"])
        rows["real_texts"].append(list(meta.get("real_texts") or []))
        rows["real_scores"].append([float(s) for s in meta.get("real_scores") or []])
        rows["synthetic_texts"].append(list(meta.get("synthetic_texts") or []))
        stats.add("samples_written")
    return pa.Table.from_pydict(rows, schema=PARQUET_SCHEMA)
