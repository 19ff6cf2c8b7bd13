"""Export throughput (images/s) for each odise-export target on 1,000 images of tiny-model labels, on the CPU.

    python bench/export_cpu.py [--images 1000]

1. The annotate output: the tiny model (random weights) labels 8 real photos (scikit-image samples, resized
   to 320x240 / 240x320) once; their results go through the real encoder (``pipeline.encode.encode_result``)
   and the schema's row builders (``pipeline.schema.label_row`` / ``rows_to_table``), and the 8 encoded rows
   are reused for ``--images`` rows with distinct keys: half in an image folder, half in a WebDataset tar
   (so that ``--copy-images`` reads both ways); ``uncertainty`` is drawn at random.
2. Each export runs in its own process (``--one``), so its time and peak memory are its own:
   ``bench/results/export_cpu.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

RUNS = [
    {"format": "fiftyone"},
    {"format": "fiftyone", "copy_images": True},
    {"format": "labelstudio"},
    {"format": "labelstudio", "order": "uncertainty", "copy_images": True},
    {"format": "labelstudio", "order": "uncertainty", "max_images": 100},
    {"format": "datumaro"},
    {"format": "datumaro", "copy_images": True},
    {"format": "hf"},
    {"format": "hf", "include_image": True},
    {"format": "hf", "min_score": 0.5},
    {"loop": "annotate_to_shards"},
]


def build_output(root: Path, n_images: int) -> dict:
    """Step 1 of the module doc; returns what was built."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from _common import sample_photos
    from PIL import Image

    import odise_model
    from pipeline.encode import encode_result
    from pipeline.schema import RunProvenance, label_row, rows_to_table

    torch.manual_seed(0)
    model = odise_model.build_odise("tiny")
    vocab = odise_model.load_vocabulary(str(REPO / "examples" / "classes.txt"))
    predictor = odise_model.Predictor(model, vocab, batch_size=4)
    photos = []
    for k, photo in enumerate(sample_photos() * 2):
        size = (320, 240) if k % 2 == 0 else (240, 320)
        photos.append(np.asarray(Image.fromarray(photo).resize(size)))
    started = time.perf_counter()
    results = predictor.predict(photos)
    model_s = time.perf_counter() - started
    encoded = [encode_result(r, include_png=True) for r in results]
    jpegs = []
    for photo in photos:
        buf = io.BytesIO()
        Image.fromarray(photo).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())

    rng = np.random.default_rng(0)
    images_dir, tar_path = root / "images", root / "shards" / "000000.tar"
    images_dir.mkdir(parents=True)
    tar_path.parent.mkdir(parents=True)
    half = n_images // 2
    folder_rows, tar_rows = [], []
    folder_url, tar_url = f"file://{images_dir}", f"file://{tar_path}"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(n_images):
            j = i % len(encoded)
            u = float(rng.uniform(0.05, 0.95))
            if i < half:
                key = f"img{i:06d}.jpg"
                (images_dir / key).write_bytes(jpegs[j])
                shard, sid, rows = f"{folder_url}#images-000000", "images-images-000000-00000000", folder_rows
            else:
                key = f"s{i:06d}"
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size = len(jpegs[j])
                tar.addfile(info, io.BytesIO(jpegs[j]))
                shard, sid, rows = tar_url, "000000-00000000", tar_rows
            rows.append(
                label_row(
                    run_id="bench", shard=shard, shard_id=sid, key=key, encoded=encoded[j], image_ext="jpg",
                    uncertainty=u, branch_disagreement=0.0,
                )
            )  # fmt: skip
    provenance = RunProvenance(
        run_id="bench",
        model_variant="tiny",
        categories=vocab.coco_categories(),
        settings={"plumbing_check": True},
    )
    (root / "out" / "parquet").mkdir(parents=True)
    for sid, rows in (("images-images-000000-00000000", folder_rows), ("000000-00000000", tar_rows)):
        pq.write_table(rows_to_table(rows, provenance), root / "out" / "parquet" / f"{sid}.parquet")
    (root / "out" / "provenance.json").write_text(provenance.to_json())
    return {
        "images": n_images,
        "photos": len(photos),
        "segments_per_image": round(sum(len(e["segments"]) for e in encoded) / len(encoded), 2),
        "instances_per_image": round(sum(len(e["instances"]) for e in encoded) / len(encoded), 2),
        "image_sizes": sorted({f"{p.shape[1]}x{p.shape[0]}" for p in photos}),
        "tiny_model_seconds_for_the_photos": round(model_s, 2),
        "parquet_mib": round(sum(f.stat().st_size for f in (root / "out" / "parquet").iterdir()) / 2**20, 2),
    }


def _vm_hwm_mib() -> float:
    """Peak resident memory of this process image (``VmHWM``; unlike ``ru_maxrss`` it does not carry over the
    parent's peak through fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def run_one(spec: dict, source: str, out: str) -> dict:
    """One export (or loop conversion) in this process; returns its timing and peak memory."""
    rss0 = _vm_hwm_mib()
    started = time.perf_counter()
    if spec.get("loop"):
        from pipeline.export.loop import annotate_to_shards

        summary = annotate_to_shards(source, out).to_dict()
        images = summary["samples"]
        extra = {}
    else:
        from pipeline.export import ExportConfig, run_export

        summary = run_export(ExportConfig(input=source, output=out, **spec)).to_dict()
        images = summary["images"]
        extra = {"rows_read": summary["rows_read"]}
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    return {
        **spec,
        "images": images,
        **extra,
        "seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 1),
        "output_mib": round(size / 2**20, 2),
        "peak_rss_mib": round(_vm_hwm_mib(), 1),
        "peak_rss_after_imports_mib": round(rss0, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: JSON of one run + source + out
    ns = parser.parse_args()
    if ns.one:
        job = json.loads(ns.one)
        print(json.dumps(run_one(job["spec"], job["source"], job["out"])))
        return 0

    from _common import machine, write_result

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    load_at_start = [round(v, 1) for v in os.getloadavg()]  # the machine is shared: say how busy it was
    with tempfile.TemporaryDirectory(prefix="odise-bench-export-") as tmp:
        root = Path(tmp)
        built = build_output(root, ns.images)
        print(f"annotate output: {built}", flush=True)
        runs = []
        for k, spec in enumerate(RUNS):
            job = {"spec": spec, "source": str(root / "out"), "out": str(root / f"export-{k}")}
            proc = subprocess.run(
                [sys.executable, __file__, "--one", json.dumps(job)], env=env, capture_output=True, text=True
            )
            if proc.returncode != 0:
                raise RuntimeError(f"{spec} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            runs.append(result)
            print(json.dumps(result), flush=True)
    write_result(
        "export_cpu",
        {
            "benchmark": "odise-export throughput per target (run_export in its own process), plus the loop conversion",
            "command": f"python bench/export_cpu.py --images {ns.images}",
            "input": "annotate output written by the real encoder and schema row builders from the tiny model's "
            "results on 8 real photos (reused for every row); half the images in a folder, half in one tar",
            "annotate_output": built,
            "runs": runs,
            "load_average_1_5_15min_at_end": [round(v, 1) for v in os.getloadavg()],
            "load_average_at_start": load_at_start,
            "machine": machine(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
