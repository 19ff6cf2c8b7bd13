"""The README walk-through, run exactly as written: annotate (tiny) -> export to Label Studio -> convert back
-> train 4 steps -> evaluate, one console-script process per step (``python -m flows.cli <command>``).

The commands come from bench/walkthrough_cpu.py (the script that times them); README.md must show the same
lines, so the documentation cannot drift from what is tested.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
def test_walkthrough_runs_end_to_end(tmp_path):
    walkthrough = _walkthrough()
    (tmp_path / "examples").symlink_to(REPO / "examples")  # what a fresh clone has, nothing else
    steps = walkthrough.run_walkthrough(tmp_path, REPO)
    annotate, export, convert, train, evaluate = steps

    assert "labelled 4 image(s) (0 errors" in annotate["stdout"] and "PLUMBING CHECK" in annotate["stderr"]
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
