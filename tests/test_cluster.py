"""The annotate pipeline on a real multi-node Ray cluster started on this machine (``ray.cluster_utils.Cluster``:
a head node and a worker node, 1 CPU and a small object store each), with the output on the moto S3 server.

``run_annotation`` (tiny model) connects to the cluster by address, its two model replicas land on the two
nodes (Ray Data's SPREAD strategy), every image is labelled once, and a local path is accepted because both
nodes are on the driver's host (the refusal for nodes on other hosts is tested on node records in
tests/test_checks.py, since every node here shares one host).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import jpeg_bytes, webdataset_members, write_tar

import pipeline
from pipeline.annotate.checks import check_cluster_paths

pytestmark = pytest.mark.slow

OBJECT_STORE = 80 * 1024 * 1024
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_node_cluster():
    """A head (1 CPU) and a worker node (1 CPU) on this machine; the session's local Ray is paused meanwhile."""
    import ray
    from ray.cluster_utils import Cluster

    had_local = ray.is_initialized()
    if had_local:
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": OBJECT_STORE, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
    cluster.wait_for_nodes()
    yield cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster.shutdown()
    if had_local:  # give the session's tests their local Ray back (tests/conftest.py ray_local)
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False
        )
        ray.data.DataContext.get_current().enable_progress_bars = False


def _shard(path, photos, prefix: str, n: int) -> list[str]:
    names = sorted(photos)
    samples = {
        f"{prefix}-{i:03d}": jpeg_bytes(photos[names[i % len(names)]], (64 + 8 * i, 48)) for i in range(n)
    }
    write_tar(path, webdataset_members(samples))
    return list(samples)


def test_two_node_cluster_labels_into_s3_with_replicas_on_both_nodes(
    two_node_cluster, tmp_path, photos, s3_bucket, s3_storage_options
):
    import pyarrow.parquet as pq
    import ray
    import s3fs

    shards = tmp_path / "shards"
    shards.mkdir()
    keys = []
    for i in range(4):
        keys += _shard(shards / f"part-{i}.tar", photos, f"c{i}", 2)
    out = f"s3://{s3_bucket}/labels"
    config = pipeline.AnnotateConfig(
        input=str(shards),  # a local path: fine, both nodes are on this host
        output=out,
        vocab_file="coco_panoptic",
        model="tiny",
        ray_address=two_node_cluster.address,
        num_actors=2,
        cpus_per_actor=0.5,
        batch_size=2,
        overlays=0,
        storage_options=s3_storage_options,
        no_progress_timeout_s=240,
    )
    replica_nodes: set[str] = set()
    seen: dict = {}
    lock = threading.Lock()

    def watch(progress):  # while connected (run_annotation disconnects at the end): nodes and replicas
        actors = ray._private.state.actors().values()  # alive or done: the record keeps its node
        with lock:
            seen["nodes"] = ray.nodes()
            seen["driver_ip"] = ray.util.get_node_ip_address()
            replica_nodes.update(
                a["Address"]["NodeID"]
                for a in actors
                if "MapWorker" in a.get("ActorClassName", "") and (a.get("Address") or {}).get("NodeID")
            )

    summary = pipeline.run_annotation(config, on_progress=watch)

    assert summary.images == len(keys) and summary.errors == 0 and summary.shards_committed == 4
    nodes = seen["nodes"]
    assert len([n for n in nodes if n["Alive"]]) == 2
    assert replica_nodes == {n["NodeID"] for n in nodes if n["Alive"]}, "the two replicas share one node"
    fs = s3fs.S3FileSystem(**s3_storage_options)
    rows = []
    for path in fs.find(f"{s3_bucket}/labels/parquet"):
        with fs.open(path, "rb") as fh:
            rows += pq.read_table(fh, columns=["key"]).column("key").to_pylist()
    assert sorted(rows) == sorted(keys)  # every image exactly once
    assert json.loads(fs.cat(f"{s3_bucket}/labels/summary.json"))["n_images"] == len(keys)
    assert not fs.exists(f"{s3_bucket}/labels/_lease.json")  # released

    # one host: a local output path is accepted by the real node list of this cluster
    host = socket.gethostname()
    check_cluster_paths(
        config.model_copy(update={"output": str(tmp_path / "local-out")}),
        nodes,
        driver_host=host,
        driver_addresses={seen["driver_ip"]},
    )


def test_without_ray_address_a_run_starts_its_own_ray_even_beside_a_running_cluster(
    two_node_cluster, tmp_path
):
    """A bare ``ray.init()`` joins the cluster running on this machine (and then refuses ``num_cpus``); a run
    without ``ray_address`` (and without ``$RAY_ADDRESS``) starts its own local Ray, as documented."""
    script = (
        "import json, ray\n"
        "from pipeline.annotate.run import _start_ray\n"
        "from pipeline.config import AnnotateConfig\n"
        "ray.init(include_dashboard=False)\n"
        "bare = ray.get_runtime_context().gcs_address\n"
        "ray.shutdown()\n"
        f"config = AnnotateConfig(input={str(tmp_path)!r}, output={str(tmp_path / 'out')!r}, num_cpus=1)\n"
        "assert _start_ray(config)\n"
        "print(json.dumps({'bare': bare, 'run': ray.get_runtime_context().gcs_address,\n"
        "                  'cpus': ray.cluster_resources().get('CPU')}))\n"
        "ray.shutdown()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["bare"] == two_node_cluster.address  # the hazard is real here
    assert seen["run"] != two_node_cluster.address and seen["cpus"] == 1.0
