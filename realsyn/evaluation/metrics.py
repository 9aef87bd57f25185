"""Zero-shot classification (clip_benchmark's classifier from class names and templates) and retrieval recall@k."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def zeroshot_classifier(
    encode_texts: Callable[[list[str]], np.ndarray], classnames: Sequence[str], templates: Sequence[str], *, normalize: bool = True
) -> np.ndarray:
    """[dim, classes]: per class the mean of its prompts' text features (templates use ``{c}``, as clip_benchmark's).

    ``normalize``: unit-normalise each prompt's features and the mean (contrastive models); SuperClass's
    bag-of-subwords vectors are averaged as they are.
    """
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    columns = []
    for name in classnames:
        feats = np.asarray(encode_texts([t.format(c=name) for t in templates]), np.float64)
        if normalize:
            feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        mean = feats.mean(axis=0)
        columns.append(mean / np.linalg.norm(mean) if normalize else mean)
    return np.stack(columns, axis=1)


def zeroshot_accuracy(logits: np.ndarray, labels: Sequence[int], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``acc{k}`` for every k not above the class count, and ``mean_per_class_recall`` (clip_benchmark's names).

    Ranks by stable descending sort: of tied scores the lower class index ranks first.
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or not len(labels):
        raise ValueError(f"logits {logits.shape} and {len(labels)} labels do not match")
    order = np.argsort(-logits, axis=1, kind="stable")
    out = {}
    for k in ks:
        if k <= logits.shape[1]:
            out[f"acc{k}"] = float((order[:, :k] == labels[:, None]).any(axis=1).mean())
    top1 = order[:, 0] == labels
    out["mean_per_class_recall"] = float(np.mean([top1[labels == c].mean() for c in np.unique(labels)]))
    return out


def recall_at_k(scores: np.ndarray, text_image: Sequence[int], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Retrieval recall@k from a score matrix [images, texts]; ``text_image[j]`` is the image text j describes.

    ``text_retrieval_recall@k`` (image to text): share of images with any of their texts in the top k;
    ``image_retrieval_recall@k`` (text to image): share of texts whose image is in the top k.
    Ties rank the lower index first (stable sort).
    """
    scores = np.asarray(scores, np.float64)
    owner = np.asarray(text_image, np.int64)
    n_images, n_texts = scores.shape
    if len(owner) != n_texts:
        raise ValueError(f"{len(owner)} text owners for {n_texts} texts")
    i2t = np.argsort(-scores, axis=1, kind="stable")
    t2i = np.argsort(-scores.T, axis=1, kind="stable")
    out = {}
    for k in ks:
        out[f"text_retrieval_recall@{k}"] = float((owner[i2t[:, :k]] == np.arange(n_images)[:, None]).any(axis=1).mean())
        out[f"image_retrieval_recall@{k}"] = float((t2i[:, :k] == owner[:, None]).any(axis=1).mean())
    return out
