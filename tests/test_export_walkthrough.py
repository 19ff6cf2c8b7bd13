"""The README walk-through, run exactly as written: annotate (tiny) -> export to Label Studio -> convert back
-> train 4 steps -> evaluate, one console-script process per step (``python -m flows.cli <command>``).

The commands come from bench/walkthrough_cpu.py (the script that times them); README.md must show the same
lines, so the documentation cannot drift from what is tested. Its first step is the README's main command
(Prefect's ephemeral mode, a local Ray), so this test also checks what that command shows in a terminal (a
plumbing-check banner, a progress bar over images, no INFO noise) and writes; then ``odise-evaluate`` scores
the output against its own COCO export (PQ 100, the per-class table).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

NOISE = (
    "| INFO",  # Prefect-formatted INFO lines (flow/task runs and forwarded pipeline logs)
    "\tINFO ",  # Ray / Ray Data INFO lines ("... INFO streaming_executor.py:216 -- Execution plan ...")
    "streaming_executor",
    "Token authentication is enabled",
    "core_worker.cc",
    "has constructor arguments in the object store",
    "Progress bars disabled",
)
"""Lines a user must not see on a successful run without ``-v``."""


def _walkthrough():
    spec = importlib.util.spec_from_file_location("walkthrough_cpu", REPO / "bench" / "walkthrough_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_shows_the_tested_walkthrough():
    walkthrough = _walkthrough()
    readme = (REPO / "README.md").read_text()
    for argv in walkthrough.WALKTHROUGH:
        assert walkthrough.command_line(argv) in readme, walkthrough.command_line(argv)


@pytest.mark.slow
def test_walkthrough_runs_end_to_end(tmp_path, prefect_server):
    walkthrough = _walkthrough()
    (tmp_path / "examples").symlink_to(REPO / "examples")  # what a fresh clone has, nothing else
    steps = walkthrough.run_walkthrough(tmp_path, REPO)
    annotate, export, convert, train, evaluate = steps

    # the README's main command: what the terminal shows, and what it writes
    assert annotate["command"].startswith(
        "odise-annotate --input examples/images --vocab-file examples/classes.txt"
    )
    assert "labelled 4 image(s) (0 errors" in annotate["stdout"]
    assert "PLUMBING CHECK" in annotate["stderr"] and "RANDOM weights" in annotate["stderr"]
    bar = annotate["stderr"]
    assert "labelling" in bar and "4/4" in bar and "img/s" in bar and "shards=1/1" in bar  # counts images
    for noise in NOISE:  # no INFO noise from Ray, Ray Data or Prefect, no token notice, no core_worker line
        assert noise not in annotate["stderr"] + annotate["stdout"], noise
    out = tmp_path / "out"
    for rel in ("provenance.json", "summary.json", "coco/panoptic.json", "coco/instances.json"):
        assert (out / rel).is_file(), rel
    assert list((out / "parquet").glob("*.parquet"))
    assert len(list((out / "overlays").rglob("*.jpg"))) == 4
    assert json.loads((out / "provenance.json").read_text())["settings"]["plumbing_check"] is True
    assert "exported 4 image(s)" in export["stdout"] and "PLUMBING CHECK" in export["stderr"]
    tasks = json.loads((tmp_path / "review" / "tasks.json").read_text())
    assert len(tasks) == 4 and all(t["predictions"][0]["result"] for t in tasks)
    uncertainties = [t["data"]["uncertainty"] for t in tasks]
    assert uncertainties == sorted(uncertainties, reverse=True)  # most uncertain first
    for task in tasks:  # copied images, served the Label Studio local-files way
        assert (tmp_path / "review" / task["data"]["image"].removeprefix("/data/local-files/?d=")).is_file()
    assert (tmp_path / "review" / "labeling_config.xml").is_file()

    assert "tasks: 0 reviewed, 4 not reviewed (their predictions used)" in convert["stdout"]
    assert "wrote 4 sample(s)" in convert["stdout"]
    assert (
        list((tmp_path / "data" / "train").glob("*.tar"))
        and (tmp_path / "data" / "train" / "categories.json").is_file()
    )

    assert re.search(r"steps\s+4", train["stdout"]), train["stdout"]
    assert list((tmp_path / "runs" / "tiny" / "checkpoints").glob("model_*.pth"))

    # the unreviewed labels are the pseudo-labels themselves: a perfect score
    assert re.search(r"PQ All\s+100\.0", evaluate["stdout"]), evaluate["stdout"]
    assert json.loads((tmp_path / "pq.json").read_text())["num_images"] == 4
    for step in steps:
        assert "Traceback" not in step["stderr"], step["command"]

    # odise-evaluate of the output against its own COCO export as ground truth: PQ 100, and the per-class
    # table lists every vocabulary category, absent ones marked (against the session's Prefect server)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": prefect_server["PREFECT_API_URL"]}
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "evaluate", "--ground-truth", "out/coco/panoptic.json",
         "--ground-truth-png", "out/coco/panoptic", "--predictions", "out", "--json", "pq-coco.json",
         "--no-instance-ap"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"PQ All\s+100\.0", proc.stdout), proc.stdout
    metrics = json.loads((tmp_path / "pq-coco.json").read_text())
    assert metrics["num_images"] == 4 and metrics["instance"] is None
    metrics_rows = [line for line in proc.stdout.splitlines() if re.match(r"\s+\d+ \S", line)]
    assert len(metrics_rows) == len(metrics["panoptic"]["per_class"]), proc.stdout
    counted = [r for r in metrics["panoptic"]["per_class"].values() if r["counted"]]
    assert counted and all(r["pq"] == 1.0 for r in counted)
    assert sum("(absent)" in line for line in metrics_rows) == len(metrics_rows) - len(counted)
