"""bench/measure.py: the measurement kit of the GPU suite, checked on the CPU (report, busy fraction, FLOPs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import measure  # noqa: E402


def test_busy_fraction_is_the_union_of_overlapping_intervals():
    # [0, 2] and [1, 3] overlap -> 3 s; [5, 6] -> 1 s; a copy inside a kernel counts once
    busy, fraction = measure.busy_fraction([(5.0, 6.0), (0.0, 2.0), (1.0, 3.0), (1.5, 1.6)], wall_s=8.0)
    assert busy == pytest.approx(4.0) and fraction == pytest.approx(0.5)
    assert measure.busy_fraction([(0.0, 3.0)], wall_s=2.0) == (3.0, 1.0)  # capped at 1
    assert measure.busy_fraction([], wall_s=1.0) == (0.0, 0.0)


def test_count_flops_counts_a_matmul():
    a, b = torch.randn(4, 8), torch.randn(8, 16)
    assert measure.count_flops(lambda: a @ b) == 2 * 4 * 8 * 16


def test_report_is_rewritten_after_every_section_and_a_failed_section_is_recorded(tmp_path):
    import numpy as np

    report = measure.Report(tmp_path / "r.json")
    out = measure.run_section(report, "ok", lambda x: {"value": np.float32(x)}, 1.5, budget_left_s=10)
    assert out["value"] == 1.5 and "section_seconds" in out
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert on_disk["ok"]["value"] == 1.5 and "elapsed_s" in on_disk

    def broken():
        raise RuntimeError("boom")

    failed = measure.run_section(report, "broken", broken)
    assert failed["error"] == "RuntimeError: boom" and "Traceback" in failed["traceback"]
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert set(on_disk) == {"ok", "broken", "elapsed_s"}
    assert not list(tmp_path.glob("*.tmp"))


def test_gpu_probes_are_inert_on_a_cpu_device():
    cpu = torch.device("cpu")
    sampler = measure.SmiSampler(cpu)
    assert (
        sampler.proc is None and sampler.mean_util(0, 1e12) is None and sampler.max_mem_gib(0, 1e12) is None
    )
    sampler.close()
    assert measure.profiled_busy(lambda: None, cpu) is None
    assert measure.gib(2**31) == 2.0 and measure.gib(None) is None
    assert measure.has("json") and not measure.has("no_such_module_xyz.sub")
