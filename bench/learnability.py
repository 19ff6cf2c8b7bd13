"""Learnability check: the tiny ODISE variant learns a synthetic panoptic dataset on the CPU.

Synthetic data (:func:`pipeline.train.data.write_synthetic_shapes_dataset`): circles, squares and triangles of
random colours (things) on two background textures, stripes and noise, split by a random line (stuff).
The vocabulary is a ``classes.txt`` with the category names. The tiny model's CLIP and Stable Diffusion are
random (frozen), so classification can only come from the trainable side (``text_proj`` on the frozen
random text embeddings of the class names, the null embedding, the mask embeddings); evaluation therefore
runs without the MaskCLIP fusion (``use_clip=False``).

Steps: 1. write train / held-out shards; 2. PQ of the untrained model (same seed as training);
3. ``run_training`` (``odise-train`` equivalent) with periodic evaluation; 4. the trained checkpoint through
``odise_model.Predictor`` on held-out images (and an overlay PNG); 5. ``bench/results/<name>.json``.

    .venv/bin/python bench/learnability.py --steps 600

Settings that differ from the official recipe, to learn within minutes on a CPU: ``lr`` 1e-3 (official
1e-4 for 92k steps), ``num_points`` 1024 (the tiny model's masks are 32x32; official 12,544), LSJ scale
0.5-1.5 at crop 128 (official 0.1-2.0 at 1024), batch 4.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, peak_rss_mib, write_result  # noqa: E402

CLASSES_TXT = """# synthetic shapes (things) on textures (stuff)
1: circle
2: square
3: triangle
4: stripes [stuff]
5: noise [stuff]
"""


def _overlay(image: np.ndarray, panoptic: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, size=(int(panoptic.max()) + 1, 3))
    colours[0] = 0
    return (0.45 * image + 0.55 * colours[panoptic]).astype(np.uint8)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--crop-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--num-points", type=int, default=1024)
    parser.add_argument("--min-scale", type=float, default=0.5)
    parser.add_argument("--max-scale", type=float, default=1.5)
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--val-images", type=int, default=32)
    parser.add_argument("--evals", type=int, default=4, help="evaluations during training")
    parser.add_argument(
        "--val-same",
        action="store_true",
        help="evaluate on the training images themselves (a memorisation check of the whole loop)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on small shared CPUs)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--colour-coded",
        action="store_true",
        help="each shape category has its own hue (classes learnable from colour too)",
    )
    parser.add_argument(
        "--work-dir", default=None, help="where data and checkpoints go (default: a temp folder)"
    )
    parser.add_argument("--name", default="learnability", help="result file bench/results/<name>.json")
    parser.add_argument(
        "--annotate-from",
        default=None,
        help="instead of training: run the annotate pipeline (pipeline.annotate.run.run_annotation) with the checkpoint of a "
        "finished --work-dir on its held-out shards; writes bench/results/<name>_annotate.json",
    )
    args = parser.parse_args(argv)
    if args.annotate_from:
        return annotate(Path(args.annotate_from), args.name, argv)

    import torch

    torch.set_num_threads(args.threads)
    import odise_model
    from pipeline.config import TrainConfig
    from pipeline.train.data import write_synthetic_shapes_dataset
    from pipeline.train.run import evaluate_on_shards, last_checkpoint, run_training

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="odise-learnability-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    # 1. data and vocabulary
    train, val = str(work / "train"), str(work / "val")
    write_synthetic_shapes_dataset(
        train,
        num_images=args.train_images,
        size=128,
        seed=1000 + args.seed,
        samples_per_shard=250,
        colour_coded=args.colour_coded,
    )
    if args.val_same:
        val = train
    else:
        write_synthetic_shapes_dataset(
            val, num_images=args.val_images, size=128, seed=2000 + args.seed, colour_coded=args.colour_coded
        )
    classes = work / "classes.txt"
    classes.write_text(CLASSES_TXT)
    vocab = odise_model.load_vocabulary(str(classes))

    cfg = TrainConfig(
        train=train,
        val=val,
        output=str(work / "run"),
        model="tiny",
        vocab=str(classes),
        max_steps=args.steps,
        batch_size=args.batch_size,
        crop_size=args.crop_size,
        lr=args.lr,
        num_points=args.num_points,
        min_scale=args.min_scale,
        max_scale=args.max_scale,
        eval_every=max(1, args.steps // max(1, args.evals)),
        eval_use_clip=False,
        checkpoint_every=args.steps,
        log_every=20,
        seed=args.seed,
    )

    # 2. before training: the model run_training starts from (build seed = cfg.seed)
    untrained = odise_model.build_odise("tiny", seed=cfg.seed)
    before = evaluate_on_shards(untrained, vocab, val, use_clip=False).to_dict()
    del untrained

    # 3. train
    summary = run_training(cfg)
    records = [json.loads(line) for line in Path(cfg.output, "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    losses = [(r["step"], round(r["loss"], 3)) for r in records if r["type"] == "train"]

    # 4. the trained checkpoint through the predictor on held-out images
    from pipeline.groundtruth import iter_labeled_shards

    ckpt = last_checkpoint(cfg.output)
    model = odise_model.build_odise("tiny", checkpoint=ckpt)
    predictor = odise_model.Predictor(model, vocab, use_clip=False)
    held_out = [r for _, r in zip(range(4), iter_labeled_shards(val))]
    results = predictor.predict([r.decode_image() for r in held_out])
    predicted = [
        {
            "image_id": r.image_id,
            "gt": sorted(vocab.by_id(s.category_id).name for s in r.segments),
            "predicted": sorted(s.category_name for s in res.segments),
        }
        for r, res in zip(held_out, results)
    ]
    from PIL import Image

    tiles = [
        np.concatenate([r.decode_image(), _overlay(r.decode_image(), res.panoptic_seg)], axis=0)
        for r, res in zip(held_out, results)
    ]
    overlay_path = RESULTS / f"{args.name}_overlay.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(tiles, axis=1)).save(overlay_path)

    def pq(d):
        pan = d["panoptic"] if "panoptic" in d else d
        return {
            "PQ": pan["All"]["pq"],
            "PQ_th": pan["Things"]["pq"],
            "PQ_st": pan["Stuff"]["pq"],
            "SQ": pan["All"]["sq"],
            "RQ": pan["All"]["rq"],
        }

    payload = {
        "what": "tiny ODISE fine-tuned on a synthetic panoptic dataset (3 shape things, 2 texture stuff); held-out PQ",
        "command": " ".join(
            ["python", "bench/learnability.py", *map(shlex.quote, argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine(),
        "settings": cfg.model_dump(
            mode="json", exclude={"train", "val", "output", "vocab", "storage_options"}
        ),
        "data": {
            "train_images": args.train_images,
            "val_images": args.train_images if args.val_same else args.val_images,
            "held_out": not args.val_same,
            "image_size": 128,
        },
        "pq_before": pq(before) | {"mIoU": (before["semantic"] or {}).get("mIoU")},
        "pq_after": {k: v for k, v in (summary.last_eval or {}).items() if k not in ("type", "per_class")},
        "per_class_after": evals[-1]["per_class"] if evals else None,
        "eval_curve": [
            {
                "step": e["step"],
                "PQ": e["PQ"],
                "PQ_th": e["PQ_th"],
                "PQ_st": e["PQ_st"],
                "mIoU": e.get("mIoU"),
            }
            for e in evals
        ],
        "loss_curve": losses,
        "steps": summary.steps,
        "train_minutes": round(summary.train_time_s / 60, 2),
        "total_minutes": round((time.time() - t0) / 60, 2),
        "images_per_s": summary.images_per_s,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "predictor_on_held_out": predicted,
        "overlay": str(overlay_path.relative_to(RESULTS.parent.parent)),
    }
    write_result(args.name, payload)
    print(json.dumps({k: payload[k] for k in ("pq_before", "pq_after", "steps", "train_minutes")}, indent=2))
    return payload


def annotate(work: Path, name: str, argv: list[str] | None) -> dict:
    """The trained checkpoint through the annotate pipeline (Ray Data, Parquet + COCO output) on the held-out shards.

    The tiny model's CLIP is random, so the MaskCLIP fusion is switched off with ``alpha = beta = 0``.
    """
    import torch

    torch.set_num_threads(1)
    from pipeline.annotate.run import run_annotation
    from pipeline.config import AnnotateConfig
    from pipeline.train.run import last_checkpoint

    t0 = time.time()
    ckpt = last_checkpoint(str(work / "run"))
    if ckpt is None:
        raise SystemExit(f"no checkpoint under {work / 'run'}")
    cfg = AnnotateConfig(
        input=str(work / "val"),
        output=str(work / "annotated"),
        vocab_file=str(work / "classes.txt"),
        model="tiny",
        checkpoint=ckpt,
        alpha=0.0,
        beta=0.0,
        num_cpus=1,
        batch_size=4,
        overlays=2,
    )
    summary = run_annotation(cfg).to_dict()
    payload = {
        "what": "the learnability checkpoint through the annotate pipeline on the held-out shards",
        "command": " ".join(
            ["python", "bench/learnability.py", *map(shlex.quote, argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine(),
        "checkpoint": ckpt,
        "summary": {k: v for k, v in summary.items() if k not in ("overlays", "coco")},
        "total_minutes": round((time.time() - t0) / 60, 2),
    }
    write_result(f"{name}_annotate", payload)
    return payload


if __name__ == "__main__":
    main()
