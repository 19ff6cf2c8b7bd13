"""The public predictor API on the tiny model with real photos (scikit-image's sample images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
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
        assert [(s.id, s.category_id, s.isthing) for s in a.segments] == [
            (s.id, s.category_id, s.isthing) for s in b.segments
        ]
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
    # only stuff classes: no instance can exist, and post-processing must not fail on zero instance masks
    vocab = odise_model.load_vocabulary(["sky [stuff]", "grass [stuff]", "wall [stuff]"])
    result = odise_model.Predictor(model, vocab).predict(photos[0])[0]
    _check_result(result, photos[0].shape, vocab)
    assert result.instances == []


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
    images = [
        rng.integers(0, 255, shape, dtype=np.uint8) for shape in [(3, 2000, 3), (2000, 3, 3), (1, 1, 3)]
    ]
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


def _raw_equal(a, b) -> None:
    np.testing.assert_array_equal(a.panoptic, b.panoptic)
    np.testing.assert_array_equal(a.semantic, b.semantic)
    assert a.segments == b.segments
    for name in ("instance_category_ids", "instance_boxes", "instance_masks_packed"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    # instance scores average mask probabilities over all pixels: torch splits that sum across threads
    # differently for a different number of rows, so the last bits may differ (the order does not)
    np.testing.assert_allclose(a.instance_scores, b.instance_scores, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(a.segment_queries, b.segment_queries)
    assert (a.uncertainty, a.branch_disagreement) == (b.uncertainty, b.branch_disagreement)


@pytest.mark.usefixtures("one_torch_thread")
def test_chunked_postprocessing_is_identical(model, photos):
    """The out-of-memory fallback (post-processing a few queries at a time, never ``Q x H x W`` at once) gives
    the same panoptic map, segments, semantic map and instance masks, boxes and classes, bit for bit, as the
    normal path, and the same instance scores up to float summation order."""
    vocab = odise_model.load_vocabulary("coco_panoptic")
    predictor = odise_model.Predictor(model, vocab, batch_size=2)
    outputs = predictor.infer_prepared([predictor.prepare(p) for p in photos[:2]])
    for output in outputs:
        plain = predictor.postprocess_output(output)
        assert plain.segments and len(plain.instance_scores)  # every part of the output is exercised
        for chunk in (1, 3, 8, 1000):
            _raw_equal(predictor.postprocess_output(output, chunk_queries=chunk), plain)
    # a vocabulary where no query passes the threshold: empty outputs agree as well
    empty = odise_model.Predictor(model, ["thing a", "thing b"])
    output = empty.infer_prepared([empty.prepare(photos[3])])[0]
    output.mask_cls[:, :-1] = -30.0  # every query says "no object"
    _raw_equal(empty.postprocess_output(output, chunk_queries=4), empty.postprocess_output(output))
    assert empty.postprocess_output(output).segments == []


@pytest.mark.usefixtures("one_torch_thread")
def test_branch_outputs_do_not_change_the_labels(model, photos):
    """Asking the model for each branch's top classes (``return_branches``) leaves its outputs untouched."""
    predictor = odise_model.Predictor(model, "ade20k_150", batch_size=2)
    prepared = [predictor.prepare(p) for p in photos[:2]]
    vocab_emb = model.vocabulary_embedding(predictor.vocabulary)
    args = ([p[0] for p in prepared], [p[1] for p in prepared], vocab_emb)
    plain = model.infer(*args)
    with_branches = model.infer(*args, return_branches=True)
    for (cls_a, masks_a), (cls_b, masks_b, branches) in zip(plain, with_branches, strict=True):
        assert torch.equal(cls_a, cls_b) and torch.equal(masks_a, masks_b)
        q = cls_a.shape[0]
        assert branches["diffusion_top"].shape == (q,) and branches["clip_top"].shape == (q,)
        assert int(branches["clip_top"].max()) < len(predictor.vocabulary)


@pytest.mark.usefixtures("one_torch_thread")
def test_uncertainty_and_branch_disagreement(model, photos):
    """``uncertainty`` = mean over segments of 1 - the fused top-1 probability of the segment's query (its
    segment score); ``branch_disagreement`` = share of segments whose two branches' top classes differ."""
    vocab = odise_model.load_vocabulary("coco_panoptic")
    predictor = odise_model.Predictor(model, vocab, batch_size=4)
    raws = predictor.predict_prepared_raw([predictor.prepare(p) for p in photos])
    ids = {c.id for c in vocab}
    for raw in raws:
        assert raw.segments and len(raw.segment_queries) == len(raw.segments)
        q = raw.segment_queries
        for seg, query in zip(raw.segments, q):
            assert raw.query_top_prob[query] == pytest.approx(seg.score, abs=1e-6)
            assert raw.query_top_class[query] == seg.category_id
        assert raw.uncertainty == pytest.approx(float(np.mean([1 - s.score for s in raw.segments])), abs=1e-6)
        assert 0.0 <= raw.uncertainty <= 1.0
        assert set(raw.diffusion_top_class.tolist()) <= ids and set(raw.clip_top_class.tolist()) <= ids
        differ = raw.diffusion_top_class[q] != raw.clip_top_class[q]
        assert raw.branch_disagreement == pytest.approx(float(differ.mean()))
        result = raw.to_result()
        assert (result.uncertainty, result.branch_disagreement) == (raw.uncertainty, raw.branch_disagreement)
    # the tiny model's random branches disagree somewhere, so the statistic is not trivially 0
    assert any(r.branch_disagreement > 0 for r in raws)
    # without the CLIP branch there is nothing to disagree with
    no_clip = odise_model.Predictor(model, vocab, use_clip=False).predict_prepared_raw(
        [predictor.prepare(photos[0])]
    )
    assert no_clip[0].branch_disagreement is None and no_clip[0].clip_top_class is None
    # without segments: no uncertainty either
    output = predictor.infer_prepared([predictor.prepare(photos[1])])[0]
    output.mask_cls[:, :-1] = -30.0
    empty = predictor.postprocess_output(output)
    assert empty.segments == [] and empty.uncertainty is None and empty.branch_disagreement is None


# --- the labels before this change, kept verbatim as a reference ---------------------------------------
def _reference_panoptic(mask_cls, mask_pred, isthing, object_mask_threshold, overlap_threshold):
    """``panoptic_inference`` as it was before per-query fields and chunking (segments as tuples)."""
    import torch.nn.functional as F

    num_classes = mask_cls.shape[-1] - 1
    scores, labels = F.softmax(mask_cls.float(), dim=-1).max(-1)
    masks = mask_pred.float().sigmoid()
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], masks[keep]
    height, width = masks.shape[-2:]
    panoptic = torch.zeros((height, width), dtype=torch.int32, device=masks.device)
    segments = []
    if cur_masks.shape[0] == 0:
        return panoptic, segments
    mask_ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    isthing_cpu = isthing.cpu()
    stuff_ids: dict[int, int] = {}
    current_id = 0
    for k in range(cur_classes.shape[0]):
        pred_class = int(cur_classes[k])
        thing = bool(isthing_cpu[pred_class])
        assigned = mask_ids == k
        mask_area = int(assigned.sum())
        original_area = int((cur_masks[k] >= 0.5).sum())
        mask = assigned & (cur_masks[k] >= 0.5)
        if mask_area > 0 and original_area > 0 and int(mask.sum()) > 0:
            if mask_area / original_area < overlap_threshold:
                continue
            if not thing:
                if pred_class in stuff_ids:
                    panoptic[mask] = stuff_ids[pred_class]
                    continue
                stuff_ids[pred_class] = current_id + 1
            current_id += 1
            panoptic[mask] = current_id
            segments.append((current_id, pred_class, thing, float(cur_scores[k])))
    return panoptic, segments


@pytest.mark.usefixtures("one_torch_thread")
def test_labels_equal_the_code_before_this_change(model, photos):
    """The predictor's outputs (panoptic map, segments, semantic map, instances) are exactly what the code
    before the per-query fields / chunked fallback / split inference computed: the model's forward pass
    without branch outputs, then the unchanged pure post-processing functions and the old segment loop."""
    from odise_model.postprocess import (
        instance_inference,
        mask_boxes,
        pack_masks,
        resize_mask_logits,
        semantic_argmax,
    )

    predictor = odise_model.Predictor(model, "coco_panoptic", batch_size=2)
    cfg = model.config.postprocess
    categories = predictor.vocabulary.categories
    cat_ids = torch.tensor([c.id for c in categories], dtype=torch.int32)
    isthing = torch.tensor([c.isthing for c in categories])
    prepared = [predictor.prepare(p) for p in photos]
    new = predictor.predict_prepared_raw(prepared)
    vocab_emb = model.vocabulary_embedding(predictor.vocabulary)
    old_outputs = model.infer([p[0] for p in prepared], [p[1] for p in prepared], vocab_emb)
    for (tensor, resized, original), (mask_cls, mask_logits), raw in zip(
        prepared, old_outputs, new, strict=True
    ):
        masks = resize_mask_logits(mask_logits, tuple(tensor.shape[-2:]), resized, original)
        pan, segs = _reference_panoptic(
            mask_cls, masks, isthing, cfg.object_mask_threshold, cfg.overlap_threshold
        )
        np.testing.assert_array_equal(raw.panoptic, pan.numpy())
        assert [(s.id, s.category_id, s.isthing, s.score) for s in raw.segments] == [
            (sid, categories[c].id, thing, score) for sid, c, thing, score in segs
        ]
        np.testing.assert_array_equal(raw.semantic, cat_ids[semantic_argmax(mask_cls, masks)].numpy())
        classes, scores, queries = instance_inference(
            mask_cls, masks, isthing, topk=cfg.topk_per_image, things_only=True
        )
        unique, inverse = torch.unique(queries, return_inverse=True)
        binary = masks[unique] > 0
        np.testing.assert_array_equal(raw.instance_category_ids, cat_ids[classes].numpy())
        np.testing.assert_array_equal(raw.instance_scores, scores.numpy())
        np.testing.assert_array_equal(raw.instance_boxes, mask_boxes(binary)[inverse].numpy())
        np.testing.assert_array_equal(raw.instance_masks_packed, pack_masks(binary)[inverse].numpy())
