"""What one writer per output costs a run: lease acquire / renew / release and the pre-run holder check.

Measures :class:`pipeline.annotate.lease.OutputLease` in its three modes against real stores: a local folder
(``local``: hard link + flock), and a local moto S3 server (``conditional``: ``If-None-Match`` / ``If-Match``
PUTs; ``claims``: claim objects, with its ``settle_s`` wait included). The S3 numbers are loopback round
trips to moto, a lower bound for a real object store (add its request latency per operation: acquire 2-3
requests + settle for claims, renew 1 PUT (conditional) or LIST + GETs + PUT (claims), release 1 DELETE).

    python bench/lease_cpu.py [--repeats 20]   # -> bench/results/lease_cpu.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine, write_result  # noqa: E402


def _ms(samples: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(1000 * statistics.median(samples), 2),
        "p90_ms": round(1000 * sorted(samples)[int(0.9 * (len(samples) - 1))], 2),
    }


def measure(output: str, options: dict, mode: str, repeats: int, settle_s: float) -> dict:
    from pipeline.annotate.lease import OutputLease, check_not_leased

    acquire, renew, release, check = [], [], [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        check_not_leased(output, options)
        t1 = time.perf_counter()
        lease = OutputLease(
            output, options, run_id=f"bench-{i}", ttl_s=600, renew_s=200, mode=mode, settle_s=settle_s
        )
        lease.acquire()
        t2 = time.perf_counter()
        lease.renew()
        t3 = time.perf_counter()
        lease.release()
        t4 = time.perf_counter()
        check.append(t1 - t0)
        acquire.append(t2 - t1)
        renew.append(t3 - t2)
        release.append(t4 - t3)
    return {
        "mode": mode,
        "repeats": repeats,
        "settle_s": settle_s if mode == "claims" else None,
        "check_not_leased": _ms(check),
        "acquire": _ms(acquire),
        "renew": _ms(renew),
        "release": _ms(release),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--settle-s", type=float, default=1.0, help="claims mode wait (the default of OutputLease)"
    )
    ns = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}"},
    }
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(**options).mkdir(bucket)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        results.append(measure(f"{tmp}/out", {}, "local", ns.repeats, ns.settle_s))
    results.append(measure(f"s3://{bucket}/conditional", options, "conditional", ns.repeats, ns.settle_s))
    results.append(measure(f"s3://{bucket}/claims", options, "claims", max(3, ns.repeats // 4), ns.settle_s))
    server.stop()
    for r in results:
        print(
            f"{r['mode']:>11s}: check {r['check_not_leased']['median_ms']:7.2f} ms, acquire {r['acquire']['median_ms']:8.2f} ms, "
            f"renew {r['renew']['median_ms']:7.2f} ms, release {r['release']['median_ms']:7.2f} ms (medians)"
        )
    write_result(
        "lease_cpu",
        {
            "what": "OutputLease costs per run (acquire, renew, release) and the pre-run holder check",
            "command": f"python bench/lease_cpu.py --repeats {ns.repeats}",
            "store_notes": "local = a tmp folder; conditional / claims = moto S3 server on 127.0.0.1 (loopback)",
            "machine": machine(),
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
