"""Tests of pipeline/annotate/checks.py: the typed result of ``check_inputs``, the in-process hand-off that
lets the CLI, the flow and ``run_annotation`` check once, the lease check, and the refusal of local paths on a
Ray cluster with nodes on other hosts (a pure function over ``ray.nodes()`` records).

The real two-node cluster is in tests/test_cluster.py; counting listings / probes through the whole
command is in tests/test_flows.py.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from pipeline.annotate.checks import (
    CheckedInputs,
    ClusterPathError,
    OutputError,
    check_cluster_paths,
    check_inputs,
    hand_over,
    remote_nodes,
    take_over,
)
from pipeline.config import AnnotateConfig

REPO = Path(__file__).resolve().parents[1]
IMAGES = str(REPO / "examples" / "images")
VOCAB = str(REPO / "examples" / "classes.txt")


def _config(output: str, **kw) -> AnnotateConfig:
    return AnnotateConfig(input=kw.pop("input", IMAGES), output=output, vocab_file=VOCAB, model="tiny", **kw)


def test_check_inputs_returns_a_typed_frozen_result(tmp_path):
    config = _config(str(tmp_path / "out"))
    checked = check_inputs(config)
    assert isinstance(checked, CheckedInputs) and dataclasses.is_dataclass(checked)
    with pytest.raises(dataclasses.FrozenInstanceError):
        checked.shards = ()  # type: ignore[misc]
    assert checked.output == config.output
    assert len(checked.shards) == 1 and checked.shards[0].kind == "images" and checked.images_known == 4
    assert len(checked.vocabulary) == 11 and checked.model_config.name == "tiny"
    assert checked.sources.checkpoint is None and not checked.located.any()  # random weights
    assert checked.provenance is None and checked.new_provenance.model_variant == "tiny"
    assert checked.conditional_writes  # local folder: exclusive create is available
    assert checked["shards"] is checked.shards  # mapping access for older callers


def test_hand_over_is_used_once_for_the_same_config_and_output(tmp_path):
    config = _config(str(tmp_path / "out"))
    checked = check_inputs(config)
    hand_over(config, checked, "block-a")
    assert take_over(config, "block-b") is None  # another credentials block: another key
    assert take_over(config, "block-a") is checked
    assert take_over(config, "block-a") is None  # used once
    hand_over(config, checked)
    assert take_over(config.model_copy(update={"batch_size": 9})) is None  # another config
    assert take_over(config) is checked
    old = dataclasses.replace(checked, checked_at=time.time() - 3600)
    hand_over(config, old)
    assert take_over(config) is None  # too old: check again


def test_an_output_another_run_writes_is_refused_by_the_checks(tmp_path):
    from pipeline.annotate.lease import LeaseHeldError, OutputLease

    config = _config(str(tmp_path / "out"))
    with OutputLease(config.output, {}, run_id="run-busy", ttl_s=60, renew_s=10):
        with pytest.raises(LeaseHeldError, match="run run-busy"):
            check_inputs(config)
    check_inputs(config)


# --- local paths on a cluster ---------------------------------------------------------------------------------
DRIVER = {"driver_host": "head-host", "driver_addresses": {"10.0.0.1"}}


def _node(host: str, ip: str, alive: bool = True) -> dict:
    return {
        "NodeID": f"id-{host}-{ip}",
        "Alive": alive,
        "NodeManagerHostname": host,
        "NodeManagerAddress": ip,
    }


def test_remote_nodes_are_those_on_other_hosts():
    nodes = [
        _node("head-host", "10.0.0.1"),
        _node("head-host", "127.0.0.1"),  # a second raylet on the driver's machine
        _node("renamed", "10.0.0.1"),  # same address, other name
        _node("gpu-2", "10.0.0.2"),
        _node("gpu-3", "10.0.0.3", alive=False),  # dead nodes do not count
    ]
    assert [n["NodeManagerHostname"] for n in remote_nodes(nodes, **DRIVER)] == ["gpu-2"]


def test_local_output_on_a_multi_host_cluster_is_refused_naming_output_and_nodes(tmp_path):
    nodes = [_node("head-host", "10.0.0.1"), _node("gpu-2", "10.0.0.2")]
    out = str(tmp_path / "labels")
    config = _config(out, input="s3://bucket/shards/*.tar")
    with pytest.raises(ClusterPathError) as info:
        check_cluster_paths(config, nodes, **DRIVER)
    msg = str(info.value)
    assert f"output {out}" in msg and "gpu-2 (10.0.0.2)" in msg and "--shared-filesystem" in msg
    assert isinstance(info.value, OutputError)  # a user error: exit code 2, never retried
    # a local input is refused the same way
    with pytest.raises(ClusterPathError, match=r"input /data/imgs"):
        check_cluster_paths(_config("s3://bucket/labels", input="/data/imgs"), nodes, **DRIVER)
    with pytest.raises(ClusterPathError, match=r"output file:///mnt/labels"):
        check_cluster_paths(_config("file:///mnt/labels", input="s3://b/x.tar"), nodes, **DRIVER)


def test_local_paths_are_fine_on_one_host_on_object_storage_or_on_a_shared_filesystem(tmp_path):
    one_host = [_node("head-host", "10.0.0.1"), _node("head-host", "127.0.0.1")]
    check_cluster_paths(_config(str(tmp_path / "o")), one_host, **DRIVER)
    many = [_node("head-host", "10.0.0.1"), _node("gpu-2", "10.0.0.2")]
    check_cluster_paths(_config("s3://bucket/labels", input="s3://bucket/shards/*.tar"), many, **DRIVER)
    check_cluster_paths(_config(str(tmp_path / "o"), shared_filesystem=True), many, **DRIVER)
