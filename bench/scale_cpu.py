"""The annotate commit path at dataset scale, on this machine's CPU, with a STAND-IN predictor.

    python bench/scale_cpu.py                 # full sizes (about 30-60 min on 2 cores): bench/results/scale_cpu.json
    python bench/scale_cpu.py --quick         # small sizes, a few minutes (writes scale_cpu_quick.json)

STAND-IN PREDICTOR (not a model): :class:`StandInAnnotator` has the real actor interface, the ``__call__``
contract of :class:`pipeline.annotate.stages.Annotator` (the read stage's row batch in; the same columns plus
``panoptic`` / ``semantic`` (int32 bytes at the original size), ``segments`` / ``inst_meta`` (JSON) and
``inst_masks`` (instance masks bit-packed, ``N x ceil(H*W/8)`` bytes) out), and realistic output sizes for a
640x480 image: 100 queries, 30 panoptic segments (a Voronoi partition of the image on a 4-pixel grid, every
third segment a thing), 100 instance masks (ellipses with log-uniform areas from 200 pixels to 20% of the image,
overlapping), scores. It exists so the CPU side of the pipeline can be measured with the outputs a real model
gives; it says nothing about model speed.

Measurements (CPU ms per image is the robust number on a machine shared with other work; wall time includes
waiting for a core):

1. ``cost_per_image``: decode (:class:`~pipeline.annotate.stages.ReadShard`: stream the tar, decode the JPEG,
   resize to the official model's input, short side 1024) + encode and stage
   (:class:`~pipeline.annotate.stages.EncodeAndStage`: unpack the masks, RLE of every segment and instance,
   panoptic + semantic PNG, staging Parquet) + write (:func:`~pipeline.annotate.commit.commit_shard`'s share:
   both passes, PNG files, COCO fragment, marker), over ``--cost-images`` real-photo JPEGs; the target is
   <= 66 ms, i.e. one core keeps up with a GPU at 15 images/s. Also encode alone before/after this change's
   encode path (``encode_result``) for reference.
2. ``commit``: one shard of 1k, 10k and 100k images. The staging files are generated directly with the real
   encode/stage functions (``encode_result`` -> ``label_row`` -> ``write_staging``, 8 rows per file like a
   Ray write task, 2% of the files written twice like retried tasks), NOT through Ray; a pool of 64 distinct
   stand-in results is reused under new keys. ``commit_shard`` then runs in a fresh child process: wall and
   CPU seconds, peak RSS (the child's ``ru_maxrss``: what the commit adds to the driver).
3. ``coco_assembly``: :func:`~pipeline.annotate.coco.finalize_coco` over the committed 1k and 100k outputs in
   a fresh child (default part size 50,000 images): time, peak RSS.
4. ``noop_rerun``: ``run_annotation`` (tiny model config, local input and output) over 10,000 committed tar
   shards with nothing to do, in a fresh child: wall seconds (target < 60 s), peak RSS; Ray is not started.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
H, W = 480, 640
TARGET_MS = 66.0
BASE_COMMIT = "1e3e920"  # before the encode path was optimised (same output)


# --------------------------------------------------------------------------------------------------
# The stand-in predictor
# --------------------------------------------------------------------------------------------------
def standin_outputs(seed: int, h: int = H, w: int = W, n_segments: int = 30, n_instances: int = 100) -> dict:
    """One image's outputs as the model stage returns them (``Annotator.__call__`` columns of one row)."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform([0, 0], [h, w], size=(n_segments, 2))
    yy, xx = np.mgrid[0:h:4, 0:w:4]
    nearest = np.argmin((yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2, axis=-1)
    panoptic = np.repeat(np.repeat(nearest.astype(np.int32) + 1, 4, 0), 4, 1)[:h, :w]
    ids = np.unique(panoptic)
    segments = []
    for sid in ids.tolist():
        mask = panoptic == sid
        ys, xs = np.nonzero(mask)
        cat = 1 + (sid * 7) % 133
        segments.append(
            {
                "id": sid,
                "category_id": cat,
                "category_name": f"class{cat}",
                "isthing": sid % 3 == 0,
                "score": float(rng.uniform(0.5, 1.0)),
                "area": int(mask.sum()),
                "bbox": (float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)),
            }  # fmt: skip
        )
    semantic = np.zeros((h, w), np.int32)
    for s in segments:
        semantic[panoptic == s["id"]] = s["category_id"]
    Y, X = np.ogrid[0:h, 0:w]
    masks = np.zeros((n_instances, h, w), bool)
    meta = []
    for k in range(n_instances):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        area = float(np.exp(rng.uniform(np.log(200), np.log(0.2 * h * w))))
        ry = np.sqrt(area / np.pi) * rng.uniform(0.6, 1.6)
        rx = area / np.pi / ry
        masks[k] = ((Y - cy) / ry) ** 2 + ((X - cx) / rx) ** 2 < 1
        cat = 1 + (k * 11) % 80
        meta.append(
            {"category_id": cat, "category_name": f"class{cat}", "score": float(rng.uniform(0.05, 1.0))}
        )
    packed = np.packbits(masks.reshape(n_instances, -1), axis=1)
    return {
        "panoptic": panoptic.astype(np.int32).tobytes(),
        "semantic": semantic.tobytes(),
        "segments": json.dumps(segments),
        "inst_meta": json.dumps(meta),
        "inst_masks": packed.tobytes(),
    }


class StandInAnnotator:
    """STAND-IN for :class:`pipeline.annotate.stages.Annotator` (same ``__call__`` contract, no model): a pool of
    ``pool`` precomputed 640x480 outputs, handed out in turn, placed at each sample's original size."""

    def __init__(self, pool: int = 16) -> None:
        self.pool = [standin_outputs(i) for i in range(pool)]
        self.calls = 0

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        out = {k: list(batch[k]) for k in batch}
        for col in ("panoptic", "semantic", "inst_masks", "segments", "inst_meta"):
            out[col] = [b"" if col in ("panoptic", "semantic", "inst_masks") else ""] * n
        for i in range(n):
            if batch["kind"][i] != "sample" or batch["error"][i]:
                continue
            if (int(batch["height"][i]), int(batch["width"][i])) != (H, W):
                raise ValueError("the stand-in outputs are 640x480; generate landscape 640x480 images")
            outputs = self.pool[self.calls % len(self.pool)]
            self.calls += 1
            for col, value in outputs.items():
                out[col][i] = value
            out["image"][i] = b""
        return out


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def jpegs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` 640x480 JPEGs (quality 85-95) cropped from scikit-image's real photos."""
    import skimage.data as data
    from PIL import Image

    base = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arr = base[i % len(base)]
        h, w = arr.shape[:2]
        ch, cw = int(h * rng.uniform(0.7, 1.0)), int(w * rng.uniform(0.7, 1.0))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        im = Image.fromarray(np.ascontiguousarray(arr[y : y + ch, x : x + cw])).resize((W, H), Image.BILINEAR)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=int(rng.integers(85, 96)))
        out.append(buf.getvalue())
    return out


def write_tar(path: Path, samples: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, data in samples:
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))


def provenance(run_id: str = "bench"):
    from pipeline.schema import RunProvenance

    cats = [{"id": i, "name": f"class{i}", "isthing": i <= 80} for i in range(1, 134)]
    return RunProvenance(run_id=run_id, model_variant="STAND-IN", categories=cats), cats


class Clock:
    def __enter__(self) -> Clock:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0


def run_child(task: str, args: dict, timeout: float = 7200) -> dict:
    """Run ``task`` in a fresh Python process (its own peak RSS); returns the JSON it prints last."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", task, json.dumps(args)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"child {task} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_mib() -> float:
    """This process's peak resident memory (``VmHWM``: per address space, so not inherited from the parent the
    way ``ru_maxrss`` is across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024.0, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


# --------------------------------------------------------------------------------------------------
# 1. cost per image
# --------------------------------------------------------------------------------------------------
def cost_per_image(n: int, work: Path) -> dict:
    from pipeline.annotate.commit import commit_shard
    from pipeline.annotate.stages import EncodeAndStage, ReadShard
    from pipeline.encode import encode_result
    from pipeline.shards import ShardRef

    prov, cats = provenance()
    images = jpegs(n)
    annotator = StandInAnnotator()
    read = ReadShard(storage_options={}, short_side=1024, max_size=2560, max_pixels=89_478_485, shard_index={},
                     overlays_per_shard=0, overlays_total=0, rows_per_batch=4)  # fmt: skip
    out = work / "cost" / "out"
    encode = EncodeAndStage(out_url=str(out), storage_options={}, provenance_json=prov.to_json(indent=None),
                            include_png=True)  # fmt: skip
    clocks = {}
    # a warm-up shard first (imports, first-call setup: a long-running Ray worker pays them once), then the timed one
    for name, count in (("warm-up", 4), ("timed", n)):
        tar = work / "cost" / f"{name}.tar"
        write_tar(tar, [(f"img-{i:05d}", b) for i, b in enumerate(images[:count])])
        ref = ShardRef(url=f"file://{tar}", shard_id=f"{name}-cost")
        item = {"shard": [json.dumps({"url": ref.url, "shard_id": ref.shard_id, "kind": "tar", "members": [],
                                      "root": ""})]}  # fmt: skip
        with Clock() as t_decode:
            batches = list(read(item))
        labelled = [
            annotator({k: list(v) for k, v in b.items()}) for b in batches
        ]  # the GPU's work: not timed
        with Clock() as t_encode:
            for b in labelled:
                encode(b)
        with Clock() as t_commit:
            info = commit_shard(str(out), {}, shard=ref, expected_keys=count, provenance=prov, categories=cats,
                                seq=len(clocks) + 1)  # fmt: skip
        assert info.n_labelled == count, info
        clocks[name] = (t_decode, t_encode, t_commit)
    t_decode, t_encode, t_commit = clocks["timed"]

    # encode_result alone on one stand-in output (the unpacked masks as the encode stage builds them)
    from odise_model.types import Instance, PanopticResult, Segment

    raw = standin_outputs(0)
    meta = json.loads(raw["inst_meta"])
    masks = np.unpackbits(
        np.frombuffer(raw["inst_masks"], np.uint8).reshape(len(meta), -1), axis=1, count=H * W
    )
    result = PanopticResult(
        panoptic_seg=np.frombuffer(raw["panoptic"], np.int32).reshape(H, W),
        segments=[Segment(**{**s, "bbox": tuple(s["bbox"])}) for s in json.loads(raw["segments"])],
        semantic_seg=np.frombuffer(raw["semantic"], np.int32).reshape(H, W),
        instances=[
            Instance(
                m["category_id"],
                m["category_name"],
                m["score"],
                masks[j].reshape(H, W).astype(bool),
                (0, 0, 0, 0),
            )
            for j, m in enumerate(meta)
        ],  # fmt: skip
    )
    reps = 10
    with Clock() as t_result:
        for _ in range(reps):
            enc = encode_result(result, include_png=True)
    before = _encode_module_at(BASE_COMMIT)
    t_before = None
    if before is not None:
        old = before.encode_result(result, include_png=True)
        assert [s["rle"] for s in old["segments"]] == [s["rle"] for s in enc["segments"]]  # the same output
        assert [i["rle"] for i in old["instances"]] == [i["rle"] for i in enc["instances"]]
        with Clock() as t_before:
            for _ in range(3):
                before.encode_result(result, include_png=True)

    def ms(clock: Clock, count: int) -> dict:
        return {"cpu_ms": round(1000 * clock.cpu / count, 1), "wall_ms": round(1000 * clock.wall / count, 1)}

    stages = {
        "decode (ReadShard: tar, JPEG, resize to short side 1024)": ms(t_decode, n),
        "encode + stage (EncodeAndStage: unpack, RLE, 2 PNGs, staging Parquet)": ms(t_encode, n),
        "write (commit_shard share: 2 passes, PNG files, fragment, marker)": ms(t_commit, n),
    }
    total_cpu = round(sum(v["cpu_ms"] for v in stages.values()), 1)
    return {
        "images": n,
        "outputs_per_image": {
            "segments": len(enc["segments"]),
            "instances": len(enc["instances"]),
            "panoptic_png_bytes": len(enc["panoptic_png"]),
            "instance_rle_chars": sum(len(i["rle"]["counts"]) for i in enc["instances"]),
        },  # fmt: skip
        "stages": stages,
        "total_cpu_ms_per_image": total_cpu,
        "target_ms": TARGET_MS,
        "meets_target": total_cpu <= TARGET_MS,
        "encode_result_alone": ms(t_result, reps),
        f"encode_result_alone_before (pipeline/encode.py at {BASE_COMMIT}, same output)": (
            ms(t_before, 3) if t_before is not None else "not measured (git history unavailable)"
        ),
    }


def _encode_module_at(commit: str):
    """``pipeline/encode.py`` as it was at ``commit`` (from git), as a module; None without git history."""
    import types

    src = subprocess.run(
        ["git", "show", f"{commit}:pipeline/encode.py"], cwd=REPO, capture_output=True, text=True
    )
    if src.returncode != 0:
        return None
    module = types.ModuleType("encode_before")
    exec(compile(src.stdout, f"{commit}:pipeline/encode.py", "exec"), module.__dict__)
    return module


# --------------------------------------------------------------------------------------------------
# 2. commit at scale, 3. COCO assembly (children)
# --------------------------------------------------------------------------------------------------
def make_staging(out: Path, n: int, rows_per_file: int = 8, duplicate_every: int = 50) -> dict:
    """Staging files of one shard of ``n`` images, written with the real functions (not Ray)."""
    from odise_model.types import Instance, PanopticResult, Segment
    from pipeline.annotate.commit import write_staging
    from pipeline.encode import encode_result
    from pipeline.schema import label_row

    prov, _ = provenance()
    pool = []
    for seed in range(64):
        raw = standin_outputs(seed)
        meta = json.loads(raw["inst_meta"])
        packed = np.frombuffer(raw["inst_masks"], np.uint8).reshape(len(meta), -1)
        masks = np.unpackbits(packed, axis=1, count=H * W).reshape(len(meta), H, W).astype(bool)
        result = PanopticResult(
            panoptic_seg=np.frombuffer(raw["panoptic"], np.int32).reshape(H, W),
            segments=[Segment(**{**s, "bbox": tuple(s["bbox"])}) for s in json.loads(raw["segments"])],
            semantic_seg=np.frombuffer(raw["semantic"], np.int32).reshape(H, W),
            instances=[
                Instance(m["category_id"], m["category_name"], m["score"], masks[j], (0, 0, 0, 0))
                for j, m in enumerate(meta)
            ],  # fmt: skip
        )
        pool.append(encode_result(result, include_png=True))
    shard = {"url": "file:///bench/shards/big.tar", "shard_id": "big-shard"}
    started = time.perf_counter()
    files = 0
    for start in range(0, n, rows_per_file):
        rows = [
            label_row(
                run_id=prov.run_id,
                shard=shard["url"],
                shard_id=shard["shard_id"],
                key=f"img-{i:07d}",
                encoded=pool[i % len(pool)],
                image_ext="jpg",
            )  # fmt: skip
            for i in range(start, min(n, start + rows_per_file))
        ]
        write_staging(rows, str(out), {}, prov)
        files += 1
        if files % duplicate_every == 0:  # a retried write task: the same rows again
            write_staging(rows, str(out), {}, prov)
            files += 1
    return {"staging_files": files, "seconds": round(time.perf_counter() - started, 1), "shard": shard}


def child_commit(args: dict) -> dict:
    from pipeline.annotate.commit import commit_shard

    prov, cats = provenance()
    with Clock() as t:
        info = commit_shard(args["out"], {}, shard=args["shard"], expected_keys=args["n"], provenance=prov,
                            categories=cats, seq=1)  # fmt: skip
    out = Path(args["out"])
    return {
        "images": info.n_images,
        "staging_files": info.n_staging_files,
        "duplicates_dropped": info.n_duplicates_dropped,
        "wall_s": round(t.wall, 1),
        "cpu_s": round(t.cpu, 1),
        "ms_per_image_wall": round(1000 * t.wall / info.n_images, 2),
        "peak_rss_mib": peak_rss_mib(),
        "parquet_mib": round((out / info.parquet).stat().st_size / 2**20, 1),
        "fragment_mib": round((out / info.coco_part).stat().st_size / 2**20, 1),
    }


def child_coco(args: dict) -> dict:
    from pipeline.annotate.coco import finalize_coco

    _, cats = provenance()
    with Clock() as t:
        result = finalize_coco(args["out"], {}, cats)
    coco = Path(args["out"]) / "coco"
    index = json.loads((coco / "index.json").read_text())
    return {
        "images": index["n_images"],
        "instance_annotations": index["n_instance_annotations"],
        "parts": int(result["parts"]),
        "wall_s": round(t.wall, 1),
        "cpu_s": round(t.cpu, 1),
        "peak_rss_mib": peak_rss_mib(),
        "export_mib": round(sum(p.stat().st_size for p in coco.glob("*.json")) / 2**20, 1),
    }


# --------------------------------------------------------------------------------------------------
# 4. no-op rerun over many committed shards
# --------------------------------------------------------------------------------------------------
def _config(inp: Path, out: Path):
    from pipeline.config import AnnotateConfig

    return AnnotateConfig(input=str(inp), output=str(out), vocab_file="coco_panoptic", model="tiny", overlays=0,
                          num_cpus=1)  # fmt: skip


def build_noop_output(n: int, work: Path, procs: int = 2) -> dict:
    """An input folder of ``n`` one-image tar shards and an output in which all are committed (real commits)."""
    inp, out = work / "noop" / "in", work / "noop" / "out"
    photo = jpegs(1)[0]
    for i in range(n):
        write_tar(inp / f"shard-{i:06d}.tar", [("img", photo)])
    started = time.perf_counter()
    chunks = [list(range(k, n, procs)) for k in range(procs)]
    children = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--child",
                "commit_many",
                json.dumps({"inp": str(inp), "out": str(out), "ids": c}),
            ],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for c in chunks
    ]
    for child in children:
        child.communicate(timeout=7200)
        if child.returncode:
            raise RuntimeError("building the committed output failed")
    result = run_child("coco_noop_prepare", {"inp": str(inp), "out": str(out)})
    return {"shards": n, "seconds": round(time.perf_counter() - started, 1), **result}


def child_commit_many(args: dict) -> dict:
    from odise_model.types import PanopticResult, Segment, bbox_from_mask
    from pipeline.annotate.checks import check_inputs, provenance_for
    from pipeline.annotate.commit import commit_shard, source_stamps, write_provenance, write_staging
    from pipeline.encode import encode_result
    from pipeline.schema import label_row

    config = _config(Path(args["inp"]), Path(args["out"]))
    checked = check_inputs(config)
    prov = write_provenance(config.output, {}, provenance_for(config, checked, "bench-build"))
    cats = checked["vocabulary"].coco_categories()
    seg = np.zeros((48, 64), np.int32)
    seg[10:30, 10:40] = 1
    result = PanopticResult(seg, [Segment(1, cats[0]["id"], cats[0]["name"], True, 0.9, int((seg == 1).sum()),
                                          bbox_from_mask(seg == 1))])  # fmt: skip
    encoded = encode_result(result, include_png=True)
    shards = checked["shards"]
    stamps = source_stamps([shards[i] for i in args["ids"]], {})  # one listing, as the driver does
    for i in args["ids"]:
        ref = shards[i]
        write_staging([label_row(run_id=prov.run_id, shard=ref.url, shard_id=ref.shard_id, key="img",
                                 encoded=encoded, image_ext="jpg")], config.output, {}, prov)  # fmt: skip
        commit_shard(config.output, {}, shard=ref, expected_keys=1, provenance=prov, categories=cats, seq=i + 1,
                     source=stamps[ref.shard_id])  # fmt: skip
    return {"committed": len(args["ids"])}


def child_coco_noop_prepare(args: dict) -> dict:
    """One full run over the committed output (builds the COCO export and summary), timed as a reference."""
    from pipeline.annotate.run import run_annotation

    with Clock() as t:
        summary = run_annotation(_config(Path(args["inp"]), Path(args["out"])))
    assert summary.shards_committed == 0 and summary.shards_skipped == summary.shards_total, summary
    return {"first_run_with_coco_build_s": round(t.wall, 1)}


def child_noop(args: dict) -> dict:
    import logging

    from pipeline.annotate.run import run_annotation

    logging.basicConfig(level=logging.WARNING)
    with Clock() as t:
        summary = run_annotation(_config(Path(args["inp"]), Path(args["out"])))
    assert summary.shards_committed == 0 and summary.shards_skipped == summary.shards_total, summary
    import sys as _sys

    return {
        "shards": summary.shards_total,
        "wall_s": round(t.wall, 1),
        "cpu_s": round(t.cpu, 1),
        "peak_rss_mib": peak_rss_mib(),
        "coco_parts_rebuilt": summary.coco_parts_rebuilt,
        "ray_imported": "ray" in _sys.modules,
    }


CHILDREN = {
    "commit": child_commit,
    "coco": child_coco,
    "commit_many": child_commit_many,
    "coco_noop_prepare": child_coco_noop_prepare,
    "noop": child_noop,
}


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", nargs=2, metavar=("TASK", "JSON"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small sizes (a check of the script)")
    parser.add_argument(
        "--commit-sizes", type=int, nargs="+", default=None, help="images per shard (1k 10k 100k)"
    )
    parser.add_argument(
        "--coco-sizes", type=int, nargs="+", default=None, help="COCO assembly sizes (1k 100k)"
    )
    parser.add_argument(
        "--noop-shards", type=int, default=None, help="committed shards of the no-op rerun (10000)"
    )
    parser.add_argument("--cost-images", type=int, default=None, help="images of the per-image cost (64)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["cost", "commit", "noop"])
    ns = parser.parse_args()
    if ns.child:
        print(json.dumps(CHILDREN[ns.child[0]](json.loads(ns.child[1]))))
        return
    commit_sizes = ns.commit_sizes or ([200, 1000] if ns.quick else [1000, 10_000, 100_000])
    coco_sizes = ns.coco_sizes or ([200, 1000] if ns.quick else [1000, 100_000])
    noop_shards = ns.noop_shards or (500 if ns.quick else 10_000)
    cost_images = ns.cost_images or (16 if ns.quick else 64)
    work = Path(ns.work or tempfile.mkdtemp(prefix="odise-scale-"))
    name = "scale_cpu_quick" if ns.quick else "scale_cpu"
    result: dict = {
        "benchmark": "annotate commit path at scale, CPU, with a STAND-IN predictor (no model)",
        "command": "python bench/scale_cpu.py " + " ".join(sys.argv[1:]),
        "stand_in": "StandInAnnotator: the Annotator.__call__ contract; per 640x480 image 100 queries, ~30 panoptic "
        "segments (Voronoi on a 4-px grid), 100 overlapping ellipse instance masks (200 px .. 20% of the image)",
        "machine": machine(),
        "load_average_at_start": [round(v, 1) for v in os.getloadavg()],
    }
    try:
        if "cost" not in ns.skip:
            print(f"cost per image over {cost_images} images ...", flush=True)
            result["cost_per_image"] = cost_per_image(cost_images, work)
            print(json.dumps(result["cost_per_image"], indent=1), flush=True)
            write_result(name, result)  # partial results survive a later failure
        if "commit" not in ns.skip:
            result["commit"], result["coco_assembly"] = {}, {}
            for n in sorted(set(commit_sizes) | set(coco_sizes)):
                out = work / f"commit-{n}" / "out"
                print(f"staging {n} images ...", flush=True)
                staged = make_staging(out, n)
                print(f"committing {n} images ({staged['staging_files']} staging files) ...", flush=True)
                measured = run_child("commit", {"out": str(out), "n": n, "shard": staged["shard"]})
                measured["staging_generated_in_s"] = staged["seconds"]
                measured["staging"] = (
                    "real encode/stage functions (encode_result, label_row, write_staging), not Ray"
                )
                if n in commit_sizes:
                    result["commit"][str(n)] = measured
                print(json.dumps(measured), flush=True)
                if n in coco_sizes:
                    print(f"COCO assembly over {n} images ...", flush=True)
                    result["coco_assembly"][str(n)] = run_child("coco", {"out": str(out)})
                    print(json.dumps(result["coco_assembly"][str(n)]), flush=True)
                shutil.rmtree(work / f"commit-{n}", ignore_errors=True)
                write_result(name, result)
        if "noop" not in ns.skip:
            print(f"building an output with {noop_shards} committed shards ...", flush=True)
            built = build_noop_output(noop_shards, work)
            print(json.dumps(built), flush=True)
            measured = run_child(
                "noop", {"inp": str(work / "noop" / "in"), "out": str(work / "noop" / "out")}
            )
            measured["target_s"] = 60
            measured["meets_target"] = measured["wall_s"] < 60
            measured["built"] = built
            result["noop_rerun"] = measured
            print(json.dumps(measured), flush=True)
    finally:
        if not ns.work:
            shutil.rmtree(work, ignore_errors=True)
    result["load_average_at_end"] = [round(v, 1) for v in os.getloadavg()]
    write_result(name, result)


if __name__ == "__main__":
    main()
