"""Export of a split: WebDataset tar shards (what open_clip trains from) and a Parquet table.

A sample is a dict with ``key`` (a safe ``__key__``), ``image_bytes``, ``image_format``, ``txt``
(the caption a trainer sees: the synthetic one, else the top real text) and ``json`` (all texts:
real ones ranked with scores, synthetic ones, size, source document); ``make_sample`` builds one.
A tar holds per sample, in name order: the image as ``{key}.{ext}`` (one extension for the whole
export, ``image_format``: images in another format are re-encoded, losslessly for ``png`` / ``webp``),
``{key}.json``, ``{key}.real0.txt`` .. ``{key}.real{m-1}.txt`` (the real texts by rank, empty where
fewer were retrieved: every sample has the same members, which ``datasets`` needs) and ``{key}.txt``.
Tars are written deterministically (fixed mtime, owner and member order), so a rerun produces
byte-identical shards. The Parquet table types its ``image`` column as a ``datasets`` Image (struct
of bytes and path, with the ``huggingface`` schema metadata).

``write_webdataset`` / ``samples_to_parquet_table`` write such sample dicts one at a time.
``ShardSamples`` is the export stage's path: one shard's samples for every split in one pass over
the shard's images, column-wise (image members and Parquet image cells are zero-copy views of the
image column, tar headers and JSON built per batch, tars assembled with ``os.writev``), with the same
tar members and Parquet rows as the sample-dict path (``reference_samples`` + ``write_webdataset``).
Its member names fit a plain ustar header (``safe_key``'s keys are at most 81 bytes); a name over 100
bytes is refused there, where ``write_webdataset`` (Python's ``tarfile``) writes a pax header for it.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import io
import itertools
import json
import os
import re
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from realsyn.image_db import UndecodableImageError
from realsyn.io import json_default
from realsyn.stats import StepStats

# image_format (as image_db records it) -> tar member extension.
IMAGE_EXTENSIONS = {"jpeg": "jpg", "jpg": "jpg", "png": "png", "webp": "webp"}
# the extensions an export may use for every image -> the Pillow format it is encoded in
OUTPUT_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
DEFAULT_IMAGE_FORMAT = "jpg"  # web images are mostly JPEG: they pass through untouched
DEFAULT_SAMPLES_PER_SHARD = 10_000  # img2dataset's default
REAL_TEXT_MEMBERS = 3  # real0.txt .. real2.txt: the paper retrieves k = 3 real texts per image
REENCODE_JPEG_QUALITY = 95
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets.Image's Arrow storage


def _hf_feature(t: pa.DataType) -> dict[str, Any]:
    """The ``datasets`` feature (dict form) of an Arrow type of PARQUET_SCHEMA."""
    if t == IMAGE_TYPE:
        return {"_type": "Image"}
    if pa.types.is_list(t):
        return {"feature": _hf_feature(t.value_type), "_type": "List"}
    dtype = {pa.string(): "string", pa.int32(): "int32", pa.float32(): "float32"}[t]
    return {"dtype": dtype, "_type": "Value"}


_PARQUET_FIELDS = [
    ("key", pa.string()),
    ("image", IMAGE_TYPE),
    ("image_id", pa.string()),
    ("doc_id", pa.string()),
    ("source", pa.string()),
    ("image_format", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("txt", pa.string()),
    ("real_texts", pa.list_(pa.string())),
    ("real_scores", pa.list_(pa.float32())),
    ("synthetic_texts", pa.list_(pa.string())),
]
# the "huggingface" metadata makes datasets read the image column as an Image, not a plain struct
HF_FEATURES = {name: _hf_feature(t) for name, t in _PARQUET_FIELDS}
PARQUET_SCHEMA = pa.schema(_PARQUET_FIELDS, metadata={"huggingface": json.dumps({"info": {"features": HF_FEATURES}})})


# The json member of a sample (as _Batch writes it, keys in order) in the YAML form of datasets features:
# the data card declares them, so datasets need not infer them from the first samples.
JSON_MEMBER_FEATURES: dict[str, dict[str, str]] = {
    "doc_id": {"dtype": "string"},
    "height": {"dtype": "int64"},
    "image_id": {"dtype": "string"},
    "real_scores": {"list": "float64"},
    "real_sentence_ids": {"list": "string"},
    "real_texts": {"list": "string"},
    "shard": {"dtype": "string"},
    "source": {"dtype": "string"},
    "synthetic_texts": {"list": "string"},
    "width": {"dtype": "int64"},
}


def check_image_format(image_format: str) -> str:
    if image_format not in OUTPUT_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(OUTPUT_FORMATS)}, got {image_format!r}")
    return image_format


def member_suffixes(image_format: str, real_text_members: int) -> list[str]:
    """The member suffixes of every sample, in the order they are written (name order)."""
    if real_text_members < 0:
        raise ValueError(f"real_text_members must be >= 0, got {real_text_members}")
    return sorted([check_image_format(image_format), "json", "txt", *(f"real{j}.txt" for j in range(real_text_members))])


def real_text_member(real_texts: Sequence[str | None], j: int) -> bytes:
    """Member ``real{j}.txt``: the j-th real text, empty where fewer were retrieved."""
    return (real_texts[j] or "").encode("utf-8") if j < len(real_texts) else b""


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


def normalize_image(
    image_bytes: bytes, image_format: str | None, target: str = DEFAULT_IMAGE_FORMAT, jpeg_quality: int = REENCODE_JPEG_QUALITY
) -> tuple[bytes, str]:
    """(bytes, extension ``target``): an image already in ``target`` passes through untouched; any other is
    decoded and re-encoded: losslessly as ``png`` or ``webp`` (pixels kept exactly), at ``jpeg_quality`` as ``jpg``."""
    if IMAGE_EXTENSIONS.get((image_format or "").lower()) == check_image_format(target):
        return image_bytes, target
    from realsyn.image_decode import MAX_PIXELS_CEILING, open_image

    out = io.BytesIO()
    try:
        # allowed formats only, pixel ceiling and memory budget (decode + converted copy: 8 bytes a pixel)
        with open_image(image_bytes, max_pixels=MAX_PIXELS_CEILING, bytes_per_pixel=8) as im:
            im.load()
            if target == "jpg":
                _to_rgb(im).save(out, format="JPEG", quality=jpeg_quality)
            elif target == "png":
                # PNG stores these modes as they are; others (CMYK, YCbCr, float) become RGB(A)
                keep = im.mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")
                (im if keep else im.convert("RGBA" if _has_alpha(im) else "RGB")).save(out, format="PNG")
            else:
                im.convert("RGBA" if _has_alpha(im) else "RGB").save(out, format="WEBP", lossless=True, quality=100, method=4)
    except Exception as e:  # Pillow raises many types for bad data
        raise UndecodableImageError(f"cannot decode {image_format!r} image: {e}") from e
    return out.getvalue(), target


def _has_alpha(im) -> bool:
    return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)


def _to_rgb(im):
    from PIL import Image

    if _has_alpha(im):
        # JPEG has no alpha: flatten onto white rather than dropping alpha (which can leave black).
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


def _count_reencode(stats: StepStats, source_format: str | None, target: str) -> None:
    stats.add("reencoded_images")
    if target == "jpg":  # the only lossy re-encoding
        stats.add("reencoded_lossy")


def _prepared(
    samples: Iterable[dict[str, Any]], stats: StepStats, target: str, jpeg_quality: int
) -> Iterator[tuple[dict[str, Any], bytes, str]]:
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
            data, ext = normalize_image(sample["image_bytes"], image_format, target, jpeg_quality)
        except UndecodableImageError:
            stats.drop("undecodable_image")
            continue
        if IMAGE_EXTENSIONS.get((image_format or "").lower()) != target:
            _count_reencode(stats, image_format, target)
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
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    shard_pattern: str = "{split}-{index:06d}.tar",
    split: str = "train",
    stats: StepStats | None = None,
    image_format: str = DEFAULT_IMAGE_FORMAT,
    real_text_members: int = REAL_TEXT_MEMBERS,
    jpeg_quality: int = REENCODE_JPEG_QUALITY,
) -> dict[str, int]:
    """Write samples into tar shards opened with ``open_shard(name)`` (closed here when full).

    Returns {shard name: sample count}, the content of the ``sizes.json`` open_clip reads.
    Members per sample in name order (``member_suffixes``): ``{key}.{image_format}``, ``{key}.json``,
    ``{key}.real{j}.txt`` for j < ``real_text_members``, ``{key}.txt``.
    """
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    suffixes = member_suffixes(image_format, real_text_members)
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
        for sample, data, ext in _prepared(samples, stats, image_format, jpeg_quality):
            if tar is None or sizes[name] >= samples_per_shard:
                close()
                name = shard_pattern.format(split=split, index=len(sizes))
                file = open_shard(name)
                # Stream mode: writes strictly forward, so any writable file object (S3 too) works.
                tar = tarfile.open(fileobj=file, mode="w|", format=tarfile.PAX_FORMAT)
                sizes[name] = 0
            key = sample["key"]
            meta_dict = sample.get("json") or {}
            meta = json.dumps(meta_dict, sort_keys=True, ensure_ascii=False, default=json_default)
            real = list(meta_dict.get("real_texts") or [])
            members = {ext: data, "json": meta.encode("utf-8"), "txt": sample["txt"].encode("utf-8")}
            members.update({f"real{j}.txt": real_text_member(real, j) for j in range(real_text_members)})
            for suffix in suffixes:
                _add_member(tar, f"{key}.{suffix}", members[suffix])
            sizes[name] += 1
            stats.add("samples_written")
    finally:
        close()
    stats.add("shards_written", len(sizes))
    return sizes


def samples_to_parquet_table(
    samples: Iterable[dict[str, Any]],
    stats: StepStats | None = None,
    image_format: str = DEFAULT_IMAGE_FORMAT,
    jpeg_quality: int = REENCODE_JPEG_QUALITY,
) -> pa.Table:
    """The same samples as one Parquet-ready table (PARQUET_SCHEMA: the image a ``datasets`` Image, texts as list columns)."""
    stats = stats if stats is not None else StepStats("export_parquet")
    rows: dict[str, list[Any]] = {field.name: [] for field in PARQUET_SCHEMA}
    for sample, data, ext in _prepared(samples, stats, image_format, jpeg_quality):
        meta = sample.get("json") or {}
        rows["key"].append(sample["key"])
        rows["image"].append({"bytes": data, "path": f"{sample['key']}.{ext}"})
        rows["image_id"].append(meta.get("image_id"))
        rows["doc_id"].append(meta.get("doc_id"))
        rows["source"].append(meta.get("source"))
        rows["image_format"].append(OUTPUT_FORMATS[ext].lower())
        rows["width"].append(meta.get("width"))
        rows["height"].append(meta.get("height"))
        rows["txt"].append(sample["txt"])
        rows["real_texts"].append(list(meta.get("real_texts") or []))
        rows["real_scores"].append([float(s) for s in meta.get("real_scores") or []])
        rows["synthetic_texts"].append(list(meta.get("synthetic_texts") or []))
        stats.add("samples_written")
    return pa.Table.from_pydict(rows, schema=PARQUET_SCHEMA)


# ------------------------------------------------------------------------------------------------
# Column-wise export of one shard: every split's samples in one pass over the shard's images.


def _tar_header_template() -> tuple[bytes, bytes, bytes, int]:
    """The constant parts of the header ``_add_member`` writes, taken from this Python's tarfile.

    (mode+uid+gid, mtime, type..end, checksum of those parts with the checksum field as spaces).
    """
    info = tarfile.TarInfo("x")
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0, 0o644, 0, 0, "", ""
    buf = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    if len(buf) != tarfile.BLOCKSIZE:  # pragma: no cover - a pax header would mean an unexpected tarfile
        raise RuntimeError("unexpected tar header layout")
    mode_ids, mtime, tail = buf[100:124], buf[136:148], buf[156:512]
    return mode_ids, mtime, tail, 8 * ord(" ") + sum(mode_ids) + sum(mtime) + sum(tail)


_MODE_IDS, _MTIME, _HEADER_TAIL, _HEADER_SUM = _tar_header_template()
_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)


def tar_header(name: bytes, size: int) -> bytes:
    """The 512-byte header ``tarfile`` (PAX format) writes for a member of ``_add_member``: ASCII name <= 100 bytes."""
    if len(name) > 100 or not name.isascii() or size >= 8**11:
        raise ValueError(f"tar member {name!r} of {size} bytes needs a pax header")
    size_field = b"%011o\x00" % size
    chksum = _HEADER_SUM + sum(name) + sum(size_field)
    return b"".join((name.ljust(100, b"\x00"), _MODE_IDS, size_field, _MTIME, b"%06o\x00 " % chksum, _HEADER_TAIL))


def _header_template() -> np.ndarray:
    """A header with an empty name, an empty size field and the checksum field as spaces."""
    tpl = np.frombuffer(tar_header(b"", 0), np.uint8).copy()
    tpl[124:136] = 0
    tpl[148:156] = ord(" ")
    return tpl


_HEADER_TEMPLATE = _header_template()
_TEMPLATE_SUM = int(_HEADER_TEMPLATE.sum(dtype=np.int64))  # the checksum of a header with an empty name and size field
_SIZE_SHIFTS = 3 * np.arange(10, -1, -1, dtype=np.int64)  # 11 octal digits
_CHKSUM_SHIFTS = 3 * np.arange(5, -1, -1, dtype=np.int64)  # 6 octal digits


def _fill_headers(out: np.ndarray, name_sums: np.ndarray, sizes: np.ndarray) -> None:
    """Complete headers ``out`` (..., 512) whose name field is filled in (``name_sums``: the sum of its bytes):
    the size field and the checksum, which is the template's sum plus the name's and the size digits' bytes."""
    digits = 48 + ((sizes[..., None] >> _SIZE_SHIFTS) & 7)
    out[..., 124:135] = digits
    chksum = _TEMPLATE_SUM + name_sums + digits.sum(axis=-1)
    out[..., 148:154] = 48 + ((chksum[..., None] >> _CHKSUM_SHIFTS) & 7)
    out[..., 154] = 0


def member_headers(keys: Sequence[bytes], suffixes: Sequence[str], sizes: np.ndarray) -> bytes:
    """The headers of members ``{key}.{suffix}`` of ``sizes[i, j]`` bytes (keys i, suffixes j): ``tar_header``
    of each, one 512-byte block per (i, j) in row-major order, computed as arrays (a key's bytes summed once)."""
    n, m = len(keys), len(suffixes)
    if not n or not m:
        return b""
    return header_blocks(keys, suffixes, sizes).transpose(1, 0, 2).tobytes()


def header_blocks(keys: Sequence[bytes], suffixes: Sequence[str], sizes: np.ndarray) -> np.ndarray:
    """``member_headers`` as an array of shape (suffixes, keys, 512): the headers of one suffix contiguous."""
    n, m = len(keys), len(suffixes)
    ext = [("." + s).encode() for s in suffixes]
    sizes = np.asarray(sizes, np.int64).reshape(n, m)
    if not n or not m:
        return np.zeros((m, n, tarfile.BLOCKSIZE), np.uint8)
    lengths = np.fromiter(map(len, keys), np.int64, n)
    if int(lengths.max()) + max(map(len, ext)) > 100 or not b"".join(keys).isascii() or sizes.max() >= 8**11:
        one_by_one = b"".join(tar_header(k + e, int(sizes[i, j])) for i, k in enumerate(keys) for j, e in enumerate(ext))  # raises
        return np.frombuffer(one_by_one, np.uint8).reshape(n, m, tarfile.BLOCKSIZE).transpose(1, 0, 2).copy()
    key_area = np.frombuffer(b"".join(k.ljust(100, b"\x00") for k in keys), np.uint8).reshape(n, 100)
    out = np.empty((m, n, tarfile.BLOCKSIZE), np.uint8)
    out[:] = _HEADER_TEMPLATE
    out[:, :, :100] = key_area[None, :, :]
    at = np.arange(n)[:, None]
    for j, e in enumerate(ext):  # the suffix right after each key
        out[j, at, lengths[:, None] + np.arange(len(e))] = np.frombuffer(e, np.uint8)
    name_sums = key_area.sum(axis=1, dtype=np.int64)[None, :] + np.array([sum(e) for e in ext], np.int64)[:, None]
    _fill_headers(out, name_sums, sizes.T)
    return out


def _padding(size: int) -> bytes:
    return _ZERO_BLOCK[: -size % tarfile.BLOCKSIZE]


def tar_member(name: bytes, data: bytes) -> bytes:
    """One whole member (header, data, padding), as ``_add_member`` writes it."""
    return tar_header(name, len(data)) + data + _padding(len(data))


class TarStream:
    """Writes tar members strictly forward, byte for byte as ``tarfile.open(mode="w|", format=PAX_FORMAT)``.

    The caller appends already-built members (``tar_member``, or ``tar_header`` + data + padding);
    ``close`` writes the end-of-archive blocks and pads to the 10 KiB record as tarfile does.
    """

    def __init__(self, file: BinaryIO, flush_bytes: int = 8 << 20):
        self.file, self.flush_bytes = file, flush_bytes
        self.parts: list[Any] = []
        self.pending = 0  # bytes in parts
        self.offset = 0  # bytes written to file

    def write(self, data) -> None:
        """Append bytes (kept by reference until the next flush: the caller must not change them)."""
        self.write_parts((data,), len(data))

    def write_parts(self, parts: Sequence[Any], nbytes: int) -> None:
        """Append several buffers of ``nbytes`` bytes in all (kept by reference until the next flush)."""
        self.parts.extend(parts)
        self.pending += nbytes
        if self.pending >= self.flush_bytes:
            self._flush()

    def _flush(self) -> None:
        if self.parts:
            writev = getattr(self.file, "writev", None)
            if writev is not None:
                writev(self.parts, self.pending)  # gathered by the kernel: no copy here
            else:
                self.file.write(b"".join(self.parts))  # one copy, one large write
        self.offset += self.pending
        self.parts, self.pending = [], 0

    def close(self) -> None:
        end = tarfile.BLOCKSIZE * 2
        total = self.offset + self.pending + end
        self.write(bytes(end + (-total % tarfile.RECORDSIZE)))
        self._flush()
        self.file.close()


class GatherFile:
    """A new local file written with ``os.writev``: a list of buffers per system call, none copied first."""

    IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") and "SC_IOV_MAX" in os.sysconf_names else 16

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def writev(self, parts: Sequence[Any], nbytes: int | None = None) -> None:
        for start in range(0, len(parts), self.IOV_MAX):
            chunk = parts[start : start + self.IOV_MAX]
            written, total = os.writev(self.fd, chunk), sum(map(len, chunk))
            if written < total:  # a short write (rare on a local file): the rest in plain writes
                rest = memoryview(b"".join(chunk))[written:]
                while rest:
                    rest = rest[os.write(self.fd, rest) :]

    def write(self, data) -> int:
        self.writev([data])
        return len(data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> GatherFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _binary_views(column: pa.ChunkedArray, rows: np.ndarray) -> list[memoryview | None]:
    """The values of a binary column at ``rows`` as zero-copy memoryviews (None where null)."""
    out: list[memoryview | None] = [None] * len(rows)
    lengths = [len(c) for c in column.chunks]
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    which = np.searchsorted(starts, rows, side="right") - 1
    for ci, chunk in enumerate(column.chunks):
        sel = np.flatnonzero(which == ci)
        if not len(sel):
            continue
        if pa.types.is_large_binary(chunk.type):
            offset_type = np.int64
        elif pa.types.is_binary(chunk.type):
            offset_type = np.int32
        else:
            raise TypeError(f"image_bytes must be binary, got {chunk.type}")
        _, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(offsets_buf, dtype=offset_type)[chunk.offset : chunk.offset + len(chunk) + 1]
        data = memoryview(data_buf) if data_buf is not None else memoryview(b"")
        local = rows[sel] - starts[ci]
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)[local] if chunk.null_count else np.ones(len(local), bool)
        for j, a, b, ok in zip(sel.tolist(), offsets[local].tolist(), offsets[local + 1].tolist(), valid.tolist()):
            if ok:
                out[j] = data[a:b]
    return out


def _positions(ids: pa.ChunkedArray | pa.Array, table_ids: pa.ChunkedArray, what: str) -> np.ndarray:
    """Row of each of ``ids`` in ``table_ids`` (every id must be there)."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    pos = pc.index_in(ids, value_set=table_ids.combine_chunks() if isinstance(table_ids, pa.ChunkedArray) else table_ids)
    if pos.null_count:
        missing = pc.filter(ids, pc.is_null(pos)).to_pylist()
        head = ", ".join(map(repr, missing[:3])) + (" ..." if len(missing) > 3 else "")
        raise ValueError(f"{len(missing)} chosen images have no row in {what}: {head}")
    return pos.to_numpy(zero_copy_only=False).astype(np.int64)


_encode_str = json.encoder.encode_basestring  # what json.dumps(ensure_ascii=False) writes for a str


def _json_value(value: Any) -> str:
    return _encode_str(value) if value.__class__ is str else ("null" if value is None else _JSON_ENCODER.encode(value))


_JSON_ENCODER = json.JSONEncoder(sort_keys=True, ensure_ascii=False, default=json_default)
# Parquet rows per row group: at least this many, or what two batches of image rows gave a split (the pending rows hold
# zero-copy views of their image batches, so at most two batches stay in memory per split); a split's last one smaller
_PARQUET_BATCH_ROWS = 1024


class _Lists:
    """A list column of a batch taken apart once: its values flattened, each row's [start, end) in them."""

    def __init__(self, values: pa.Array | pa.ChunkedArray):
        values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        self.nulls = values.is_null() if values.null_count else None
        self.flat = pc.list_flatten(values)  # a null list has no values here
        lengths = pc.list_value_length(values).fill_null(0).to_numpy(zero_copy_only=False)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        self.bounds = self.offsets.tolist()

    def json(self, encode: Callable[[pa.Array], pa.Array]) -> pa.Array:
        """Per row the JSON text of its values (``encode``: the JSON text of each value, a string array) joined by ", ", without
        the brackets (a string array); null for a null list. The joins run in Arrow (``binary_join``), not a Python
        call per row."""
        parts = encode(self.flat)  # one batch's texts: far below 2 GB
        lists = pa.ListArray.from_arrays(pa.array(self.offsets, pa.int32()), parts, mask=self.nulls)
        return pc.binary_join(lists, ", ")

    def element(self, j: int) -> pa.Array:
        """Per row its j-th value, null where the row has fewer (or the value is null)."""
        lengths = np.diff(self.offsets)
        return self.flat.take(pa.array(self.offsets[:-1].astype(np.int64) + j, pa.int64(), mask=lengths <= j))


def _json_strings(values: list) -> list[str]:
    """The JSON text of each value of a list of strings, as json.dumps(ensure_ascii=False) writes them."""
    try:
        return list(map(_encode_str, values))
    except TypeError:  # a null among them
        return [_encode_str(x) if x.__class__ is str else _JSON_ENCODER.encode(x) for x in values]


# the characters json.dumps(ensure_ascii=False) escapes in a string: control characters, the quote, the backslash
_JSON_ESCAPED = r'[\x00-\x1f"\\]'


def _json_string_values(values: pa.Array) -> pa.Array:
    """``_json_strings`` of a string array, as a string array: in Arrow (quotes around each value, "null" for a
    null), Python's encoder only for the values with a character to escape."""
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        return pa.array(_json_strings(values.to_pylist()), pa.string())
    values = _as_type(values, pa.string())
    out = pc.binary_join_element_wise('"', values, '"', "").fill_null("null")
    escape = pc.match_substring_regex(values, _JSON_ESCAPED).fill_null(False)
    if pc.any(escape).as_py():
        fixed = pa.array(list(map(_encode_str, pc.filter(values, escape).to_pylist())), pa.string())
        out = pc.replace_with_mask(out, escape, fixed)
    return out


def _json_float_values_array(values: pa.Array) -> pa.Array:
    """``_json_float_values`` of an array, as a string array."""
    return pa.array(_json_float_values(values.to_pylist()), pa.string())


_JSON_FLOAT_SPECIALS = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _json_float_values(values: list) -> list[str]:
    """The JSON text of ``float(v)`` for each value, as json.dumps writes it: repr, NaN and +-Infinity."""
    out = list(map(repr, map(float, values)))  # float(None) raises, as make_sample's float(s) does
    if any(x in _JSON_FLOAT_SPECIALS for x in out):
        out = [_JSON_FLOAT_SPECIALS.get(x, x) for x in out]
    return out


def _lengths(values: pa.Array) -> np.ndarray:
    """The byte length of each value of a binary or string array (int64)."""
    return pc.binary_length(values).to_numpy(zero_copy_only=False).astype(np.int64)


def _int_texts(values: pa.Array) -> pa.Array:
    """``str(int(v))`` of each value, as a string array (a null raises, as ``int(None)`` does)."""
    if pa.types.is_integer(values.type) and not values.null_count:
        return values.cast(pa.string())
    return pa.array([str(int(v)) for v in values.to_pylist()], pa.string())


class _Batch:
    """The prepared samples of one batch of image rows, per slot (a chosen image row): whether it is
    exportable (else the drop reason), its tar members as (bytes before the image, the image, bytes after
    it), the bytes the content hash takes for it and its Parquet columns; column-wise where it can (member
    headers, JSON members, Parquet columns: a Python loop per slot only picks the caption and checks the
    image), the non-image bytes of every sample laid out by one Arrow join, the image bytes never copied
    before they are written."""

    def __init__(self, owner: ShardSamples, start: int, images: pa.Table | pa.RecordBatch, rows: np.ndarray):
        self.start, self.images = start, images
        self.rows = rows  # sorted unique image rows (of the whole shard) this batch prepares
        self.slot = np.full(images.num_rows, -1, np.int64)
        self.slot[rows - start] = np.arange(len(rows))
        local = pa.array(rows - start, pa.int64())
        n = len(rows)
        target, quality, m = owner.image_format, owner.jpeg_quality, owner.real_text_members
        self.image_format = target
        self.retrieval_rows = owner.retrieval_of[rows]
        retr = owner.retrievals.select(["sentence_ids", "texts", "scores"]).take(pa.array(self.retrieval_rows, pa.int64()))
        synthetic = owner.captions.column("synthetic_caption").take(pa.array(owner.caption_of[rows], pa.int64())).to_pylist()
        data = _binary_views(_chunked(images.column("image_bytes")), rows - start)
        image_ids, formats = (_take(images.column(c), local).to_pylist() for c in ("image_id", "format"))
        # image_db's sha256 of the image bytes: the image's share of the content hash without hashing it again
        shas = _take(images.column("sha256"), local).to_pylist() if "sha256" in images.schema.names else [None] * n
        texts = _Lists(retr.column("texts"))
        flat_texts, text_bounds = texts.flat.to_pylist(), texts.bounds
        self.keys = [safe_key(x) for x in image_ids]
        self.synthetic: list[list[str]] = [[c] if c else [] for c in synthetic]
        # per slot: None when exportable, else the drop reason; the caption; the re-encoded image, if any
        self.status: list[str | None] = [None] * n
        self.txt: list[str | None] = [None] * n
        self.reencoded: list[bytes | None] = [None] * n
        self.ok = np.zeros(n, bool)
        self.reencoded_mask = np.zeros(n, bool)
        ok: list[int] = []  # exportable slots, with their image bytes and image digests
        images_ok: list[Any] = []
        digests: list[str] = []
        for i in range(n):
            caption = synthetic[i]
            if caption and caption.strip():
                txt = caption
            else:  # a None among the real texts: no caption
                txt = next((t for t in flat_texts[text_bounds[i] : text_bounds[i + 1]] if t and t.strip()), None)
            self.txt[i] = txt
            image = data[i]
            if not image:
                self.status[i] = "missing_image"
                continue
            if txt is None:
                self.status[i] = "missing_txt"
                continue
            fmt = formats[i]
            if IMAGE_EXTENSIONS.get((fmt or "").lower()) != target:
                try:
                    image, _ = normalize_image(bytes(image), fmt, target, quality)
                except UndecodableImageError:
                    self.status[i] = "undecodable_image"
                    continue
                self.reencoded[i] = image
                self.reencoded_mask[i] = True
                digest = hashlib.sha256(image).hexdigest()
            else:
                digest = shas[i] or hashlib.sha256(image).hexdigest()
            ok.append(i)
            images_ok.append(image)
            digests.append(digest)
        self.ok[ok] = True
        # per slot: its tar members as (bytes before the image, the image, bytes after it), and what the content hash
        # takes, the image replaced by its sha256 hex: views of one buffer laid out (before, sha256, after) per sample
        self.members: list[tuple[Any, Any, Any] | None] = [None] * n
        self.hashed: list[Any] = [None] * n
        self.nbytes = np.zeros(n, np.int64)
        if not ok:
            return
        at_ok = pa.array(ok, pa.int64())
        member_data = self._member_data(owner, images, local.take(at_ok), retr.take(at_ok), texts, at_ok, ok, synthetic)
        n_ok, at, block = len(ok), owner.suffixes.index(target), tarfile.BLOCKSIZE
        sizes = np.empty((n_ok, m + 3), np.int64)
        for j, s in enumerate(owner.suffixes):
            sizes[:, j] = np.fromiter(map(len, images_ok), np.int64, n_ok) if j == at else _lengths(member_data[s])
        headers = header_blocks([self.keys[i].encode() for i in ok], owner.suffixes, sizes)  # (member, sample, 512)
        pads = (-sizes) % block
        stored = sizes + pads + block  # each member in the tar: header, data, padding
        self.nbytes[ok] = stored.sum(axis=1)
        # the layout of every sample, column by column: (header, data, padding) per member, the image's data its digest;
        # Arrow joins them element-wise into one buffer
        header_offsets = pa.py_buffer(np.arange(0, (n_ok + 1) * block, block, dtype=np.int32))
        zeros = pa.py_buffer(bytes(int(pads.sum(axis=0).max())))
        digest_array = pa.array(digests, pa.binary())
        columns: list[pa.Array] = []
        for j, s in enumerate(owner.suffixes):
            columns.append(pa.Array.from_buffers(pa.binary(), n_ok, [None, header_offsets, pa.py_buffer(headers[j])]))
            columns.append(digest_array if j == at else member_data[s])
            pad_offsets = np.zeros(n_ok + 1, np.int32)
            np.cumsum(pads[:, j], out=pad_offsets[1:])
            columns.append(pa.Array.from_buffers(pa.binary(), n_ok, [None, pa.py_buffer(pad_offsets), zeros]))
        layout = pc.binary_join_element_wise(*columns, b"")
        buffer = memoryview(layout.buffers()[2])
        offsets = np.frombuffer(layout.buffers()[1], np.int32)[layout.offset : layout.offset + n_ok + 1].astype(np.int64)
        head_len = stored[:, :at].sum(axis=1) + block  # the members before the image, then its header
        digest_at = offsets[:-1] + head_len
        tail_at = digest_at + _lengths(digest_array)  # the image's padding, then the members after it
        for i, image, a, d, t, e in zip(ok, images_ok, offsets[:-1].tolist(), digest_at.tolist(), tail_at.tolist(), offsets[1:].tolist()):
            self.members[i] = (buffer[a:d], image, buffer[t:e])
            self.hashed[i] = buffer[a:e]

    def _member_data(
        self,
        owner: ShardSamples,
        images: pa.Table | pa.RecordBatch,
        local: pa.Array,
        retr: pa.Table,
        texts: _Lists,
        at_ok: pa.Array,
        ok: list[int],
        synthetic: list[str | None],
    ) -> dict[str, pa.Array]:
        """{suffix: binary array} of the exportable slots ``ok`` (``local``: their image rows, ``retr``: their
        retrievals), every member but the image: the json, real{j}.txt and txt members, column-wise."""
        out: dict[str, pa.Array] = {}
        for j in range(owner.real_text_members):  # the j-th real text, empty where fewer were retrieved (or null)
            out[f"real{j}.txt"] = _as_type(texts.element(j).take(at_ok).fill_null(""), pa.binary())
        out["txt"] = pa.array([self.txt[i] for i in ok], pa.string()).cast(pa.binary())

        def json_texts(column: str) -> pa.Array:  # _json_value of every value of a string column
            return _json_string_values(_take(images.column(column), local))

        sentence_ids = _Lists(retr.column("sentence_ids")).json(_json_string_values)
        caption = [synthetic[i] for i in ok]
        # json.dumps(make_sample(...)["json"], sort_keys=True, ensure_ascii=False), written out key by key
        meta = pc.binary_join_element_wise(
            '{"doc_id": ',
            json_texts("doc_id"),
            ', "height": ',
            _int_texts(_take(images.column("height"), local)),
            ', "image_id": ',
            json_texts("image_id"),
            ', "real_scores": [',
            _Lists(retr.column("scores")).json(_json_float_values_array).fill_null(""),
            '], "real_sentence_ids": ',
            pc.binary_join_element_wise("[", sentence_ids, "]", "").fill_null("null"),
            ', "real_texts": [',
            _Lists(retr.column("texts")).json(_json_string_values).fill_null(""),
            '], "shard": ' + _json_value(owner.shard) + ', "source": ',
            json_texts("source"),
            ', "synthetic_texts": ',
            pa.array(["[" + _encode_str(c) + "]" if c else "[]" for c in caption], pa.string()),
            ', "width": ',
            _int_texts(_take(images.column("width"), local)),
            "}",
            "",
        )
        out["json"] = meta.cast(pa.binary())
        return out

    @functools.cached_property
    def _parquet_columns(self) -> dict[str, pa.Array]:
        """The Parquet columns not taken from the images or the retrievals, for every slot (a split takes its rows)."""
        keys = pa.array(self.keys, pa.string())
        return {
            "key": keys,
            "path": pc.binary_join_element_wise(keys, "." + self.image_format, ""),
            "txt": pa.array(self.txt, pa.string()),
            "synthetic_texts": pa.array(self.synthetic, pa.list_(pa.string())),
        }

    @functools.cached_property
    def _image_column(self) -> pa.StructArray:
        """The Parquet image column (bytes, path) for every row of the batch: the bytes are the batch's own."""
        values = self.images.column("image_bytes")
        if isinstance(values, pa.ChunkedArray):
            values = values.chunk(0) if values.num_chunks == 1 else values.combine_chunks()
        where = pa.array(self.slot, pa.int64(), mask=self.slot < 0)  # rows no split chose have no path
        paths = self._parquet_columns["path"].take(where)
        return pa.StructArray.from_arrays([_as_type(values, pa.binary()), paths], fields=list(IMAGE_TYPE))

    def parquet_table(self, owner: ShardSamples, slots: np.ndarray) -> pa.Table:
        """PARQUET_SCHEMA rows of ``slots`` (exportable ones only)."""
        at = pa.array(slots, pa.int64())
        local = pa.array(self.rows[slots] - self.start, pa.int64())
        images = self.images
        if self.reencoded_mask[slots].any():
            sl = slots.tolist()
            views = _binary_views(_chunked(images.column("image_bytes")), self.rows[slots] - self.start)
            image_bytes = pa.array(
                [self.reencoded[s] if self.reencoded[s] is not None else bytes(v) for s, v in zip(sl, views)], pa.binary()
            )
            image = pa.StructArray.from_arrays([image_bytes, self._parquet_columns["path"].take(at)], fields=list(IMAGE_TYPE))
        else:  # zero-copy: a slice of the batch's image column per run of consecutive rows, no copy before Parquet's own
            image = _row_runs(self._image_column, self.rows[slots] - self.start)
        own = self._parquet_columns
        retrieval_rows = pa.array(self.retrieval_rows[slots], pa.int64())
        real_texts = owner.retrievals.column("texts").take(retrieval_rows)
        real_scores = owner.retrievals.column("scores").take(retrieval_rows)
        if real_texts.null_count or real_scores.null_count:
            real_texts = pa.array([x or [] for x in real_texts.to_pylist()], pa.list_(pa.string()))
            real_scores = pa.array([x or [] for x in real_scores.to_pylist()], pa.list_(pa.float32()))
        columns = {
            "key": own["key"].take(at),
            "image": image,
            "image_id": _take(images.column("image_id"), local),
            "doc_id": _take(images.column("doc_id"), local),
            "source": _take(images.column("source"), local),
            "image_format": pa.repeat(pa.scalar(OUTPUT_FORMATS[self.image_format].lower(), pa.string()), len(slots)),
            "width": _take(images.column("width"), local),
            "height": _take(images.column("height"), local),
            "txt": own["txt"].take(at),
            "real_texts": real_texts,
            "real_scores": real_scores,
            "synthetic_texts": own["synthetic_texts"].take(at),
        }
        return pa.table([_as_type(columns[f.name], f.type) for f in PARQUET_SCHEMA], schema=PARQUET_SCHEMA)


def _chunked(values: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    return values if isinstance(values, pa.ChunkedArray) else pa.chunked_array([values], values.type)


def _take(values: pa.Array | pa.ChunkedArray, indices: pa.Array) -> pa.Array:
    """``values.take(indices)`` as one array: no second copy where ``values`` is one chunk."""
    if isinstance(values, pa.ChunkedArray):
        if values.num_chunks != 1:
            return values.take(indices).combine_chunks()
        values = values.chunk(0)
    return values.take(indices)


def _row_runs(values: pa.Array, rows: np.ndarray) -> pa.ChunkedArray:
    """``values`` at ``rows`` as zero-copy slices, one per run of consecutive rows."""
    if not len(rows):
        return pa.chunked_array([], values.type)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts, ends = np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])
    return pa.chunked_array([values.slice(a, n) for a, n in zip(rows[starts].tolist(), (ends - starts).tolist())], values.type)


_HOST = r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/]*@)?(?P<host>[^/:?#]+)"
TOP_HOSTS = 50  # image hosts kept per shard and split (the rest summed as "(other hosts)")


class SplitFacts:
    """What a split's data card says about its samples, from their Parquet rows, added up batch by batch:
    histograms of text lengths and image-text scores (fixed edges, so shards add up) and image hosts."""

    def __init__(self):
        self.hist: dict[str, dict | None] = {"synthetic_length": None, "real_length": None, "real_score": None}
        self.hosts: dict[str, int] = {}

    def add(self, table: pa.Table) -> None:
        from realsyn.datacard import SIMILARITY_EDGES, TEXT_LENGTH_EDGES, histogram, merge_histograms

        real = pc.list_flatten(table.column("real_texts"))
        new = {
            "synthetic_length": histogram(pc.utf8_length(table.column("txt")).to_numpy(zero_copy_only=False), TEXT_LENGTH_EDGES),
            "real_length": histogram(pc.utf8_length(pc.drop_null(real)).to_numpy(zero_copy_only=False), TEXT_LENGTH_EDGES),
            "real_score": histogram(
                pc.drop_null(pc.list_flatten(table.column("real_scores"))).to_numpy(zero_copy_only=False), SIMILARITY_EDGES
            ),
        }
        self.hist = {k: merge_histograms(self.hist[k], new[k]) for k in self.hist}
        hosts = pc.struct_field(pc.extract_regex(table.column("source"), _HOST), [0])
        counts = pc.value_counts(hosts.fill_null("(no URL: inline or local)"))
        for host, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()):
            self.hosts[host] = self.hosts.get(host, 0) + int(n)

    def as_dict(self) -> dict[str, Any]:
        top = sorted(self.hosts.items(), key=lambda x: (-x[1], x[0]))
        hosts = dict(top[:TOP_HOSTS])
        if len(top) > TOP_HOSTS:
            hosts["(other hosts)"] = sum(n for _, n in top[TOP_HOSTS:])
        return {**self.hist, "hosts": hosts}


class SplitOutput:
    """Where one split's samples of a shard go: tars ``tar_name(0), tar_name(1), ...`` (at most
    ``samples_per_shard`` samples each) through ``open_shard(name)``, and one Parquet file (``parquet``,
    opened by ``open_parquet()`` if the split chose any image of the shard).

    ``content_sha256`` (after the write) is the sha256 of the tar members written, each image replaced
    by its own sha256: the split's content of this shard (tars and Parquet hold the same samples) at
    the cost of hashing the small members only. ``facts`` (a ``SplitFacts``) describes the samples.
    """

    def __init__(
        self,
        open_shard: Callable[[str], BinaryIO],
        tar_name: Callable[[int], str],
        open_parquet: Callable[[], BinaryIO] | None,
        samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
        stats: StepStats | None = None,
    ):
        if samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
        self.open_shard, self.tar_name, self.open_parquet = open_shard, tar_name, open_parquet
        self.samples_per_shard = samples_per_shard
        self.stats = stats if stats is not None else StepStats("export")
        self.sizes: dict[str, int] = {}
        self.facts = SplitFacts()
        self._hash = hashlib.sha256()
        self.content_sha256 = ""
        self._tar: TarStream | None = None
        self._name, self._count = "", 0
        self._parquet_file: BinaryIO | None = None
        self._parquet: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._pending_batches: list[_Batch] = []  # the image batches the pending rows hold views of

    def _start(self) -> None:
        if self.open_parquet is not None:
            self._parquet_file = self.open_parquet()
            self._parquet = pq.ParquetWriter(self._parquet_file, PARQUET_SCHEMA, **PARQUET_WRITE_OPTIONS)

    def _write(self, owner: ShardSamples, batch: _Batch, rows: np.ndarray) -> None:
        """The chosen ``rows`` (image rows of ``batch``, in the split's order): tar members, then Parquet rows."""
        slots = batch.slot[rows - batch.start]
        self.stats.add("samples_in", len(slots))
        ok = batch.ok[slots]
        if not ok.all():
            for slot in slots[~ok].tolist():
                self.stats.drop(batch.status[slot])
            slots = slots[ok]
        reencoded = int(np.count_nonzero(batch.reencoded_mask[slots]))
        if reencoded:
            self.stats.add("reencoded_images", reencoded)
            if owner.image_format == "jpg":
                self.stats.add("reencoded_lossy", reencoded)
        done = 0
        while done < len(slots):
            if self._tar is None or self._count >= self.samples_per_shard:
                self._close_tar()
                self._name, self._count = self.tar_name(len(self.sizes)), 0
                self._tar = TarStream(self.open_shard(self._name))
            chunk = slots[done : done + self.samples_per_shard - self._count]
            members = map(batch.members.__getitem__, chunk.tolist())
            self._tar.write_parts(list(itertools.chain.from_iterable(members)), int(batch.nbytes[chunk].sum()))
            self._count += len(chunk)
            done += len(chunk)
        update = self._hash.update
        for hashed in map(batch.hashed.__getitem__, slots.tolist()):  # no copy: each sample's view hashed in turn
            update(hashed)
        if self._parquet is not None and len(slots):
            self._pending.append(batch.parquet_table(owner, slots))
            self._pending_rows += len(slots)
            if not self._pending_batches or self._pending_batches[-1] is not batch:
                self._pending_batches.append(batch)
            if self._pending_rows >= _PARQUET_BATCH_ROWS or len(self._pending_batches) >= 2:
                self._flush_parquet()

    def _flush_parquet(self) -> None:
        if self._pending:
            table = pa.concat_tables(self._pending)
            self.facts.add(table)
            self._parquet.write_table(table)  # one row group
        self._pending, self._pending_rows, self._pending_batches = [], 0, []

    def _close_tar(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self.sizes[self._name] = self._count
            self._tar = None

    def _finish(self) -> None:
        self._close_tar()
        if self._parquet is not None:
            self._flush_parquet()
            self._parquet.close()
            self._parquet_file.close()
            self._parquet = None
        self.content_sha256 = self._hash.hexdigest()
        self.stats.add("samples_written", sum(self.sizes.values()))
        self.stats.add("shards_written", len(self.sizes))

    def _abort(self) -> None:
        if self._tar is not None:
            self._tar.file.close()
        if self._parquet_file is not None:
            self._parquet_file.close()


class ShardSamples:
    """The export samples of one shard, written for every split in one pass over the shard's images.

    ``image_ids`` are the ids of the shard's filtered images (row order); ``retrievals`` (image_id,
    sentence_ids, texts, scores) and ``captions`` (image_id, synthetic_caption) the shard's tables;
    ``selections`` maps each split to the image ids it chose, in order. ``write`` then takes the
    image rows in batches (image_id, image_bytes, format, width, height, doc_id, source, and sha256
    when present) and, per batch, prepares every image some split chose once (key, json and text
    members, its image member a zero-copy view of the image column, re-encoded once if its format is
    not ``image_format``), then appends each split's samples of that batch to the split's tars and
    Parquet file. Tar members and Parquet rows equal what ``make_sample`` + ``write_webdataset`` /
    ``samples_to_parquet_table`` produce for the same samples (``reference_samples``), in the same
    order. Streaming needs every split's rows in ascending image order (``ordered``; the samplers
    keep candidate order); otherwise the caller passes the whole table as one batch.
    """

    def __init__(
        self,
        shard: str,
        image_ids: pa.Array | pa.ChunkedArray,
        retrievals: pa.Table,
        captions: pa.Table,
        selections: dict[str, Sequence[str] | pa.Array | pa.ChunkedArray],
        image_format: str = DEFAULT_IMAGE_FORMAT,
        real_text_members: int = REAL_TEXT_MEMBERS,
        jpeg_quality: int = REENCODE_JPEG_QUALITY,
    ):
        self.shard, self.retrievals, self.captions = shard, retrievals, captions
        self.image_format, self.real_text_members, self.jpeg_quality = image_format, real_text_members, jpeg_quality
        self.suffixes = member_suffixes(image_format, real_text_members)
        self.num_images = len(image_ids)
        self.rows = {
            split: _positions(ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids, pa.string()), image_ids, "the images")
            for split, ids in selections.items()
        }
        self.ordered = all(len(r) < 2 or bool(np.all(np.diff(r) >= 0)) for r in self.rows.values())
        chosen = [r for r in self.rows.values() if len(r)]
        union = np.unique(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
        union_ids = (image_ids if isinstance(image_ids, pa.ChunkedArray) else pa.chunked_array([image_ids])).take(
            pa.array(union, pa.int64())
        )
        self.retrieval_of = np.full(self.num_images, -1, np.int64)
        self.caption_of = np.full(self.num_images, -1, np.int64)
        self.retrieval_of[union] = _positions(union_ids, retrievals.column("image_id"), "the retrievals")
        self.caption_of[union] = _positions(union_ids, captions.column("image_id"), "the synthetic captions")

    def selected(self, split: str) -> int:
        return len(self.rows[split])

    def write(self, batches: Iterable[pa.RecordBatch | pa.Table], outputs: dict[str, SplitOutput]) -> dict[str, dict[str, int]]:
        """Every split's samples from ``batches`` (the image rows in order, all of them): {split: {tar name: samples}}."""
        # Python's cyclic garbage collector off meanwhile: a batch makes thousands of small objects (views, tuples)
        # that reference counting frees, and the collector's passes over them cost ~4% of the export's time
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._write(batches, outputs)
        finally:
            if collecting:
                gc.enable()

    def _write(self, batches: Iterable[pa.RecordBatch | pa.Table], outputs: dict[str, SplitOutput]) -> dict[str, dict[str, int]]:
        if not self.ordered:
            batches = list(batches)
            if len(batches) > 1:
                raise ValueError("a split's image rows are not in ascending order: pass the whole image table as one batch")
        done = {split: 0 for split in outputs}
        for out in outputs.values():
            out._start()
        start = 0
        try:
            for batch_table in batches:
                end = start + batch_table.num_rows
                if self.ordered:
                    todo = {split: self.rows[split][done[split] : np.searchsorted(self.rows[split], end)] for split in outputs}
                else:
                    todo = {split: self.rows[split] for split in outputs}
                wanted = [r for r in todo.values() if len(r)]
                if wanted:
                    batch = _Batch(self, start, batch_table, np.unique(np.concatenate(wanted)))
                    for split, rows in todo.items():
                        if len(rows):
                            outputs[split]._write(self, batch, rows)
                            done[split] += len(rows)
                start = end
            if start != self.num_images:
                raise ValueError(f"the batches held {start} image rows, the shard has {self.num_images}")
            for out in outputs.values():
                out._finish()
        except BaseException:
            for out in outputs.values():
                out._abort()
            raise
        return {split: out.sizes for split, out in outputs.items()}


def _as_type(values: pa.Array | pa.ChunkedArray, type_: pa.DataType) -> pa.Array | pa.ChunkedArray:
    return values if values.type == type_ else values.cast(type_)


# Parquet leaf column paths (a list's values are "{name}.list.element", a struct's fields "{name}.{field}")
_COLUMNS = [
    f"{f.name}.{c.name}" if pa.types.is_struct(f.type) else f"{f.name}.list.element" if pa.types.is_list(f.type) else f.name
    for f in PARQUET_SCHEMA
    for c in (f.type if pa.types.is_struct(f.type) else [f])
]
# the image bytes are JPEG/PNG/WebP, already compressed: zstd and a dictionary only cost time there. The writer
# checks whether a data page is full every write_batch_size values: 64 images (~2 MB) rather than the default 1024
# (a page of ~35 MB, which no CPU cache holds between encoding it and writing it out)
PARQUET_WRITE_OPTIONS: dict[str, Any] = {
    "compression": {c: ("none" if c == "image.bytes" else "zstd") for c in _COLUMNS},
    "use_dictionary": [c for c in _COLUMNS if c != "image.bytes"],
    "write_batch_size": 64,
}


def reference_samples(
    shard: str, images: pa.Table, retrievals: pa.Table, captions: pa.Table, chosen: Sequence[str]
) -> Iterator[dict[str, Any]]:
    """The samples of ``chosen`` one row at a time through ``make_sample``: the specification ``ShardSamples`` meets.

    Slow (a Python row per sample); tests and the export benchmark compare against it.
    """
    ipos = {x: i for i, x in enumerate(images.column("image_id").to_pylist())}
    rpos = {x: i for i, x in enumerate(retrievals.column("image_id").to_pylist())}
    cpos = {x: i for i, x in enumerate(captions.column("image_id").to_pylist())}
    for image_id in chosen:
        img = images.slice(ipos[image_id], 1).to_pylist()[0]
        r = retrievals.slice(rpos[image_id], 1).to_pylist()[0]
        synthetic = captions.column("synthetic_caption")[cpos[image_id]].as_py()
        sample = make_sample(
            image_id,
            img["image_bytes"],
            img["format"],
            r["texts"],
            r["scores"],
            [synthetic],
            img["width"],
            img["height"],
            img["doc_id"],
            img["source"],
        )
        sample["json"].update(real_sentence_ids=r["sentence_ids"], shard=shard)
        yield sample


# ------------------------------------------------------------------------------------------------
# Published splits: {root}/_exports/{split}/v{N}/ and latest.json, outside every generation folder.

_VERSION_DIR = re.compile(r"v(\d+)")


def _split_dir(root: Any, split: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str, Callable[[str], str]]:
    """(filesystem, path of ``{root}/_exports/{split}``, path -> URI) for a root URI or a ``realsyn.storage.Storage``."""
    from realsyn import layout
    from realsyn.io import filesystem_for, join_path
    from realsyn.storage import validate_name

    validate_name(split, "split name")
    if isinstance(root, str):
        fs, base = filesystem_for(root.rstrip("/"), storage_options)
        protocol = root.split("://", 1)[0] if "://" in root else None
        to_uri = (lambda p: p) if protocol is None else (lambda p: f"{protocol}://{p}")
    else:  # a Storage
        fs, base, to_uri = root.fs, root.root, root.uri_of
    return fs, join_path(fs, base, layout.PUBLISHED_EXPORTS_DIR, split), to_uri


def published_versions(root: Any, split: str, storage_options: dict[str, Any] | None = None) -> dict[int, dict[str, Any]]:
    """{version: its manifest} of every complete published version of ``split`` (a version is complete
    once its ``manifest.json``, written last, is there)."""
    from realsyn import layout
    from realsyn.io import join_path

    fs, split_dir, _ = _split_dir(root, split, storage_options)
    if not fs.exists(split_dir):
        return {}
    out = {}
    for entry in fs.ls(split_dir, detail=False):
        m = _VERSION_DIR.fullmatch(entry.rstrip("/").rsplit("/", 1)[-1])
        if m is None:
            continue
        try:
            out[int(m.group(1))] = json.loads(fs.cat_file(join_path(fs, entry.rstrip("/"), layout.PUBLISHED_MANIFEST_FILE)))
        except FileNotFoundError:
            continue  # being written, or a publish that died: not a version
    return dict(sorted(out.items()))


def published_split_path(root: Any, split: str, version: int | str = "latest", storage_options: dict[str, Any] | None = None) -> str:
    """The URI of a published split folder (tars, sizes.json, train_data.txt, parquet/, README.md, datacard.json).

    ``root`` is the storage root (a URI, or a ``realsyn.storage.Storage``); ``version`` a number or
    ``"latest"`` (what ``latest.json`` points at). The folder is never deleted or changed by a later
    publish (only its card is rewritten when an evaluation lands), so a training job can read it while
    the next version builds. Raises ``FileNotFoundError`` for a split or version not published.
    """
    from realsyn import layout
    from realsyn.io import join_path

    fs, split_dir, to_uri = _split_dir(root, split, storage_options)
    if version == "latest":
        try:
            version = int(json.loads(fs.cat_file(join_path(fs, split_dir, layout.PUBLISHED_LATEST_FILE)))["version"])
        except FileNotFoundError:
            raise FileNotFoundError(f"split {split!r} has not been published under {to_uri(split_dir)}") from None
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"version must be a number or 'latest', got {version!r}")
    folder = join_path(fs, split_dir, f"v{version}")
    if not fs.exists(join_path(fs, folder, layout.PUBLISHED_MANIFEST_FILE)):
        raise FileNotFoundError(f"split {split!r} has no complete published version {version} under {to_uri(split_dir)}")
    return to_uri(folder)


def claim_version(root: Any, split: str, storage_options: dict[str, Any] | None = None) -> int:
    """A new version number of ``split``, claimed by creating ``v{N}/.claim`` exclusively (so two
    publishers never write the same folder): one past the highest folder there."""
    from realsyn.io import is_local, join_path

    fs, split_dir, _ = _split_dir(root, split, storage_options)
    taken = [
        int(m.group(1))
        for e in (fs.ls(split_dir, detail=False) if fs.exists(split_dir) else [])
        if (m := _VERSION_DIR.fullmatch(e.rstrip("/").rsplit("/", 1)[-1]))
    ]
    n = max(taken, default=0) + 1
    while True:
        claim = join_path(fs, split_dir, f"v{n}", ".claim")
        try:
            if is_local(fs):
                os.makedirs(os.path.dirname(claim), exist_ok=True)
                os.close(os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            else:
                fs.pipe_file(claim, b"", mode="create")  # a conditional PUT (If-None-Match: *)
            return n
        except FileExistsError:
            n += 1
        except NotImplementedError:  # an object store without conditional writes: check, then write
            if fs.exists(claim):
                n += 1
                continue
            fs.pipe_file(claim, b"")
            return n
        except OSError as e:
            if "precondition" not in str(e).lower() and "conflict" not in str(e).lower():
                raise
            n += 1  # 412 / 409: another publisher claimed it first


def point_latest(root: Any, split: str, version: int, data_version: str, storage_options: dict[str, Any] | None = None) -> None:
    """Flip ``latest.json`` of ``split`` to a complete ``version`` (one atomic write)."""
    from realsyn import layout
    from realsyn.io import atomic_write_bytes, join_path

    fs, split_dir, to_uri = _split_dir(root, split, storage_options)
    uri = published_split_path(root, split, version, storage_options)  # refuses an incomplete version
    pointer = {"version": version, "path": f"v{version}", "uri": uri, "data_version": data_version, "updated_at": time.time()}
    atomic_write_bytes(fs, join_path(fs, split_dir, layout.PUBLISHED_LATEST_FILE), json.dumps(pointer, indent=1).encode())
