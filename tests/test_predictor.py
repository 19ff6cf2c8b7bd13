"""The public predictor API on the tiny model with real photos (scikit-image's sample images)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import odise_model


@pytest.fixture(scope="module")
def model():
    return odise_model.build_odise("tiny")


@pytest.fixture(scope="module")
def photos():
    import skimage.data

    return [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]


def _check_result(result, image_shape, vocab):
    ids = {c.id: c for c in vocab}
    assert result.panoptic_seg.shape == image_shape[:2]
    assert result.panoptic_seg.dtype == np.int32
    present = set(np.unique(result.panoptic_seg).tolist()) - {0}
    assert present == {s.id for s in result.segments}
    assert [s.id for s in result.segments] == list(range(1, len(result.segments) + 1))
    for seg in result.segments:
        mask = result.panoptic_seg == seg.id
        assert seg.area == int(mask.sum()) > 0
        ys, xs = np.nonzero(mask)
        assert seg.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        assert seg.category_id in ids and ids[seg.category_id].name == seg.category_name
        assert seg.isthing == ids[seg.category_id].isthing
        assert 0.0 <= seg.score <= 1.0
    assert result.semantic_seg.shape == image_shape[:2]
    assert set(np.unique(result.semantic_seg).tolist()) <= set(ids)
    for inst in result.instances:
        assert inst.mask.shape == image_shape[:2] and inst.mask.dtype == bool
        assert ids[inst.category_id].isthing
    scores = [i.score for i in result.instances]
    assert scores == sorted(scores, reverse=True)


def test_predicts_real_photos_with_builtin_vocabulary(model, photos):
    predictor = odise_model.Predictor(model, "coco_panoptic", batch_size=4)
    results = predictor.predict(photos)
    assert len(results) == len(photos)
    vocab = odise_model.load_vocabulary("coco_panoptic")
    for result, photo in zip(results, photos):
        _check_result(result, photo.shape, vocab)
    assert sum(len(r.segments) for r in results) > 0


def test_batched_equals_one_by_one(model, photos):
    """Batching pools SD tiles of several images; results equal per-image inference up to float rounding
    (batched convolutions round differently): same segments and categories, scores within 1e-4, and at most
    a handful of boundary pixels flipping between two segments."""
    batched = odise_model.Predictor(model, "ade20k_150", batch_size=4).predict(photos)
    single = [odise_model.Predictor(model, "ade20k_150", batch_size=1).predict(p)[0] for p in photos]
    for a, b in zip(batched, single):
        assert [(s.id, s.category_id, s.isthing) for s in a.segments] == [(s.id, s.category_id, s.isthing) for s in b.segments]
        for sa, sb in zip(a.segments, b.segments):
            assert sa.score == pytest.approx(sb.score, abs=1e-4)
            assert abs(sa.area - sb.area) <= max(2, sa.area // 1000)
        assert (a.panoptic_seg != b.panoptic_seg).mean() < 1e-4


def test_any_vocabulary(model, photos, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("# my classes\nastronaut, person\nspace suit\nsky, clouds [stuff]\nwall [stuff]\n")
    for spec in (str(classes), ["cat", "dog, puppy", "table"], "ade20k_150"):
        vocab = odise_model.load_vocabulary(spec)
        result = odise_model.Predictor(model, vocab).predict(photos[0])[0]
        _check_result(result, photos[0].shape, vocab)


def test_image_kinds(model):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    inputs = [
        rgb,
        Image.fromarray(rgb).convert("L"),
        Image.fromarray(rgb).convert("RGBA"),
        Image.fromarray(rgb).convert("P"),
        rgb[:, :, 0],
        rgb.astype(np.float32) / 255.0,
        rgb.astype(np.uint16) * 257,
        np.dstack([rgb, np.full((70, 90), 255, np.uint8)]),
    ]
    predictor = odise_model.Predictor(model, ["thing a", "thing b"])
    results = predictor.predict(inputs)
    assert [r.panoptic_seg.shape for r in results] == [(70, 90)] * len(inputs)
    # float / 16-bit / alpha inputs are the same picture as the uint8 one
    for k in (5, 6, 7):
        assert (results[k].panoptic_seg != results[0].panoptic_seg).mean() < 1e-3
    with pytest.raises(ValueError, match="shape"):
        predictor.predict(np.zeros((10, 10, 2), np.uint8))
    with pytest.raises(TypeError, match="numpy array or PIL image"):
        predictor.predict(["not an image"])


def test_resize_follows_detectron2_shortest_edge():
    from odise_model.predictor import resized_size

    assert resized_size(480, 640, 1024, 2560) == (1024, 1365)
    assert resized_size(640, 480, 1024, 2560) == (1365, 1024)
    assert resized_size(100, 4000, 1024, 2560) == (64, 2560)


def test_extreme_aspect_ratios_and_single_pixel_images():
    """Sizes that round a side to 0 under the shortest-edge resize still predict at the input's size."""
    import numpy as np

    import odise_model

    predictor = odise_model.Predictor(odise_model.build_odise("tiny"), ["cat", "sky [stuff]"])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in [(3, 2000, 3), (2000, 3, 3), (1, 1, 3)]]
    for image, result in zip(images, predictor.predict(images), strict=True):
        assert result.panoptic_seg.shape == image.shape[:2]


def test_caption_variant_predicts_and_round_trips(tmp_path, photos):
    """The caption variant (binary foreground head, no null embedding) on the inference path; its checkpoint
    round-trips, and a label checkpoint is refused by it with the keys that differ."""
    from odise_model import CheckpointError

    model = odise_model.build_odise("tiny_caption", seed=5)
    assert model.config.classifier.kind == "caption"
    images = photos[:2]
    vocab = odise_model.load_vocabulary(["cat", "person", "sky [stuff]"])
    predictor = odise_model.Predictor(model, vocab, batch_size=2)
    results = predictor.predict(images)
    for image, r in zip(images, results, strict=True):
        _check_result(r, image.shape, vocab)
    path = tmp_path / "caption.pth"
    odise_model.save_checkpoint(model, path)
    loaded = odise_model.build_odise("tiny_caption", checkpoint=path, seed=5)
    again = odise_model.Predictor(loaded, vocab, batch_size=2).predict(images)
    for a, b in zip(results, again, strict=True):
        np.testing.assert_array_equal(a.panoptic_seg, b.panoptic_seg)
        assert a.segments == b.segments
    label = tmp_path / "label.pth"
    odise_model.save_checkpoint(odise_model.build_odise("tiny"), label)
    with pytest.raises(CheckpointError, match="category_head.null_embed|class_embed"):
        odise_model.build_odise("tiny_caption", checkpoint=label)
