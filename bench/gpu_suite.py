"""The GPU benchmark suite: ONE script, under 8 minutes on one H100 / H200, everything measured side by side.

    python bench/gpu_suite.py                                   # official-size model on cuda (the real run)
    python bench/gpu_suite.py --model tiny --device cpu --quick # dry run on a CPU (checks the script works)

Results: ``$OUT/gpu_suite.json`` (``$OUT`` set by the device runner; otherwise ``bench/results/``), rewritten
after every section so a run cut short still leaves what it measured; a compact table on stdout.

What it measures (official-size ``odise_label_coco`` with random weights: ``build_odise(model)``, seeded)
on COCO-size 640x480 inputs at the official test resolution (short side 1024 -> 1024x1365, padded to
1024x1408 -> 6 SD tiles of 512):

1. ``agreement`` (before any timing): (a) vs fp32 with batched tiles and images (should agree almost
   exactly), then (a) vs (b). Numbers: pixel agreement of the semantic category maps, of the panoptic
   category maps (category of each pixel's segment, 0 = unlabeled), of the panoptic segmentation
   (fraction of pixels whose segment is matched one-to-one, greedily by overlap, to a segment of the same
   category in the other result; unlabeled matches unlabeled) and PQ of one result against the other.
2. ``official`` (a): fp32 (TF32 off, cudnn.benchmark off), batch 1,
   ``Predictor(..., full_decode=True, sequential_tiles=True, batch_size=1)``: the official execution.
3. ``production`` (b): frozen SD / CLIP in bf16 (``set_frozen_dtype``, what ``build_odise(dtype="bf16")``
   does), TF32 on, cudnn.benchmark on, ``--batch`` images per call with ``--tile-batch`` tiles per SD
   pass, VAE decoder stopped after its last tap; also at batch 1 (latency and peak memory).
4. ``pipeline``: ``run_annotation`` from generated tar shards of JPEGs to Parquet on a local Ray with one
   GPU actor (``model`` + ``pretrained=False``: random weights), overall and steady-state images/s (between
   the first and the last staging write reported by ``on_progress``; shard commits with an older
   ``run_annotation``) and GPU busy fraction (``nvidia-smi`` utilisation over that window).
5. ``production_compiled``: (b) + ``torch.compile`` of the SD UNet (``--compile auto``: on CUDA only, when
   the remaining budget allows; falls back to eager on any error and says so; checked against eager (b)).
6. ``training``: training steps (forward + backward + AdamW, bf16 autocast) of the same model at the
   official crop size (``input.short_side``: 1024) on synthetic batches through
   ``odise_model.training.TrainingModule``; images/s per GPU at the largest of 8, 4, 2, 1 images per GPU
   that fits. Skipped with a reason when that module is missing (the measurement is then a placeholder for
   whoever lands the training code).

Per setting: images/s, FLOPs per image (``torch.utils.flop_counter.FlopCounterMode`` on one image: matmul,
conv and attention FLOPs; grid_sample and element-wise work are not counted), achieved TFLOP/s (counted
FLOPs x images/s), GPU busy fraction (union of CUDA kernel + copy intervals / wall time, from
``torch.profiler`` over one extra profiled iteration of the timed loop; ``nvidia-smi`` utilisation sampled
during the timed loop as a second opinion) and peak GPU memory (``torch.cuda.max_memory_allocated``,
weights included).

Targets it reports against: the paper's 1.26 images/s at 1024x1024 on a V100 using 11.9 GB; production
should exceed 15 images/s per GPU on COCO-size images, be >= 8x faster than (a) in the same run, and use
< 10 GB at batch 1.

Time: a global budget (``--budget-s``, default 450 s) starts at launch; every section checks what is left,
shrinks its loops (fewer iterations when slow) or is skipped with a reason. Requirements: torch, numpy,
pillow, diffusers, transformers, open_clip_torch (the model); pydantic (PQ in the agreement, the
pipeline); pyarrow, fsspec, pycocotools, webdataset, ray[data] (the pipeline section). Missing optional
packages skip their section and are listed under ``environment``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

START = time.perf_counter()
RESULTS_DIR = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, when not installed
sys.path.insert(
    0, str(Path(__file__).resolve().parent)
)  # bench/measure.py, also when imported from elsewhere
from measure import (  # noqa: E402
    Report,
    SmiSampler,
    count_flops,
    gib,
    has,
    profiled_busy,
    run_section,
    sync,
)

PAPER = {"images_per_s": 1.26, "gpu": "V100", "resolution": "1024x1024", "memory_gb": 11.9}
TARGETS = {"production_images_per_s_min": 15.0, "speedup_vs_official_min": 8.0, "batch1_memory_gb_max": 10.0}


# --------------------------------------------------------------------------------------------------
# Small helpers (the measurement kit itself is bench/measure.py)
# --------------------------------------------------------------------------------------------------
def remaining(args) -> float:
    return args.budget_s - (time.perf_counter() - START)


def section(report: Report, name: str, fn, cfg) -> Any:
    """Run one section with the remaining budget shown; record its result (or error); never raise."""
    return run_section(report, name, fn, cfg, budget_left_s=remaining(cfg))


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def make_images(n: int, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """``n`` 480x640 RGB uint8 images: scikit-image photos (crops, flips) if installed, else synthetic scenes."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    base: list[np.ndarray] = []
    source = "synthetic"
    try:
        import skimage.data as data

        for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
            with contextlib.suppress(Exception):
                base.append(np.ascontiguousarray(getattr(data, name)()[:, :, :3]))
        if base:
            source = "scikit-image photos (random crops / flips), resized to 640x480"
    except ImportError:
        pass
    out = []
    for i in range(n):
        if base:
            arr = base[i % len(base)]
            h, w = arr.shape[:2]
            ch, cw = int(h * rng.uniform(0.75, 1.0)), int(w * rng.uniform(0.75, 1.0))
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            crop = arr[y : y + ch, x : x + cw]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            im = Image.fromarray(np.ascontiguousarray(crop)).resize((640, 480), Image.BILINEAR)
        else:  # a sky / ground gradient with random shapes, blurred a little
            top, bottom = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
            t = np.linspace(0, 1, 480)[:, None, None]
            grad = (top * (1 - t) + bottom * t).repeat(640, axis=1).astype(np.uint8)
            im = Image.fromarray(grad)
            draw = ImageDraw.Draw(im)
            for _ in range(12):
                x0, y0 = int(rng.integers(0, 600)), int(rng.integers(0, 440))
                box = (x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200)))
                color = tuple(int(v) for v in rng.integers(0, 255, 3))
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
            im = im.filter(ImageFilter.GaussianBlur(1.5))
        out.append(np.asarray(im))
    return out, source


def write_shards(folder: Path, images: list[np.ndarray], per_shard: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(images), per_shard):
        with tarfile.open(folder / f"shard-{s // per_shard:06d}.tar", "w") as tar:
            for i in range(s, min(len(images), s + per_shard)):
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, format="JPEG", quality=90)
                data = buf.getvalue()
                info = tarfile.TarInfo(f"img-{i:06d}.jpg")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))


# --------------------------------------------------------------------------------------------------
# Agreement of two sets of results
# --------------------------------------------------------------------------------------------------
def _category_map(result) -> np.ndarray:
    lut = {int(s.id): int(s.category_id) for s in result.segments}
    ids, inverse = np.unique(result.panoptic_seg, return_inverse=True)
    cats = np.array([lut.get(int(i), 0) for i in ids], np.int32)
    return cats[inverse].reshape(result.panoptic_seg.shape)


def _panoptic_agreement(ra, rb) -> float:
    a, b = ra.panoptic_seg.astype(np.int64), rb.panoptic_seg.astype(np.int64)
    cat_a = {0: 0, **{int(s.id): int(s.category_id) for s in ra.segments}}
    cat_b = {0: 0, **{int(s.id): int(s.category_id) for s in rb.segments}}
    pairs, counts = np.unique(a * (1 << 24) + b, return_counts=True)
    used_a, used_b, agree = set(), set(), 0
    for k in np.argsort(-counts, kind="stable"):
        ia, ib = divmod(int(pairs[k]), 1 << 24)
        if ia in used_a or ib in used_b or cat_a.get(ia, -1) != cat_b.get(ib, -2):
            continue
        used_a.add(ia)
        used_b.add(ib)
        agree += int(counts[k])
    return agree / a.size


def compare(results_a: list, results_b: list, vocabulary) -> dict[str, Any]:
    """Agreement numbers of two result lists for the same images (b scored against a)."""
    sem = np.mean(
        [
            float((x.semantic_seg == y.semantic_seg).mean())
            for x, y in zip(results_a, results_b)
            if x.semantic_seg is not None and y.semantic_seg is not None
        ]
        or [math.nan]
    )
    cat = np.mean(
        [float((_category_map(x) == _category_map(y)).mean()) for x, y in zip(results_a, results_b)]
    )
    pan = np.mean([_panoptic_agreement(x, y) for x, y in zip(results_a, results_b)])
    out: dict[str, Any] = {
        "images": len(results_a),
        "semantic_pixel_agreement": round(float(sem), 5),
        "panoptic_category_pixel_agreement": round(float(cat), 5),
        "panoptic_segment_pixel_agreement": round(float(pan), 5),
        "segments_per_image": [
            round(float(np.mean([len(r.segments) for r in rs])), 1) for rs in (results_a, results_b)
        ],
    }
    try:  # PQ of b against a (needs pipeline.evaluate.metrics: numpy + pydantic through pipeline/__init__)
        from pipeline.evaluate.metrics import PQStat, pq_compute_single_image

        cats = {c.id: {"isthing": int(c.isthing), "name": c.name} for c in vocabulary}
        stat = PQStat()
        for x, y in zip(results_a, results_b):
            stat += pq_compute_single_image(x.panoptic_seg, x.segments, y.panoptic_seg, y.segments, cats)
        out["pq_of_b_against_a"] = round(stat.pq_average(cats)[0].pq, 5)
    except Exception as exc:  # noqa: BLE001 - optional
        out["pq_of_b_against_a"] = f"unavailable ({type(exc).__name__}: {exc})"
    return out


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
def environment(cfg) -> dict[str, Any]:
    import torch

    packages = {}
    for mod in (
        "diffusers",
        "transformers",
        "open_clip",
        "PIL",
        "pydantic",
        "pyarrow",
        "fsspec",
        "pycocotools",
        "webdataset",
        "ray",
        "skimage",
    ):
        packages[mod] = has(mod)
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(cfg.device),
        "gpu": torch.cuda.get_device_name(cfg.device) if cfg.device.type == "cuda" else None,
        "gpu_memory_gib": gib(torch.cuda.get_device_properties(cfg.device).total_memory)
        if cfg.device.type == "cuda"
        else None,
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
        "packages_present": packages,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    missing = [m for m in ("diffusers", "transformers", "open_clip", "PIL") if not packages[m]]
    if missing:
        raise RuntimeError(f"the model needs {missing}: install the project (pip install -e .) first")
    return info


def build(cfg) -> dict[str, Any]:
    import torch

    import odise_model

    t0 = time.perf_counter()
    how = "built on the device"
    try:
        with torch.device(cfg.device):
            model = odise_model.build_odise(cfg.model, device=cfg.device, random_weights=True)
    except Exception as exc:  # noqa: BLE001 - some init code may not like a non-CPU default device
        how = f"built on CPU then moved ({type(exc).__name__} on the device)"
        model = odise_model.build_odise(cfg.model, device="cpu", random_weights=True).to(cfg.device)
    sync(cfg.device)
    cfg.model_obj = model
    cfg.vocabulary = odise_model.load_vocabulary("coco_panoptic")
    inp = model.config.input
    params = sum(p.numel() for p in model.parameters())
    return {
        "model": cfg.model,
        "weights": "random (seeded), pretrained=False",
        "how": how,
        "seconds": round(time.perf_counter() - t0, 1),
        "parameters": params,
        "trainable_parameters": sum(p.numel() for _, p in model.trainable_parameters()),
        "input": {"short_side": inp.short_side, "max_size": inp.max_size, "tile_size": inp.tile_size},
    }


def prepare_inputs(cfg) -> dict[str, Any]:
    import odise_model
    from odise_model.feature_extractor import tile_boxes

    images, source = make_images(cfg.n_images)
    cfg.images = images
    predictor = odise_model.Predictor(cfg.model_obj, cfg.vocabulary)
    cfg.prepared = [predictor.prepare(im) for im in images]
    tensor, resized, _ = cfg.prepared[0]
    tiles = len(
        tile_boxes(int(tensor.shape[-2]), int(tensor.shape[-1]), cfg.model_obj.config.input.tile_size)
    )
    return {
        "images": len(images),
        "source": source,
        "size": "640x480 (HxW 480x640)",
        "model_input": f"{resized[0]}x{resized[1]} padded to {tensor.shape[-2]}x{tensor.shape[-1]}",
        "tiles_per_image": tiles,
    }


def set_precision(official: bool) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = not official
    torch.backends.cudnn.allow_tf32 = not official
    torch.backends.cudnn.benchmark = not official
    torch.set_float32_matmul_precision("highest" if official else "high")


def official_predictor(cfg):
    import odise_model

    return odise_model.Predictor(
        cfg.model_obj, cfg.vocabulary, batch_size=1, full_decode=True, sequential_tiles=True
    )


def production_predictor(cfg, batch: int):
    import odise_model

    return odise_model.Predictor(
        cfg.model_obj, cfg.vocabulary, batch_size=batch, tile_batch_size=cfg.tile_batch
    )


def run_batches(predictor, prepared: list) -> list:
    out = []
    for start in range(0, len(prepared), predictor.batch_size):
        out.extend(predictor.predict_prepared(prepared[start : start + predictor.batch_size]))
    return out


def agreement_fp32(cfg) -> dict[str, Any]:
    """(a) vs fp32 batched, both fp32 with TF32 off; keeps (a)'s results for the bf16 check."""
    set_precision(official=True)
    k = cfg.agree_images
    subset = cfg.prepared[:k]
    cfg.results_a = run_batches(official_predictor(cfg), subset)
    fp32_batched = run_batches(production_predictor(cfg, cfg.batch), subset)
    out = compare(cfg.results_a, fp32_batched, cfg.vocabulary)
    out["what"] = (
        "(a) official fp32 vs fp32 with batched tiles + images, decoder stopped early (same weights)"
    )
    return out


def timed(cfg, predictor, prepared: list, *, max_iters: int, max_s: float, per_iter: int, sampler) -> dict:
    """Timed loop over ``per_iter`` images per iteration (warm-up done by the caller)."""
    import torch

    if cfg.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(cfg.device)
    n_images, iters = 0, 0
    sync(cfg.device)
    t0 = time.perf_counter()
    while iters < max_iters and (iters == 0 or time.perf_counter() - t0 < max_s):
        chunk = [prepared[(iters * per_iter + j) % len(prepared)] for j in range(per_iter)]
        run_batches(predictor, chunk)
        n_images += per_iter
        iters += 1
    sync(cfg.device)
    t1 = time.perf_counter()
    wall = t1 - t0
    peak = torch.cuda.max_memory_allocated(cfg.device) if cfg.device.type == "cuda" else None
    return {
        "images": n_images,
        "iterations": iters,
        "seconds": round(wall, 3),
        "images_per_s": round(n_images / wall, 3),
        "seconds_per_image": round(wall / n_images, 4),
        "peak_memory_gib": gib(peak),
        "nvidia_smi_util": sampler.mean_util(t0, t1),
    }


def measure_setting(cfg, predictor, *, per_iter: int, max_iters: int, max_s: float, sampler) -> dict:
    """Warm-up, FLOPs on one image, timed loop, one profiled iteration."""
    prepared = cfg.prepared
    run_batches(predictor, prepared[:per_iter])  # warm-up (cudnn autotune, allocator, text embeddings)
    one = prepared[:1]
    batch = predictor.batch_size
    predictor.batch_size = 1
    try:
        flops = count_flops(lambda: run_batches(predictor, one))
    finally:
        predictor.batch_size = batch
    out = timed(
        cfg, predictor, prepared, max_iters=max_iters, max_s=max_s, per_iter=per_iter, sampler=sampler
    )
    out["flops_per_image"] = flops
    out["gflops_per_image"] = round(flops / 1e9, 1) if flops else None
    out["achieved_tflops"] = round(flops * out["images_per_s"] / 1e12, 2) if flops else None
    chunk = [prepared[j % len(prepared)] for j in range(per_iter)]
    prof = profiled_busy(lambda: run_batches(predictor, chunk), cfg.device)
    out["profile"] = prof
    out["gpu_busy"] = prof["gpu_busy"] if prof else None
    return out


def official(cfg) -> dict[str, Any]:
    set_precision(official=True)
    budget = min(cfg.section_s, max(10.0, remaining(cfg) * 0.2))
    out = measure_setting(
        cfg,
        official_predictor(cfg),
        per_iter=1,
        max_iters=cfg.official_iters,
        max_s=budget,
        sampler=cfg.sampler,
    )
    out["settings"] = "fp32, TF32 off, batch 1, tiles one by one, full VAE decode"
    cfg.official_ips = out["images_per_s"]
    return out


def to_production(cfg) -> dict[str, Any]:
    """Cast the frozen SD / CLIP to bf16 and check (b) against (a) before timing it."""
    import torch

    cfg.model_obj.set_frozen_dtype(
        torch.bfloat16 if cfg.device.type == "cuda" or cfg.bf16_on_cpu else torch.float32
    )
    if cfg.device.type == "cuda":
        torch.cuda.empty_cache()
    set_precision(official=False)
    results_b = run_batches(production_predictor(cfg, cfg.batch), cfg.prepared[: cfg.agree_images])
    out = compare(cfg.results_a, results_b, cfg.vocabulary)
    out["what"] = f"(a) official fp32 vs (b) production ({cfg.dtype_name} frozen SD/CLIP, TF32, batched)"
    cfg.results_b = results_b
    return out


def production(cfg) -> dict[str, Any]:
    set_precision(official=False)
    budget = min(cfg.section_s, max(10.0, remaining(cfg) * 0.2))
    out = measure_setting(
        cfg,
        production_predictor(cfg, cfg.batch),
        per_iter=cfg.batch,
        max_iters=cfg.production_iters,
        max_s=budget,
        sampler=cfg.sampler,
    )
    # batch 1: latency and peak memory
    b1 = production_predictor(cfg, 1)
    run_batches(b1, cfg.prepared[:1])
    out["batch1"] = timed(
        cfg,
        b1,
        cfg.prepared,
        max_iters=cfg.production_iters,
        max_s=min(10.0, budget),
        per_iter=1,
        sampler=cfg.sampler,
    )
    out["settings"] = (
        f"{cfg.dtype_name} frozen SD/CLIP, TF32 + cudnn.benchmark on, batch {cfg.batch}, "
        f"tile batch {cfg.tile_batch}, VAE decoder stopped after its last tap, eager"
    )
    out["speedup_vs_official"] = (
        round(out["images_per_s"] / cfg.official_ips, 2) if cfg.official_ips else None
    )
    cfg.production_ips = out["images_per_s"]
    return out


def pipeline_run(cfg) -> dict[str, Any]:
    missing = [m for m in ("ray", "pyarrow", "fsspec", "pycocotools", "pydantic") if not has(m)]
    if missing:
        return {"skipped": f"missing packages {missing}"}
    if remaining(cfg) < cfg.pipeline_min_s:
        return {"skipped": f"budget: {remaining(cfg):.0f} s left < {cfg.pipeline_min_s} s"}
    import ray
    import torch

    import pipeline

    tmp = Path(tempfile.mkdtemp(prefix="odise-gpu-suite-"))
    try:
        n = cfg.pipeline_images
        images, _ = make_images(n, seed=1)
        write_shards(tmp / "shards", images, cfg.pipeline_per_shard)
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        ray.init(
            num_cpus=os.cpu_count(),
            num_gpus=1 if cfg.device.type == "cuda" else 0,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        ray_init_s = time.perf_counter() - t0
        config = pipeline.AnnotateConfig(
            input=str(tmp / "shards"),
            output=str(tmp / "out"),
            vocab_file="coco_panoptic",
            model=cfg.model,
            pretrained=False,
            device=cfg.device.type,
            dtype="bf16" if cfg.device.type == "cuda" else "fp32",
            batch_size=cfg.batch,
            tile_batch_size=cfg.tile_batch,
            overlays=0,
            num_actors=1,
            no_progress_timeout_s=max(60.0, remaining(cfg)),
        )
        # progress events: ("shard", committed images) after each commit, ("images", staged images) whenever
        # labelled images are staged (older run_annotation versions send commits only, without "event")
        events: list[tuple[float, str, int]] = []

        def on_progress(p: dict[str, Any]) -> None:
            kind = p.get("event", "shard")
            events.append(
                (time.perf_counter(), kind, int(p["images_staged"] if kind == "images" else p["images"]))
            )

        t_start = time.perf_counter()
        summary = pipeline.run_annotation(config, on_progress=on_progress)
        t_end = time.perf_counter()
        ray.shutdown()
        commits = [(t, n) for t, kind, n in events if kind == "shard"]
        staged = [(t, n) for t, kind, n in events if kind == "images"]
        out: dict[str, Any] = {
            "images": summary.images,
            "labelled": summary.labelled,
            "errors": summary.errors,
            "shards_committed": len(commits),
            "seconds": round(t_end - t_start, 2),
            "images_per_s_overall": round(summary.images / (t_end - t_start), 3),
            "overall_includes": "input checks, actor start + model build (random init on CPU, then moved to the "
            "device), COCO export",
            "ray_init_s_not_included": round(ray_init_s, 1),
            "settings": f"1 model actor on {cfg.device.type}, batch {cfg.batch}, tile batch {cfg.tile_batch}, "
            f"frozen SD/CLIP {config.dtype}, PNGs stored, COCO export on",
        }
        window = staged if len(staged) >= 3 else commits
        what = "staging writes" if window is staged else "shard commits"
        if len(window) >= 3:
            (t_a, n_a), (t_b, n_b) = window[0], window[-1]
            out["images_per_s_steady"] = round((n_b - n_a) / (t_b - t_a), 3) if t_b > t_a else None
            out["steady_window"] = f"first to last of the {what} ({n_b - n_a} images, {t_b - t_a:.1f} s)"
            out["gpu_busy_nvidia_smi_steady"] = cfg.sampler.mean_util(t_a, t_b)
        else:
            out["images_per_s_steady"] = None
            out["steady_window"] = f"fewer than 3 {what}"
        out["gpu_memory_used_gib_max_nvidia_smi"] = cfg.sampler.max_mem_gib(t_start, t_end)
        return out
    finally:
        with contextlib.suppress(Exception):
            import ray as _ray

            if _ray.is_initialized():
                _ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def training(cfg) -> dict[str, Any]:
    """Training steps/s at the official crop size (placeholder when odise_model.training is missing)."""
    if not has("odise_model.training"):
        return {
            "skipped": "odise_model.training not available (placeholder: fill when pipeline.train.run lands)"
        }
    if remaining(cfg) < cfg.training_min_s:
        return {"skipped": f"budget: {remaining(cfg):.0f} s left < {cfg.training_min_s} s"}
    import torch

    from odise_model.training import TrainingModule, optimizer_param_groups

    model = cfg.model_obj
    crop = int(model.config.input.short_side)  # the official crop size (1024 for the official model)
    vocab = cfg.vocabulary
    gen = torch.Generator().manual_seed(0)
    module = TrainingModule(
        model, vocab if model.config.classifier.kind == "label" else None, tile_batch_size=cfg.tile_batch
    )
    groups = optimizer_param_groups(model, lr=1e-4, weight_decay=0.05)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=1e-4)
    model.train()

    def batch_of(b: int):
        images = [torch.rand(3, crop, crop, generator=gen).to(cfg.device) for _ in range(b)]
        targets = []
        for _ in range(b):
            masks = torch.zeros(8, crop, crop, dtype=torch.bool)
            for m in range(8):
                y, x = (int(v) for v in torch.randint(0, crop // 2, (2,), generator=gen))
                masks[m, y : y + crop // 3, x : x + crop // 3] = True
            labels = torch.randint(0, len(vocab), (8,), generator=gen)
            targets.append({"labels": labels.to(cfg.device), "masks": masks.to(cfg.device)})
        words = [["thing"] * 8 for _ in range(b)] if model.config.classifier.kind == "caption" else None
        return images, targets, words

    def step(images, targets, words) -> None:
        ctx = (
            torch.autocast(device_type="cuda", dtype=torch.bfloat16)
            if cfg.device.type == "cuda"
            else contextlib.nullcontext()
        )
        with ctx:
            losses = module(images, targets, words, generator=torch.Generator().manual_seed(1))
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.01)
        optimizer.step()

    tried = []
    try:
        for b in cfg.train_batches:
            try:
                if cfg.device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(cfg.device)
                data = batch_of(b)
                step(*data)  # warm-up
                sync(cfg.device)
                n, t0 = 0, time.perf_counter()
                while n < cfg.train_steps and (n == 0 or time.perf_counter() - t0 < cfg.section_s / 2):
                    step(*data)
                    n += 1
                sync(cfg.device)
                wall = time.perf_counter() - t0
                peak = torch.cuda.max_memory_allocated(cfg.device) if cfg.device.type == "cuda" else None
                return {
                    "crop": crop,
                    "batch_per_gpu": b,
                    "steps": n,
                    "seconds_per_step": round(wall / n, 3),
                    "images_per_s_per_gpu": round(n * b / wall, 3),
                    "peak_memory_gib": gib(peak),
                    "tried": tried,
                    "settings": "synthetic batch (8 box masks/image), bf16 autocast on GPU, frozen SD/CLIP in the "
                    "production dtype, AdamW + grad clip 0.01, tile batch "
                    f"{cfg.tile_batch}; data loading not included",
                }
            except torch.cuda.OutOfMemoryError:
                tried.append({"batch": b, "result": "out of memory"})
                optimizer.zero_grad(set_to_none=True)
                continue
        return {"error": "out of memory at every batch size", "tried": tried}
    finally:
        model.eval()
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()  # AdamW moments of the 28M trainable parameters
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()


def compiled(cfg) -> dict[str, Any]:
    want = cfg.compile == "on" or (cfg.compile == "auto" and cfg.device.type == "cuda")
    if not want:
        return {"used": "eager", "skipped": f"--compile {cfg.compile} on {cfg.device.type}"}
    if remaining(cfg) < cfg.compile_min_s:
        return {"used": "eager", "skipped": f"budget: {remaining(cfg):.0f} s left < {cfg.compile_min_s} s"}
    import torch

    set_precision(official=False)
    sd = cfg.model_obj.sd
    eager_unet = sd.unet
    try:
        sd.unet = torch.compile(eager_unet)
        t0 = time.perf_counter()
        predictor = production_predictor(cfg, cfg.batch)
        results = run_batches(predictor, cfg.prepared[: cfg.agree_images])  # compiles
        compile_s = time.perf_counter() - t0
        agree = compare(cfg.results_b, results, cfg.vocabulary)
        budget = min(cfg.section_s, max(10.0, remaining(cfg) * 0.5))
        out = timed(
            cfg,
            predictor,
            cfg.prepared,
            max_iters=cfg.production_iters,
            max_s=budget,
            per_iter=cfg.batch,
            sampler=cfg.sampler,
        )
        chunk = [cfg.prepared[j % len(cfg.prepared)] for j in range(cfg.batch)]
        prof = profiled_busy(lambda: run_batches(predictor, chunk), cfg.device)
        out.update(
            used="torch.compile(unet)",
            compile_and_first_batch_s=round(compile_s, 1),
            agreement_with_eager_b=agree,
            profile=prof,
            gpu_busy=prof["gpu_busy"] if prof else None,
        )
        out["speedup_vs_official"] = (
            round(out["images_per_s"] / cfg.official_ips, 2) if cfg.official_ips else None
        )
        return out
    except Exception as exc:  # noqa: BLE001 - guarded: fall back to eager
        return {
            "used": "eager (compile failed)",
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-2000:],
        }
    finally:
        sd.unet = eager_unet


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------
def verdicts(data: dict[str, Any]) -> dict[str, Any]:
    prod = data.get("production") or {}
    comp = data.get("production_compiled") or {}
    best = max(
        (s for s in (prod, comp) if isinstance(s.get("images_per_s"), (int, float))),
        key=lambda s: s["images_per_s"],
        default={},
    )
    official_ips = (data.get("official") or {}).get("images_per_s")
    ips = best.get("images_per_s")
    mem1 = (prod.get("batch1") or {}).get("peak_memory_gib")
    return {
        "paper": PAPER,
        "targets": TARGETS,
        "best_production": best.get("settings", "")
        + (" + torch.compile(unet)" if best is comp and comp else ""),
        "production_images_per_s": ips,
        "meets_images_per_s": None if ips is None else ips > TARGETS["production_images_per_s_min"],
        "speedup_vs_official": None if not (ips and official_ips) else round(ips / official_ips, 2),
        "meets_speedup": None
        if not (ips and official_ips)
        else ips / official_ips >= TARGETS["speedup_vs_official_min"],
        "batch1_peak_memory_gib": mem1,
        "meets_memory": None if mem1 is None else mem1 * 2**30 / 1e9 < TARGETS["batch1_memory_gb_max"],
        "vs_paper_images_per_s": None if ips is None else round(ips / PAPER["images_per_s"], 1),
        "note": "paper: 1024x1024 input (4 tiles) on V100; here 640x480 -> 1024x1408 (6 tiles)",
    }


def table(data: dict[str, Any]) -> str:
    def f(v, fmt="{:.2f}"):
        return "-" if v is None or isinstance(v, str) else fmt.format(v)

    rows = [("setting", "img/s", "s/img", "GFLOP/img", "TFLOP/s", "busy", "peak GiB")]
    for key, label in (
        ("official", "(a) official fp32 b1"),
        ("production", "(b) production"),
        ("production_compiled", "(b) + torch.compile"),
    ):
        s = data.get(key) or {}
        if "images_per_s" in s:
            rows.append(
                (
                    label,
                    f(s["images_per_s"]),
                    f(s.get("seconds_per_image"), "{:.3f}"),
                    f(s.get("gflops_per_image"), "{:.0f}"),
                    f(s.get("achieved_tflops"), "{:.1f}"),
                    f(s.get("gpu_busy")),
                    f(s.get("peak_memory_gib")),
                )
            )
        if key == "production" and "batch1" in s:
            b1 = s["batch1"]
            rows.append(
                (
                    "(b) production b1",
                    f(b1["images_per_s"]),
                    f(b1["seconds_per_image"], "{:.3f}"),
                    "-",
                    "-",
                    "-",
                    f(b1["peak_memory_gib"]),
                )
            )
    p = data.get("pipeline") or {}
    if "images_per_s_overall" in p:
        rows.append(
            (
                "pipeline (Ray, 1 actor)",
                f(p.get("images_per_s_steady")) + " st",
                f(p["images_per_s_overall"]) + " all",
                "-",
                "-",
                f(p.get("gpu_busy_nvidia_smi_steady")),
                f(p.get("gpu_memory_used_gib_max_nvidia_smi")),
            )
        )
    t = data.get("training") or {}
    if "images_per_s_per_gpu" in t:
        rows.append(
            (
                f"training crop {t['crop']} b{t['batch_per_gpu']}",
                f(t["images_per_s_per_gpu"]),
                f(t["seconds_per_step"], "{:.3f}") + "/st",
                "-",
                "-",
                "-",
                f(t.get("peak_memory_gib")),
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    for key in ("agreement_fp32", "agreement_bf16"):
        a = data.get(key) or {}
        if "semantic_pixel_agreement" in a:
            lines.append(
                f"{key}: semantic {a['semantic_pixel_agreement']:.4f}  category "
                f"{a['panoptic_category_pixel_agreement']:.4f}  panoptic "
                f"{a['panoptic_segment_pixel_agreement']:.4f}  PQ {a['pq_of_b_against_a']}"
            )
    v = data.get("verdicts") or {}
    if v:
        lines.append(
            f"targets: >15 img/s {v.get('meets_images_per_s')}  >=8x {v.get('meets_speedup')} "
            f"({v.get('speedup_vs_official')}x)  <10 GB at b1 {v.get('meets_memory')} "
            f"({v.get('batch1_peak_memory_gib')} GiB); paper 1.26 img/s V100"
        )
    for key, s in data.items():
        if isinstance(s, dict) and ("skipped" in s or "error" in s):
            lines.append(f"{key}: {s.get('skipped') or s.get('error')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="odise_label_coco")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="few images / iterations (CPU dry run)")
    parser.add_argument(
        "--batch", type=int, default=None, help="production images per call (default 8; quick 2)"
    )
    parser.add_argument(
        "--tile-batch", type=int, default=None, help="SD tiles per pass (default 24; quick 6)"
    )
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--budget-s", type=float, default=450.0, help="total time budget, seconds")
    parser.add_argument("--skip", nargs="*", default=[], choices=("pipeline", "training", "compile"))
    parser.add_argument("--name", default="gpu_suite", help="result file name (without .json)")
    cfg = parser.parse_args()

    import torch

    cfg.device = torch.device(cfg.device)
    if cfg.device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu for a dry run", file=sys.stderr)
        return 2
    q = cfg.quick
    cfg.batch = cfg.batch or (2 if q else 8)
    cfg.tile_batch = cfg.tile_batch or (6 if q else 24)
    cfg.n_images = max(cfg.batch, 4 if q else 16)
    cfg.agree_images = 2 if q else 4
    cfg.official_iters = 2 if q else 12
    cfg.production_iters = 2 if q else 8
    cfg.section_s = 30.0 if q else 40.0
    cfg.pipeline_images = 8 if q else 128
    cfg.pipeline_per_shard = 2 if q else 16
    cfg.pipeline_min_s = -math.inf if q else 150.0
    cfg.training_min_s = -math.inf if q else 45.0
    cfg.train_batches = [1] if q else [8, 4, 2, 1]
    cfg.train_steps = 2 if q else 5
    cfg.compile_min_s = 150.0
    cfg.bf16_on_cpu = False  # bf16 matmuls on most CPUs are slow: the dry run keeps fp32 for (b) on CPU
    cfg.dtype_name = "bf16" if cfg.device.type == "cuda" else "fp32 (CPU dry run)"
    cfg.official_ips = cfg.production_ips = None

    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS_DIR
    report = Report(out_dir / f"{cfg.name}.json", start=START)
    report["command"] = "python " + " ".join(sys.argv)
    settings = {
        k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool, list, type(None)))
    }
    settings["device"] = str(cfg.device)
    report["settings"] = settings

    env = section(report, "environment", environment, cfg)
    if "error" in env:
        print(table(report.data))
        return 2
    b = section(report, "build", build, cfg)
    if "error" in b:
        print(table(report.data))
        return 2
    cfg.sampler = SmiSampler(cfg.device)
    try:
        inp = section(report, "inputs", prepare_inputs, cfg)
        if "error" in inp:
            return 2
        section(report, "agreement_fp32", agreement_fp32, cfg)
        section(report, "official", official, cfg)
        section(report, "agreement_bf16", to_production, cfg)
        section(report, "production", production, cfg)
        if "pipeline" not in cfg.skip:
            section(report, "pipeline", pipeline_run, cfg)
        if "compile" not in cfg.skip:
            section(report, "production_compiled", compiled, cfg)
        if "training" not in cfg.skip:
            section(report, "training", training, cfg)
        report["verdicts"] = verdicts(report.data)
        import resource

        report["peak_host_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    finally:
        cfg.sampler.close()
        report.write()
        print("\n" + table(report.data), flush=True)
        print(f"\nwrote {report.path} ({time.perf_counter() - START:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
