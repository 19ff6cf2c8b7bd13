"""Tests of pipeline/export/loop.py and ``odise-convert --from annotate|labelstudio``: pseudo-labels (or their
reviewed Label Studio version) become labeled shards that the training / evaluation reader takes.

Reviews are simulated the way Label Studio exports them: tasks with ``annotations`` whose brush results are
encoded with ``label_studio_converter.brush`` (the package Label Studio's own converter uses).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from export_fixtures import CATEGORIES, write_annotate_output
from PIL import Image

from pipeline.export import ExportConfig, run_export
from pipeline.export.labelstudio import mask_to_brush
from pipeline.export.loop import _training_image, annotate_to_shards, labelstudio_to_shards
from pipeline.groundtruth import iter_labeled_shards, read_categories

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    root = tmp_path_factory.mktemp("annotated")
    return write_annotate_output(
        str(root / "out"), f"file://{root}/images", f"file://{root}/shards/s0.tar", seed=3
    )


def _records(url: str) -> dict[str, object]:
    cats = read_categories(url)
    return {r.file_name: r for r in iter_labeled_shards(url, categories=cats)}


def test_annotate_output_to_shards_keeps_confident_segments_and_voids_the_rest(annotated, tmp_path):
    out = str(tmp_path / "shards")
    summary = annotate_to_shards(annotated.output, out, min_score=0.5, samples_per_shard=2)
    # x2's only segment scores 0.1: skipped as empty; the error row is skipped too
    assert (summary.samples, summary.skipped_empty, summary.error_rows) == (4, 1, 1)
    assert len(summary.shards) == 2 and summary.segments_dropped == 4
    records = _records(out)
    assert sorted(records) == ["a.jpg", "b.jpg", "sub/c.png", "x1.jpg"]
    for name, record in records.items():
        key = name.removesuffix(".jpg") if name.startswith("x") else name
        keep = [(k, c) for k, c, s in annotated.segments[key] if s >= 0.5]
        expected = np.where(np.isin(annotated.id_maps[key], [k for k, _ in keep]), annotated.id_maps[key], 0)
        assert np.array_equal(record.id_map, expected), name  # every other pixel is void
        assert [(s.id, s.category_id) for s in record.segments] == keep
        assert record.image_bytes == annotated.image_bytes[key]  # image bytes unchanged
    assert json.loads(open(f"{out}/categories.json").read()) == CATEGORIES  # synonyms kept for training
    with pytest.raises(ValueError, match="already holds shards"):
        annotate_to_shards(annotated.output, out)


def _review(tasks: list[dict]) -> list[dict]:
    """A reviewer's work on the exported tasks, as Label Studio exports it."""
    by_key = {t["data"]["key"]: t for t in tasks}
    a = by_key["a.jpg"]
    h, w = (
        a["predictions"][0]["result"][0]["original_height"],
        a["predictions"][0]["result"][0]["original_width"],
    )
    painted = np.zeros((h, w), bool)
    painted[20:30, 30:40] = True  # a cat drawn over the bottom-right corner (on top of nothing)
    fixed = [dict(r) for r in a["predictions"][0]["result"]]
    fixed[0] = {**fixed[0], "value": {**fixed[0]["value"], "brushlabels": ["cat"]}}  # sky -> cat
    for r in fixed:
        r.pop("score")
    new = {
        **fixed[1],
        "id": "new1",
        "value": {"format": "rle", "rle": mask_to_brush(painted), "brushlabels": ["cat"]},
    }
    a["annotations"] = [
        {"id": 1, "result": [], "was_cancelled": False, "updated_at": "2026-01-01T10:00:00Z"},  # older
        {"id": 2, "result": [*fixed, new], "was_cancelled": False, "updated_at": "2026-01-02T10:00:00Z"},
    ]
    by_key["b.jpg"]["annotations"] = [{"id": 3, "result": [], "was_cancelled": True}]  # skipped: predictions
    c = by_key["sub/c.png"]
    c["annotations"] = [
        {
            "id": 4,
            "was_cancelled": False,
            "result": [
                {
                    "type": "polygonlabels",
                    "value": {"points": [[0, 0], [1, 1], [1, 0]], "polygonlabels": ["sky"]},
                },
                *c["predictions"][0]["result"],
            ],
        }
    ]
    return tasks


def test_reviewed_labelstudio_export_to_shards(annotated, tmp_path):
    export = str(tmp_path / "ls")
    run_export(ExportConfig(input=annotated.output, output=export, format="labelstudio"))
    tasks = _review(json.loads(open(f"{export}/tasks.json").read()))
    reviewed = f"{export}/project-1-reviewed.json"
    with open(reviewed, "w") as f:
        json.dump(tasks, f)

    out = str(tmp_path / "shards")
    summary = labelstudio_to_shards(reviewed, out, min_score=0.5)  # categories.json found next to the file
    assert (summary.reviewed, summary.unreviewed, summary.samples) == (2, 3, 4)  # x2: 0.1 < 0.5 -> empty
    assert summary.ignored_results == {"polygonlabels": 1} and summary.skipped_empty == 1
    records = _records(out)
    a = records["a.jpg"]
    ids = annotated.id_maps["a.jpg"]
    expected = np.where(ids == 1, 1, 0) + np.where(ids == 2, 2, 0)
    expected[20:30, 30:40] = 3  # the drawn cat, painted last
    assert np.array_equal(a.id_map, expected)
    assert [(s.id, s.category_id) for s in a.segments] == [(1, 2), (2, 1), (3, 2)]  # sky relabelled cat
    assert a.segments[2].area == 100 and a.segments[2].bbox == (30, 20, 10, 10)
    b = records["b.jpg"]  # not reviewed: its predictions above min_score
    assert [(s.id, s.category_id) for s in b.segments] == [(1, 2)]
    assert b.image_bytes == annotated.image_bytes["b.jpg"]
    assert records["x1.jpg"].image_bytes == annotated.image_bytes["x1"]  # read from the tar

    only = labelstudio_to_shards(reviewed, str(tmp_path / "only"), reviewed_only=True, categories=CATEGORIES)
    assert only.samples == 2 and only.skipped_unreviewed == 3
    assert sorted(_records(str(tmp_path / "only"))) == ["a.jpg", "sub/c.png"]


def test_labelstudio_errors_name_the_task(annotated, tmp_path):
    export = str(tmp_path / "ls")
    run_export(ExportConfig(input=annotated.output, output=export, format="labelstudio", max_images=1))
    tasks = json.loads(open(f"{export}/tasks.json").read())
    tasks[0]["id"] = 41
    tasks[0]["predictions"][0]["result"][0]["value"]["brushlabels"] = ["dog"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(tasks))
    with pytest.raises(ValueError, match=r"bad.json: task 41.*brush label \['dog'\] is not one category"):
        labelstudio_to_shards(str(bad), str(tmp_path / "x"), categories=f"{export}/categories.json")
    with pytest.raises(FileNotFoundError, match="categories file .*categories.json not found"):
        labelstudio_to_shards(str(bad), str(tmp_path / "y"))


def test_missing_images_are_skipped_and_named(annotated, tmp_path):
    export = str(tmp_path / "ls")
    run_export(ExportConfig(input=annotated.output, output=export, format="labelstudio"))
    tasks = json.loads(open(f"{export}/tasks.json").read())
    tasks[1]["data"]["image_url"] = "file:///nowhere/b.jpg"
    (tmp_path / "t.json").write_text(json.dumps(tasks))
    summary = labelstudio_to_shards(str(tmp_path / "t.json"), str(tmp_path / "s"), categories=CATEGORIES)
    assert summary.samples == 4 and summary.images_skipped == 1 and "/nowhere/b.jpg" in summary.skipped[0]


def test_training_image_applies_exif_orientation_and_checks_the_size():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (10, 20, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", exif=exif, quality=100)
    data, ext = _training_image(buf.getvalue(), "jpg", 10, 20, "s/k")  # labels are 10 wide, 20 high
    assert ext == "png"
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (10, 20)
    plain = io.BytesIO()
    Image.fromarray(pixels).save(plain, format="PNG")
    assert _training_image(plain.getvalue(), "png", 20, 10, "s/k") == (plain.getvalue(), "png")  # unchanged
    with pytest.raises(ValueError, match="s/k: image is 20x10, labels are 30x10"):
        _training_image(plain.getvalue(), "png", 30, 10, "s/k")
    with pytest.raises(ValueError, match="s/k: unreadable image"):
        _training_image(b"garbage", "jpg", 1, 1, "s/k")


def _convert(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "convert", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_odise_convert_from_annotate_and_labelstudio(annotated, tmp_path):
    proc = _convert(
        ["--from", "annotate", "--input", annotated.output, "--output", "train", "--min-score", "0.5"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote 4 sample(s)" in proc.stdout and "skipped:     1 images without segments" in proc.stdout
    assert sorted(_records(str(tmp_path / "train"))) == ["a.jpg", "b.jpg", "sub/c.png", "x1.jpg"]

    # (--from labelstudio through the command line: tests/test_export_walkthrough.py)
    proc = _convert(["--from", "annotate", "--output", "x"], tmp_path)
    assert proc.returncode == 2 and "--from annotate needs --input" in proc.stderr
    proc = _convert(["--ground-truth", "x.json", "--output", "x"], tmp_path)
    assert proc.returncode == 2 and "--from coco needs --ground-truth and --images" in proc.stderr
    proc = _convert(["--from", "annotate", "--input", str(tmp_path / "nope"), "--output", "x"], tmp_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
