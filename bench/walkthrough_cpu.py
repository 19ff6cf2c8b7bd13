"""The README walk-through (annotate -> Label Studio export -> convert back -> train -> evaluate), timed.

    python bench/walkthrough_cpu.py              # in a fresh `git clone` of this repository's HEAD
    python bench/walkthrough_cpu.py --here DIR   # in DIR, with this checkout's code (what the slow test does)

Runs exactly :data:`WALKTHROUGH` (the commands README.md shows, on the shipped examples) through
``python -m flows.cli <command>`` (the console scripts' entry points, so it runs without reinstalling the
package), one process per command as a user would, and writes ``bench/results/walkthrough_cpu.json`` with the
wall time of each step and of the whole chain, and the machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WALKTHROUGH: list[list[str]] = [
    [
        "odise-annotate",
        "--input", "examples/images",
        "--vocab-file", "examples/classes.txt",
        "--output", "out/",
        "--model", "tiny",
    ],
    [
        "odise-export",
        "--input", "out/",
        "--output", "review/",
        "--format", "labelstudio",
        "--order", "uncertainty",
        "--copy-images",
    ],
    ["odise-convert", "--from", "labelstudio", "--input", "review/tasks.json", "--output", "data/train"],
    ["odise-train", "--train", "data/train", "--output", "runs/tiny", "--model", "tiny", "--max-steps", "4"],
    ["odise-evaluate", "--ground-truth-shards", "data/train", "--predictions", "out/", "--json", "pq.json"],
]  # fmt: skip
"""The walk-through, one command per step, as README.md shows it (relative paths: run in the repository root)."""


def command_line(argv: list[str]) -> str:
    """One step as README.md writes it."""
    return " ".join(argv)


def run_walkthrough(workdir: Path, code: Path, *, timeout: float = 900) -> list[dict]:
    """Run :data:`WALKTHROUGH` in ``workdir`` with the package from ``code``; returns one record per step.

    Raises:
        RuntimeError: a step failed (its command, exit code and output tail in the message).
    """
    env = {
        **os.environ,
        "PYTHONPATH": str(code),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
    }
    env.setdefault("PREFECT_HOME", str(workdir / ".prefect-home"))
    env.pop("PREFECT_API_URL", None)
    steps = []
    for argv in WALKTHROUGH:
        sub = argv[0].removeprefix("odise-")
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", sub, *argv[1:]],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(
                f"step failed ({proc.returncode}): {command_line(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        steps.append(
            {
                "command": command_line(argv),
                "seconds": round(seconds, 1),
                "stdout": proc.stdout,
                "stderr": proc.stderr,
            }
        )
        print(f"{seconds:7.1f} s  {command_line(argv)}", flush=True)
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--here", type=Path, help="run in this folder with this checkout's code (no clone)")
    ns = parser.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    from _common import machine, write_result

    load_at_start = [round(v, 1) for v in os.getloadavg()]  # the machine is shared: say how busy it was
    with tempfile.TemporaryDirectory(prefix="odise-walkthrough-") as tmp:
        if ns.here:
            workdir, code = ns.here, REPO
            workdir.mkdir(parents=True, exist_ok=True)
            if not (workdir / "examples").exists():
                (workdir / "examples").symlink_to(REPO / "examples")
            where = "this checkout"
        else:
            workdir = code = Path(tmp) / "clone"
            subprocess.run(
                ["git", "clone", "--quiet", "--depth", "1", f"file://{REPO}", str(workdir)], check=True
            )
            head = subprocess.run(
                ["git", "-C", str(workdir), "rev-parse", "HEAD"], capture_output=True, text=True
            )
            where = f"fresh git clone of {head.stdout.strip()}"
        started = time.perf_counter()
        steps = run_walkthrough(workdir, code)
        total = time.perf_counter() - started
    metrics = [line for line in steps[-1]["stdout"].splitlines() if "PQ All" in line]
    write_result(
        "walkthrough_cpu",
        {
            "benchmark": "README walk-through: annotate (tiny) -> export Label Studio -> convert back -> train 4 steps -> evaluate",
            "command": "python bench/walkthrough_cpu.py" + (f" --here {ns.here}" if ns.here else ""),
            "where": where,
            "note": "one process per step (Prefect in ephemeral mode, local Ray for annotate); wall times include "
            "process start, imports and Prefect's temporary server",
            "steps": [{"command": s["command"], "seconds": s["seconds"]} for s in steps],
            "total_seconds": round(total, 1),
            "evaluate": metrics[0].strip() if metrics else None,
            "load_average_1_5_15min_at_end": [round(v, 1) for v in os.getloadavg()],
            "load_average_at_start": load_at_start,
            "machine": machine(),
        },
    )
    print(f"total {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
