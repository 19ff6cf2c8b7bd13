"""Predictor throughput on this machine's CPU (tiny model by default), batch 1 vs batched.

    python bench/predictor_cpu.py [--model tiny] [--images 16] [--batch-sizes 1 4]

Writes bench/results/predictor_cpu.json (images/s, seconds per image, peak RSS, machine).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, peak_rss_mib, sample_photos, write_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--vocabulary", default="coco_panoptic")
    parser.add_argument("--out", default="predictor_cpu")
    args = parser.parse_args()

    import odise_model

    t0 = time.perf_counter()
    model = odise_model.build_odise(args.model, random_weights=True)  # timing only: random weights
    build_s = time.perf_counter() - t0
    photos = sample_photos()
    images = [photos[i % len(photos)] for i in range(args.images)]
    runs = []
    for bs in args.batch_sizes:
        predictor = odise_model.Predictor(model, args.vocabulary, batch_size=bs)
        predictor.predict(images[: max(bs, 2)])  # warm-up (text embeddings, allocator)
        t0 = time.perf_counter()
        results = predictor.predict(images)
        dt = time.perf_counter() - t0
        runs.append(
            {
                "batch_size": bs,
                "images": len(images),
                "seconds": round(dt, 3),
                "images_per_s": round(len(images) / dt, 3),
                "ms_per_image": round(1000 * dt / len(images), 1),
                "segments": sum(len(r.segments) for r in results),
            }
        )
        print(f"batch {bs}: {runs[-1]['images_per_s']} images/s ({runs[-1]['ms_per_image']} ms/image)")
    write_result(
        args.out,
        {
            "benchmark": "predictor on CPU",
            "command": "python " + " ".join(sys.argv),
            "model": args.model,
            "input": "scikit-image photos (512x512, 400x600, 300x451, 427x640), resized by the model config",
            "build_seconds": round(build_s, 2),
            "runs": runs,
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
