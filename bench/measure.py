"""Measurement kit for the benchmark scripts: a JSON report written after every section, GPU activity
(``nvidia-smi`` sampler, ``torch.profiler`` busy fraction), a FLOP counter and small unit helpers.

Used by ``bench/gpu_suite.py`` (the script) and reusable by any other benchmark::

    from measure import Report, SmiSampler, count_flops, profiled_busy, run_section

Nothing here imports torch at module level (CPU-only tools can use :class:`Report` and
:func:`busy_fraction`); the GPU parts return ``None`` on a CPU device instead of failing.

Units: seconds (``*_s``), GiB (``*_gib``), fractions in [0, 1] (``gpu_busy``, ``mean_util``), FLOPs as counted
by ``torch.utils.flop_counter.FlopCounterMode`` (matmul, conv and attention; element-wise work and
``grid_sample`` are not counted).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "Report",
    "SmiSampler",
    "busy_fraction",
    "count_flops",
    "gib",
    "has",
    "json_default",
    "profiled_busy",
    "run_section",
    "sync",
]


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------
def sync(device) -> None:
    """Wait for the device's queued work (``torch.cuda.synchronize``); no-op on a CPU device."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(n_bytes: float | None) -> float | None:
    """Bytes -> GiB rounded to 3 decimals (``None`` stays ``None``)."""
    return None if n_bytes is None else round(n_bytes / 2**30, 3)


def has(module: str) -> bool:
    """True when ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def json_default(obj: Any) -> Any:
    """``json.dumps`` fallback: numpy scalars as Python numbers, anything else as ``str``."""
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "shape", None) == ():
        return obj.item()
    return str(obj)


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------
class Report:
    """The result JSON document, rewritten atomically (temp file + ``os.replace``) after every change,
    so a run cut short still leaves everything measured so far.

    Args:
        path: the JSON file.
        start: ``time.perf_counter()`` of the run's start; ``elapsed_s`` in the file counts from it.
    """

    def __init__(self, path: Path, start: float | None = None) -> None:
        self.path = Path(path)
        self.start = time.perf_counter() if start is None else start
        self.data: dict[str, Any] = {}

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=json_default) + "\n")
        os.replace(tmp, self.path)


def run_section(
    report: Report, name: str, fn: Callable[..., Any], *args: Any, budget_left_s: float | None = None
) -> Any:
    """Run ``fn(*args)`` as section ``name``; record its result (or its error and traceback) and its
    duration (``section_seconds``) under ``report[name]``. Never raises: a failed section must not lose the
    others."""
    t0 = time.perf_counter()
    budget = "" if budget_left_s is None else f" (budget left {budget_left_s:.0f} s)"
    print(f"\n== {name}{budget}", flush=True)
    try:
        out = fn(*args)
    except Exception as exc:  # noqa: BLE001 - a failed section must not lose the others
        out = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        print(out["traceback"], flush=True)
    if isinstance(out, dict):
        out["section_seconds"] = round(time.perf_counter() - t0, 1)
    report[name] = out
    return out


# --------------------------------------------------------------------------------------------------
# GPU activity
# --------------------------------------------------------------------------------------------------
class SmiSampler:
    """``nvidia-smi`` GPU utilisation (% of time a kernel ran) and memory, sampled every ``period_ms``.

    On a CPU device, or without ``nvidia-smi``, it samples nothing and its queries return ``None``.
    ``samples`` holds ``(perf_counter time, utilisation %, memory MiB)``.
    """

    def __init__(self, device, period_ms: int = 200) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self.proc = None
        if device.type == "cuda" and shutil.which("nvidia-smi"):
            index = device.index if device.index is not None else 0
            cmd = [
                "nvidia-smi",
                f"--id={index}",
                "--query-gpu=utilization.gpu,memory.used",
                "--format=csv,noheader,nounits",
                "-lms",
                str(period_ms),
            ]
            try:
                self.proc = subprocess.Popen(
                    cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
                )
            except OSError:
                self.proc = None
        if self.proc is not None:
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                util, mem = (float(v) for v in line.strip().split(","))
            except ValueError:
                continue
            self.samples.append((time.perf_counter(), util, mem))

    def mean_util(self, t0: float, t1: float) -> float | None:
        """Mean utilisation (fraction) of the samples taken between ``t0`` and ``t1`` (perf_counter)."""
        vals = [u for t, u, _ in self.samples if t0 <= t <= t1]
        return round(sum(vals) / len(vals) / 100.0, 3) if vals else None

    def max_mem_gib(self, t0: float, t1: float) -> float | None:
        """Largest memory use (GiB, all processes on the GPU) sampled between ``t0`` and ``t1``."""
        vals = [m for t, _, m in self.samples if t0 <= t <= t1]
        return round(max(vals) / 1024.0, 2) if vals else None

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(Exception):
                self.proc.wait(timeout=5)


def busy_fraction(intervals: Iterable[tuple[float, float]], wall_s: float) -> tuple[float, float]:
    """``(busy seconds, busy / wall)`` of device activity intervals ``(start_s, end_s)``: the length of
    their union (overlapping kernels and copies count once), the fraction capped at 1."""
    ordered = sorted(intervals)
    if not ordered or wall_s <= 0:
        return 0.0, 0.0
    busy, cur_s, cur_e = 0.0, ordered[0][0], ordered[0][1]
    for s, e in ordered[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return busy, min(1.0, busy / wall_s)


def profiled_busy(fn: Callable[[], Any], device) -> dict[str, Any] | None:
    """Run ``fn`` once under ``torch.profiler`` (CUDA activity only).

    Returns ``{"gpu_busy": union of kernel + copy intervals / wall, "kernel_s", "wall_s", "device_events"}``,
    or ``None`` on a CPU device.
    """
    if device.type != "cuda":
        return None
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t0
    intervals: list[tuple[float, float]] = []
    try:  # kineto events, ns or us depending on the torch version
        for e in prof.profiler.kineto_results.events():
            if str(e.device_type()).endswith("CUDA"):
                if hasattr(e, "start_ns"):
                    intervals.append((e.start_ns() / 1e9, (e.start_ns() + e.duration_ns()) / 1e9))
                else:
                    intervals.append((e.start_us() / 1e6, (e.start_us() + e.duration_us()) / 1e6))
    except Exception:  # noqa: BLE001 - fall back to FunctionEvents
        intervals = [
            (e.time_range.start / 1e6, e.time_range.end / 1e6)
            for e in prof.events()
            if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
        ]
    if not intervals:
        return {"gpu_busy": None, "wall_s": round(wall, 3), "note": "profiler reported no device events"}
    busy, fraction = busy_fraction(intervals, wall)
    return {
        "gpu_busy": round(fraction, 3),
        "kernel_s": round(busy, 3),
        "wall_s": round(wall, 3),
        "device_events": len(intervals),
    }


def count_flops(fn: Callable[[], Any]) -> float | None:
    """FLOPs of one call of ``fn`` as counted by ``torch.utils.flop_counter.FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())
