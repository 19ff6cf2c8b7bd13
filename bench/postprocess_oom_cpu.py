"""Peak memory and time of post-processing one large image: the normal path vs the out-of-memory fallback.

The annotate model stage retries an image whose post-processing ran out of memory with
``Predictor.postprocess_raw(..., chunk_queries=8)``: the ``Q x H x W`` mask logits at the original image size
(the biggest tensor of the whole pipeline: 100 queries x 12 MP x 4 bytes = 4.8 GB) never exist at once.
This script measures both paths on the same inputs, each in a fresh process (peak RSS is per process), and
checks that their outputs agree.

Inputs are synthetic but shaped like the official label model's (``odise_label_coco``: 100 queries, the 133
COCO classes): ``mask_cls`` with a few confident queries, smooth random mask logits at stride 4 of a
1024-short-side input. Only post-processing runs (the tiny model supplies the predictor's settings).

    PYTHONPATH=. python bench/postprocess_oom_cpu.py [--height 1500 --width 2000 --queries 100]

Writes ``bench/results/postprocess_oom_cpu.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, peak_rss_mib, write_result  # noqa: E402


def _one(args: argparse.Namespace) -> dict:
    """Run one mode in this process and return its numbers (called in a child process)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    import odise_model

    torch.manual_seed(0)
    predictor = odise_model.Predictor(odise_model.build_odise("tiny"), "coco_panoptic")
    num_classes = len(predictor.vocabulary)
    q = args.queries
    mask_cls = torch.randn(q, num_classes + 1) * 2
    confident = torch.randperm(q)[: q // 5]
    mask_cls[confident, torch.randint(0, num_classes, (len(confident),))] += 12.0
    mask_cls = F.log_softmax(mask_cls, -1)
    padded = (1024, -(-round(1024 * args.width / args.height) // 64) * 64)
    image = (1024, round(1024 * args.width / args.height))
    # confident queries own distinct regions (Voronoi cells of random centres): realistic, non-overlapping
    gh, gw = padded[0] // 32, padded[1] // 32
    centres = torch.rand(len(confident), 2) * torch.tensor([gh, gw])
    yy, xx = torch.meshgrid(torch.arange(gh) + 0.5, torch.arange(gw) + 0.5, indexing="ij")
    owner = (
        (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    ).argmin(0)
    low = torch.randn(q, gh, gw) * 2 - 6
    for j, query in enumerate(confident.tolist()):
        low[query] = torch.where(owner == j, 8.0, -8.0) + torch.randn(gh, gw)
    mask_logits = F.interpolate(
        low[:, None], size=(padded[0] // 4, padded[1] // 4), mode="bicubic", align_corners=False
    )[:, 0]
    baseline = peak_rss_mib()
    started = time.perf_counter()
    chunk = None if args.mode == "unchunked" else args.chunk
    raw = predictor.postprocess_raw(
        mask_cls, mask_logits, padded, image, (args.height, args.width), chunk_queries=chunk
    )
    elapsed = time.perf_counter() - started
    digest = hashlib.sha256()
    for arr in (
        raw.panoptic,
        raw.semantic,
        raw.instance_masks_packed,
        raw.instance_category_ids,
        raw.instance_boxes,
    ):
        digest.update(np.ascontiguousarray(arr).tobytes())
    return {
        "mode": args.mode,
        "chunk_queries": chunk,
        "seconds": round(elapsed, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_rss_above_setup_mib": round(peak_rss_mib() - baseline, 1),
        "segments": len(raw.segments),
        "instances": int(len(raw.instance_scores)),
        "outputs_sha256": digest.hexdigest()[:16],
        "segments_repr": [(s.id, s.category_id, s.area) for s in raw.segments],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--height", type=int, default=1500)
    parser.add_argument("--width", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", choices=["unchunked", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:  # child
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(_one(args)))
        return
    runs = []
    for mode in ("unchunked", "chunked"):
        cmd = [
            sys.executable,
            __file__,
            "--mode",
            mode,
            "--height",
            str(args.height),
            "--width",
            str(args.width),
            "--queries",
            str(args.queries),
            "--chunk",
            str(args.chunk),
            "--threads",
            str(args.threads),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(runs[-1]["mode"], {k: v for k, v in runs[-1].items() if k != "segments_repr"})
    same = (
        runs[0]["outputs_sha256"] == runs[1]["outputs_sha256"]
        and runs[0]["segments_repr"] == runs[1]["segments_repr"]
    )
    for r in runs:
        r.pop("segments_repr")
    write_result(
        "postprocess_oom_cpu",
        {
            "what": "post-processing one image: normal path vs the out-of-memory fallback (chunk_queries)",
            "command": "PYTHONPATH=. python bench/postprocess_oom_cpu.py "
            + " ".join(
                f"--{k} {getattr(args, k)}" for k in ("height", "width", "queries", "chunk", "threads")
            ),
            "inputs": "synthetic mask_cls / mask logits shaped like odise_label_coco (100 queries, 133 classes)",
            "output_size": [args.height, args.width],
            "queries": args.queries,
            "identical_maps_segments_instance_masks": same,
            "runs": runs,
            "load_average_1m_at_end": round(os.getloadavg()[0], 1),  # a shared machine: times are noisy
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
