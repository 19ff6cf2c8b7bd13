"""``--copy-images``: an annotate output that opens as it is, with real components (tiny model, local Ray, real
files, pycocotools, Datumaro's COCO parsers).

The run labels an image folder (with a sub-folder and a name that is not file-safe) and a WebDataset tar; one
copy is made to fail (a directory sits where the file goes): that image becomes a retryable error row and
``--retry-errors`` copies and labels it. Every COCO ``file_name`` must exist under ``<output>/images/`` with the
original bytes; pycocotools and Datumaro's ``coco_panoptic`` / ``coco_instances`` parsers open the output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from helpers import jpeg_bytes, webdataset_members, write_tar

from pipeline.config import AnnotateConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _config(inputs: list[str], out: Path, **kw) -> AnnotateConfig:
    base = dict(input=inputs, output=str(out), vocab_file=str(EXAMPLES / "classes.txt"), model="tiny", num_cpus=2,
                overlays=0, batch_size=2, no_progress_timeout_s=240, copy_images=True)  # fmt: skip
    return AnnotateConfig(**{**base, **kw})


def test_copy_images_excludes_image_root_and_names_are_deterministic():
    import inspect

    from flows.annotate import annotate
    from flows.cli import _options_from, build_annotate_parser
    from flows.params import ParameterError, annotate_config
    from pipeline.annotate.coco import copied_image_name, png_names

    # the command-line flag and the flow parameter reach the config
    parser = build_annotate_parser()
    params = _options_from(
        parser.parse_args(["--input", "x", "--output", "o", "--copy-images"]), AnnotateConfig
    )
    assert annotate_config(params).copy_images is True
    assert inspect.signature(annotate.fn).parameters["copy_images"].default is False
    with pytest.raises(ParameterError, match="copy_images and image_root"):
        annotate_config({"input": "x", "output": "o", "copy_images": True, "image_root": "/data"})

    with pytest.raises(ValueError, match="copy_images and image_root='/data' exclude each other"):
        AnnotateConfig(input="x", output="o", copy_images=True, image_root="/data")
    assert copied_image_name("images", "sid", "cats/001.jpg", "jpg") == "sid/cats/001.jpg"
    assert copied_image_name("tar", "sid", "cats/001", "jpg") == "sid/cats/001.jpg"
    assert copied_image_name("tar", "sid", "a.jpg", "jpg") == "sid/a.jpg.jpg"  # member a.jpg.jpg
    assert copied_image_name("images", "sid", "A.JPG", "jpg") == "sid/A.JPG"  # the name as it is
    odd = copied_image_name("images", "sid", "my photo #1.JPG", "jpg")
    assert odd.startswith("sid/my_photo_1-") and odd.endswith(".JPG") and "/" not in odd[4:]
    # the same stem as the image's panoptic PNG (detectron2 finds <png stem>.jpg)
    (png,) = png_names([("my photo #1.JPG", "jpg")]).values()
    assert odd[len("sid/") :].removesuffix(".JPG") == png.removesuffix(".png")


@pytest.mark.slow
def test_copy_images_makes_a_self_contained_output(tmp_path, photos, ray_local):
    import datumaro as dm
    from datumaro.components.environment import Environment
    from datumaro.plugins.data_formats.coco.format import CocoImporterType
    from pycocotools.coco import COCO

    from pipeline.annotate.checks import check_inputs
    from pipeline.annotate.commit import ProvenanceMismatchError
    from pipeline.annotate.run import run_annotation
    from pipeline.shards import list_shards

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    sources = {
        "a.jpg": jpeg_bytes(photos["astronaut"], (64, 48)),
        "sub/b.jpg": jpeg_bytes(photos["coffee"], (48, 64)),
        "my photo #1.jpg": jpeg_bytes(photos["chelsea"], (56, 48)),
    }
    for name, data in sources.items():
        (folder / name).write_bytes(data)
    tar = write_tar(
        tmp_path / "shard-000.tar", webdataset_members({"t0": jpeg_bytes(photos["rocket"], (64, 64))})
    )
    out = tmp_path / "out"
    inputs = [str(folder), str(tar)]
    shards = {s.kind: s for s in list_shards(inputs)}
    # a directory where sub/b.jpg's copy goes: that copy fails (after its retries), the image becomes an error
    blocker = out / "images" / shards["images"].shard_id / "sub" / "b.jpg"
    (blocker / "x").mkdir(parents=True)

    first = run_annotation(_config(inputs, out))
    assert (first.images, first.labelled, first.errors) == (4, 3, 1)
    rows = {r["key"]: r for r in pads.dataset(str(out / "parquet"), format="parquet").to_table().to_pylist()}
    failed = rows["sub/b.jpg"]
    assert (
        failed["error"].startswith("copying the image (--copy-images) failed")
        and str(folder) in failed["error"]
    )
    assert failed["error_kind"] == "io_error" and failed["retryable"] is True

    # the obstacle gone, --retry-errors copies and labels exactly that image (the others keep their rows)
    (blocker / "x").rmdir()
    blocker.rmdir()
    again = run_annotation(_config(inputs, out, retry_errors=True))
    assert (again.images, again.labelled, again.errors) == (1, 1, 0) and again.shards_retried == 1
    rows = {r["key"]: r for r in pads.dataset(str(out / "parquet"), format="parquet").to_table().to_pylist()}
    assert len(rows) == 4 and all(r["error"] is None for r in rows.values())

    # every file_name is a copy of the original bytes under <output>/images/ (not the resized image)
    index = json.loads((out / "coco" / "index.json").read_text())
    assert index["image_root"] == f"file://{out}/images/" and index["images_copied"] is True
    instances = json.loads((out / "coco" / "instances.json").read_text())
    by_url = {im["coco_url"]: im for im in instances["images"]}
    assert len(by_url) == 4
    for name, data in sources.items():
        image = by_url[f"file://{folder}/{name}"]
        assert (out / "images" / image["file_name"]).read_bytes() == data, name
    member = by_url[f"tar://t0.jpg::file://{tar}"]
    assert member["file_name"] == f"{shards['tar'].shard_id}/t0.jpg"
    assert (out / "images" / member["file_name"]).read_bytes() == jpeg_bytes(photos["rocket"], (64, 64))
    copies = sorted(p for p in (out / "images").rglob("*") if p.is_file())
    assert len(copies) == 4  # nothing duplicated, no temp files left
    panoptic = json.loads((out / "coco" / "panoptic.json").read_text())
    assert sorted(im["file_name"] for im in panoptic["images"]) == sorted(
        by_url[u]["file_name"] for u in by_url
    )
    # detectron2's panoptic loader looks for images/<PNG file_name with .jpg>: true of every image here
    for ann in panoptic["annotations"]:
        assert (out / "images" / (ann["file_name"].removesuffix(".png") + ".jpg")).is_file(), ann["file_name"]

    # pycocotools: annotations per image, file names that open
    coco = COCO(str(out / "coco" / "instances.json"))
    assert len(coco.getImgIds()) == 4 and coco.getAnnIds()
    for image in coco.loadImgs(coco.getImgIds()):
        assert (out / "images" / image["file_name"]).is_file()

    # Datumaro's COCO parsers on the coco/ folder as it is: images found through file_name under images/
    # (its default importer wants annotations/<task>_<subset>.json; the roboflow path rules take the root as
    # the JSON's grandparent, the output, and the images as <root>/<subset>)
    env = Environment()
    for fmt, name in (("coco_panoptic", "panoptic.json"), ("coco_instances", "instances.json")):
        extractor = env.make_extractor(
            fmt, str(out / "coco" / name), coco_importer_type=CocoImporterType.roboflow, subset="images"
        )
        dataset = dm.Dataset.from_extractors(extractor)
        items = list(dataset)
        assert len(items) == 4, fmt
        for item in items:
            assert item.media.has_data and Path(item.media.path).is_file(), (fmt, item.id)
            assert item.media.data.shape[:2] == item.media.size
        masks = [a for item in items for a in item.annotations if a.type == dm.AnnotationType.mask]
        assert masks, fmt

    # the output is labelled with copies: a run without them is refused, naming the setting
    with pytest.raises(ProvenanceMismatchError, match="was labelled with copy_images"):
        check_inputs(_config(inputs, out, copy_images=False))
    # a plain rerun finds nothing to do and leaves the copies as they are
    before = {p: p.stat().st_mtime_ns for p in copies}
    noop = run_annotation(_config(inputs, out))
    assert noop.images == 0 and {p: p.stat().st_mtime_ns for p in copies} == before


@pytest.mark.slow
def test_copy_images_from_and_to_s3(tmp_path, photos, ray_local, s3_bucket, s3_storage_options):
    """A tar on S3 labelled into an output on S3: the copies are objects under <output>/images/ with the
    members' original bytes, named as COCO file_name says."""
    import s3fs

    from pipeline.annotate.run import run_annotation

    fs = s3fs.S3FileSystem(**s3_storage_options)
    samples = {
        "cats/001": jpeg_bytes(photos["chelsea"], (64, 48)),
        "rocket": jpeg_bytes(photos["rocket"], (48, 64)),
    }
    local = write_tar(tmp_path / "shard-000.tar", webdataset_members(samples))
    fs.put(str(local), f"{s3_bucket}/in/shard-000.tar")
    out = f"s3://{s3_bucket}/labels"
    summary = run_annotation(
        _config(
            [f"s3://{s3_bucket}/in/shard-000.tar"],
            out,
            vocab_file="coco_panoptic",
            storage_options=s3_storage_options,
        )
    )
    assert summary.labelled == 2 and summary.errors == 0
    index = json.loads(fs.cat(f"{s3_bucket}/labels/coco/index.json"))
    assert index["image_root"] == f"s3://{s3_bucket}/labels/images/" and index["images_copied"] is True
    instances = json.loads(fs.cat(f"{s3_bucket}/labels/coco/instances.json"))
    got = {
        im["coco_url"]: fs.cat(f"{s3_bucket}/labels/images/{im['file_name']}") for im in instances["images"]
    }
    tar = f"s3://{s3_bucket}/in/shard-000.tar"
    assert got == {f"tar://{key}.jpg::{tar}": data for key, data in samples.items()}
    assert len(fs.find(f"{s3_bucket}/labels/images")) == 2
