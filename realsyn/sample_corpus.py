"""The bundled sample corpus: OBELICS-layout shards of real photos and English paragraphs, with planted noise.

Photos are the ones shipped inside scikit-image (``skimage.data``, only those bundled in the wheel)
and scikit-learn (``load_sample_images``); the paragraphs are ``realsyn/data/sample_paragraphs.json``,
stored sentence by sentence so the expected split is known. Every kind of planted noise is
counted in the returned summary, so each pipeline stage can be checked against exact numbers.
Same seed, same package versions -> byte-identical files.

    python -m realsyn.sample_corpus OUT_DIR [--shards 4] [--seed 0]
"""

from __future__ import annotations

import argparse
import base64
import glob
import io
import json
import os
import random
from collections.abc import Callable
from importlib import resources
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

MAX_SIDE = 512
JPEG_QUALITY = 85
NEAR_DUPLICATE_QUALITY = 60
NEAR_DUPLICATE_SCALE = 0.9
N_EXACT_DUPLICATES = 3
N_NEAR_DUPLICATES = 3
TINY_MAX_SIDE = (96, 90)  # two thumbnails, short side well under 100 px
BANNER_SIZES = ((600, 150), (120, 480))  # aspect 4.0 and 1/4.0, short sides >= 100 px
UNREACHABLE_URL = "http://127.0.0.1:9/missing.jpg"  # loopback: refused by the fetch policy before any connection
CORPUS_SUMMARY_FILE = "_sample_corpus.json"
PARQUET_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("url", pa.string()),
        ("images", pa.list_(pa.binary())),
        ("texts", pa.list_(pa.string())),
        ("general_metadata", pa.string()),
    ]
)


def load_paragraphs() -> dict[str, Any]:
    """The bundled English paragraphs (``photos``, ``filler``, ``boilerplate``, ``noise``)."""
    return json.loads(resources.files("realsyn").joinpath("data/sample_paragraphs.json").read_text(encoding="utf-8"))


def _photo_loader(source: str) -> Callable[[], np.ndarray]:
    """Loader for a ``source`` string of the paragraphs file."""
    if source.startswith("skimage.data."):
        name = source.removeprefix("skimage.data.")

        def load() -> np.ndarray:
            import skimage.data

            image = getattr(skimage.data, name)()
            return image[0] if isinstance(image, tuple) else image  # stereo pairs: left view

        return load
    if source.startswith("sklearn.datasets.load_sample_images:"):
        filename = source.split(":", 1)[1]

        def load() -> np.ndarray:
            from sklearn.datasets import load_sample_images

            bunch = load_sample_images()
            return bunch.images[[os.path.basename(f) for f in bunch.filenames].index(filename)]

        return load
    raise ValueError(f"unknown photo source {source!r}")


def load_photos(paragraphs: dict[str, Any]) -> dict[str, Image.Image]:
    """Every photo of the paragraphs file that loads offline, fitted to ``MAX_SIDE``; others skipped."""
    photos = {}
    for name, entry in paragraphs["photos"].items():
        try:
            array = _photo_loader(entry["source"])()
        except Exception:  # data that skimage would have to download: not bundled, skip it
            continue
        photos[name] = _fit(_to_pil(array), MAX_SIDE)
    return photos


def _to_pil(array: np.ndarray) -> Image.Image:
    if array.dtype == bool:
        array = np.where(array, 255, 0).astype(np.uint8)
    elif array.dtype != np.uint8:
        array = np.clip(array * 255.0 if array.max() <= 1.0 else array, 0, 255).astype(np.uint8)
    image = Image.fromarray(array)
    return image.convert("RGB") if image.mode not in ("L", "RGB") else image


def _fit(image: Image.Image, max_side: int) -> Image.Image:
    scale = max_side / max(image.size)
    if scale >= 1.0:
        return image
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.LANCZOS)


def _jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buffer.getvalue()


def _center_strip(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Crop the centre strip with the aspect ratio of ``size``, then resize to it."""
    target_ratio = size[0] / size[1]
    if image.width / image.height > target_ratio:
        width, height = round(image.height * target_ratio), image.height
    else:
        width, height = image.width, round(image.width / target_ratio)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height)).resize(size, Image.Resampling.LANCZOS)


class _CorpusPlan:
    """Documents per shard plus the tally of what was planted."""

    def __init__(self, n_shards: int):
        self.shards: list[list[dict[str, Any]]] = [[] for _ in range(n_shards)]
        self.counts: dict[str, int] = {
            "documents": 0,
            "malformed_documents": 0,
            "image_slots": 0,
            "paragraphs": 0,
            "sentences": 0,
        }

    def tally(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def add_document(self, shard: int, doc_id: str, slots: list[tuple[str, Any]], title: str, source: str) -> dict[str, Any]:
        """``slots``: ("image", bytes-or-str) or ("text", list of sentences)."""
        doc = {"id": doc_id, "slots": slots, "title": title, "source": source}
        self.shards[shard].append(doc)
        return doc

    def finalize_counts(self) -> None:
        for shard in self.shards:
            for doc in shard:
                self.tally("documents")
                for kind, value in doc["slots"]:
                    if kind == "image":
                        self.tally("image_slots")
                    else:
                        self.tally("paragraphs")
                        self.tally("sentences", len(value))


def _row(doc: dict[str, Any], jsonl: bool) -> dict[str, Any]:
    images, texts = [], []
    for kind, value in doc["slots"]:
        if kind == "image":
            if isinstance(value, bytes) and jsonl:
                value = "data:image/jpeg;base64," + base64.b64encode(value).decode("ascii")
            images.append(value)
            texts.append(None)
        else:
            images.append(None)
            texts.append(" ".join(value))
    metadata = json.dumps({"title": doc["title"], "image_source": doc["source"], "license": "see source package"}, sort_keys=True)
    return {
        "id": doc["id"],
        "url": f"https://example.org/realsyn-sample/{doc['id']}",
        "images": images,
        "texts": texts,
        "general_metadata": metadata,
    }


def _write_shards(plan: _CorpusPlan, out_dir: str) -> list[str]:
    names = []
    last = len(plan.shards) - 1
    for index, docs in enumerate(plan.shards):
        if index == last:
            name = f"part-{index:05d}.jsonl"
            with open(os.path.join(out_dir, name), "w", encoding="utf-8", newline="\n") as f:
                for i, doc in enumerate(docs):
                    f.write(json.dumps(_row(doc, jsonl=True), sort_keys=True) + "\n")
                    if i == 0:
                        # A broken record (2 image slots, 1 text slot): readers must skip and count it.
                        bad = {"id": "sample-malformed", "images": [None, UNREACHABLE_URL], "texts": ["Orphan paragraph."]}
                        f.write(json.dumps(bad, sort_keys=True) + "\n")
                        plan.tally("malformed_documents")
        else:
            name = f"part-{index:05d}.parquet"
            rows = [_row(doc, jsonl=False) for doc in docs]
            table = pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA)
            pq.write_table(table, os.path.join(out_dir, name), compression="zstd")
        names.append(name)
    return names


def _remove_stale_shards(out_dir: str) -> None:
    """Shards of an earlier build with more shards would otherwise be read as part of this one."""
    for pattern in ("part-*.parquet", "part-*.jsonl", "part-*.jsonl.gz"):
        for path in glob.glob(os.path.join(out_dir, pattern)):
            os.remove(path)


def build_sample_corpus(out_dir: str, n_shards: int = 4, seed: int = 0) -> dict[str, Any]:
    """Write the sample corpus (last shard JSONL, the others Parquet) and return what was planted."""
    paragraphs = load_paragraphs()
    photos = load_photos(paragraphs)
    needed = N_EXACT_DUPLICATES + N_NEAR_DUPLICATES + len(TINY_MAX_SIDE) + len(BANNER_SIZES)
    if not 2 <= n_shards <= len(photos) or len(photos) < needed:
        raise ValueError(f"need 2 <= n_shards <= {len(photos)} photos (got {n_shards}) and >= {needed} photos")
    rng = random.Random(seed)
    plan = _CorpusPlan(n_shards)
    jsonl_shard = n_shards - 1
    fillers = [list(p) for p in paragraphs["filler"]]
    rng.shuffle(fillers)

    def filler() -> list[str]:
        return fillers.pop()

    # Photo documents, round-robin over shards in a seeded order.
    order = sorted(photos)
    rng.shuffle(order)
    shard_of = {name: i % n_shards for i, name in enumerate(order)}
    photo_bytes = {name: _jpeg(photos[name]) for name in order}
    photo_docs = {}
    for name in order:
        entry = paragraphs["photos"][name]
        texts = [("text", list(p)) for p in entry["paragraphs"]]
        slot = 1 if rng.random() < 0.7 else 0  # image mostly after the first paragraph
        slots = texts[:slot] + [("image", photo_bytes[name])] + texts[slot:]
        photo_docs[name] = plan.add_document(shard_of[name], f"sample-{name}", slots, entry["title"], entry["source"])

    # One photo of the JSONL shard is referenced by a relative file path instead of inline bytes.
    local_name = next(name for name in order if shard_of[name] == jsonl_shard)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    local_rel = f"images/{local_name}.jpg"
    with open(os.path.join(out_dir, local_rel), "wb") as f:
        f.write(photo_bytes[local_name])
    doc = photo_docs[local_name]
    doc["slots"] = [("image", local_rel) if kind == "image" else (kind, v) for kind, v in doc["slots"]]
    plan.tally("local_path_images")

    # Exact and near duplicates, each in a different shard from its original.
    picked = rng.sample(order, N_EXACT_DUPLICATES + N_NEAR_DUPLICATES)
    for k, name in enumerate(picked[:N_EXACT_DUPLICATES]):
        slots = [("text", filler()), ("image", photo_bytes[name])]
        plan.add_document((shard_of[name] + 1) % n_shards, f"sample-repost-{k}", slots, paragraphs["photos"][name]["title"], "repost")
        plan.tally("exact_duplicate_images")
    for k, name in enumerate(picked[N_EXACT_DUPLICATES:]):
        image = photos[name]
        smaller = image.resize(
            (round(image.width * NEAR_DUPLICATE_SCALE), round(image.height * NEAR_DUPLICATE_SCALE)), Image.Resampling.LANCZOS
        )
        slots = [("image", _jpeg(smaller, NEAR_DUPLICATE_QUALITY)), ("text", filler())]
        plan.add_document(
            (shard_of[name] + 1) % n_shards, f"sample-resized-{k}", slots, paragraphs["photos"][name]["title"], "resized copy"
        )
        plan.tally("near_duplicate_images")

    parquet_shards = list(range(n_shards - 1))
    # Thumbnails (short side < 100 px) and banners (aspect ratio 4).
    thumbs = [("image", _jpeg(_fit(photos[name], side))) for name, side in zip(rng.sample(order, len(TINY_MAX_SIDE)), TINY_MAX_SIDE)]
    plan.add_document(rng.choice(parquet_shards), "sample-thumbnails", [("text", filler()), *thumbs], "Thumbnails", "thumbnails")
    plan.tally("tiny_images", len(thumbs))
    banners = [_jpeg(_center_strip(photos[name], size)) for name, size in zip(rng.sample(order, len(BANNER_SIZES)), BANNER_SIZES)]
    plan.add_document(
        rng.choice(parquet_shards),
        "sample-banners",
        [("image", banners[0]), ("text", filler()), ("image", banners[1])],
        "Banners",
        "banners",
    )
    plan.tally("extreme_aspect_images", len(banners))

    # A truncated upload (undecodable) and a link to a loopback address (refused by the fetch policy).
    broken = photo_bytes[rng.choice(order)][:700]
    plan.add_document(
        rng.choice(parquet_shards), "sample-broken-upload", [("text", filler()), ("image", broken)], "Broken upload", "truncated file"
    )
    plan.tally("undecodable_images")
    plan.add_document(jsonl_shard, "sample-dead-link", [("text", filler()), ("image", UNREACHABLE_URL)], "Dead link", UNREACHABLE_URL)
    plan.tally("unreachable_url_images")
    # A text-only document takes the remaining filler paragraphs.
    plan.add_document(0, "sample-club-news", [("text", filler()) for _ in range(len(fillers))], "Club news", "text only")

    # Noise sentences, appended to the last paragraph of distinct photo documents.
    noise = [(kind, s) for kind in ("emoji", "url", "too_short", "too_long") for s in paragraphs["noise"][kind]]
    for (kind, sentence), name in zip(noise, rng.sample(order, len(noise))):
        slots = photo_docs[name]["slots"]
        last_text = max(i for i, (k, _) in enumerate(slots) if k == "text")
        slots[last_text] = ("text", slots[last_text][1] + [sentence])
        plan.tally(f"{kind}_sentences")
    # The same boilerplate paragraph at the end of one photo document per shard.
    for shard in range(n_shards):
        name = next(name for name in order if shard_of[name] == shard)
        photo_docs[name]["slots"].append(("text", list(paragraphs["boilerplate"])))
    plan.tally("duplicate_sentences", len(paragraphs["boilerplate"]) * (n_shards - 1))

    for docs in plan.shards:
        rng.shuffle(docs)
    plan.finalize_counts()
    os.makedirs(out_dir, exist_ok=True)
    _remove_stale_shards(out_dir)
    names = _write_shards(plan, out_dir)
    summary = {
        **plan.counts,
        "n_shards": n_shards,
        "seed": seed,
        "shards": names,
        "photos": len(photos),
        "photo_names": sorted(photos),
        "expected_image_status": {
            "ok": plan.counts["image_slots"] - plan.counts["undecodable_images"] - plan.counts["unreachable_url_images"],
            "undecodable": plan.counts["undecodable_images"],
            "fetch_refused": plan.counts["unreachable_url_images"],
        },
    }
    with open(os.path.join(out_dir, CORPUS_SUMMARY_FILE), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    total = sum(os.path.getsize(os.path.join(out_dir, n)) for n in names) + len(photo_bytes[local_name])
    return {**summary, "out_dir": out_dir, "total_bytes": total}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the RealSyn sample corpus (OBELICS-layout shards).")
    parser.add_argument("out_dir")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(build_sample_corpus(args.out_dir, args.shards, args.seed), indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
