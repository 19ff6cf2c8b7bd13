"""Tests of pipeline/export/: every export opens in its real consumer package, and the selection is right.

The annotate output is built by tests/export_fixtures.py through the public contract (real encoders, real
Parquet, real images in a folder and in a tar). Consumers: ``label_studio_converter`` (brush RLE decoded back
pixel for pixel), ``datumaro`` (``coco_instances`` and ``coco_panoptic`` importers), ``pycocotools`` (the
FiftyOne COCO labels), ``datasets`` (``load_dataset("parquet")`` with an ``Image`` feature), FiftyOne where
its database runs. S3 is the moto server of conftest.py.
"""

from __future__ import annotations

import io
import json
import os
import xml.etree.ElementTree as ET

import numpy as np
import pyarrow.parquet as pq
import pytest
from export_fixtures import CATEGORIES, LABELLED_KEY_ORDER, NAMES, TAR_SHARD_ID, write_annotate_output
from PIL import Image

from pipeline.encode import png_to_panoptic, rle_to_mask
from pipeline.export import ExportConfig, run_export
from pipeline.export.reader import SelectionStats, image_url_of, iter_items, open_output
from pipeline.export.run import ExportOutputError


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    root = tmp_path_factory.mktemp("annotated")
    return write_annotate_output(
        str(root / "out"), f"file://{root}/images", f"file://{root}/shards/s0.tar", seed=1
    )


def _export(annotated, tmp_path, fmt, **kwargs):
    out = str(tmp_path / fmt)
    summary = run_export(ExportConfig(input=annotated.output, output=out, format=fmt, **kwargs))
    return out, summary


def _key(image_url: str) -> str:
    """The fixture key of an image URL (``.../images/sub/c.png`` -> ``sub/c.png``, ``tar://x1.jpg::...`` -> ``x1``)."""
    if image_url.startswith("tar://"):
        return image_url[len("tar://") :].split("::")[0].split(".")[0]
    return image_url.split("/images/", 1)[1]


# --------------------------------------------------------------------------------------------------
# reader and selection
# --------------------------------------------------------------------------------------------------
def test_image_url_rules():
    folder = {"shard": "s3://b/imgs#images-000003", "key": "sub/a.jpg", "image_ext": "jpg", "shard_id": "x"}
    assert image_url_of(folder) == "s3://b/imgs/sub/a.jpg"
    rest = {**folder, "shard": "file:///d/imgs#rest-000000"}
    assert image_url_of(rest) == "file:///d/imgs/sub/a.jpg"
    tar = {"shard": "s3://b/s/000001.tar", "key": "k/001", "image_ext": "png", "shard_id": "x"}
    assert image_url_of(tar) == "tar://k/001.png::s3://b/s/000001.tar"
    # a row's own image_url wins; the older '<tar>#<member>' form becomes fsspec's chained URL
    assert (
        image_url_of({**tar, "image_url": "s3://b/s/000001.tar#k/001.PNG"})
        == "tar://k/001.PNG::s3://b/s/000001.tar"
    )
    assert image_url_of({**tar, "image_url": "https://h/a.jpg"}) == "https://h/a.jpg"
    with pytest.raises(ValueError, match="cannot locate the image of x/k"):
        image_url_of({"shard": "s3://b/manifest.lst", "key": "k", "shard_id": "x"})


def test_key_order_skips_error_rows_and_min_score_drops_segments(annotated):
    source = open_output(annotated.output)
    stats = SelectionStats()
    items = list(iter_items(source, min_score=0.5, stats=stats))
    assert [_key(i.image_url) for i in items] == LABELLED_KEY_ORDER
    assert stats.error_rows == 1 and stats.rows_read == 6
    kept = {_key(i.image_url): [s["score"] for s in i.row["segments"]] for i in items}
    for key, segs in annotated.segments.items():
        assert kept[key] == pytest.approx([s for _, _, s in segs if s >= 0.5])
    assert stats.segments_dropped == sum(
        1 for segs in annotated.segments.values() for *_, s in segs if s < 0.5
    )
    assert {_key(i.image_url): i.filtered for i in items} == {
        "a.jpg": True,
        "b.jpg": True,
        "sub/c.png": False,
        "x1": True,
        "x2": True,
    }
    # names: shard folder + key without its extension; the tar member './x2.JPG' is key x2, ext jpg
    names = {_key(i.image_url): i.name for i in items}
    assert names["sub/c.png"].endswith("imgs-images-000000-0badcafe/sub/c.png")
    assert names["x2"] == f"{TAR_SHARD_ID}/x2.jpg"


def test_uncertainty_order_heap_and_disk_sort_agree_and_fall_back_to_scores(annotated):
    source = open_output(annotated.output)
    expected = sorted(annotated.uncertainty, key=lambda k: -annotated.uncertainty[k])
    assert expected == ["x2", "b.jpg", "sub/c.png", "x1", "a.jpg"]
    on_disk = list(iter_items(source, order="uncertainty", batch_rows=2))  # no limit: sorted through SQLite
    assert [_key(i.image_url) for i in on_disk] == expected
    for item in on_disk:
        key = _key(item.image_url)
        assert item.uncertainty == pytest.approx(annotated.uncertainty[key], abs=1e-6)
        assert item.uncertainty_fallback == key.startswith(
            "x"
        )  # the tar rows have no uncertainty column value
    for n in (1, 2, 4):  # a heap of n keeps the n most uncertain, in order
        top = list(iter_items(source, order="uncertainty", max_images=n))
        assert [_key(i.image_url) for i in top] == expected[:n]
    assert [_key(i.image_url) for i in iter_items(source, max_images=2)] == LABELLED_KEY_ORDER[:2]


def test_bad_inputs_are_named(tmp_path, annotated):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_output(str(tmp_path / "nope"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="not an odise-annotate output"):
        open_output(str(tmp_path / "plain"))
    # a Parquet file of a future schema version is refused with its name
    bad = tmp_path / "future"
    (bad / "parquet").mkdir(parents=True)
    src = next(p for p in os.listdir(f"{annotated.output}/parquet"))
    table = pq.read_table(f"{annotated.output}/parquet/{src}")
    table = table.replace_schema_metadata({**table.schema.metadata, b"odise_annotate.schema_version": b"99"})
    pq.write_table(table, bad / "parquet" / src)
    (bad / "provenance.json").write_text(open(f"{annotated.output}/provenance.json").read())
    with pytest.raises(ValueError, match=f"{src} has schema version 99"):
        list(iter_items(open_output(str(bad))))


def test_export_folder_rules(annotated, tmp_path):
    out = tmp_path / "ls"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    cfg = {"input": annotated.output, "output": str(out), "format": "labelstudio"}
    with pytest.raises(ExportOutputError, match="not empty and holds no export.json"):
        run_export(ExportConfig(**cfg))
    assert (out / "notes.txt").read_text() == "mine"  # never deleted
    (out / "notes.txt").unlink()
    run_export(ExportConfig(**cfg, max_images=1))
    with pytest.raises(ExportOutputError, match="already holds a finished labelstudio export"):
        run_export(ExportConfig(**cfg))
    summary = run_export(ExportConfig(**cfg, overwrite=True))
    assert summary.images == 5 and len(json.loads((out / "tasks.json").read_text())) == 5
    # a crashed export (export.json not complete) is cleared and written again without --overwrite
    (out / "export.json").write_text(json.dumps({"complete": False}))
    (out / "stale.png").write_bytes(b"x")
    assert run_export(ExportConfig(**cfg)).images == 5
    assert not (out / "stale.png").exists()
    with pytest.raises(ValueError, match="output must not be the annotate output"):
        ExportConfig(input=annotated.output, output=annotated.output + "/", format="hf")


# --------------------------------------------------------------------------------------------------
# Label Studio
# --------------------------------------------------------------------------------------------------
def test_labelstudio_brush_rle_decodes_back_to_our_masks(annotated, tmp_path):
    from label_studio_converter.brush import decode_rle

    out, summary = _export(annotated, tmp_path, "labelstudio", order="uncertainty", copy_images=True)
    tasks = json.loads(open(f"{out}/tasks.json").read())
    assert [t["data"]["key"] for t in tasks] == ["x2", "b.jpg", "sub/c.png", "x1", "a.jpg"]
    assert summary.images == 5 and summary.error_rows == 1 and summary.images_copied == 5
    assert summary.model_version == "tiny@random-weights" and summary.plumbing_check
    n_results = 0
    for task in tasks:
        key = task["data"]["key"]
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == "tiny@random-weights"
        assert prediction["score"] == pytest.approx(1 - annotated.uncertainty[key], abs=1e-5)
        assert isinstance(task["data"]["odise_image_id"], str)  # no integer above 2**53 for JavaScript
        expected = annotated.segments[key]
        assert len(prediction["result"]) == len(expected)
        for result, (seg_id, cat, score) in zip(prediction["result"], expected, strict=True):
            h, w = result["original_height"], result["original_width"]
            assert (h, w) == annotated.id_maps[key].shape
            decoded = decode_rle(result["value"]["rle"]).reshape(h, w, 4)
            assert set(np.unique(decoded)) <= {0, 255}
            assert np.array_equal(
                decoded[:, :, 3] == 255, annotated.id_maps[key] == seg_id
            )  # pixel for pixel
            assert result["value"]["brushlabels"] == [NAMES[cat]]
            assert result["score"] == pytest.approx(score, abs=1e-6)
            assert (result["type"], result["from_name"], result["to_name"]) == (
                "brushlabels",
                "label",
                "image",
            )
            n_results += 1
        # the copied image, referenced the way Label Studio serves local files
        rel = task["data"]["image"].removeprefix("/data/local-files/?d=")
        assert open(f"{out}/{rel}", "rb").read() == annotated.image_bytes[key]
        assert task["data"]["image_url"].startswith(("file://", "tar://"))
    assert n_results == summary.segments
    # the labeling config names every category once, for the result names used
    view = ET.parse(f"{out}/labeling_config.xml").getroot()
    brush = view.find("BrushLabels")
    assert brush.get("name") == "label" and brush.get("toName") == "image"
    assert view.find("Image").get("name") == "image" and view.find("Image").get("value") == "$image"
    assert [lbl.get("value") for lbl in brush.findall("Label")] == [c["name"] for c in CATEGORIES]
    assert json.loads(open(f"{out}/categories.json").read()) == CATEGORIES
    manifest = json.loads(open(f"{out}/export.json").read())
    assert manifest["complete"] and manifest["summary"]["images"] == 5


def test_labelstudio_without_copy_references_the_source(annotated, tmp_path):
    out, summary = _export(annotated, tmp_path, "labelstudio", min_score=0.5, max_images=3)
    tasks = json.loads(open(f"{out}/tasks.json").read())
    assert [t["data"]["key"] for t in tasks] == LABELLED_KEY_ORDER[:3]
    assert tasks[0]["data"]["image"] == annotated.images_url + "/a.jpg" and not os.path.exists(
        f"{out}/images"
    )
    assert [r["score"] for r in tasks[0]["predictions"][0]["result"]] == [pytest.approx(0.9)]
    assert summary.images_copied == 0 and summary.segments_dropped == 2
    assert summary.rows_read == 3  # key order with max_images stops reading at the third image


# --------------------------------------------------------------------------------------------------
# Datumaro / CVAT
# --------------------------------------------------------------------------------------------------
def test_datumaro_imports_coco_instances_and_panoptic(annotated, tmp_path):
    import datumaro as dm

    out, summary = _export(annotated, tmp_path, "cvat", copy_images=True, min_score=0.25)
    assert summary.format == "datumaro"
    for fmt in ("coco_instances", "coco_panoptic"):
        ds = dm.Dataset.import_from(out, fmt)
        assert len(ds) == 5, fmt
        labels = ds.categories()[dm.AnnotationType.label]
        assert [c.name for c in labels] == [c["name"] for c in CATEGORIES]
        by_name = {item.id.rsplit("/", 1)[-1]: item for item in ds}
        assert set(by_name) == {"a", "b", "c", "x1", "x2"}
        item = by_name["a"]
        assert item.media.size == (30, 40) and item.media.has_data
        assert np.array_equal(item.media.data[:, :, ::-1].astype(int).shape, (30, 40, 3))
        masks = [a for a in item.annotations if a.type in (dm.AnnotationType.mask,)]
        if fmt == "coco_panoptic":
            # the person segment (id 2, score 0.9) and the sky (score 0.3 >= 0.25), as binary masks per segment
            got = sorted((labels[m.label].name, int(m.image.sum())) for m in masks)
            want = sorted(
                (NAMES[c], int((annotated.id_maps["a.jpg"] == k).sum()))
                for k, c, _ in annotated.segments["a.jpg"]
            )
            assert got == want
            person = next(m for m in masks if labels[m.label].name == "person")
            assert np.array_equal(person.image.astype(bool), annotated.id_maps["a.jpg"] == 2)
        else:
            (inst,) = masks  # the one thing of a.jpg: its instance mask and score
            assert labels[inst.label].name == "person"
            assert np.array_equal(inst.image.astype(bool), annotated.id_maps["a.jpg"] == 2)
            assert inst.attributes["score"] == pytest.approx(0.81, abs=1e-5)
    # x2's only segment (0.1) is below min_score: its panoptic PNG is all unlabeled
    png = next(p for p in _files(out) if p.endswith("/x2.png"))
    assert not png_to_panoptic(open(png, "rb").read()).any()


def _files(root: str) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


# --------------------------------------------------------------------------------------------------
# FiftyOne files (checked with pycocotools and Datumaro; FiftyOne itself where its database runs)
# --------------------------------------------------------------------------------------------------
def test_fiftyone_files_read_with_pycocotools(annotated, tmp_path):
    from pycocotools.coco import COCO

    out, summary = _export(annotated, tmp_path, "fiftyone", copy_images=True)
    coco = COCO(f"{out}/labels.json")
    assert len(coco.getImgIds()) == 5 and summary.instances == len(coco.getAnnIds())
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [c["name"] for c in CATEGORIES]
    for image in coco.loadImgs(coco.getImgIds()):
        key = _key(image["coco_url"])
        assert open(f"{out}/data/{image['file_name']}", "rb").read() == annotated.image_bytes[key]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        things = [(k, c, s) for k, c, s in annotated.segments[key] if c in (1, 2)]
        assert len(anns) == len(things)
        for ann, (seg_id, cat, score) in zip(anns, things, strict=True):
            assert ann["category_id"] == cat and ann["score"] == pytest.approx(score * 0.9, abs=1e-5)
            assert np.array_equal(coco.annToMask(ann).astype(bool), annotated.id_maps[key] == seg_id)
        stem = image["file_name"].rsplit(".", 1)[0]
        with Image.open(f"{out}/labels/{stem}.png") as mask:
            assert mask.mode == "L"  # every category id < 256: 8-bit
            assert np.array_equal(np.asarray(mask), annotated.semantic(key))
    assert json.loads(open(f"{out}/mask_targets.json").read()) == {
        str(c["id"]): c["name"] for c in CATEGORIES
    }
    assert not os.path.exists(f"{out}/data.json")


def test_fiftyone_without_copy_writes_a_data_manifest(annotated, tmp_path):
    out, _ = _export(annotated, tmp_path, "fiftyone", min_score=0.5)
    manifest = json.loads(open(f"{out}/data.json").read())
    labels = json.loads(open(f"{out}/labels.json").read())
    assert sorted(manifest) == sorted(i["file_name"] for i in labels["images"])
    a = next(i for i in labels["images"] if i["key"] == "a.jpg")
    assert manifest[a["file_name"]] == annotated.images_url.removeprefix("file://") + "/a.jpg"
    with Image.open(f"{out}/labels/{a['file_name'].rsplit('.', 1)[0]}.png") as mask:
        assert np.array_equal(np.asarray(mask), annotated.semantic("a.jpg", min_score=0.5))


def test_fiftyone_importers_read_both_layouts(annotated, tmp_path):
    """FiftyOne's own importers (no database needed) on both layouts: copied images, and a data.json manifest."""
    fouc = pytest.importorskip(
        "fiftyone.utils.coco", reason="fiftyone is not installed (not a test dependency)"
    )
    from fiftyone.utils.data.importers import ImageSegmentationDirectoryImporter

    for copy in (True, False):
        out, _ = _export(annotated, tmp_path / str(copy), "fiftyone", copy_images=copy)
        data = {} if copy else {"data_path": "data.json"}
        importer = fouc.COCODetectionDatasetImporter(dataset_dir=out, label_types=["segmentations"], **data)
        with importer:
            samples = list(importer)
        assert len(samples) == 5
        for path, _, label in samples:
            if "::" in path:  # a tar member without --copy-images: FiftyOne cannot open it (documented)
                key = path.split("/x", 1)[1].split(".")[0]
                key = f"x{key}"
                assert not copy
            else:
                key = "sub/c.png" if path.endswith("c.png") else os.path.basename(path).removesuffix(".jpg")
                key = key if key.startswith(("x", "sub")) else key + ".jpg"
                assert open(path, "rb").read() == annotated.image_bytes[key]
            things = [(k, c, s) for k, c, s in annotated.segments[key] if c in (1, 2)]
            detections = label.detections if label is not None else []
            assert [(d.label, round(d.confidence, 5)) for d in detections] == [
                (NAMES[c], round(s * 0.9, 5)) for _, c, s in things
            ]
            for det in detections:
                assert det.mask is not None and det.mask.any()
        importer = ImageSegmentationDirectoryImporter(dataset_dir=out, load_masks=True, **data)
        with importer:
            masks = [(p, lbl.mask) for p, _, lbl in importer]
        assert len(masks) == 5
        by_name = {os.path.basename(p): m for p, m in masks if "::" not in p}
        assert np.array_equal(by_name["a.jpg"], annotated.semantic("a.jpg"))
        assert np.array_equal(by_name["c.png"], annotated.semantic("sub/c.png"))


def _fiftyone_or_skip():
    try:
        import fiftyone as fo

        fo.list_datasets()  # starts (or connects to) its MongoDB
    except Exception as exc:  # noqa: BLE001 - any failure means FiftyOne cannot run here
        pytest.skip(
            f"FiftyOne or its database is not available here ({type(exc).__name__}: {str(exc)[:200]})"
        )
    return fo


def test_fiftyone_loads_both_dataset_types(annotated, tmp_path):
    fo = _fiftyone_or_skip()
    out, _ = _export(annotated, tmp_path, "fiftyone", copy_images=True)
    det = fo.Dataset.from_dir(
        dataset_dir=out,
        dataset_type=fo.types.COCODetectionDataset,
        label_types="segmentations",
        label_field="predictions",
    )
    seg = fo.Dataset.from_dir(
        dataset_dir=out, dataset_type=fo.types.ImageSegmentationDirectory, label_field="semantic"
    )
    try:
        assert len(det) == 5 and len(seg) == 5
        detections = [d for s in det for d in (s.predictions.detections if s.predictions else [])]
        assert len(detections) == 4 and all(
            d.confidence is not None and d.mask is not None for d in detections
        )
        for sample in seg:
            mask = sample.semantic.get_mask()
            with Image.open(sample.filepath) as im:
                assert mask.shape == im.size[::-1]
    finally:
        det.delete()
        seg.delete()


# --------------------------------------------------------------------------------------------------
# Hugging Face datasets
# --------------------------------------------------------------------------------------------------
def test_hf_parquet_loads_with_an_image_feature(annotated, tmp_path):
    import datasets

    out, summary = _export(
        annotated, tmp_path, "hf", include_image=True, order="uncertainty", rows_per_file=2
    )
    files = sorted(os.listdir(f"{out}/data"))
    assert files == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]
    ds = datasets.load_dataset("parquet", data_files=f"{out}/data/*.parquet", split="train")
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds["key"] == ["x2", "b.jpg", "sub/c.png", "x1", "a.jpg"] and summary.images_copied == 5
    for row in ds:
        key = row["key"]
        expected = Image.open(io.BytesIO(annotated.image_bytes[key]))
        assert row["image"].size == expected.size
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(expected.convert("RGB")))
        assert row["review_uncertainty"] == pytest.approx(annotated.uncertainty[key], abs=1e-6)
        assert (row["uncertainty"] is None) == key.startswith("x")
        assert np.array_equal(png_to_panoptic(row["panoptic_png"]), annotated.id_maps[key])
        assert [s["category_id"] for s in row["segments"]] == [c for _, c, _ in annotated.segments[key]]
        assert np.array_equal(rle_to_mask(row["segments"][0]["rle"]), annotated.id_maps[key] == 1)
    readme = open(f"{out}/README.md").read()
    assert "path: data/train-*.parquet" in readme and "PLUMBING CHECK" in readme


def test_hf_without_images_and_with_min_score(annotated, tmp_path):
    import datasets

    out, _ = _export(annotated, tmp_path, "hf", min_score=0.5)
    ds = datasets.load_dataset("parquet", data_files=f"{out}/data/*.parquet", split="train")
    assert "image" not in ds.features and ds["key"] == LABELLED_KEY_ORDER
    row = ds[0]  # a.jpg: the sky (0.3) is dropped, its pixels unlabeled in the rebuilt PNG
    expected = np.where(annotated.id_maps["a.jpg"] == 2, 2, 0)
    assert np.array_equal(png_to_panoptic(row["panoptic_png"]), expected)


# --------------------------------------------------------------------------------------------------
# object storage
# --------------------------------------------------------------------------------------------------
def test_export_from_and_to_s3_copies_images_and_tar_members(s3_bucket, s3_storage_options):
    import s3fs

    base = f"s3://{s3_bucket}"
    expected = write_annotate_output(
        f"{base}/out", f"{base}/images", f"{base}/shards/s0.tar", s3_storage_options, seed=2
    )
    out = f"{base}/exports/ls"
    summary = run_export(
        ExportConfig(
            input=expected.output,
            output=out,
            format="labelstudio",
            copy_images=True,
            order="uncertainty",
            max_images=3,
            storage_options=s3_storage_options,
        )
    )
    assert (
        summary.images == 3 and summary.images_copied == 3 and summary.files["tasks"] == f"{out}/tasks.json"
    )
    fs = s3fs.S3FileSystem(**s3_storage_options)
    tasks = json.loads(fs.cat(f"{out}/tasks.json"))
    assert [t["data"]["key"] for t in tasks] == ["x2", "b.jpg", "sub/c.png"]
    for task in tasks:
        rel = task["data"]["image"].removeprefix("/data/local-files/?d=")
        assert fs.cat(f"{out}/{rel}") == expected.image_bytes[task["data"]["key"]]
    assert json.loads(fs.cat(f"{out}/export.json"))["complete"] is True
    # the hf target embeds the tar members' bytes read straight from S3
    summary = run_export(
        ExportConfig(
            input=expected.output,
            output=f"{base}/exports/hf",
            format="hf",
            include_image=True,
            storage_options=s3_storage_options,
        )
    )
    assert summary.images == 5 and summary.images_copied == 5 and summary.images_missing == 0


def test_missing_images_are_counted_not_fatal(annotated, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(os.path.dirname(annotated.output), root)
    moved = write_annotate_output(
        str(root / "out"), f"file://{root}/images", f"file://{root}/shards/s0.tar", seed=1
    )
    os.remove(root / "images" / "b.jpg")
    os.remove(root / "shards" / "s0.tar")
    summary = run_export(
        ExportConfig(input=moved.output, output=str(tmp_path / "fo"), format="fiftyone", copy_images=True)
    )
    assert summary.images == 5 and summary.images_copied == 2 and summary.images_missing == 3
    assert any("b.jpg" in m for m in summary.missing) and any("s0.tar" in m for m in summary.missing)
