"""The three training objectives, each a small open_clip model with random weights plus its loss.

- ``clip``: image and text towers, ``open_clip.loss.ClipLoss`` (softmax over the batch's similarity
  matrix, both directions), learnable temperature initialised at 1/0.07.
- ``siglip``: the same towers, ``open_clip.loss.SigLipLoss`` (a sigmoid per image-text pair),
  learnable temperature and bias initialised at t' = log 10, b = -10 (the SigLIP paper's init).
- ``superclass``: no text tower. A linear classifier on the image features over the tokenizer's
  vocabulary; a caption's targets are its subword ids (special tokens left out), each weighted by
  its inverse document frequency counted online, ``idf(w) = log((N + 1) / (df(w) + 1))`` over the N
  captions seen so far (this batch included), then normalised to sum to one: the softmax loss
  SuperClass found best, ``-sum_w y_w log softmax(logits)_w``. A word in every caption seen weighs 0.

For evaluation every objective maps images and texts into one space where a dot product scores a
pair: CLIP/SigLIP their normalised tower features; SuperClass the log-softmax of its classifier
(images) and the IDF-weighted bag of subwords (texts), so a text's score is the IDF-weighted mean
log-probability of its subwords.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

OBJECTIVES = ("clip", "siglip", "superclass")
CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
SIGLIP_INIT_LOGIT_BIAS = -10.0
MAX_LOGIT_SCALE = math.log(100.0)  # open_clip's training clamp of the learnable temperature


class OnlineIDF:
    """Document frequencies over the vocabulary, counted as batches arrive (no pass over the data first)."""

    def __init__(self, vocab_size: int):
        import torch

        self.df = torch.zeros(vocab_size, dtype=torch.float64)
        self.documents = 0

    def update(self, multi_hot) -> None:
        """Count a batch of captions, ``multi_hot`` [batch, vocab] (1 where a subword occurs)."""
        self.df += (multi_hot > 0).sum(dim=0).to(self.df.dtype).cpu()
        self.documents += int(multi_hot.shape[0])

    def weights(self):
        """``log((N + 1) / (df + 1))`` per subword, float32."""
        import torch

        return torch.log((self.documents + 1.0) / (self.df + 1.0)).float()


def superclass_targets(token_ids, vocab_size: int, ignore: set[int] | frozenset[int] = frozenset()):
    """Multi-hot [batch, vocab] of the subword ids in each row of ``token_ids`` (padding and ``ignore`` left out)."""
    import torch

    ids = token_ids.long()
    hot = torch.zeros(ids.shape[0], vocab_size, dtype=torch.float32, device=ids.device)
    hot.scatter_(1, ids, 1.0)
    for token in set(ignore) | {0}:  # 0 pads open_clip's token rows
        hot[:, token] = 0.0
    return hot


def superclass_loss(logits, multi_hot, idf):
    """SuperClass's IDF-weighted softmax loss, averaged over captions with any weight (the others add nothing)."""
    import torch

    weighted = multi_hot * idf.to(multi_hot.device)[None, :]
    mass = weighted.sum(dim=1, keepdim=True)
    rows = mass.squeeze(1) > 0
    if not bool(rows.any()):
        return logits.sum() * 0.0  # keeps the graph: no caption carried information
    targets = weighted[rows] / mass[rows]
    return -(targets * torch.log_softmax(logits[rows].float(), dim=1)).sum(dim=1).mean()


class Trainee:
    """One objective's model, loss and encoders; built by ``build_trainee``."""

    def __init__(self, objective: str, model: Any, tokenizer: Any, preprocess_train: Any, preprocess_val: Any, device: str):
        self.objective, self.model, self.tokenizer, self.device = objective, model, tokenizer, device
        self.preprocess_train, self.preprocess_val = preprocess_train, preprocess_val
        self.special_tokens = {
            t for t in (getattr(tokenizer, "sot_token_id", None), getattr(tokenizer, "eot_token_id", None)) if t is not None
        }
        if objective == "superclass":
            self.vocab_size = model.head.out_features
            self.idf = OnlineIDF(self.vocab_size)
        else:
            from open_clip.loss import ClipLoss, SigLipLoss

            self.loss_fn = ClipLoss() if objective == "clip" else SigLipLoss()

    def parameters(self):
        return self.model.parameters()

    def loss(self, images, texts: list[str]):
        """The objective's loss on a batch (images [B, 3, H, W] on the device, one text per image)."""
        tokens = self.tokenizer(texts).to(self.device)
        if self.objective == "superclass":
            hot = superclass_targets(tokens, self.vocab_size, self.special_tokens)
            self.idf.update(hot)
            return superclass_loss(self.model(images), hot, self.idf.weights())
        model = self.model
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(tokens, normalize=True)
        scale = model.logit_scale.exp()
        if self.objective == "clip":
            return self.loss_fn(image_features, text_features, scale)
        return self.loss_fn(image_features, text_features, scale, model.logit_bias)

    def after_step(self) -> None:
        import torch

        if self.objective != "superclass":
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def encode_images(self, images) -> np.ndarray:
        """Image features in the scoring space (float64 numpy)."""
        import torch

        with torch.no_grad():
            if self.objective == "superclass":
                out = torch.log_softmax(self.model(images).float(), dim=1)
            else:
                out = self.model.encode_image(images, normalize=True).float()
        return out.cpu().numpy().astype(np.float64)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Text features in the scoring space: tower features, or SuperClass's IDF-weighted bag of subwords."""
        import torch

        tokens = self.tokenizer(texts).to(self.device)
        with torch.no_grad():
            if self.objective == "superclass":
                weighted = superclass_targets(tokens, self.vocab_size, self.special_tokens) * self.idf.weights().to(tokens.device)
                mass = weighted.sum(dim=1, keepdim=True)
                out = weighted / torch.where(mass > 0, mass, torch.ones_like(mass))
            else:
                out = self.model.encode_text(tokens, normalize=True).float()
        return out.cpu().numpy().astype(np.float64)

    @property
    def normalized_space(self) -> bool:
        """Contrastive features are unit vectors (zero-shot classifiers renormalise); SuperClass's are not."""
        return self.objective != "superclass"


def _superclass_model(visual: Any, embed_dim: int, vocab_size: int) -> Any:
    """open_clip's image tower plus a linear classifier over the vocabulary (torch imported here, lazily)."""
    import torch

    class SuperClassModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = visual
            self.head = torch.nn.Linear(embed_dim, vocab_size)

        def forward(self, images):
            return self.head(self.visual(images))

    return SuperClassModel()


def build_trainee(objective: str, model_name: str = "RealSyn-Tiny", *, seed: int = 0, device: str = "cpu") -> Trainee:
    """A fresh ``objective`` model of the open_clip config ``model_name`` with random weights (seeded)."""
    import open_clip
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from realsyn.embedding.open_clip_embedder import register_model_configs

    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    register_model_configs()
    if open_clip.get_model_config(model_name) is None:
        raise ValueError(f"unknown open_clip model config {model_name!r}")
    kwargs: dict[str, Any] = {"init_logit_scale": CLIP_INIT_LOGIT_SCALE}
    if objective == "siglip":
        kwargs = {"init_logit_scale": SIGLIP_INIT_LOGIT_SCALE, "init_logit_bias": SIGLIP_INIT_LOGIT_BIAS}
    tokenizer = open_clip.get_tokenizer(model_name)
    with torch.random.fork_rng(devices=[]):  # same weights on every device; the caller's RNG untouched
        torch.manual_seed(seed)
        clip = open_clip.create_model(model_name, pretrained=None, pretrained_text=False, **kwargs)
        if objective == "superclass":
            vocab = int(getattr(tokenizer, "vocab_size", 0) or open_clip.get_model_config(model_name)["text_cfg"]["vocab_size"])
            embed_dim = int(open_clip.get_model_config(model_name)["embed_dim"])
            model = _superclass_model(clip.visual, embed_dim, vocab)  # the text tower is dropped with ``clip``
        else:
            model = clip
    model = model.to(device)
    cfg = PreprocessCfg(**model.visual.preprocess_cfg)
    return Trainee(objective, model, tokenizer, image_transform_v2(cfg, is_train=True), image_transform_v2(cfg, is_train=False), device)
