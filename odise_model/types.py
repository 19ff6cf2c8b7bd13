"""Typed results returned by :class:`odise_model.Predictor`.

Plain dataclasses holding numpy arrays, so results can be pickled across Ray workers and used
without torch. Coordinates are in pixels of the *input* image (not the resized model input).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Segment", "Instance", "PanopticResult", "bbox_from_mask"]


def bbox_from_mask(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight COCO box ``(x, y, w, h)`` of a boolean ``HxW`` mask; ``(0, 0, 0, 0)`` when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return (0, 0, 0, 0)
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1 = int(rows[0]), int(rows[-1])
    x0, x1 = int(cols[0]), int(cols[-1])
    return (x0, y0, x1 - x0 + 1, y1 - y0 + 1)


@dataclass(frozen=True)
class Segment:
    """One panoptic segment.

    Attributes:
        id: segment id as written in ``PanopticResult.panoptic_seg`` (>= 1; 0 means unlabeled).
        category_id: stable id of the vocabulary category (``Category.id``).
        category_name: display name of the category (its first synonym).
        isthing: True for countable objects, False for amorphous stuff (merged per category).
        score: class probability of the query that produced the segment, in [0, 1].
        area: number of pixels of the segment at the input's resolution.
        bbox: tight box ``(x, y, w, h)`` in input pixels.
    """

    id: int
    category_id: int
    category_name: str
    isthing: bool
    score: float
    area: int
    bbox: tuple[int, int, int, int]


@dataclass(frozen=True)
class Instance:
    """One instance-segmentation detection (thing classes only when panoptic output is on).

    Attributes:
        category_id, category_name: as in :class:`Segment`.
        score: class probability x mean mask probability inside the mask, in [0, 1].
        mask: ``HxW`` bool at the input's resolution.
        bbox: tight box ``(x, y, w, h)`` of ``mask``.
    """

    category_id: int
    category_name: str
    score: float
    mask: np.ndarray
    bbox: tuple[int, int, int, int]


@dataclass
class PanopticResult:
    """Everything the predictor says about one image.

    Attributes:
        panoptic_seg: ``HxW`` int32 segment ids at the input's size; 0 = unlabeled.
        segments: one :class:`Segment` per id present in ``panoptic_seg`` (ids are 1..len).
        semantic_seg: ``HxW`` int32 category ids (``Category.id``) of the per-pixel argmax of the
            semantic scores, or None when semantic output is off.
        instances: detections sorted by descending score (empty when instance output is off).
        uncertainty: mean over segments of 1 - the fused top-1 class probability of the segment's query,
            in [0, 1]; None without segments (or when not computed).
        branch_disagreement: fraction of segments whose diffusion-branch and CLIP-branch top classes
            differ; None without segments or without the CLIP branch.
        height, width: the input image's size.
    """

    panoptic_seg: np.ndarray
    segments: list[Segment]
    semantic_seg: np.ndarray | None = None
    instances: list[Instance] = field(default_factory=list)
    uncertainty: float | None = None
    branch_disagreement: float | None = None

    @property
    def height(self) -> int:
        return int(self.panoptic_seg.shape[0])

    @property
    def width(self) -> int:
        return int(self.panoptic_seg.shape[1])
