"""Tests of pipeline/annotate/lease.py: one writer per output, on a local folder and on a real S3 server (moto).

Every mode the lease has is exercised against the real store: ``local`` (hard link / O_EXCL + flock),
``conditional`` (S3 ``If-None-Match`` / ``If-Match``, which moto honours like AWS) and ``claims`` (claim
objects, the fallback for stores without conditional writes). Races use real threads hitting the real store
at the same moment (a barrier), so "exactly one wins" is decided by the store, not by the test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from pipeline.annotate.lease import (
    LEASE_FILE,
    LeaseHeldError,
    LeaseLostError,
    LeaseRecord,
    OutputLease,
    check_not_leased,
    current_holder,
    honours_conditional_writes,
    lease_mode,
)

MODES = ["local", "conditional", "claims"]


@pytest.fixture(params=MODES)
def output(request, tmp_path, s3_bucket, s3_storage_options):
    """``(output URL, storage options, lease mode)`` for each mode; S3 modes on the moto server."""
    if request.param == "local":
        return str(tmp_path / "out"), {}, "local"
    return f"s3://{s3_bucket}/out-{request.param}", s3_storage_options, request.param


def _lease(output, run_id: str, **kw) -> OutputLease:
    url, opts, mode = output
    kw = {"ttl_s": 2.0, "renew_s": 0.3, "settle_s": 0.3, **kw}
    return OutputLease(url, opts, run_id=run_id, mode=mode, **kw)


def _write_record(output, record: LeaseRecord) -> None:
    """Put a lease record in place the way its mode stores it (a holder that is not this test's object)."""
    import fsspec.core

    url, opts, mode = output
    fs, root = fsspec.core.url_to_fs(url, **opts)
    if mode == "claims":
        name = f"{int(time.time() * 1000):016d}-{record.run_id}.json"
        fs.pipe_file(f"{root}/_lease/claims/{name}", record.to_json())
    else:
        if mode == "local":
            os.makedirs(root, exist_ok=True)
        fs.pipe_file(f"{root}/{LEASE_FILE}", record.to_json())


def _foreign(run_id: str, *, renewed_s_ago: float, ttl_s: float = 60.0) -> LeaseRecord:
    """A holder on another machine whose last renewal was ``renewed_s_ago`` seconds ago."""
    now = time.time()
    rec = LeaseRecord.new(run_id, ttl_s=ttl_s, renew_s=ttl_s / 4, now=now - renewed_s_ago - 5)
    rec = rec.renewed(now - renewed_s_ago)
    return LeaseRecord(**{**rec.to_dict(), "host": "other-host", "pid": 4242, "process_ns": "elsewhere"})


def test_a_second_writer_is_refused_with_the_holder_named_then_admitted_after_release(output):
    first = _lease(output, "run-first").acquire()
    try:
        with pytest.raises(LeaseHeldError) as info:
            _lease(output, "run-second").acquire()
        msg = str(info.value)
        for part in (
            "run run-first",
            f"host {socket.gethostname()}",
            f"pid {os.getpid()}",
            first.record.since,
            output[0],
        ):
            assert part in msg, part
        assert info.value.holder.run_id == "run-first"
        with pytest.raises(LeaseHeldError, match="run-first"):  # the fast check before a run says the same
            check_not_leased(output[0], output[1])
        first.ensure_held()
    finally:
        first.release()
    assert current_holder(output[0], output[1]) is None
    second = _lease(output, "run-second").acquire()
    assert second.taken_over is None
    second.release()


def test_heartbeat_renews_and_a_stale_lease_is_taken_over(output):
    holder = _lease(output, "run-old").acquire()
    since = holder.record.since
    time.sleep(0.8)
    renewed = current_holder(output[0], output[1])[0]
    assert renewed.run_id == "run-old" and renewed.since == since and renewed.renewed_at > since
    holder._stop.set()  # the holder hangs: its heartbeat stops, the lease goes stale after its TTL
    holder._thread.join()
    with pytest.raises(LeaseHeldError):
        _lease(output, "run-new").acquire()
    time.sleep(2.3)
    new = _lease(output, "run-new").acquire()
    try:
        assert new.taken_over is not None and new.taken_over.run_id == "run-old"
        # the old holder wakes up: its renewal is refused and it must not commit anything else
        with pytest.raises(LeaseLostError, match="run-new"):
            holder.renew()
        with pytest.raises(LeaseLostError):
            holder.ensure_held()
        holder.release()  # releasing a lost lease leaves the new holder's alone
        assert current_holder(output[0], output[1])[0].run_id == "run-new"
    finally:
        new.release()


def test_a_lease_of_another_host_is_kept_until_its_ttl(output):
    _write_record(output, _foreign("run-remote", renewed_s_ago=5, ttl_s=60))
    with pytest.raises(LeaseHeldError, match="run run-remote on host other-host \\(pid 4242\\)"):
        _lease(output, "run-me").acquire()
    _write_record(output, _foreign("run-remote", renewed_s_ago=61, ttl_s=60))
    if output[2] == "claims":  # the live claim of the first write is still there: drop it
        import fsspec.core

        fs, root = fsspec.core.url_to_fs(output[0], **output[1])
        for path in sorted(fs.find(f"{root}/_lease/claims"))[:-1]:
            fs.rm_file(path)
    lease = _lease(output, "run-me").acquire()
    assert lease.taken_over.run_id == "run-remote" and lease.taken_over.host == "other-host"
    lease.release()


@pytest.mark.parametrize("contenders", [4])
def test_racing_writers_exactly_one_wins(output, contenders):
    barrier = threading.Barrier(contenders)
    results: dict[str, object] = {}

    def contend(i: int) -> None:
        lease = _lease(output, f"run-{i}")
        barrier.wait()
        try:
            results[f"run-{i}"] = lease.acquire()
        except LeaseHeldError as exc:
            results[f"run-{i}"] = exc

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [k for k, v in results.items() if isinstance(v, OutputLease)]
    assert len(results) == contenders and len(winners) == 1, results
    losers = [v for v in results.values() if isinstance(v, LeaseHeldError)]
    assert all(e.holder.run_id == winners[0] for e in losers)
    results[winners[0]].release()


def test_a_dead_process_on_this_machine_does_not_hold_the_lease(tmp_path):
    """``kill -9`` of a run: its lease names a pid that no longer exists here, so a rerun need not wait."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(proc.stdout)
    rec = LeaseRecord.new("run-killed", ttl_s=3600, renew_s=60)
    rec = LeaseRecord(**{**rec.to_dict(), "pid": dead_pid})
    out = tmp_path / "out"
    out.mkdir()
    (out / LEASE_FILE).write_bytes(rec.to_json())
    assert rec.process_gone() and rec.is_stale()
    lease = OutputLease(str(out), {}, run_id="run-rerun", ttl_s=3600, renew_s=60).acquire()
    assert lease.taken_over.run_id == "run-killed"
    lease.release()
    # a live process (this one) is never presumed dead
    live = LeaseRecord.new("run-live", ttl_s=3600, renew_s=60)
    assert not live.process_gone() and not live.is_stale()


def test_unrenewed_for_half_the_ttl_stops_commits(tmp_path):
    lease = OutputLease(str(tmp_path / "out"), {}, run_id="run-slow", ttl_s=3, renew_s=1).acquire()
    lease._stop.set()  # no renewal (as if the store were unreachable)
    lease._thread.join()
    lease.ensure_held()
    time.sleep(1.7)
    with pytest.raises(LeaseLostError, match="not been renewed"):
        lease.ensure_held()
    lease.release()


def test_release_on_exceptions_and_the_record_on_disk(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with OutputLease(str(out), {}, run_id="run-ctx", ttl_s=30, renew_s=5) as lease:
            data = json.loads((out / LEASE_FILE).read_text())
            assert {"run_id", "host", "pid", "since", "renewed_at", "ttl_s", "renew_s"} <= set(data)
            assert data["run_id"] == "run-ctx" and lease.record.pid == os.getpid()
            raise RuntimeError("boom")
    assert not (out / LEASE_FILE).exists()


def test_store_capabilities(tmp_path, s3_bucket, s3_storage_options):
    import s3fs

    assert lease_mode(str(tmp_path), {}) == "local"
    assert lease_mode(f"file://{tmp_path}", {}) == "local"
    assert lease_mode(f"s3://{s3_bucket}/x", s3_storage_options) == "conditional"  # moto honours both headers
    assert lease_mode(f"s3://{s3_bucket}/x", s3_storage_options, conditional=False) == "claims"
    fs = s3fs.S3FileSystem(**s3_storage_options)
    probe = f"{s3_bucket}/probe-{uuid.uuid4().hex}"
    fs.pipe_file(probe, b"x")
    assert honours_conditional_writes(fs, probe)
    assert lease_mode("memory://somewhere", {}) == "claims"


def test_invalid_timing_is_refused(tmp_path):
    with pytest.raises(ValueError, match="below half the TTL"):
        OutputLease(str(tmp_path), {}, run_id="x", ttl_s=10, renew_s=5)
    from pipeline.config import AnnotateConfig

    with pytest.raises(ValueError, match="lease_renew_s"):
        AnnotateConfig(input="x", output="y", lease_ttl_s=10, lease_renew_s=6)
