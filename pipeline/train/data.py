"""Training data: labeled WebDataset shards -> augmented, deterministic, resumable training samples.

Pipeline, per worker (``rank`` of ``world_size``):

1. **Global order.** Epoch ``e`` reads the shards in an order shuffled with ``(seed, e)`` and streams their
   samples (raw bytes, nothing decoded) through a shuffle buffer of ``shuffle_buffer`` samples drawn with
   the same RNG. Every worker computes the same global order. A training step consumes
   ``per_worker_batch * world_size`` consecutive samples of it; sample ``j`` of a step goes to worker
   ``j % world_size``; an epoch that runs out in the middle of a step continues with the next epoch.
2. **Position.** :class:`DataPosition` ``(epoch, index)`` counts the samples of the global order consumed
   so far; it is saved in checkpoints. Resuming replays the epoch's order and skips ``index`` samples
   without decoding them, so a resumed run sees exactly the samples an uninterrupted run would.
3. **Decoding** (own samples only): image, panoptic PNG and ``segments.json`` (:mod:`pipeline.groundtruth`).
   Crowd segments are dropped (official). Category ids map to class indices of the training vocabulary.
4. **Augmentation** (COCO LSJ, as detectron2's ``RandomFlip`` + ``ResizeScale(0.1, 2.0)`` +
   ``FixedSizeCrop(pad=True)``, see :func:`lsj_augment`), with an RNG seeded by
   ``(seed, epoch, index of the sample in the epoch)``: the same sample gets the same augmentation whatever
   the number of workers and whether the run was resumed.
5. **Targets**: one binary mask per remaining segment that still has pixels after the crop (the official
   mapper keeps segments cropped away as empty masks; we drop them, an empty target only teaches the
   matcher noise), plus the class index. Image tensor ``3xSxS`` in [0, 1], pad pixels 128/255 (detectron2's
   pad value), GT VOID in the padding; then padded with 0 to a multiple of ``size_divisibility``.

Caption nouns (caption supervision)
-----------------------------------
The official code extracts noun phrases with NLTK's tagger, whose models must be downloaded at run time
(not allowed here). We use, in this order:

* a ``nouns`` list stored in the sample's ``segments.json`` (extracted offline by whatever tool the
  dataset owner likes, e.g. NLTK or spaCy), when present (with several ``captions``: a list of lists,
  one per caption);
* otherwise :func:`extract_nouns` (:mod:`odise_model.vocabulary`, the same extractor as ``--caption``): a
  pure-Python matcher of caption words against a lexicon (every synonym of the built-in vocabularies, a
  shipped list of frequent caption nouns, plus the training vocabulary), longest phrase first, with
  English plurals. It finds the object and stuff names a caption mentions, which is what the grounding
  loss uses; it misses nouns outside the lexicon (documented deviation; measured recall in
  :mod:`odise_model.vocabulary`).

With several ``captions`` (COCO Captions has ~5 per image), one is drawn at random each time the image
is used, as the official caption mapper does. ``num_words`` (official 8) words are then sampled with replacement per image; an image without any noun
gets no words (its grounding terms are masked out).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from odise_model.vocabulary import extract_nouns, noun_lexicon

__all__ = [
    "TrainSample",
    "DataPosition",
    "TrainDataStream",
    "lsj_augment",
    "vocabulary_from_categories",
    "training_vocabulary",
    "class_index_map",
    "extract_nouns",
    "noun_lexicon",
    "write_synthetic_shapes_dataset",
    "SYNTHETIC_CATEGORIES",
]

logger = logging.getLogger(__name__)

PAD_VALUE = 128
"""Image value of the crop padding (detectron2 ``FixedSizeCrop(pad_value=128)``)."""


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainSample:
    """One augmented training image with its targets.

    Attributes:
        image: ``3xHxW`` float32 in [0, 1] (H = W = crop size rounded up to ``size_divisibility``).
        labels: ``T`` int64 class indices into the training vocabulary.
        masks: ``TxHxW`` bool, one per segment, covering the same ``HxW`` as ``image``.
        words: caption words (``num_words`` sampled with replacement) or ``[]``.
        key: the WebDataset key of the source sample.
        epoch, index: where the sample sits in the global order.
    """

    image: Any
    labels: Any
    masks: Any
    words: list[str]
    key: str
    epoch: int
    index: int


@dataclass
class DataPosition:
    """Position in the global sample order: ``index`` samples of epoch ``epoch`` consumed (by all workers)."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> DataPosition:
        if not d:
            return cls()
        return cls(epoch=int(d["epoch"]), index=int(d["index"]))


# --------------------------------------------------------------------------------------------------
# Vocabulary helpers
# --------------------------------------------------------------------------------------------------


def training_vocabulary(
    vocab: str | None,
    categories: Mapping[int, Mapping[str, Any]],
    *,
    source: str = "<categories.json>",
    storage_options: Mapping[str, Any] | None = None,
):
    """The vocabulary a training run uses.

    1. ``vocab`` when given (a ``classes.txt`` path / URL or a built-in name);
    2. else, when ``categories`` carry names only and are a built-in vocabulary (same ids and thing /
       stuff flags, e.g. COCO panoptic converted with ``odise-convert``), that built-in, whose
       prompt-engineered synonyms are what the official model is trained with;
    3. else :func:`vocabulary_from_categories`.
    """
    from odise_model.vocabulary import load_vocabulary, matching_builtin_vocabulary

    if vocab:
        return load_vocabulary(vocab, storage_options=dict(storage_options or {}))
    if not any(info.get("synonyms") for info in categories.values()):
        builtin = matching_builtin_vocabulary(categories)
        if builtin:
            logger.info(
                "%s: the categories are built-in vocabulary %r (same ids and thing/stuff flags); training "
                "with its synonyms, as the official model (set vocab to override)",
                source,
                builtin,
            )
            return load_vocabulary(builtin)
    return vocabulary_from_categories(categories, source=source)


def vocabulary_from_categories(
    categories: Mapping[int, Mapping[str, Any]], source: str = "<categories.json>"
):
    """A :class:`odise_model.Vocabulary` from COCO categories ``{id: {"name", "isthing", ["synonyms"]}}``.

    The class order is the order of ``categories``; a ``synonyms`` list (as written by
    ``Vocabulary.coco_categories``) is used when present, else the name alone.

    Classes may share display names and synonyms (the vocabulary allows repeats, as a file with
    ``#! allow-repeats`` does): a dataset's categories are keyed by id, and an output labelled with
    ``--preset demo`` has COCO's, ADE20K's and LVIS's ``person`` as three classes. Such classes get the
    same text embedding, so the model cannot tell them apart (a training run logs how many repeat).
    """
    from odise_model.vocabulary import Category, Vocabulary

    cats = []
    for cat_id, info in categories.items():
        name = str(info["name"]).strip()
        synonyms = tuple(str(s).strip() for s in info.get("synonyms") or [name])
        if synonyms[0] != name:
            synonyms = (name, *[s for s in synonyms if s != name])
        cats.append(Category(int(cat_id), name, synonyms, bool(info.get("isthing", 1))))
    vocabulary = Vocabulary(tuple(cats), source=source, allow_repeats=True)
    repeated = len(cats) - len({c.name.casefold() for c in cats})
    if repeated:
        logger.info(
            "%s: %d categor%s repeat an earlier display name (e.g. a --preset demo output); they are kept "
            "as separate classes, told apart by id only",
            source,
            repeated,
            "y" if repeated == 1 else "ies",
        )
    return vocabulary


def class_index_map(
    vocabulary, categories: Mapping[int, Any] | None = None, *, where: str = "dataset"
) -> dict[int, int]:
    """``{category_id: class index}`` of a vocabulary; checks that every dataset category is in it."""
    mapping = {c.id: k for k, c in enumerate(vocabulary)}
    if categories is not None:
        missing = sorted(set(int(c) for c in categories) - set(mapping))
        if missing:
            raise ValueError(
                f"{where}: category ids {missing[:20]} are not in the training vocabulary {vocabulary.source} "
                f"(ids {sorted(mapping)[:20]}...)"
            )
    return mapping


# Caption nouns: ``extract_nouns`` and ``noun_lexicon`` come from :mod:`odise_model.vocabulary` (one
# implementation for training and ``--caption``) and are re-exported here.


# --------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------


def lsj_augment(
    image: np.ndarray,
    id_map: np.ndarray,
    *,
    crop_size: int,
    min_scale: float,
    max_scale: float,
    rng: np.random.Generator,
    flip: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """COCO large-scale jitter, as detectron2 ``[RandomFlip(), ResizeScale(min, max, S, S), FixedSizeCrop((S, S))]``.

    1. horizontal flip with probability 0.5;
    2. scale ``s ~ U(min_scale, max_scale)``; resize by ``r = min(S*s/H, S*s/W)`` to ``round(H*r) x round(W*r)``
       (image bilinear, ids nearest, PIL);
    3. crop ``S x S`` at offset ``round(max(size - S, 0) * u)``, one ``u ~ U(0, 1)`` for both axes;
    4. pad bottom / right to ``S x S``: image with 128, ids with 0 (VOID).

    Args:
        image: ``HxWx3`` uint8; id_map: ``HxW`` int32 segment ids (0 = VOID).
    Returns:
        ``(SxSx3 uint8 image, SxS int32 ids)``.
    """
    from PIL import Image

    # 1. flip
    if flip and rng.random() < 0.5:
        image, id_map = image[:, ::-1], id_map[:, ::-1]
    # 2. resize scale
    height, width = id_map.shape
    scale = rng.uniform(min_scale, max_scale)
    ratio = min(crop_size * scale / height, crop_size * scale / width)
    new_h, new_w = max(1, int(round(height * ratio))), max(1, int(round(width * ratio)))
    if (new_h, new_w) != (height, width):
        image = np.asarray(
            Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h), Image.BILINEAR)
        )
        id_map = np.asarray(
            Image.fromarray(np.ascontiguousarray(id_map, dtype=np.int32)).resize(
                (new_w, new_h), Image.NEAREST
            )
        ).astype(np.int32)
    # 3. crop
    u = rng.uniform(0.0, 1.0)
    off_y = int(round(max(new_h - crop_size, 0) * u))
    off_x = int(round(max(new_w - crop_size, 0) * u))
    image = image[off_y : off_y + crop_size, off_x : off_x + crop_size]
    id_map = id_map[off_y : off_y + crop_size, off_x : off_x + crop_size]
    # 4. pad
    out_img = np.full((crop_size, crop_size, 3), PAD_VALUE, dtype=np.uint8)
    out_ids = np.zeros((crop_size, crop_size), dtype=np.int32)
    out_img[: image.shape[0], : image.shape[1]] = image
    out_ids[: id_map.shape[0], : id_map.shape[1]] = id_map
    return out_img, out_ids


# --------------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------------


@dataclass
class _RawSample:
    shard: str
    key: str
    files: dict[str, bytes] = field(repr=False)


class TrainDataStream:
    """Deterministic, resumable, sharded-by-worker stream of augmented training samples (see module doc).

    Args:
        urls: labeled shards: a dataset folder (all ``*.tar``), one shard or a list of shard URLs.
        class_index: ``{category_id: class index}`` of the training vocabulary.
        crop_size: LSJ output size S (official 1024).
        seed: seed of the order and of the augmentations.
        rank, world_size: this worker and the number of workers.
        min_scale, max_scale: LSJ scale range (official 0.1, 2.0).
        size_divisibility: pad images to a multiple of this (the model's, 64).
        shuffle_buffer: samples held for shuffling (raw bytes).
        num_words: caption words sampled per image (0: no words).
        lexicon: phrases for :func:`extract_nouns` (None: no extraction from captions; stored
            ``nouns`` are still used).
        categories: dataset categories, to check segment category ids while decoding.
        storage_options: fsspec options.
        position: where to start (resume).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        class_index: Mapping[int, int],
        crop_size: int,
        seed: int = 42,
        rank: int = 0,
        world_size: int = 1,
        min_scale: float = 0.1,
        max_scale: float = 2.0,
        size_divisibility: int = 64,
        shuffle_buffer: int = 512,
        num_words: int = 0,
        lexicon: frozenset[str] | None = None,
        categories: Mapping[int, Any] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        position: DataPosition | None = None,
    ) -> None:
        from pipeline.groundtruth import list_shards

        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if crop_size < 1 or not 0 < min_scale <= max_scale:
            raise ValueError(f"bad LSJ settings: crop_size={crop_size}, scale=({min_scale}, {max_scale})")
        self.storage_options = dict(storage_options or {})
        self.shards = (
            list_shards(urls, storage_options=self.storage_options) if isinstance(urls, str) else list(urls)
        )
        if not self.shards:
            raise ValueError(f"no training shards in {urls!r}")
        self.class_index = dict(class_index)
        self.crop_size = crop_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.min_scale, self.max_scale = min_scale, max_scale
        self.size_divisibility = size_divisibility
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.num_words = num_words
        self.lexicon = lexicon
        self.categories = categories
        self.position = DataPosition(**(position or DataPosition()).to_dict())
        self._iter: Iterator[_RawSample] | None = None

    # --- global order ------------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> Iterator[_RawSample]:
        """The raw samples of one epoch in the global shuffled order (identical on every worker)."""
        from pipeline.groundtruth import iter_shard_samples

        rng = np.random.default_rng([self.seed, epoch, 0x5EED])
        buffer: list[_RawSample] = []
        for s in rng.permutation(len(self.shards)):
            shard = self.shards[int(s)]
            for key, files in iter_shard_samples(shard, self.storage_options):
                buffer.append(_RawSample(shard, key, files))
                if len(buffer) >= self.shuffle_buffer:
                    j = int(rng.integers(len(buffer)))
                    buffer[j], buffer[-1] = buffer[-1], buffer[j]
                    yield buffer.pop()
        while buffer:
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            yield buffer.pop()

    def _next_raw(self) -> tuple[_RawSample, int, int]:
        """Next raw sample of the global order, its epoch and index; advances the position."""
        for _attempt in range(2):
            if self._iter is None:
                self._iter = self._epoch_order(self.position.epoch)
                for _ in range(self.position.index):  # resume: skip without decoding
                    if next(self._iter, None) is None:
                        raise ValueError(
                            f"cannot resume at {self.position}: epoch {self.position.epoch} has fewer samples"
                        )
            raw = next(self._iter, None)
            if raw is not None:
                epoch, index = self.position.epoch, self.position.index
                self.position.index += 1
                return raw, epoch, index
            if self.position.index == 0:
                raise ValueError(f"the training shards hold no samples: {self.shards[:3]}...")
            self.position = DataPosition(self.position.epoch + 1, 0)
            self._iter = None
        raise AssertionError("unreachable")  # pragma: no cover

    def next_batch(self, per_worker_batch: int) -> list[TrainSample]:
        """Consume ``per_worker_batch * world_size`` global samples and decode this worker's share."""
        own = []
        for j in range(per_worker_batch * self.world_size):
            raw, epoch, index = self._next_raw()
            if j % self.world_size == self.rank:
                own.append((raw, epoch, index))
        return [self.decode(raw, epoch, index) for raw, epoch, index in own]

    # --- one sample -------------------------------------------------------------------------------------
    def decode(self, raw: _RawSample, epoch: int, index: int) -> TrainSample:
        """Decode, augment and build the targets of one sample (deterministic in ``(seed, epoch, index)``)."""
        import torch

        from pipeline.groundtruth import record_from_sample

        record = record_from_sample(raw.key, raw.files, raw.shard, self.categories)
        if record.image_bytes is None:
            raise ValueError(f"{raw.shard}: sample {raw.key!r} has no image")
        image = record.decode_image()
        if image.shape[:2] != record.id_map.shape:
            raise ValueError(
                f"{raw.shard}: sample {raw.key!r}: image {image.shape[:2]} and panoptic PNG {record.id_map.shape} differ"
            )
        rng = np.random.default_rng([self.seed, epoch, index, 0xA06])
        image, id_map = lsj_augment(
            image,
            record.id_map,
            crop_size=self.crop_size,
            min_scale=self.min_scale,
            max_scale=self.max_scale,
            rng=rng,
        )
        labels, masks = [], []
        for seg in record.segments:
            if seg.iscrowd:
                continue
            if seg.category_id not in self.class_index:
                raise ValueError(
                    f"{raw.shard}: sample {raw.key!r}: category {seg.category_id} is not in the training vocabulary"
                )
            mask = id_map == seg.id
            if mask.any():
                labels.append(self.class_index[seg.category_id])
                masks.append(mask)
        size = -(-self.crop_size // self.size_divisibility) * self.size_divisibility
        tensor = torch.zeros(3, size, size)
        tensor[:, : self.crop_size, : self.crop_size] = (
            torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255.0
        )
        mask_tensor = torch.zeros(len(masks), size, size, dtype=torch.bool)
        if masks:
            mask_tensor[:, : self.crop_size, : self.crop_size] = torch.from_numpy(np.stack(masks))
        return TrainSample(
            image=tensor,
            labels=torch.tensor(labels, dtype=torch.int64),
            masks=mask_tensor,
            words=self._words(raw, record.caption, rng),
            key=raw.key,
            epoch=epoch,
            index=index,
        )

    def _words(self, raw: _RawSample, caption: str | None, rng: np.random.Generator) -> list[str]:
        if self.num_words <= 0:
            return []
        meta = json.loads(raw.files["segments.json"].decode("utf-8"))
        nouns = meta.get("nouns")
        several = [str(c) for c in meta.get("captions") or [] if isinstance(c, str) and c.strip()]
        if len(several) > 1:
            # one caption drawn at random each time the image is used, as the official caption mapper
            pick = int(rng.integers(len(several)))
            caption = several[pick]
            if (
                isinstance(nouns, list)
                and len(nouns) == len(several)
                and all(isinstance(n, list) for n in nouns)
            ):
                nouns = nouns[pick]  # stored per caption
        if isinstance(nouns, list) and any(isinstance(n, list) for n in nouns):
            nouns = [w for n in nouns for w in (n if isinstance(n, list) else [n])]
        if nouns is None and caption and self.lexicon is not None:
            nouns = extract_nouns(caption, self.lexicon)
        nouns = [str(n) for n in (nouns or []) if str(n).strip()]
        if not nouns:
            return []
        return [nouns[int(i)] for i in rng.integers(len(nouns), size=self.num_words)]


# --------------------------------------------------------------------------------------------------
# A synthetic dataset (tests, learnability check, plumbing)
# --------------------------------------------------------------------------------------------------

SYNTHETIC_CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "circle", "isthing": 1},
    {"id": 2, "name": "square", "isthing": 1},
    {"id": 3, "name": "triangle", "isthing": 1},
    {"id": 4, "name": "stripes", "isthing": 0},
    {"id": 5, "name": "noise", "isthing": 0},
]
"""Categories of :func:`write_synthetic_shapes_dataset`: three shapes (things), two textures (stuff)."""


# with colour coding, each shape category has its own hue (brightness and saturation still vary)
_SHAPE_HUES = {1: 0.0, 2: 1 / 3, 3: 2 / 3}


def _synthetic_image(
    rng: np.random.Generator, size: int, max_shapes: int, colour_coded: bool = False
) -> tuple[np.ndarray, np.ndarray, list[dict], str]:
    """One image: two stuff regions (stripes / noise) split by a random line, 1..max_shapes solid shapes.

    Shapes have random colours, or with ``colour_coded`` a per-category hue (red circles, green squares,
    blue triangles, with random brightness / saturation), which makes classes learnable from colour as well
    as shape.
    """
    height = width = size
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.zeros((height, width, 3), dtype=np.uint8)
    id_map = np.zeros((height, width), dtype=np.int32)
    segments: list[dict] = []
    # stuff: a random straight split into two regions, each stripes or noise
    angle = rng.uniform(0, np.pi)
    offset = rng.uniform(-0.25, 0.25) * size
    side = (np.cos(angle) * (xx - width / 2) + np.sin(angle) * (yy - height / 2)) > offset
    stuff_classes = rng.integers(4, 6, size=2)
    if stuff_classes[0] == stuff_classes[1]:
        regions = [np.ones_like(side)]
        stuff_classes = stuff_classes[:1]
    else:
        regions = [side, ~side]
    names = {4: "stripes", 5: "noise"}
    for region, cat in zip(regions, stuff_classes):
        base = rng.integers(40, 216, size=3)
        if cat == 4:  # stripes: two colours alternating along a random direction
            other = rng.integers(40, 216, size=3)
            theta = rng.uniform(0, np.pi)
            period = rng.uniform(6, 12)
            phase = (np.cos(theta) * xx + np.sin(theta) * yy) / period
            texture = np.where((np.floor(phase) % 2 == 0)[..., None], base, other)
        else:  # noise: per-pixel colour noise around a base colour
            texture = np.clip(base + rng.normal(0, 45, size=(height, width, 3)), 0, 255)
        image[region] = texture[region].astype(np.uint8)
        seg_id = len(segments) + 1
        id_map[region] = seg_id
        segments.append({"id": seg_id, "category_id": int(cat), "iscrowd": 0})
    # things: solid shapes drawn in order (later ones occlude earlier ones)
    shape_names = {1: "circle", 2: "square", 3: "triangle"}
    drawn = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        cat = int(rng.integers(1, 4))
        r = rng.uniform(0.09, 0.2) * size
        cy, cx = rng.uniform(r, height - r), rng.uniform(r, width - r)
        if cat == 1:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        elif cat == 2:
            mask = (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
        else:  # upright triangle
            top, bottom = cy - r, cy + r * 0.8
            half = (yy - top) / (bottom - top) * r
            mask = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)
        if colour_coded:
            import colorsys

            rgb = colorsys.hsv_to_rgb(
                _SHAPE_HUES[cat] + rng.uniform(-0.04, 0.04), rng.uniform(0.7, 1.0), rng.uniform(0.6, 1.0)
            )
            colour = (np.array(rgb) * 255).astype(np.int64) % 256
        else:
            colour = rng.integers(0, 256, size=3)
        image[mask] = colour
        seg_id = len(segments) + 1
        id_map[mask] = seg_id
        segments.append({"id": seg_id, "category_id": cat, "iscrowd": 0})
        drawn.append(shape_names[cat])
    # keep segments that are still visible and large enough; recompute areas and boxes
    kept = []
    for seg in segments:
        mask = id_map == seg["id"]
        area = int(mask.sum())
        if area < 20:
            id_map[mask] = 0
            continue
        ys, xs = np.nonzero(mask)
        seg["area"] = area
        seg["bbox"] = [
            int(xs.min()),
            int(ys.min()),
            int(xs.max() - xs.min() + 1),
            int(ys.max() - ys.min() + 1),
        ]
        kept.append(seg)
    counts = {n: drawn.count(n) for n in dict.fromkeys(drawn)}
    things = " and ".join(f"{c} {n}s" if c > 1 else f"a {n}" for n, c in counts.items())
    stuff = " and ".join(names[int(c)] for c in stuff_classes)
    caption = f"{things} on {stuff}"
    return image, id_map, kept, caption


def write_synthetic_shapes_dataset(
    out_url: str,
    *,
    num_images: int,
    size: int = 128,
    seed: int = 0,
    max_shapes: int = 3,
    samples_per_shard: int = 64,
    store_nouns: bool = False,
    colour_coded: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write a synthetic panoptic dataset as labeled shards (format of :mod:`pipeline.groundtruth`).

    Things: circles, squares and triangles of random colours and sizes (1..``max_shapes`` per image, later
    ones occluding earlier ones); stuff: two background textures (``stripes``, ``noise``) split by a random
    line. Images are PNG (lossless), ``size x size``; each sample has a caption ("a circle and 2 squares on
    stripes and noise"); with ``store_nouns`` also a ``nouns`` list (the category names present, as an
    offline noun extractor would store them); ``colour_coded`` gives each shape category its own hue.
    Categories: :data:`SYNTHETIC_CATEGORIES`. Deterministic in ``seed``.

    Returns:
        the shard URLs.
    """
    import fsspec.core
    from PIL import Image
    from webdataset.writer import TarWriter

    from pipeline.groundtruth import encode_panoptic_png, write_categories

    options = dict(storage_options or {})
    fs, path = fsspec.core.url_to_fs(out_url, **options)
    fs.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards: list[str] = []
    writer = handle = None
    for i in range(num_images):
        if i % samples_per_shard == 0:
            if writer is not None:
                writer.close()
                handle.close()
            name = f"shard-{len(shards):06d}.tar"
            handle = fs.open(path.rstrip("/") + "/" + name, "wb")
            writer = TarWriter(handle, encoder=False, mtime=0.0)
            shards.append(out_url.rstrip("/") + "/" + name)
        image, id_map, segments, caption = _synthetic_image(rng, size, max_shapes, colour_coded)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        key = f"{seed:04d}_{i:06d}"
        meta = {"image_id": key, "file_name": f"{key}.png", "segments_info": segments, "caption": caption}
        if store_nouns:
            names = {c["id"]: c["name"] for c in SYNTHETIC_CATEGORIES}
            meta["nouns"] = list(dict.fromkeys(names[s["category_id"]] for s in segments))
        writer.write(
            {
                "__key__": key,
                "png": buf.getvalue(),
                "panoptic.png": encode_panoptic_png(id_map),
                "segments.json": json.dumps(meta).encode("utf-8"),
            }
        )
    if writer is not None:
        writer.close()
        handle.close()
    write_categories(SYNTHETIC_CATEGORIES, out_url, storage_options=options)
    return shards
