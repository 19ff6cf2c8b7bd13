"""Data-plane throughput on this machine's CPU: each stage alone, the chain in one process, and
``run_annotation`` end to end on a warm local Ray (tiny model by default).

    python bench/data_plane_cpu.py [--images 48] [--shards 4] [--model tiny] [--batch-size 4] [--threads 1]

Input: ``--images`` JPEGs (quality 85-95) made from scikit-image's real photos (astronaut, coffee, chelsea,
rocket, immunohistochemistry, hubble_deep_field, retina, camera): random crops, flips, resized to COCO size
640x480 (every 4th one portrait, 480x640), written to ``--shards`` uncompressed tar shards.

Stages, each timed alone over every image (images/s; the slowest is what the pipeline can reach per core):

1. ``read+decode``: :class:`pipeline.annotate.stages.ReadShard` over the shards (stream tar, decode, resize to the
   model's input size), i.e. the pipeline's read task;
2. ``decode``: :func:`pipeline.images.decode_image` on in-memory bytes, no resize;
3. ``predictor``: the model on the resized images (:meth:`Predictor.predict_prepared`, ``--batch-size``);
4. ``encode``: :func:`pipeline.encode.encode_result` (RLE of every segment and instance + panoptic PNG +
   semantic PNG) at the original 640x480;
5. ``write``: :func:`pipeline.annotate.commit.write_staging` per batch + :func:`commit_shard` per shard (Parquet,
   COCO PNGs and fragment, marker) on local disk.

Then the same chain in one process (no Ray), and ``run_annotation`` (Ray Data, one model actor) on a
local Ray started before timing (``--num-cpus``), overlays off. Peak memory: ``ru_maxrss`` of this process
for the stages; for ``run_annotation`` the peak over time of the summed RSS of this process and all its
descendants (Ray's GCS, raylet, workers), sampled every 0.25 s from /proc (shared pages are counted in
every process, so an upper bound). Writes bench/results/data_plane_cpu.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, peak_rss_mib, write_result  # noqa: E402


# --------------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------------
def photos() -> list[np.ndarray]:
    import skimage.data as data

    out = []
    for name in (
        "astronaut",
        "coffee",
        "chelsea",
        "rocket",
        "immunohistochemistry",
        "hubble_deep_field",
        "retina",
        "camera",
    ):
        arr = getattr(data, name)()
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        out.append(np.ascontiguousarray(arr[:, :, :3]))
    return out


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = photos()
    out = []
    for i in range(n):
        arr = base[i % len(base)]
        h, w = arr.shape[:2]
        ch, cw = int(h * rng.uniform(0.7, 1.0)), int(w * rng.uniform(0.7, 1.0))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = arr[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        size = (480, 640) if i % 4 == 3 else (640, 480)
        im = Image.fromarray(np.ascontiguousarray(crop)).resize(size, Image.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(rng.integers(85, 96)))
        out.append(buf.getvalue())
    return out


def write_shards(folder: Path, jpegs: list[bytes], n_shards: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(jpegs) // n_shards)
    paths = []
    for s in range(n_shards):
        path = folder / f"shard-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s * per, min(len(jpegs), (s + 1) * per)):
                for ext, data in (("jpg", jpegs[i]), ("json", json.dumps({"i": i}).encode())):
                    info = tarfile.TarInfo(f"img-{i:05d}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------
# Memory of a process tree
# --------------------------------------------------------------------------------------------------
def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeRSS:
    """Peak of the summed RSS of this process and its descendants, sampled in a thread."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.peak_kib, self.peak_processes = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = _descendants(os.getpid())
            total = sum(_rss_kib(p) for p in pids)
            if total > self.peak_kib:
                self.peak_kib, self.peak_processes = total, len(pids)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------
class Timer:
    """Wall and CPU time (all threads of this process) of a block; CPU time is the robust number on a
    machine shared with other work (wall time there includes waiting for a core)."""

    def __enter__(self) -> Timer:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0

    def rate(self, n: int) -> dict:
        return {
            "images": n,
            "seconds": round(self.wall, 3),
            "images_per_s": round(n / self.wall, 2),
            "ms_per_image": round(1000 * self.wall / n, 1),
            "cpu_ms_per_image": round(1000 * self.cpu / n, 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for the in-process stages (default 1: what Ray gives the model actor here, "
        "since OMP_NUM_THREADS follows its CPU reservation; 2 threads on a busy 2-core machine oversubscribe)",
    )
    parser.add_argument("--out", default="data_plane_cpu")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    import odise_model
    from pipeline.annotate.commit import commit_shard, write_provenance, write_staging
    from pipeline.annotate.stages import ReadShard
    from pipeline.encode import encode_result
    from pipeline.images import decode_image
    from pipeline.schema import RunProvenance, label_row
    from pipeline.shards import list_shards

    tmp = Path(tempfile.mkdtemp(prefix="odise-dataplane-bench-"))
    try:
        jpegs = make_jpegs(args.images)
        shard_paths = write_shards(tmp / "shards", jpegs, args.shards)
        refs = list_shards(str(tmp / "shards"))
        stages: dict[str, dict] = {}

        t0 = time.perf_counter()
        model = odise_model.build_odise(args.model, random_weights=True)  # timing only
        build_s = time.perf_counter() - t0
        predictor = odise_model.Predictor(model, "coco_panoptic", batch_size=args.batch_size)
        vocab = predictor.vocabulary
        cfg = model.config.input
        read_kwargs = dict(
            storage_options={},
            short_side=cfg.short_side,
            max_size=cfg.max_size,
            max_pixels=89_478_485,
            shard_index={},
            overlays_per_shard=0,
            overlays_total=0,
        )

        def shard_json(ref) -> str:
            return json.dumps(
                {
                    "url": ref.url,
                    "shard_id": ref.shard_id,
                    "kind": ref.kind,
                    "members": list(ref.members),
                    "root": ref.root,
                }
            )

        # 1. read + decode (+ resize): the pipeline's read task
        rows = []
        with Timer() as t:
            for ref in refs:
                for batch in ReadShard(**read_kwargs)({"shard": [shard_json(ref)]}):
                    rows.extend({k: batch[k][i] for k in batch} for i in range(len(batch["key"])))
        samples = [r for r in rows if r["kind"] == "sample" and not r["error"]]
        stages["read+decode+resize (ReadShard)"] = t.rate(len(samples))

        # 2. decode alone
        with Timer() as t:
            decoded = [decode_image(b) for b in jpegs]
        stages["decode (decode_image, no resize)"] = t.rate(len(decoded))

        # 3. predictor alone (warm-up first: text embeddings, allocator)
        prepared = [
            predictor.prepare_resized(
                np.frombuffer(r["image"], np.uint8).reshape(r["rh"], r["rw"], 3), (r["height"], r["width"])
            )
            for r in samples
        ]
        predictor.predict_prepared(prepared[: args.batch_size])
        results = []
        with Timer() as t:
            for start in range(0, len(prepared), args.batch_size):
                results.extend(predictor.predict_prepared(prepared[start : start + args.batch_size]))
        stages[f"predictor ({args.model}, batch {args.batch_size})"] = t.rate(len(results))

        # 4. encode alone
        with Timer() as t:
            encoded = [encode_result(r, include_png=True) for r in results]
        stages["encode (RLE + panoptic PNG + semantic PNG)"] = t.rate(len(encoded))

        # 5. staging + commit writes
        out = tmp / "out-stages"
        provenance = RunProvenance(
            run_id="bench", model_variant=args.model, categories=vocab.coco_categories()
        )
        write_provenance(str(out), None, provenance)
        by_shard: dict[str, list] = {}
        for r, enc in zip(samples, encoded):
            by_shard.setdefault(r["shard_id"], []).append(
                label_row(
                    run_id="bench",
                    shard=r["shard"],
                    shard_id=r["shard_id"],
                    key=r["key"],
                    encoded=enc,
                    image_ext="jpg",
                )
            )
        with Timer() as t:
            for ref in refs:
                shard_rows = by_shard[ref.shard_id]
                for start in range(0, len(shard_rows), args.batch_size):
                    write_staging(shard_rows[start : start + args.batch_size], str(out), None, provenance)
                commit_shard(
                    str(out),
                    None,
                    shard=ref,
                    expected_keys=len(shard_rows),
                    provenance=provenance,
                    categories=vocab.coco_categories(),
                    write_coco=True,
                )
        stages["write (staging per batch + commit per shard, COCO on)"] = t.rate(len(samples))
        stage_peak = peak_rss_mib()

        # 6. the chain in one process
        out = tmp / "out-chain"
        write_provenance(str(out), None, provenance)
        n = 0
        chain_timer = Timer()
        with chain_timer:
            for ref in refs:
                shard_rows = []
                for batch in ReadShard(**read_kwargs)({"shard": [shard_json(ref)]}):
                    items = [{k: batch[k][i] for k in batch} for i in range(len(batch["key"]))]
                    items = [r for r in items if r["kind"] == "sample" and not r["error"]]
                    for start in range(0, len(items), args.batch_size):
                        chunk = items[start : start + args.batch_size]
                        prep = [
                            predictor.prepare_resized(
                                np.frombuffer(r["image"], np.uint8).reshape(r["rh"], r["rw"], 3),
                                (r["height"], r["width"]),
                            )
                            for r in chunk
                        ]
                        rows_ = [
                            label_row(
                                run_id="bench",
                                shard=r["shard"],
                                shard_id=r["shard_id"],
                                key=r["key"],
                                encoded=encode_result(res, include_png=True),
                                image_ext="jpg",
                            )
                            for r, res in zip(chunk, predictor.predict_prepared(prep))
                        ]
                        write_staging(rows_, str(out), None, provenance)
                        shard_rows.extend(rows_)
                commit_shard(
                    str(out),
                    None,
                    shard=ref,
                    expected_keys=len(shard_rows),
                    provenance=provenance,
                    categories=vocab.coco_categories(),
                    write_coco=True,
                )
                n += len(shard_rows)
        chain = chain_timer.rate(n)
        del model, predictor, results, encoded, prepared

        # 7. run_annotation on a warm Ray
        import ray

        import pipeline

        t0 = time.perf_counter()
        ray.init(
            num_cpus=args.num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False
        )
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray_start_s = time.perf_counter() - t0
        config = pipeline.AnnotateConfig(
            input=str(tmp / "shards"),
            output=str(tmp / "out-ray"),
            vocab_file="coco_panoptic",
            model=args.model,
            batch_size=args.batch_size,
            overlays=0,
            num_cpus=args.num_cpus,
        )
        with TreeRSS() as mem, Timer() as t:
            summary = pipeline.run_annotation(config)
        ray.shutdown()
        e2e = {
            **t.rate(summary.images),
            "cpu_ms_per_image": None,  # the work runs in Ray worker processes, not measured here
            "labelled": summary.labelled,
            "errors": summary.errors,
            "includes": "input checks, provenance, actor start + model build, COCO export, summary",
            "ray_init_seconds_not_included": round(ray_start_s, 2),
            "peak_tree_rss_mib": round(mem.peak_kib / 1024, 1),
            "processes_at_peak": mem.peak_processes,
        }
        slowest = min(stages, key=lambda k: stages[k]["images_per_s"])
        print(f"model build: {build_s:.1f} s")
        for name, r in stages.items():
            print(
                f"{name:55s} {r['images_per_s']:8.2f} images/s  {r['ms_per_image']:8.1f} ms/image  "
                f"{r['cpu_ms_per_image']:8.1f} CPU ms/image"
            )
        print(f"{'chain in one process':55s} {chain['images_per_s']:8.2f} images/s")
        print(
            f"{'run_annotation (warm Ray)':55s} {e2e['images_per_s']:8.2f} images/s, "
            f"peak tree RSS {e2e['peak_tree_rss_mib']} MiB"
        )
        write_result(
            args.out,
            {
                "benchmark": "data plane on CPU: stages alone, chain in one process, run_annotation on warm Ray",
                "command": "python " + " ".join(sys.argv),
                "model": args.model,
                "input": {
                    "images": args.images,
                    "shards": len(shard_paths),
                    "image_size": "640x480 (every 4th 480x640), JPEG q85-95 from scikit-image photos",
                    "jpeg_kib_mean": round(sum(map(len, jpegs)) / len(jpegs) / 1024, 1),
                    "model_input": f"short side {cfg.short_side}, max {cfg.max_size}",
                },
                "batch_size": args.batch_size,
                "torch_threads_in_process": args.threads,
                "model_build_seconds": round(build_s, 2),
                "stages": stages,
                "slowest_stage": slowest,
                "chain_one_process": chain,
                "run_annotation": e2e,
                "peak_rss_mib_stages": round(stage_peak, 1),
                "load_average_at_end": os.getloadavg(),
                "machine": machine(),
            },
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
