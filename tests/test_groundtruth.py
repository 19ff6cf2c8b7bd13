"""Tests of pipeline/groundtruth.py on a tiny COCO panoptic dataset built in tmp_path.

Round trips: COCO folder -> reader; COCO folder -> labeled shards -> reader (local and on the moto S3
server of conftest.py); every id map, segment, image byte and caption must come back exactly.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from helpers import tar_bytes
from PIL import Image

from pipeline.evaluate.metrics import PanopticEvaluator
from pipeline.groundtruth import (
    CATEGORIES_FILE,
    CocoPanopticReader,
    convert_coco_panoptic_to_shards,
    decode_panoptic_png,
    encode_panoptic_png,
    id2rgb,
    iter_labeled_shards,
    list_shards,
    read_categories,
    rgb2id,
    sample_key,
)

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1, "supercategory": "person", "color": [220, 20, 60]},
    {"id": 2, "name": "car", "isthing": 1, "supercategory": "vehicle", "color": [0, 0, 142]},
    {"id": 3, "name": "sky", "isthing": 0, "supercategory": "sky", "color": [70, 130, 180]},
]


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _segments(id_map, cats_and_crowd):
    return [
        {
            "id": sid,
            "category_id": cat,
            "area": int((id_map == sid).sum()),
            "bbox": _bbox(id_map == sid),
            "iscrowd": crowd,
        }
        for sid, (cat, crowd) in cats_and_crowd.items()
    ]


def _image_bytes(rng, h, w, fmt):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def make_coco_panoptic(root, rng=None):
    """3 images: a JPEG with a crowd segment and 24-bit ids, a PNG image, a string image id with a dot.

    Returns ``(json_path, png_dir, image_dir, expected)`` with ``expected[image_id] = (id_map, segments,
    image_bytes, file_name)``.
    """
    rng = rng or np.random.default_rng(0)
    png_dir, image_dir = root / "panoptic", root / "images"
    png_dir.mkdir(parents=True)
    image_dir.mkdir(parents=True)
    big = 0x123456  # uses all three RGB channels
    m1 = np.array(
        [
            [3, 3, 3, 3, 3, 3, 3, 3],
            [3, 3, 3, 3, 3, 3, 3, 3],
            [big, big, 0, 7, 7, 7, 0, 0],
            [big, big, 0, 7, 7, 7, 0, 0],
            [9, 9, 9, 9, 0, 0, 0, 0],
            [9, 9, 9, 9, 0, 0, 0, 0],
        ]
    )
    s1 = _segments(m1, {3: (3, 0), big: (1, 0), 7: (2, 0), 9: (1, 1)})  # 9: person crowd
    m2 = np.zeros((5, 7), np.int64)
    m2[:2] = 5
    m2[2:, 1:4] = 6
    m2[3:, 4:] = 8
    s2 = _segments(m2, {5: (3, 0), 6: (2, 0), 8: (2, 0)})
    m3 = np.full((4, 4), 40, np.int64)
    m3[1:3, 1:3] = 300
    s3 = _segments(m3, {40: (3, 0), 300: (1, 0)})
    specs = [
        (139, "000000000139.jpg", "JPEG", m1, s1),
        (285, "000000000285.png", "PNG", m2, s2),
        ("city.0001", "sub/city.0001.jpg", "JPEG", m3, s3),
    ]
    images, annotations, expected = [], [], {}
    for image_id, file_name, fmt, id_map, segs in specs:
        h, w = id_map.shape
        data = _image_bytes(rng, h, w, fmt)
        (image_dir / file_name).parent.mkdir(parents=True, exist_ok=True)
        (image_dir / file_name).write_bytes(data)
        png_name = sample_key(image_id) + ".png"
        Image.fromarray(id2rgb(id_map)).save(png_dir / png_name)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        annotations.append({"image_id": image_id, "file_name": png_name, "segments_info": segs})
        expected[image_id] = (id_map, segs, data, file_name)
    json_path = root / "panoptic.json"
    json_path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return json_path, png_dir, image_dir, expected


def assert_record_matches(record, expected):
    id_map, segs, data, file_name = expected[record.image_id]
    np.testing.assert_array_equal(record.id_map, id_map)
    assert record.id_map.dtype == np.int32
    assert [s.to_dict() for s in record.segments] == segs
    assert (record.height, record.width) == id_map.shape
    assert record.file_name == file_name
    assert record.image_bytes == data  # unchanged bytes


def test_rgb_id_encoding_roundtrip():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 256**3, (5, 7))
    rgb = id2rgb(ids)
    assert rgb.dtype == np.uint8
    assert tuple(id2rgb(np.array([[0x123456]]))[0, 0]) == (0x56, 0x34, 0x12)  # R is the low byte
    np.testing.assert_array_equal(rgb2id(rgb), ids)
    np.testing.assert_array_equal(decode_panoptic_png(encode_panoptic_png(ids)), ids)
    with pytest.raises(ValueError, match="must be in"):
        id2rgb(np.array([[256**3]]))
    buf = io.BytesIO()
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(buf, format="PNG")  # grayscale: not panoptic
    with pytest.raises(ValueError, match="must be RGB"):
        decode_panoptic_png(buf.getvalue(), where="x.png")


def test_sample_key():
    assert sample_key(139) == "139"
    assert sample_key("city.0001/a b") == "city_0001_a_b"


def test_coco_reader_reads_every_image(tmp_path):
    json_path, png_dir, image_dir, expected = make_coco_panoptic(tmp_path)
    reader = CocoPanopticReader(str(json_path), str(png_dir), image_dir=str(image_dir))
    assert len(reader) == 3
    assert list(reader.categories) == [1, 2, 3] and reader.categories[1] == CATEGORIES[0]
    records = list(reader)
    assert [r.image_id for r in records] == [139, 285, "city.0001"]
    for r in records:
        assert_record_matches(r, expected)
    crowd = [s for s in records[0].segments if s.iscrowd]
    assert [(s.id, s.category_id) for s in crowd] == [(9, 1)]
    assert records[0].decode_image().shape == (6, 8, 3)
    # Without image_dir: no image bytes are read.
    assert next(iter(CocoPanopticReader(str(json_path), str(png_dir)))).image_bytes is None


def test_coco_reader_rejects_bad_input(tmp_path):
    json_path, png_dir, _, _ = make_coco_panoptic(tmp_path)
    data = json.loads(json_path.read_text())
    data["annotations"][1]["segments_info"][0]["category_id"] = 99
    json_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown category_id 99"):
        list(CocoPanopticReader(str(json_path), str(png_dir)))
    data["annotations"][1]["segments_info"][0]["category_id"] = 3
    data["annotations"][1]["file_name"] = "../panoptic.json"
    json_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unsafe file name"):
        list(CocoPanopticReader(str(json_path), str(png_dir)))
    data["images"][0]["height"] = 99
    json_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="panoptic PNG is 6x8"):
        list(CocoPanopticReader(str(json_path), str(png_dir)))


def test_convert_to_shards_and_read_back(tmp_path):
    json_path, png_dir, image_dir, expected = make_coco_panoptic(tmp_path / "coco")
    out = tmp_path / "shards"
    summary = convert_coco_panoptic_to_shards(
        str(json_path),
        str(png_dir),
        str(image_dir),
        str(out),
        samples_per_shard=2,
        captions={285: "a car under the sky"},
    )
    assert summary.num_samples == 3
    assert [p.rsplit("/", 1)[1] for p in summary.shards] == ["shard-000000.tar", "shard-000001.tar"]
    assert sorted(p.name for p in out.iterdir()) == [CATEGORIES_FILE, "shard-000000.tar", "shard-000001.tar"]
    assert list_shards(str(out)) == summary.shards
    # The tar layout is the documented one.
    with tarfile.open(summary.shards[0]) as tar:
        assert tar.getnames() == [
            "139.jpg",
            "139.panoptic.png",
            "139.segments.json",
            "285.panoptic.png",
            "285.png",
            "285.segments.json",
        ]
        meta = json.loads(tar.extractfile("285.segments.json").read())
        png = tar.extractfile("139.panoptic.png").read()
    assert meta == {
        "image_id": 285,
        "file_name": "000000000285.png",
        "segments_info": expected[285][1],
        "caption": "a car under the sky",
    }
    assert png == (png_dir / "139.png").read_bytes()  # the panoptic PNG is copied unchanged too
    # Read everything back.
    cats = read_categories(str(out))
    assert list(cats.values()) == CATEGORIES
    records = list(iter_labeled_shards(str(out), categories=cats))
    assert [r.image_id for r in records] == [139, 285, "city.0001"]
    assert [r.key for r in records] == ["139", "285", "city_0001"]
    assert [r.caption for r in records] == [None, "a car under the sky", None]
    for r in records:
        assert_record_matches(r, expected)
    # A single shard URL works too.
    assert [r.image_id for r in iter_labeled_shards(summary.shards[1])] == ["city.0001"]


def test_ground_truth_against_itself_gives_pq_one(tmp_path):
    json_path, png_dir, image_dir, _ = make_coco_panoptic(tmp_path / "coco")
    out = tmp_path / "shards"
    convert_coco_panoptic_to_shards(str(json_path), str(png_dir), str(image_dir), str(out))
    cats = read_categories(str(out))
    ev = PanopticEvaluator(cats, instance=True)
    for r in iter_labeled_shards(str(out)):
        things = {c for c, info in cats.items() if info["isthing"]}
        insts = [
            {"category_id": s.category_id, "score": 1.0, "mask": r.id_map == s.id}
            for s in r.segments
            if s.category_id in things and not s.iscrowd
        ]
        ev.add(r.id_map, r.segments, r.id_map, r.segments, image_id=r.image_id, pred_instances=insts)
    res = ev.result()
    assert (res.overall.pq, res.overall.sq, res.overall.rq, res.overall.n) == (1.0, 1.0, 1.0, 3)
    assert res.per_class[1].tp == 2  # the crowd person is neither TP nor FN; the crowd pred is ignored
    assert res.semantic.miou == 1.0 and res.semantic.pixel_accuracy == 1.0
    assert res.instance.ap == pytest.approx(1.0)


def test_s3_roundtrip(tmp_path, s3_bucket, s3_storage_options):
    import fsspec

    json_path, png_dir, image_dir, expected = make_coco_panoptic(tmp_path / "coco")
    fs = fsspec.filesystem("s3", **s3_storage_options)
    src = f"s3://{s3_bucket}/coco"
    fs.put(str(tmp_path / "coco"), src, recursive=True)
    out = f"s3://{s3_bucket}/labeled/v1"
    summary = convert_coco_panoptic_to_shards(
        f"{src}/panoptic.json",
        f"{src}/panoptic",
        f"{src}/images",
        out,
        samples_per_shard=2,
        storage_options=s3_storage_options,
    )
    assert summary.shards == [f"{out}/shard-000000.tar", f"{out}/shard-000001.tar"]
    assert summary.categories_url == f"{out}/{CATEGORIES_FILE}"
    assert not fs.glob(f"{s3_bucket}/labeled/v1/*.tmp")  # temporary names are gone
    assert list_shards(out, storage_options=s3_storage_options) == summary.shards
    cats = read_categories(out, storage_options=s3_storage_options)
    assert list(cats.values()) == CATEGORIES
    records = list(iter_labeled_shards(out, storage_options=s3_storage_options, categories=cats))
    assert len(records) == 3
    for r in records:
        assert_record_matches(r, expected)
    # The COCO reader reads from S3 directly too.
    reader = CocoPanopticReader(
        f"{src}/panoptic.json",
        f"{src}/panoptic",
        image_dir=f"{src}/images",
        storage_options=s3_storage_options,
    )
    for r in reader:
        assert_record_matches(r, expected)


def test_shard_reader_skips_unsafe_members_and_checks_samples(tmp_path):
    id_map = np.array([[1, 1], [0, 2]])
    segs = [
        {"id": 1, "category_id": 1, "area": 2, "bbox": [0, 0, 2, 1], "iscrowd": 0},
        {"id": 2, "category_id": 3, "area": 1, "bbox": [1, 1, 1, 1], "iscrowd": 0},
    ]
    meta = json.dumps({"image_id": 1, "file_name": "1.jpg", "segments_info": segs}).encode()
    good = [
        ("a/1.jpg", b"jpeg bytes"),
        ("a/1.panoptic.png", encode_panoptic_png(id_map)),
        ("a/1.segments.json", meta),
    ]
    shard = tmp_path / "s.tar"
    shard.write_bytes(tar_bytes([("../evil.jpg", b"x"), ("/abs.jpg", b"y"), *good, ("x/../2.jpg", b"z")]))
    records = list(iter_labeled_shards(str(shard)))
    assert len(records) == 1 and records[0].key == "a/1"
    np.testing.assert_array_equal(records[0].id_map, id_map)
    assert records[0].image_bytes == b"jpeg bytes"
    assert not (tmp_path.parent / "evil.jpg").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "s.tar"
    ]
    # A sample without its panoptic PNG is an error naming the shard and key.
    shard.write_bytes(tar_bytes([good[0], good[2]]))
    with pytest.raises(ValueError, match=r"sample 'a/1' has no panoptic.png"):
        list(iter_labeled_shards(str(shard)))
    # Unknown categories are caught when categories are given.
    shard.write_bytes(tar_bytes(good))
    with pytest.raises(ValueError, match="unknown category_id 3"):
        list(iter_labeled_shards(str(shard), categories={1: CATEGORIES[0]}))


def test_converter_rejects_colliding_keys(tmp_path):
    json_path, png_dir, image_dir, _ = make_coco_panoptic(tmp_path / "coco")
    data = json.loads(json_path.read_text())
    data["images"][1]["id"] = data["annotations"][1]["image_id"] = "city_0001"  # same key as "city.0001"
    data["images"][1], data["images"][2] = data["images"][2], data["images"][1]
    data["annotations"].append(data["annotations"].pop(1))
    json_path.write_text(json.dumps(data))
    out = tmp_path / "shards"
    with pytest.raises(ValueError, match="sample key 'city_0001' already used"):
        convert_coco_panoptic_to_shards(str(json_path), str(png_dir), str(image_dir), str(out))
    assert not list(out.glob("*.tmp"))  # the unfinished shard was removed


def _console_script(name):
    import sys
    from pathlib import Path

    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.skip(f"console script {name} is not installed (pip install -e .)")
    return str(path)


def test_convert_console_script(tmp_path):
    """``odise-convert`` writes the same shards as the Python API, with captions from a COCO captions file."""
    import subprocess

    json_path, png_dir, image_dir, expected = make_coco_panoptic(tmp_path / "coco")
    captions = tmp_path / "captions.json"
    captions.write_text(
        json.dumps(
            {
                "annotations": [
                    {"image_id": 285, "id": 1, "caption": " a car under the sky "},
                    {"image_id": 285, "id": 2, "caption": "a second caption"},
                    {"image_id": "city.0001", "id": 3, "caption": "a person in a city"},
                ]
            }
        )
    )
    script = _console_script("odise-convert")
    args = [
        script,
        "--ground-truth",
        str(json_path),
        "--images",
        str(image_dir),
        "--output",
        str(tmp_path / "shards"),
    ]
    proc = subprocess.run(
        [*args, "--samples-per-shard", "2", "--captions", str(captions)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote 3 sample(s) in 2 shard(s)" in proc.stdout
    records = list(iter_labeled_shards(str(tmp_path / "shards")))
    assert [r.caption for r in records] == [None, "a car under the sky", "a person in a city"]
    with tarfile.open(tmp_path / "shards" / "shard-000000.tar") as tar:
        meta = json.loads(tar.extractfile("285.segments.json").read())
    assert meta["captions"] == ["a car under the sky", "a second caption"]  # all kept; training draws one
    for r in records:
        assert_record_matches(r, expected)  # the PNG folder defaulted to the JSON path without .json

    # A malformed dataset is a one-line error naming the file (exit 2), not a traceback.
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = subprocess.run(
        [
            script,
            "--ground-truth",
            str(bad),
            "--ground-truth-png",
            str(png_dir),
            "--images",
            str(image_dir),
            "--output",
            str(tmp_path / "out2"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "bad.json" in proc.stderr and "invalid JSON" in proc.stderr and "Traceback" not in proc.stderr
