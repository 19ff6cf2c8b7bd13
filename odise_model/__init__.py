"""ODISE open-vocabulary panoptic segmentation in plain PyTorch (diffusers + open_clip), batched.

Public API::

    import odise_model
    model = odise_model.build_odise("tiny")                  # or "odise_label_coco", pretrained=True, ...
    vocab = odise_model.load_vocabulary("classes.txt")       # or "coco_panoptic", "ade20k_150", a list of str
    predictor = odise_model.Predictor(model, vocab)
    results = predictor.predict([image_a, image_b])          # numpy HxWx3 uint8 or PIL images, any size
    results[0].panoptic_seg, results[0].segments

Heavy libraries (torch, diffusers, open_clip) are imported on first use of the model API, so importing the
package and reading vocabularies stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .types import Instance, PanopticResult, Segment
from .vocabulary import (
    BUILTIN_VOCABULARIES,
    Category,
    Vocabulary,
    VocabularyError,
    load_vocabulary,
    parse_vocabulary,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "build_odise",
    "load_config",
    "save_checkpoint",
    "Predictor",
    "ODISE",
    "ODISEConfig",
    "CheckpointError",
    "WeightsNotFoundError",
    "load_vocabulary",
    "parse_vocabulary",
    "Vocabulary",
    "VocabularyError",
    "Category",
    "BUILTIN_VOCABULARIES",
    "PanopticResult",
    "Segment",
    "Instance",
]

_LAZY = {
    "build_odise": ("build", "build_odise"),
    "load_config": ("config", "load_config"),
    "ODISEConfig": ("config", "ODISEConfig"),
    "save_checkpoint": ("checkpoint", "save_checkpoint"),
    "CheckpointError": ("weights_errors", "CheckpointError"),
    "WeightsNotFoundError": ("weights_errors", "WeightsNotFoundError"),
    "Predictor": ("predictor", "Predictor"),
    "ODISE": ("model", "ODISE"),
}

if TYPE_CHECKING:  # pragma: no cover
    from .build import build_odise
    from .checkpoint import save_checkpoint
    from .config import ODISEConfig, load_config
    from .model import ODISE
    from .predictor import Predictor
    from .weights_errors import CheckpointError, WeightsNotFoundError


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'odise_model' has no attribute {name!r}")
