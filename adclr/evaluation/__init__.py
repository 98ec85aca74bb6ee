"""Evaluation of a frozen backbone, in layers that import only downwards:

- ``features``: the evaluation transform, ``FrozenBackbone`` and ``load_frozen_backbone``, the data splits and
  ``extract_features``, which every protocol reads;
- ``commands``: the command-line plumbing the three commands share;
- ``knn``, ``linear``, ``seg``: one protocol each, with its command (``python -m adclr.eval_knn``,
  ``adclr.eval_linear``, ``adclr.eval_seg``);
- ``during_training``: ``EvalConfig`` and ``evaluate_backbone``, the evaluation ``train.py`` runs.
"""

from .during_training import EvalConfig, evaluate_backbone
from .features import BackboneFeatures, FrozenBackbone, eval_transform, extract_features, load_frozen_backbone
from .knn import knn_evaluate, weighted_knn
from .linear import linear_probe
from .seg import seg_probe

__all__ = [
    "BackboneFeatures",
    "EvalConfig",
    "FrozenBackbone",
    "eval_transform",
    "evaluate_backbone",
    "extract_features",
    "knn_evaluate",
    "linear_probe",
    "load_frozen_backbone",
    "seg_probe",
    "weighted_knn",
]
