"""Evaluation throughput on this machine's CPU: ``run_evaluation`` on a synthetic COCO-size set.

    python bench/evaluation_cpu.py [--images 200] [--segments 20]

Ground truth: ``--images`` 640x480 images, each cut into ``--segments`` irregular regions (Voronoi cells of
jittered seeds under a random anisotropic metric), VOID bands along region borders as in COCO, one crowd
region every 5th image; categories from the 133-class COCO panoptic vocabulary (about 60% things).
Predictions: the same seeds moved by up to 12 px (boundaries shift), 10% of the segments given a wrong
class, one merge of two neighbours per image, scores and instance masks for things; written through the
real output writers (``encode_result`` -> ``write_staging`` -> ``commit_shard``), 50 images per shard, once
with the PNGs stored and once without (map rebuilt from the RLEs).

Each evaluation runs in a fresh (spawned) process so its peak RSS (``VmHWM``) is its own. Writes
bench/results/evaluation_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, write_result  # noqa: E402

H, W = 480, 640


def _voronoi(seeds: np.ndarray, metric: np.ndarray) -> np.ndarray:
    """``HxW`` index of the nearest seed (anisotropic metric per seed)."""
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    best = np.full((H, W), np.inf, np.float32)
    out = np.zeros((H, W), np.int32)
    for k, ((y, x), (my, mx)) in enumerate(zip(seeds, metric)):
        d = my * (yy - y) ** 2 + mx * (xx - x) ** 2
        closer = d < best
        best[closer] = d[closer]
        out[closer] = k
    return out


def make_image(rng: np.random.Generator, n_segments: int, index: int, categories: list[dict]):
    """One synthetic (GT id map, GT segments, prediction result)."""
    from odise_model.types import Instance, PanopticResult, Segment, bbox_from_mask

    things = [c for c in categories if c["isthing"]]
    stuff = [c for c in categories if not c["isthing"]]
    seeds = rng.uniform([0, 0], [H, W], size=(n_segments, 2)).astype(np.float32)
    metric = rng.uniform(0.4, 2.5, size=(n_segments, 2)).astype(np.float32)
    n_things = int(round(0.6 * n_segments))
    cats = [things[i] for i in rng.integers(0, len(things), n_things)]
    cats += [stuff[i] for i in rng.choice(len(stuff), n_segments - n_things, replace=False)]

    # ground truth: cells, VOID on borders (2 px), one crowd region every 5th image
    cell = _voronoi(seeds, metric)
    border = np.zeros((H, W), bool)
    border[:, 1:] |= cell[:, 1:] != cell[:, :-1]
    border[1:, :] |= cell[1:, :] != cell[:-1, :]
    border[:, :-1] |= border[:, 1:].copy()
    border[:-1, :] |= border[1:, :].copy()
    gt_ids = np.where(border, 0, cell + 1).astype(np.int64) * 1000 + np.where(border, 0, 7)  # 24-bit-ish ids
    gt_segments = []
    for k, cat in enumerate(cats):
        seg_id = (k + 1) * 1000 + 7
        if not (gt_ids == seg_id).any():
            continue
        crowd = int(index % 5 == 0 and k == 0 and bool(cat["isthing"]))
        gt_segments.append({"id": seg_id, "category_id": cat["id"], "iscrowd": crowd})

    # prediction: moved seeds, some wrong classes, one merge
    moved = seeds + rng.uniform(-12, 12, size=seeds.shape).astype(np.float32)
    pred_cell = _voronoi(moved, metric)
    pred_cats = list(cats)
    for k in rng.choice(n_segments, max(1, n_segments // 10), replace=False):
        pool = things if cats[k]["isthing"] else stuff
        pred_cats[k] = pool[int(rng.integers(0, len(pool)))]
    a, b = rng.choice(n_segments, 2, replace=False)
    pred_cell[pred_cell == b] = a
    panoptic = np.zeros((H, W), np.int32)
    segments, instances = [], []
    semantic = np.zeros((H, W), np.int32)
    seg_id = 0
    merged: dict[int, int] = {}  # stuff of one category becomes one segment, as the model does
    for k in range(n_segments):
        mask = pred_cell == k
        if not mask.any():
            continue
        cat = pred_cats[k]
        semantic[mask] = cat["id"]
        if not cat["isthing"] and cat["id"] in merged:
            panoptic[mask] = merged[cat["id"]]
            continue
        seg_id += 1
        panoptic[mask] = seg_id
        score = float(rng.uniform(0.5, 1.0))
        if not cat["isthing"]:
            merged[cat["id"]] = seg_id
        segments.append(Segment(seg_id, cat["id"], cat["name"], bool(cat["isthing"]), score, 0, (0, 0, 0, 0)))
        if cat["isthing"]:
            instances.append(Instance(cat["id"], cat["name"], score, mask, bbox_from_mask(mask)))
    result = PanopticResult(
        panoptic_seg=panoptic, segments=segments, semantic_seg=semantic, instances=instances
    )
    return gt_ids, gt_segments, result


def generate(root: Path, n_images: int, n_segments: int, seed: int = 0) -> dict:
    from odise_model.vocabulary import load_vocabulary
    from pipeline.annotate.commit import commit_shard, write_provenance, write_staging
    from pipeline.encode import encode_result
    from pipeline.groundtruth import encode_panoptic_png
    from pipeline.schema import RunProvenance, label_row

    categories = load_vocabulary("coco_panoptic").coco_categories()
    rng = np.random.default_rng(seed)
    gt_png = root / "gt" / "panoptic"
    gt_png.mkdir(parents=True)
    outs = {True: root / "pred_png", False: root / "pred_rle"}
    provenance = RunProvenance(run_id="bench", model_variant="synthetic", categories=categories)
    for out in outs.values():
        write_provenance(str(out), None, provenance)
    images, annotations = [], []
    rows: dict[bool, list] = {True: [], False: []}
    n_segments_total = 0

    def flush(shard_index: int) -> None:
        for png, out in outs.items():
            shard = {
                "url": f"file:///synthetic/shard-{shard_index:04d}.tar",
                "shard_id": f"shard-{shard_index:04d}",
            }
            write_staging(rows[png], str(out), None, provenance)
            commit_shard(
                str(out),
                None,
                shard=shard,
                expected_keys=len(rows[png]),
                provenance=provenance,
                categories=categories,
                write_coco=False,
            )
            rows[png] = []

    for i in range(n_images):
        gt_ids, gt_segments, result = make_image(rng, n_segments, i, categories)
        n_segments_total += len(gt_segments)
        file_name = f"{i:012d}.jpg"
        (gt_png / f"{i:012d}.png").write_bytes(encode_panoptic_png(gt_ids))
        images.append({"id": i, "file_name": file_name, "height": H, "width": W})
        annotations.append({"image_id": i, "file_name": f"{i:012d}.png", "segments_info": gt_segments})
        for png in outs:
            encoded = encode_result(result, include_png=png)
            common = {
                "run_id": "bench",
                "shard": f"file:///synthetic/shard-{i // 50:04d}.tar",
                "shard_id": f"shard-{i // 50:04d}",
            }
            rows[png].append(label_row(**common, key=file_name, encoded=encoded, image_ext="jpg"))
        if (i + 1) % 50 == 0:
            flush(i // 50)
    if rows[True]:
        flush(n_images // 50)
    gt_categories = [{k: c[k] for k in ("id", "name", "isthing")} for c in categories]
    (root / "gt" / "panoptic.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": gt_categories})
    )
    return {"gt_segments_per_image": round(n_segments_total / n_images, 1)}


def _vm_hwm_mib() -> float | None:
    """Peak RSS of this process's own address space (``VmHWM``; ``ru_maxrss`` would include the parent's
    peak at fork time, which a spawned child inherits across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _evaluate(kwargs: dict) -> dict:
    """Run in a spawned process: one evaluation, its wall time and the process's peak RSS."""
    import resource

    from pipeline.config import EvaluateConfig
    from pipeline.evaluate.run import run_evaluation

    t0, c0 = time.perf_counter(), time.process_time()
    res = run_evaluation(EvaluateConfig(**kwargs))
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "seconds": round(dt, 3),
        "images_per_s": round(res.num_images / dt, 2),
        "ms_per_image": round(1000 * dt / res.num_images, 1),
        "cpu_ms_per_image": round(1000 * cpu / res.num_images, 1),
        "peak_rss_mib": _vm_hwm_mib() or round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "pq": round(res.overall.pq, 4),
        "miou": None if res.semantic is None else round(res.semantic.miou, 4),
        "ap": None if res.instance is None else round(res.instance.ap, 4),
        "num_images": res.num_images,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--segments", type=int, default=20)
    parser.add_argument("--out", default="evaluation_cpu")
    parser.add_argument("--keep", default=None, help="keep the generated data in this folder")
    args = parser.parse_args()

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="odise-eval-bench-"))
    try:
        t0 = time.perf_counter()
        facts = generate(root, args.images, args.segments)
        gen_s = time.perf_counter() - t0
        print(f"generated {args.images} images in {gen_s:.1f} s")
        gt = {
            "ground_truth": str(root / "gt" / "panoptic.json"),
            "ground_truth_png": str(root / "gt" / "panoptic"),
        }
        settings = {
            "pq+semantic+ap (PNGs stored)": {**gt, "predictions": str(root / "pred_png")},
            "pq+semantic (PNGs stored)": {**gt, "predictions": str(root / "pred_png"), "instance_ap": False},
            "pq only (PNGs stored)": {
                **gt,
                "predictions": str(root / "pred_png"),
                "instance_ap": False,
                "semantic": False,
            },
            "pq+semantic+ap (no PNGs: map from RLEs)": {**gt, "predictions": str(root / "pred_rle")},
        }
        runs = []
        ctx = mp.get_context("spawn")
        for name, kwargs in settings.items():
            with ctx.Pool(1) as pool:
                r = pool.apply(_evaluate, (kwargs,))
            runs.append({"setting": name, **r})
            print(
                f"{name}: {r['images_per_s']} images/s, {r['ms_per_image']} ms/image "
                f"({r['cpu_ms_per_image']} CPU ms), peak RSS {r['peak_rss_mib']} MiB"
            )
        sizes = {
            p.name: round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20, 1)
            for p in (root / "gt", root / "pred_png", root / "pred_rle")
        }
        write_result(
            args.out,
            {
                "benchmark": "run_evaluation (pipeline.evaluate.run) on CPU, one process",
                "command": "python " + " ".join(sys.argv),
                "data": {
                    "images": args.images,
                    "size": f"{W}x{H}",
                    "segments_per_image": args.segments,
                    **facts,
                    "categories": 133,
                    "generation_seconds": round(gen_s, 1),
                    "size_mib": sizes,
                },
                "runs": runs,
                "load_average_at_end": os.getloadavg(),
                "machine": machine(),
            },
        )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
