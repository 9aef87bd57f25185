"""Train a small model on an exported split and evaluate it: the way the papers show their data is good.

Three objectives through open_clip (``objectives``): CLIP's softmax contrastive loss
(``open_clip.loss.ClipLoss``), SigLIP's pairwise sigmoid loss (``open_clip.loss.SigLipLoss``,
learnable temperature and bias initialised at t' = log 10, b = -10) and SuperClass (no text tower: a
classifier on image features over the tokenizer's vocabulary, the caption's subword ids as targets,
weighted by an inverse document frequency counted online). ``data`` streams a split's WebDataset
tars (open_clip's tar grouping) and draws one of each sample's texts, real or synthetic, per step;
``heldout`` loads the held-out set (clip_benchmark classnames and templates, captions for
retrieval); ``metrics`` computes zero-shot accuracy and retrieval recall@k; ``train`` runs it all.
"""

from realsyn.evaluation.metrics import recall_at_k, zeroshot_accuracy, zeroshot_classifier
from realsyn.evaluation.objectives import OBJECTIVES, OnlineIDF, superclass_loss, superclass_targets

__all__ = [
    "OBJECTIVES",
    "OnlineIDF",
    "recall_at_k",
    "superclass_loss",
    "superclass_targets",
    "zeroshot_accuracy",
    "zeroshot_classifier",
]
