"""``python -m flows.serve``: serve the deployments of ``prefect.yaml`` without a work pool or worker.

One long-running process registers the deployments of ``prefect.yaml`` with the Prefect API
(``PREFECT_API_URL``): ``annotate/nightly`` (official model; cron ``0 2 * * *`` UTC, shipped INACTIVE),
``annotate/adhoc`` (official model), ``annotate/plumbing`` (tiny model on the sample photos: an offline
plumbing check), ``train/finetune``, ``evaluate/score`` and ``export/adhoc``, and runs their flow runs itself,
as subprocesses. The deployments (names, parameters, schedules with their ``active`` flag, tags,
descriptions and concurrency limits) are read from ``prefect.yaml`` so both ways of deploying stay the same;
work-pool settings and pull steps are ignored: the process ``chdir``s into ``--workdir`` (default:
``examples/`` next to ``prefect.yaml``, the pull step's directory), so relative paths in parameters resolve
as they do for a worker. An inactive schedule stays off until it is resumed
(``prefect deployment schedule resume annotate/nightly <schedule id>``) or ``active: true`` is set.

    python -m flows.serve                         # all deployments of prefect.yaml
    python -m flows.serve --only plumbing annotate/adhoc   # a subset
    prefect deployment run annotate/plumbing      # the offline plumbing check (tiny model)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["load_deployment_specs", "build_deployments", "concurrency_limit", "main", "DEFAULT_PREFECT_YAML"]

DEFAULT_PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"
"""``prefect.yaml`` of the source checkout this package runs from."""


def load_deployment_specs(path: str | os.PathLike = DEFAULT_PREFECT_YAML) -> list[dict[str, Any]]:
    """The ``deployments`` list of a ``prefect.yaml`` (anchors resolved)."""
    import yaml

    with open(path, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh) or {}
    specs = doc.get("deployments") or []
    if not specs:
        raise ValueError(f"{path}: no deployments")
    return specs


def build_deployments(specs: Sequence[dict[str, Any]], only: Sequence[str] | None = None) -> list[Any]:
    """``RunnerDeployment`` objects (``flow.to_deployment``) for ``specs``; ``only``: deployment names to keep."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron, Interval
    from prefect.utilities.importtools import import_object

    out = []
    for spec in specs:
        if only and spec["name"] not in only and f"{_flow_name(spec)}/{spec['name']}" not in only:
            continue
        flow = import_object(spec["entrypoint"])
        schedules = []
        for sched in spec.get("schedules") or []:
            active = sched.get("active", True)
            if "cron" in sched:
                schedules.append(Cron(sched["cron"], timezone=sched.get("timezone"), active=active))
            elif "interval" in sched:
                schedules.append(Interval(sched["interval"], timezone=sched.get("timezone"), active=active))
            else:
                raise ValueError(
                    f"deployment {spec['name']!r}: only cron and interval schedules are supported here"
                )
        out.append(
            flow.to_deployment(
                name=spec["name"],
                parameters=spec.get("parameters") or {},
                description=spec.get("description"),
                tags=spec.get("tags"),
                schedules=schedules or None,
                concurrency_limit=concurrency_limit(spec),
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return out


def concurrency_limit(spec: dict[str, Any]) -> Any:
    """A deployment's ``concurrency_limit`` as ``flow.to_deployment`` takes it: an int, or (the form
    ``{limit, collision_strategy, grace_period_seconds}`` of ``prefect.yaml``) a ``ConcurrencyLimitConfig``."""
    value = spec.get("concurrency_limit")
    if not isinstance(value, dict):
        return value
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    return ConcurrencyLimitConfig(**{k: v for k, v in value.items() if v is not None})


def _flow_name(spec: dict[str, Any]) -> str:
    from prefect.utilities.importtools import import_object

    return import_object(spec["entrypoint"]).name


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, ``chdir`` into the work directory and serve (blocks until interrupted)."""
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--prefect-yaml",
        default=str(DEFAULT_PREFECT_YAML),
        help="deployments to serve (default: %(default)s)",
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="working directory of the runs: relative paths in parameters resolve here (default: examples/ next to prefect.yaml)",
    )
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="serve only these deployments (name or flow/name)"
    )
    parser.add_argument("--limit", type=int, default=None, help="maximum concurrent flow runs")
    ns = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    workdir = Path(ns.workdir or Path(ns.prefect_yaml).resolve().parent / "examples")
    deployments = build_deployments(load_deployment_specs(ns.prefect_yaml), ns.only)
    if not deployments:
        parser.error(f"no deployment matches {ns.only}")
    os.chdir(workdir)
    print(
        f"serving {len(deployments)} deployment(s) from {ns.prefect_yaml}; working directory {os.getcwd()}",
        file=sys.stderr,
    )
    from prefect import serve

    serve(*deployments, limit=ns.limit)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
