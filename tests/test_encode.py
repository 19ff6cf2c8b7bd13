"""pipeline.encode: panoptic PNG and RLE round trips, segment records, overlays."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from odise_model.types import Instance, PanopticResult, Segment, bbox_from_mask
from pipeline.encode import (
    category_colour,
    encode_result,
    mask_to_rle,
    panoptic_to_png,
    png_to_panoptic,
    render_overlay,
    rle_area,
    rle_bbox,
    rle_to_mask,
    segments_to_panoptic,
)


def scene(h: int = 40, w: int = 56) -> tuple[np.ndarray, PanopticResult]:
    """A photo-like image and a consistent panoptic result: sky (stuff), grass (stuff), two cats (things)."""
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx * 4, yy * 5, 128 + 0 * xx], axis=-1).clip(0, 255).astype(np.uint8)
    seg = np.where(yy < h // 2, 1, 2).astype(np.int32)
    cat1 = (yy - 25) ** 2 + (xx - 12) ** 2 < 36
    cat2 = (yy > 10) & (yy < 30) & (xx > 35) & (xx < 50)
    seg[cat1] = 3
    seg[cat2] = 4
    seg[:3, :4] = 0  # a few unlabeled pixels
    specs = {
        1: (7, "sky", False, 0.9),
        2: (8, "grass", False, 0.8),
        3: (1, "cat", True, 0.95),
        4: (1, "cat", True, 0.7),
    }
    segments = [
        Segment(i, c, n, t, s, int((seg == i).sum()), bbox_from_mask(seg == i))
        for i, (c, n, t, s) in specs.items()
    ]
    instances = [
        Instance(1, "cat", 0.93, cat1, bbox_from_mask(cat1)),
        Instance(1, "cat", 0.6, cat2, bbox_from_mask(cat2)),
    ]
    return image, PanopticResult(panoptic_seg=seg, segments=segments, instances=instances)


def test_panoptic_png_roundtrip_large_ids() -> None:
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 2**24 - 1, 123456]], np.int32)
    png = panoptic_to_png(ids)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    rgb = np.asarray(Image.open(io.BytesIO(png)))
    assert tuple(rgb[0, 3]) == (0, 1, 0) and tuple(rgb[1, 2]) == (255, 255, 255)
    out = png_to_panoptic(png)
    assert out.dtype == np.int32 and np.array_equal(out, ids)


@pytest.mark.parametrize(
    "bad", [np.array([[-1]]), np.array([[2**24]]), np.zeros((2, 2, 3), np.int32), np.zeros((2, 2))]
)
def test_panoptic_png_rejects_bad_input(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        panoptic_to_png(bad)


def test_rle_roundtrip_and_metrics() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((33, 47)) > 0.6
    rle = mask_to_rle(mask)
    assert rle["size"] == [33, 47] and isinstance(rle["counts"], str)
    json.dumps(rle)  # JSON-able
    assert np.array_equal(rle_to_mask(rle), mask)
    assert rle_area(rle) == mask.sum()
    empty = mask_to_rle(np.zeros((5, 6), bool))
    assert rle_area(empty) == 0 and rle_bbox(empty) == [0.0, 0.0, 0.0, 0.0]
    box = np.zeros((10, 10), bool)
    box[2:5, 3:9] = True
    assert rle_bbox(mask_to_rle(box)) == [3.0, 2.0, 6.0, 3.0]


def test_encode_result_records() -> None:
    _, result = scene()
    enc = encode_result(result, include_png=True)
    assert (enc["width"], enc["height"]) == (56, 40)
    assert [s["id"] for s in enc["segments"]] == [1, 2, 3, 4]
    for s in enc["segments"]:
        mask = result.panoptic_seg == s["id"]
        assert np.array_equal(rle_to_mask(s["rle"]), mask)
        assert s["area"] == mask.sum() and s["bbox"] == [float(v) for v in bbox_from_mask(mask)]
        assert isinstance(s["isthing"], bool) and 0.0 <= s["score"] <= 1.0
    assert enc["segments"][2]["category_name"] == "cat" and enc["segments"][0]["isthing"] is False
    assert np.array_equal(png_to_panoptic(enc["panoptic_png"]), result.panoptic_seg)
    assert len(enc["instances"]) == 2 and enc["instances"][0]["score"] == pytest.approx(0.93)
    assert np.array_equal(rle_to_mask(enc["instances"][1]["rle"]), result.instances[1].mask)
    rebuilt = segments_to_panoptic(enc["segments"], 40, 56)
    assert np.array_equal(rebuilt, result.panoptic_seg)
    assert encode_result(result, include_png=False)["panoptic_png"] is None
    json.dumps({k: v for k, v in enc.items() if k != "panoptic_png"})


def test_encode_result_repairs_inconsistent_results() -> None:
    _, result = scene()
    seg = result.panoptic_seg.copy()
    seg[-1, -1] = 99  # an id without a segment -> unlabeled
    ghost = Segment(5, 2, "dog", True, 0.5, 10, (0, 0, 1, 1))  # a segment without pixels -> dropped
    enc = encode_result(PanopticResult(seg, [*result.segments, ghost]), include_png=True)
    assert [s["id"] for s in enc["segments"]] == [1, 2, 3, 4]
    out = png_to_panoptic(enc["panoptic_png"])
    assert out[-1, -1] == 0 and set(np.unique(out)) == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="duplicate segment id"):
        encode_result(PanopticResult(seg, [*result.segments, result.segments[0]]), include_png=False)


def test_category_colour_deterministic_and_distinct() -> None:
    colours = [category_colour(i) for i in range(50)]
    assert colours == [category_colour(i) for i in range(50)]
    assert len(set(colours)) == 50 and all(0 <= c <= 255 for rgb in colours for c in rgb)


def test_render_overlay() -> None:
    image, result = scene()
    out = render_overlay(image, result, alpha=0.5)
    assert isinstance(out, Image.Image) and out.size == (56, 40) and out.mode == "RGB"
    arr = np.asarray(out)
    assert np.array_equal(arr, np.asarray(render_overlay(image, result, alpha=0.5)))  # deterministic
    assert tuple(arr[0, 0]) == tuple(image[0, 0])  # unlabeled pixel untouched
    assert np.abs(arr.astype(int) - image).mean() > 10
    assert (arr == 0).all(axis=-1).any() and (arr == 255).all(axis=-1).any()  # label boxes and text
    zero = np.asarray(render_overlay(image, PanopticResult(np.zeros((40, 56), np.int32), []), alpha=0.5))
    assert np.array_equal(zero, image)
    with pytest.raises(ValueError):
        render_overlay(image[:10], result)


def test_fast_rle_is_byte_identical_to_pycocotools() -> None:
    """mask_to_rle and encode_result's one-pass segment RLEs write exactly pycocotools.mask.encode's strings
    (bounding-box crops, runs across column boundaries, borders, empty and full masks, 1-pixel images)."""
    from pycocotools import mask as mask_utils

    def reference(mask: np.ndarray) -> str:
        return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("ascii")

    rng = np.random.default_rng(7)
    masks = [np.zeros((5, 6), bool), np.ones((5, 6), bool), np.ones((1, 1), bool), np.zeros((1, 1), bool)]
    for _ in range(150):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        masks.append(rng.random((h, w)) > rng.uniform(0, 1))
        box = np.zeros((h, w), bool)
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        box[y0 : y0 + int(rng.integers(1, h + 1)), x0 : x0 + int(rng.integers(1, w + 1))] = True
        masks.append(box)
        right = np.zeros((h, w), bool)
        right[:, x0:] = True  # full-height columns: runs continue from one column into the next
        masks.append(right)
    for mask in masks:
        rle = mask_to_rle(mask)
        assert rle["counts"] == reference(mask) and rle["size"] == list(mask.shape)

    for seed in range(20):  # whole label maps: every segment's RLE from one pass
        h, w = (int(v) for v in rng.integers(2, 50, 2))
        seg = (
            rng.integers(0, 6, size=(h, w)).astype(np.int32)
            if seed % 2
            else np.repeat(rng.integers(0, 4, size=(h, 1)), w, axis=1).astype(np.int32)
        )
        segments = [
            Segment(int(i), 1, "cat", True, 0.5, int((seg == i).sum()), bbox_from_mask(seg == i))
            for i in np.unique(seg)
            if i > 0
        ]
        enc = encode_result(PanopticResult(seg, segments), include_png=False)
        for s in enc["segments"]:
            assert s["rle"]["counts"] == reference(seg == s["id"]), (seed, s["id"])
