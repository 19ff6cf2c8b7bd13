"""The README's pictures of labels: overlays written by the annotate pipeline, reproducibly.

1. **Meaningful labels** (``docs/images/synthetic_shapes_overlays.jpg``): the tiny model trained by
   ``bench/learnability.py`` (synthetic shapes: circle / square / triangle things on stripes / noise stuff)
   labels the held-out images of its ``--work-dir`` through the annotate pipeline
   (:func:`pipeline.annotate.run.run_annotation`: Ray Data, Parquet + COCO, ``overlays/``). The top row is
   the first ``--n`` overlays the pipeline wrote (the first images of the held-out shard, no selection), as
   written; the bottom row is the ground truth of the same images drawn with the same renderer
   (:func:`pipeline.encode.render_overlay`, score shown as 1.00).
2. **The plumbing check** (``docs/images/plumbing_random_weights.jpg``): ``odise-annotate``'s pipeline on the
   sample photos with ``--model tiny`` (random weights: the labels are meaningless), one overlay as written.

Run after training (about 5 minutes on a 2-core CPU)::

    python bench/learnability.py --steps 800 --evals 2 --lr 1e-3 --val-images 24 --train-images 1000 \\
        --colour-coded --work-dir /tmp/learn_readme --name learnability_readme
    python bench/readme_images.py --work-dir /tmp/learn_readme

Writes the images and ``bench/results/readme_images.json`` (commands, checkpoint, held-out PQ, files).
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _annotate(**kwargs) -> tuple[dict, list[str]]:
    """``run_annotation`` into a fresh output; returns its summary and the overlay paths it wrote."""
    from pipeline.annotate.run import run_annotation
    from pipeline.config import AnnotateConfig

    out = Path(kwargs["output"])
    if out.exists():
        shutil.rmtree(
            out
        )  # a rerun into an output labels nothing: start fresh so the overlays are this run's
    summary = run_annotation(AnnotateConfig(num_cpus=2, batch_size=4, no_progress_timeout_s=600, **kwargs))
    return summary.to_dict(), sorted(summary.overlays)


def _ground_truth_overlay(record, vocab) -> np.ndarray:
    """The record's ground truth drawn with the pipeline's renderer."""
    from odise_model.types import PanopticResult, Segment
    from pipeline.encode import render_overlay

    segments = []
    for s in record.segments:
        cat = vocab.by_id(s.category_id)
        segments.append(Segment(s.id, s.category_id, cat.name, cat.isthing, 1.0, s.area, tuple(s.bbox)))
    result = PanopticResult(panoptic_seg=record.id_map, segments=segments, semantic_seg=None, instances=[])
    return np.asarray(render_overlay(record.decode_image(), result).convert("RGB"))


def _jpeg(image: np.ndarray, path: Path) -> int:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    path.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", required=True, help="a finished bench/learnability.py --work-dir")
    parser.add_argument(
        "--n", type=int, default=4, help="held-out images shown (the first ones, no selection)"
    )
    parser.add_argument("--out-dir", default=str(REPO / "docs" / "images"))
    parser.add_argument("--name", default="readme_images", help="result file bench/results/<name>.json")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from PIL import Image

    import odise_model
    from pipeline.groundtruth import iter_labeled_shards
    from pipeline.train.run import last_checkpoint

    t0 = time.time()
    work, out_dir = Path(args.work_dir), Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = last_checkpoint(str(work / "run"))
    if ckpt is None:
        raise SystemExit(
            f"no checkpoint under {work / 'run'}: run bench/learnability.py --work-dir {work} first"
        )

    # 1. the trained checkpoint through the annotate pipeline on the held-out shard (no CLIP fusion: the tiny
    #    model's CLIP is random, as in bench/learnability.py)
    trained, overlays = _annotate(
        input=str(work / "val"),
        output=str(work / "annotated_readme"),
        vocab_file=str(work / "classes.txt"),
        model="tiny",
        checkpoint=ckpt,
        alpha=0.0,
        beta=0.0,
        overlays=args.n,
    )
    vocab = odise_model.load_vocabulary(str(work / "classes.txt"))
    records = {r.key: r for _, r in zip(range(4 * args.n), iter_labeled_shards(str(work / "val")))}
    top, bottom, keys = [], [], []
    for path in overlays[: args.n]:
        key = (
            path.split("/overlays/", 1)[1].split("/", 1)[1].removesuffix(".jpg")
        )  # overlays/<shard>/<key>.jpg
        keys.append(key)
        top.append(np.asarray(Image.open(path).convert("RGB")))
        bottom.append(_ground_truth_overlay(records[key], vocab))
    grid = np.concatenate([np.concatenate(top, axis=1), np.concatenate(bottom, axis=1)], axis=0)
    synthetic = out_dir / "synthetic_shapes_overlays.jpg"
    synthetic_bytes = _jpeg(grid, synthetic)

    # 2. the plumbing check on the sample photos (random weights)
    plumbing_summary, plumbing_overlays = _annotate(
        input=str(REPO / "examples" / "images"),
        output=str(work / "plumbing"),
        vocab_file=str(REPO / "examples" / "classes.txt"),
        model="tiny",
        overlays=4,
    )
    chosen = next(p for p in plumbing_overlays if Path(p).stem == "astronaut")
    plumbing = out_dir / "plumbing_random_weights.jpg"
    shutil.copyfile(chosen, plumbing)

    learn = (
        json.loads((RESULTS / "learnability_readme.json").read_text())
        if (RESULTS / "learnability_readme.json").is_file()
        else {}
    )
    payload = {
        "what": "README pictures: annotate-pipeline overlays of a tiny model trained on synthetic shapes (held-out "
        "images, with their ground truth drawn below), and of the random-weights plumbing check on the sample photos",
        "command": " ".join(
            [
                "python",
                "bench/readme_images.py",
                *map(shlex.quote, argv if argv is not None else sys.argv[1:]),
            ]
        ),
        "training_command": learn.get("command"),
        "machine": machine(),
        "checkpoint": ckpt,
        "held_out_pq_of_checkpoint": learn.get("pq_after"),
        "synthetic": {
            "file": str(synthetic.relative_to(REPO)) if synthetic.is_relative_to(REPO) else str(synthetic),
            "bytes": synthetic_bytes,
            "keys": keys,
            "summary": {
                k: v for k, v in trained.items() if k not in ("overlays", "coco", "run_id", "output")
            },
        },
        "plumbing": {
            "file": str(plumbing.relative_to(REPO)) if plumbing.is_relative_to(REPO) else str(plumbing),
            "bytes": plumbing.stat().st_size,
            "overlay": Path(chosen).name,
            "summary": {
                k: v for k, v in plumbing_summary.items() if k not in ("overlays", "coco", "run_id", "output")
            },
        },
        "total_minutes": round((time.time() - t0) / 60, 2),
    }
    write_result(args.name, payload)
    print(json.dumps({k: payload[k] for k in ("synthetic", "plumbing")}, indent=2))
    return payload


if __name__ == "__main__":
    main()
