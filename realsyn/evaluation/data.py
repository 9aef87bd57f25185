"""A split's WebDataset tars as training batches: open_clip's tar grouping, one of each sample's texts drawn per step.

The export writes per sample an image member (``jpg``/``png``/``webp``), ``txt`` (the caption open_clip's
own loader trains on) and ``json`` (every text: the retrieved real ones and the synthetic ones).
RealSyn trains on a random one of them each time a sample is seen; ``TrainingStream`` does the same,
seeded: the shard order is reshuffled every epoch, samples pass a shuffle buffer, and epochs repeat
until the caller stops asking for batches. Tars are opened through fsspec (local or s3://).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

SHUFFLE_BUFFER = 256
IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")


def sample_texts(sample: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(real texts, synthetic texts) of an exported sample; the ``txt`` caption alone when it has no JSON."""
    meta = sample.get("json")
    if isinstance(meta, dict):
        real = [t for t in meta.get("real_texts") or [] if isinstance(t, str) and t.strip()]
        synthetic = [t for t in meta.get("synthetic_texts") or [] if isinstance(t, str) and t.strip()]
        if real or synthetic:
            return real, synthetic
    txt = sample.get("txt")
    return ([txt] if isinstance(txt, str) and txt.strip() else []), []


class TrainingStream:
    """Endless (image, text) pairs from the tars of a split; ``counts`` tallies what was read, drawn and skipped."""

    def __init__(
        self, fs: Any, tar_paths: Sequence[str], *, seed: int = 0, shuffle_buffer: int = SHUFFLE_BUFFER, draft_size: int | None = None
    ):
        if not tar_paths:
            raise ValueError("the split has no tar shards to train on")
        self.fs, self.tar_paths, self.seed, self.shuffle_buffer = fs, list(tar_paths), seed, shuffle_buffer
        self.draft_size = draft_size
        self.counts: Counter[str] = Counter()
        self.rng = random.Random(seed)

    def _open(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in src:
            with self.fs.open(item["url"], "rb") as stream:
                yield {"url": item["url"], "stream": stream}

    def _skip(self, exn: Exception) -> bool:
        self.counts[f"skipped_{type(exn).__name__}"] += 1
        return True  # skip the bad member or sample and go on (counted)

    def epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        """One pass over the shards (reshuffled per epoch), samples decoded (images as PIL RGB), shuffled."""
        import webdataset as wds
        from open_clip_train.data import group_by_keys_nothrow

        order = list(self.tar_paths)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        samples = group_by_keys_nothrow(wds.tariterators.tar_file_expander(self._open({"url": u} for u in order), handler=self._skip))
        shuffled = wds.filters._shuffle(
            samples, bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(self.seed + epoch)
        )
        for sample in shuffled:
            try:
                yield self._decode(sample)
            except Exception as e:  # a corrupt image or JSON member: skipped and counted
                self._skip(e)

    def _decode(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Image members as PIL RGB (JPEGs decoded at a reduced scale near ``draft_size``: the model sees 64-224 px),
        ``json`` parsed, ``txt`` as str."""
        import io
        import json

        from PIL import Image

        out = dict(sample)
        for key in IMAGE_KEYS:
            if key in sample:
                image = Image.open(io.BytesIO(sample[key]))
                if self.draft_size:
                    image.draft("RGB", (self.draft_size, self.draft_size))  # JPEG only: DCT scaling, no full decode
                out[key] = image.convert("RGB")
        if "json" in sample:
            out["json"] = json.loads(sample["json"])
        if "txt" in sample:
            out["txt"] = sample["txt"].decode("utf-8")
        return out

    def pairs(self) -> Iterator[tuple[Any, str]]:
        """(PIL image, one text drawn from the sample's real and synthetic texts), epoch after epoch."""
        epoch = 0
        while True:
            produced = 0
            for sample in self.epoch(epoch):
                image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
                real, synthetic = sample_texts(sample)
                if image is None or not (real or synthetic):
                    self.counts["skipped_no_image_or_text"] += 1
                    continue
                pick = self.rng.randrange(len(real) + len(synthetic))
                self.counts["drawn_real_text" if pick < len(real) else "drawn_synthetic_text"] += 1
                self.counts["samples_read"] += 1
                produced += 1
                yield image, (real + synthetic)[pick]
            if not produced:
                raise ValueError(f"no usable sample in {len(self.tar_paths)} tar shards ({dict(self.counts)})")
            epoch += 1
            self.counts["epochs"] = epoch

    def batches(self, batch_size: int, preprocess: Callable[[Any], Any]) -> Iterator[tuple[Any, list[str]]]:
        """Endless (images [B, 3, H, W], texts) batches."""
        import torch

        images, texts = [], []
        for image, text in self.pairs():
            images.append(preprocess(image))
            texts.append(text)
            if len(images) == batch_size:
                yield torch.stack(images), texts
                images, texts = [], []
