"""Train one objective on a split for a fixed number of steps, then score it on the held-out set."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from realsyn.evaluation.heldout import HeldOutSet
from realsyn.evaluation.metrics import recall_at_k, zeroshot_accuracy, zeroshot_classifier


@dataclass
class TrainSettings:
    """How long and how hard each objective trains (the embedded defaults: a few CPU seconds)."""

    model: str = "RealSyn-Tiny"
    steps: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 3
    seed: int = 0
    device: str = "cpu"
    eval_batch_size: int = 64

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.lr <= 0:
            raise ValueError("warmup_steps must be >= 0 and lr > 0")


@dataclass
class ObjectiveRun:
    objective: str
    curve: list[dict[str, float]] = field(default_factory=list)  # per step: step, loss, lr
    metrics: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    samples_seen: int = 0


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warmup, then cosine decay to zero at the last step (open_clip's default schedule)."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    span = max(1, settings.steps - settings.warmup_steps)
    return 0.5 * settings.lr * (1 + math.cos(math.pi * (step - settings.warmup_steps) / span))


def train_objective(trainee: Any, batches, settings: TrainSettings) -> ObjectiveRun:
    """``settings.steps`` optimizer steps of ``trainee`` (objectives.Trainee) on ``batches`` ((images, texts), endless)."""
    import torch

    run = ObjectiveRun(trainee.objective)
    decay = [p for p in trainee.parameters() if p.ndim >= 2]
    no_decay = [p for p in trainee.parameters() if p.ndim < 2]  # gains, biases, temperature: open_clip exempts them
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr
    )
    trainee.model.train()
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        for step in range(settings.steps):
            images, texts = next(batches)
            lr = learning_rate(step, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = trainee.loss(images.to(settings.device), texts)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            trainee.after_step()
            run.samples_seen += len(texts)
            run.curve.append({"step": step, "loss": float(loss.detach()), "lr": lr})
    run.train_seconds = time.perf_counter() - started
    return run


def evaluate(trainee: Any, heldout: HeldOutSet, batch_size: int = 64) -> dict[str, float]:
    """Zero-shot accuracy over the labelled images, retrieval recall@1/5 over the captioned ones."""
    import torch

    trainee.model.eval()
    features = []
    for start in range(0, heldout.size, batch_size):
        idx = range(start, min(start + batch_size, heldout.size))
        images = torch.stack([trainee.preprocess_val(heldout.load_image(i)) for i in idx]).to(trainee.device)
        features.append(trainee.encode_images(images))
    image_features = np.concatenate(features) if features else np.zeros((0, 1))
    out: dict[str, float] = {}
    labelled = [i for i, y in enumerate(heldout.labels) if y is not None]
    if labelled:
        weights = zeroshot_classifier(trainee.encode_texts, heldout.classnames, heldout.templates, normalize=trainee.normalized_space)
        scores = image_features[labelled] @ weights
        out.update({f"zeroshot_{k}": v for k, v in zeroshot_accuracy(scores, [heldout.labels[i] for i in labelled]).items()})
        out["zeroshot_images"] = len(labelled)
        out["zeroshot_classes"] = len(heldout.classnames)
    captioned = [i for i, c in enumerate(heldout.captions) if c]
    if captioned:
        texts = [t for i in captioned for t in heldout.captions[i]]
        owner = [k for k, i in enumerate(captioned) for _ in heldout.captions[i]]
        text_features = np.concatenate([trainee.encode_texts(texts[s : s + batch_size]) for s in range(0, len(texts), batch_size)])
        out.update(recall_at_k(image_features[captioned] @ text_features.T, owner))
        out["retrieval_images"], out["retrieval_texts"] = len(captioned), len(texts)
    return out


def train_and_evaluate(
    objectives: Sequence[str], stream_factory, heldout: HeldOutSet, settings: TrainSettings
) -> tuple[dict[str, ObjectiveRun], dict[str, int]]:
    """Each objective from fresh random weights on a fresh stream of the split (same seed, same batches' images).

    ``stream_factory(draft_size=...)`` returns a ``data.TrainingStream`` (JPEGs decoded near twice the model's
    input size); returns the runs and each stream's counts.
    """
    from realsyn.evaluation.objectives import build_trainee

    runs, counts = {}, {}
    for objective in objectives:
        trainee = build_trainee(objective, settings.model, seed=settings.seed, device=settings.device)
        size = trainee.model.visual.preprocess_cfg["size"]
        stream = stream_factory(draft_size=2 * max(size if isinstance(size, (tuple, list)) else (size,)))
        run = train_objective(trainee, stream.batches(settings.batch_size, trainee.preprocess_train), settings)
        t0 = time.perf_counter()
        run.metrics = evaluate(trainee, heldout, settings.eval_batch_size)
        run.eval_seconds = time.perf_counter() - t0
        run.metrics["final_loss"] = float(np.mean([p["loss"] for p in run.curve[-max(1, len(run.curve) // 10) :]]))
        runs[objective] = run
        for k, v in stream.counts.items():
            counts[f"{objective}/{k}"] = int(v)
    return runs, counts
