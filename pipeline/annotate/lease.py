"""One writer per output: a lease object in the output, created atomically and renewed by a heartbeat.

A run that labels into ``<output>`` first takes the output's lease; a second run into the same output is
refused (:class:`LeaseHeldError`, naming the holder: host, pid, run id, since when) before it labels or
cleans anything. The lease is renewed every ``renew_s`` seconds by a background thread and released when
the run ends (also on Ctrl-C and on errors). A lease that was not renewed for its holder's ``ttl_s`` seconds
is *stale*: the holder is presumed dead and the next run takes it over (:attr:`OutputLease.taken_over`
says from whom). A lease held by a process that no longer exists on this very machine (same host, same
kernel boot and PID namespace) is stale at once, so a rerun after ``kill -9`` does not wait for the TTL.

The record (JSON, keys of :class:`LeaseRecord`)::

    {"version": 1, "run_id": "20261205T090000Z-1a2b3c4d", "host": "node-7", "pid": 4242,
     "process_ns": "<boot id>:<pid namespace>", "since": "2026-12-05T09:00:00+00:00",
     "renewed_at": "2026-12-05T09:04:30+00:00", "ttl_s": 300.0, "renew_s": 30.0}

Times are UTC from the writer's clock: the hosts' clocks must agree within a small fraction of the TTL
(NTP does this). Staleness is judged with the holder's own ``ttl_s`` (the holder promised to renew within
it), never with the reader's.

How the lease is made atomic, by store:

* **local path** (``mode="local"``): ``<output>/_lease.json``, created with a hard link of a complete,
  fsync'ed temp file (``os.link`` fails when the name exists: ``O_EXCL`` semantics, and readers never see a
  half-written lease); ``O_CREAT | O_EXCL`` where hard links are not supported. Take-over, renewal and
  release read-check-replace under an exclusive ``flock`` of ``<output>/_lease.lock`` (works on local
  filesystems and on NFS, where Linux maps it to POSIX locks).
* **S3 with conditional writes** (``mode="conditional"``; AWS S3 since 2024, moto, recent MinIO):
  ``<output>/_lease.json`` created with ``PUT If-None-Match: *``; renewed and taken over with
  ``PUT If-Match: <ETag>`` (only one of two racing writers wins), released with ``DELETE If-Match``.
* **any other store** (``mode="claims"``; an S3-compatible store that ignores conditional headers, GCS
  through fsspec ...): the documented fallback. Each run writes its own claim object
  ``<output>/_lease/claims/<since in ms>-<run id>.json`` (plain PUTs, no two runs write one name), waits
  ``settle_s``, lists the claims and the lexicographically first *live* claim holds the lease; the others
  delete their claim and are refused. A run that sees a live claim before writing its own is refused at
  once. Residual risk: two runs starting within ``settle_s`` of each other on a store whose PUTs take longer
  than ``settle_s`` to become visible in listings could both proceed until the first renewal, where the
  later one finds an earlier live claim and stops (:class:`LeaseLostError`).

Which mode an output gets is decided by :func:`honours_conditional_writes`, probed once by
:func:`pipeline.annotate.checks.check_inputs` (one extra PUT on the probe object it writes anyway).

Losing the lease (another run took it over after this one could not renew for ``ttl_s``, or the store
refused the renewal) sets :attr:`OutputLease.lost`; :meth:`OutputLease.ensure_held` then raises
:class:`LeaseLostError`, and the run calls it before every commit, so it stops before committing anything
else. ``ensure_held`` also raises when the last successful renewal is older than half the TTL (the lease may
be taken over soon; committing would no longer be safe).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any, Literal

from pipeline.storage import fs_root, is_local

log = logging.getLogger(__name__)

__all__ = [
    "LEASE_FILE",
    "LeaseError",
    "LeaseHeldError",
    "LeaseLostError",
    "LeaseMode",
    "LeaseRecord",
    "OutputLease",
    "check_not_leased",
    "current_holder",
    "honours_conditional_writes",
    "lease_mode",
    "release_all",
]

LEASE_FILE = "_lease.json"
LOCK_FILE = "_lease.lock"
CLAIMS_DIR = "_lease/claims"

LeaseMode = Literal["local", "conditional", "claims"]
"""How the lease is kept atomic: local files + flock, S3 conditional PUTs, or claim objects (module doc)."""


class LeaseError(RuntimeError):
    """Base class of the lease errors."""


class LeaseHeldError(LeaseError):
    """Another live run holds the output's lease; ``holder`` names it. The CLI exits 2 on it."""

    def __init__(self, output: str, holder: LeaseRecord, where: str) -> None:
        self.output, self.holder, self.where = output, holder, where
        super().__init__(
            f"output {output} is being written by another run: {holder.describe()}. Refusing to start a second "
            f"writer (lease {where}). Wait for that run to finish; if it died, its lease expires "
            f"{holder.ttl_s:.0f} s after its last renewal and the next run takes it over."
        )


class LeaseLostError(LeaseError):
    """This run no longer holds the output's lease (taken over, or not renewed in time): stop, commit nothing."""


def _process_ns() -> str:
    """``<kernel boot id>:<pid namespace inode>`` on Linux (a pid is meaningful only inside it), else ``""``."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            boot = fh.read().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def _parse_time(text: str) -> float:
    """Seconds since the epoch of an ISO-8601 time (naive times are UTC)."""
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class LeaseRecord:
    """The content of a lease (``_lease.json`` or a claim object). Times are ISO-8601 UTC strings."""

    run_id: str
    host: str
    pid: int
    since: str
    renewed_at: str
    ttl_s: float
    renew_s: float
    process_ns: str = ""
    version: int = 1

    @classmethod
    def new(cls, run_id: str, *, ttl_s: float, renew_s: float, now: float | None = None) -> LeaseRecord:
        """A record for this process, acquired and renewed ``now`` (epoch seconds; default: the clock)."""
        stamp = _iso(time.time() if now is None else now)
        return cls(
            run_id=run_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            since=stamp,
            renewed_at=stamp,
            ttl_s=float(ttl_s),
            renew_s=float(renew_s),
            process_ns=_process_ns(),
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> LeaseRecord:
        data = json.loads(raw)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True) + "\n").encode()

    def renewed(self, now: float | None = None) -> LeaseRecord:
        return replace(self, renewed_at=_iso(time.time() if now is None else now))

    def age_s(self, now: float | None = None) -> float:
        """Seconds since the last renewal."""
        return (time.time() if now is None else now) - _parse_time(self.renewed_at)

    def process_gone(self) -> bool:
        """True when the holder ran on this machine (same host, boot and PID namespace) and has exited."""
        if not self.process_ns or self.process_ns != _process_ns() or self.host != socket.gethostname():
            return False
        if self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # exists, owned by someone else
            return False
        return False

    def is_stale(self, now: float | None = None) -> bool:
        """Not renewed within its own ``ttl_s``, or its process is gone (see :meth:`process_gone`)."""
        return self.age_s(now) > self.ttl_s or self.process_gone()

    def describe(self, now: float | None = None) -> str:
        """One line naming the holder: run id, host, pid, since when, last renewal."""
        return (
            f"run {self.run_id} on host {self.host} (pid {self.pid}), holding it since {self.since}, "
            f"last renewed {max(0.0, self.age_s(now)):.0f} s ago"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------
# stores: one per mode
# --------------------------------------------------------------------------------------------------------
def _precondition_failed(exc: BaseException) -> bool:
    """True when ``exc`` (or its cause) is an HTTP 412 / ``PreconditionFailed`` of a conditional request."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        if isinstance(cur, FileExistsError):
            return True
        response = getattr(cur, "response", None)
        if isinstance(response, dict):
            err = response.get("Error") or {}
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if err.get("Code") in ("PreconditionFailed", "412") or status == 412:
                return True
        cur, seen = cur.__cause__ or cur.__context__, seen + 1
    return False


def _is_s3(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return any(p in ("s3", "s3a") for p in protocol) and hasattr(fs, "call_s3")


def honours_conditional_writes(fs, probe_path: str) -> bool:
    """Whether the store behind ``fs`` honours ``If-None-Match: *`` and ``If-Match`` on PUT.

    ``probe_path`` must be an existing object this caller owns (it may be overwritten). Only S3 (s3fs) is
    probed; every other non-local store answers False (the lease then uses claim objects).
    """
    if not _is_s3(fs):
        return False
    bucket, key, _ = fs.split_path(probe_path)
    for condition in ({"IfNoneMatch": "*"}, {"IfMatch": '"00000000000000000000000000000000"'}):
        try:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=b"probe", **condition)
        except Exception as exc:  # noqa: BLE001 - a refusal of any other kind means "not supported"
            if _precondition_failed(exc):
                continue
            log.info("store rejects conditional PUT (%s): %s; the lease uses claim objects", condition, exc)
            return False
        log.info("store ignores conditional PUT (%s); the lease uses claim objects", list(condition)[0])
        return False
    return True


def lease_mode(
    output: str, storage_options: dict[str, Any] | None, conditional: bool | None = None
) -> LeaseMode:
    """The lease mode of an output: ``local`` for local paths, ``conditional`` for S3 stores that honour
    conditional writes (``conditional``: the probe's answer, probed here when None), else ``claims``."""
    fs, root = fs_root(output, storage_options)
    if is_local(fs):
        return "local"
    if not _is_s3(fs):
        return "claims"
    if conditional is None:
        probe = posixpath.join(root, f".lease-probe-{uuid.uuid4().hex}")
        fs.pipe_file(probe, b"probe")
        try:
            conditional = honours_conditional_writes(fs, probe)
        finally:
            with contextlib.suppress(Exception):
                fs.rm_file(probe)
    return "conditional" if conditional else "claims"


class _LocalStore:
    """``_lease.json`` on a local (or NFS) filesystem; every read-check-write under ``flock``."""

    def __init__(self, fs, root: str) -> None:
        self.root = root
        self.path = os.path.join(root, LEASE_FILE)
        self.lock_path = os.path.join(root, LOCK_FILE)
        self.where = self.path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        os.makedirs(self.root, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _read(self) -> LeaseRecord | None:
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return None
        try:
            return LeaseRecord.from_json(raw)
        except (ValueError, TypeError):
            mtime = os.path.getmtime(self.path)
            return _unreadable(self.where, mtime)

    def _temp(self, record: LeaseRecord) -> str:
        tmp = os.path.join(self.root, f".{LEASE_FILE}.tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as fh:
            fh.write(record.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def _create(self, record: LeaseRecord) -> None:
        """Publish a new lease file; FileExistsError when one exists (never overwrites)."""
        tmp = self._temp(record)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            raise
        except OSError:  # no hard links here: O_EXCL create (content written right after, under the flock)
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            try:
                os.write(fd, record.to_json())
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    def _replace(self, record: LeaseRecord) -> None:
        os.replace(self._temp(record), self.path)

    def read(self) -> LeaseRecord | None:
        with self._locked():
            return self._read()

    def acquire(self, record: LeaseRecord) -> LeaseRecord | None:
        with self._locked():
            current = self._read()
            if current is None:
                self._create(record)
                return None
            if not current.is_stale():
                raise LeaseHeldError("", current, self.where)
            self._replace(record)
            return current

    def renew(self, record: LeaseRecord) -> None:
        with self._locked():
            current = self._read()
            if current is None or current.run_id != record.run_id:
                raise LeaseLostError(_lost_message(self.where, current))
            self._replace(record)

    def release(self, record: LeaseRecord) -> None:
        with self._locked():
            current = self._read()
            if current is not None and current.run_id == record.run_id:
                os.remove(self.path)


class _ConditionalStore:
    """``_lease.json`` on S3, made atomic by conditional PUT / DELETE (``If-None-Match`` / ``If-Match``)."""

    def __init__(self, fs, root: str) -> None:
        self.fs = fs
        self.path = posixpath.join(root, LEASE_FILE)
        self.bucket, self.key, _ = fs.split_path(self.path)
        self.where = f"s3://{self.path}"
        self.claims = _ClaimsStore(fs, root)  # claims of runs that fell back to claim objects also count
        self.etag: str | None = None

    def _read(self) -> tuple[LeaseRecord, str] | None:
        """``(record, ETag)`` of the lease object, read in one GET; None when there is none."""
        try:
            raw, etag, modified = _get_object(self.fs, self.bucket, self.key)
        except FileNotFoundError:
            return None
        try:
            record = LeaseRecord.from_json(raw)
        except (ValueError, TypeError):
            record = _unreadable(self.where, modified.timestamp() if modified else 0.0)
        return record, etag

    def _put(self, record: LeaseRecord, **condition: str) -> str:
        resp = self.fs.call_s3(
            "put_object", Bucket=self.bucket, Key=self.key, Body=record.to_json(), **condition
        )
        self.fs.invalidate_cache(self.path)
        return resp["ETag"]

    def read(self) -> LeaseRecord | None:
        found = self._read()
        if found is not None and not found[0].is_stale():
            return found[0]
        live = self.claims.live()
        return live[0][1] if live else (found[0] if found else None)

    def acquire(self, record: LeaseRecord) -> LeaseRecord | None:
        live = self.claims.live()
        if live:
            raise LeaseHeldError("", live[0][1], self.claims.where)
        for _ in range(8):
            try:
                self.etag = self._put(record, IfNoneMatch="*")
                return None
            except Exception as exc:
                if not _precondition_failed(exc):
                    raise
            found = self._read()
            if found is None:
                continue  # released in between: try to create it again
            current, etag = found
            if not current.is_stale():
                raise LeaseHeldError("", current, self.where)
            try:
                self.etag = self._put(record, IfMatch=etag)
                return current
            except Exception as exc:
                if not _precondition_failed(exc):
                    raise  # someone else changed it first: look again
        raise LeaseLostError(f"could not take the lease {self.where}: it kept changing under this run")

    def renew(self, record: LeaseRecord) -> None:
        try:
            self.etag = self._put(record, IfMatch=self.etag or "")
        except Exception as exc:
            if _precondition_failed(exc):
                found = self._read()
                raise LeaseLostError(_lost_message(self.where, found[0] if found else None)) from None
            raise

    def release(self, record: LeaseRecord) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self.etag or "")
        except FileNotFoundError:
            pass
        except Exception as exc:
            if _precondition_failed(exc):
                return  # not ours any more
            found = self._read()  # the store does not take If-Match on DELETE: check, then delete
            if found is not None and found[0].run_id == record.run_id:
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)
        self.fs.invalidate_cache(self.path)


def _get_object(fs, bucket: str, key: str) -> tuple[bytes, str, Any]:
    """``(body, ETag, LastModified)`` of one object in a single GET on s3fs's event loop."""
    from fsspec.asyn import sync

    async def _get() -> tuple[bytes, str, Any]:
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        async with resp["Body"] as body:
            data = await body.read()
        return data, resp["ETag"], resp.get("LastModified")

    return sync(fs.loop, _get)


class _ClaimsStore:
    """Claim objects ``_lease/claims/<since ms>-<run id>.json``; the first live claim holds the lease."""

    def __init__(self, fs, root: str, settle_s: float = 1.0) -> None:
        self.fs = fs
        self.root = root
        self.folder = posixpath.join(root, CLAIMS_DIR)
        self.settle_s = settle_s
        protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
        self.where = f"{protocol}://{self.folder}/"
        self.name: str | None = None

    def _claims(self) -> list[tuple[str, LeaseRecord]]:
        """Every claim, sorted by name (fresh listing)."""
        self.fs.invalidate_cache(self.folder)
        try:
            paths = sorted(p for p in self.fs.find(self.folder) if p.endswith(".json"))
        except FileNotFoundError:
            return []
        blobs = self.fs.cat(paths, on_error="omit") if paths else {}
        out = []
        for path in paths:
            raw = blobs.get(path)
            if raw is None or isinstance(raw, BaseException):
                continue  # released in between
            try:
                out.append((posixpath.basename(path), LeaseRecord.from_json(raw)))
            except (ValueError, TypeError):
                out.append((posixpath.basename(path), _unreadable(path, 0.0)))
        return out

    def live(self) -> list[tuple[str, LeaseRecord]]:
        return [(n, r) for n, r in self._claims() if not r.is_stale()]

    def read(self) -> LeaseRecord | None:
        live = self.live()
        return live[0][1] if live else None

    def _path(self, name: str) -> str:
        return posixpath.join(self.folder, name)

    def acquire(self, record: LeaseRecord) -> LeaseRecord | None:
        legacy = _ConditionalStore(self.fs, self.root) if _is_s3(self.fs) else None
        if legacy is not None:
            found = legacy._read()
            if found is not None and not found[0].is_stale():
                raise LeaseHeldError("", found[0], legacy.where)
        claims = self._claims()
        live = [(n, r) for n, r in claims if not r.is_stale()]
        if live:
            raise LeaseHeldError("", live[0][1], self.where)
        stale = [r for _, r in claims]
        if claims:
            self.fs.rm([self._path(n) for n, _ in claims])
        self.name = f"{int(_parse_time(record.since) * 1000):016d}-{record.run_id}.json"
        self.fs.pipe_file(self._path(self.name), record.to_json())
        time.sleep(self.settle_s)  # let claims of runs that started at the same moment become visible
        live = self.live()
        if not live or live[0][0] != self.name:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._path(self.name))
            self.name = None
            if live:
                raise LeaseHeldError("", live[0][1], self.where)
            raise LeaseLostError(f"this run's claim under {self.where} vanished while acquiring the lease")
        return max(stale, key=lambda r: r.renewed_at) if stale else None

    def renew(self, record: LeaseRecord) -> None:
        claims = self._claims()
        names = [n for n, _ in claims]
        if self.name not in names:
            live = [r for _, r in claims if not r.is_stale()]
            raise LeaseLostError(_lost_message(self.where, live[0] if live else None))
        earlier = [r for n, r in claims if n < self.name and not r.is_stale()]
        if earlier:
            raise LeaseLostError(_lost_message(self.where, earlier[0]))
        self.fs.pipe_file(self._path(self.name), record.to_json())

    def release(self, record: LeaseRecord) -> None:
        if self.name:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._path(self.name))
            self.name = None


def _unreadable(where: str, mtime: float) -> LeaseRecord:
    """A placeholder for a lease file that is not valid JSON: stale once its mtime is older than 60 s."""
    stamp = _iso(mtime)
    return LeaseRecord(run_id=f"unknown (unreadable {where})", host="?", pid=0, since=stamp, renewed_at=stamp,
                       ttl_s=60.0, renew_s=0.0)  # fmt: skip


def _lost_message(where: str, current: LeaseRecord | None) -> str:
    who = f"now held by {current.describe()}" if current is not None else "it is gone"
    return f"this run lost the output lease {where} ({who}); it stops before committing anything else"


def _store(mode: LeaseMode, fs, root: str, settle_s: float):
    if mode == "local":
        return _LocalStore(fs, root)
    if mode == "conditional":
        return _ConditionalStore(fs, root)
    return _ClaimsStore(fs, root, settle_s=settle_s)


def current_holder(output: str, storage_options: dict[str, Any] | None) -> tuple[LeaseRecord, str] | None:
    """``(live holder, where its lease is)`` of ``output``, or None (no lease, or a stale one). Never writes.

    Looks at ``_lease.json`` and, on object stores, at the claim objects too (runs in either mode count).
    """
    fs, root = fs_root(output, storage_options)
    candidates: list[tuple[LeaseRecord | None, str]] = []
    if is_local(fs):
        local = _LocalStore(fs, root)
        candidates.append((local.read(), local.where))
    else:
        if _is_s3(fs):
            conditional = _ConditionalStore(fs, root)
            found = conditional._read()
            candidates.append((found[0] if found else None, conditional.where))
        claims = _ClaimsStore(fs, root, settle_s=0.0)
        candidates.append((claims.read(), claims.where))
    for holder, where in candidates:
        if holder is not None and not holder.is_stale():
            return holder, where
    return None


def check_not_leased(output: str, storage_options: dict[str, Any] | None) -> None:
    """Raise :class:`LeaseHeldError` (naming the holder) when a live run holds ``output``'s lease."""
    found = current_holder(output, storage_options)
    if found is not None:
        raise LeaseHeldError(output, *found)


# --------------------------------------------------------------------------------------------------------
# the lease a run holds
# --------------------------------------------------------------------------------------------------------
_HELD: weakref.WeakSet[OutputLease] = weakref.WeakSet()


class OutputLease:
    """The lease of one output for one run: ``acquire`` -> heartbeat -> ``release`` (a context manager).

    Args:
        output: the output URL (local path, ``file://``, ``s3://`` ...).
        storage_options: fsspec options of the output.
        run_id: the run's id (recorded in the lease).
        ttl_s: seconds without renewal after which other runs may take the lease over.
        renew_s: heartbeat interval in seconds (must be below ``ttl_s / 2``).
        mode: ``local`` / ``conditional`` / ``claims`` (module doc); None: from the store (probes S3 once).
        settle_s: claims mode: seconds to wait before the claims are compared.
    """

    def __init__(
        self,
        output: str,
        storage_options: dict[str, Any] | None,
        *,
        run_id: str,
        ttl_s: float = 300.0,
        renew_s: float = 30.0,
        mode: LeaseMode | None = None,
        settle_s: float = 1.0,
    ) -> None:
        if not 0 < renew_s < ttl_s / 2:
            raise ValueError(
                f"lease renewal interval {renew_s} s must be > 0 and below half the TTL {ttl_s} s"
            )
        self.output = output
        self.run_id = run_id
        self.ttl_s, self.renew_s = float(ttl_s), float(renew_s)
        fs, root = fs_root(output, storage_options)
        self.mode: LeaseMode = mode or lease_mode(output, storage_options)
        self._store = _store(self.mode, fs, root, settle_s)
        self.where: str = self._store.where
        self.record: LeaseRecord | None = None
        self.taken_over: LeaseRecord | None = None
        self.lost: str | None = None
        self._last_renewed = 0.0  # time.monotonic() of the last successful write
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    def acquire(self) -> OutputLease:
        """Take the lease (or take over a stale one) and start the heartbeat.

        Raises:
            LeaseHeldError: a live run holds it (the message names it).
        """
        record = LeaseRecord.new(self.run_id, ttl_s=self.ttl_s, renew_s=self.renew_s)
        with self._lock:
            try:
                previous = self._store.acquire(record)
            except LeaseHeldError as exc:
                raise LeaseHeldError(self.output, exc.holder, exc.where) from None
            self.record, self.taken_over = record, previous
            self._last_renewed = time.monotonic()
        if previous is not None:
            log.warning(
                "took over the stale lease of %s: %s (not renewed for more than its %.0f s TTL, or its process "
                "is gone)",
                self.output,
                previous.describe(),
                previous.ttl_s,
            )
        _HELD.add(self)
        self._thread = threading.Thread(target=self._heartbeat, name="odise-lease", daemon=True)
        self._thread.start()
        return self

    def renew(self) -> None:
        """Write a fresh ``renewed_at``; raises :class:`LeaseLostError` when the lease is no longer ours."""
        with self._lock:
            if self.record is None:
                raise LeaseLostError(f"the lease {self.where} is not held")
            if self.lost:
                raise LeaseLostError(self.lost)
            record = self.record.renewed()
            try:
                self._store.renew(record)
            except LeaseLostError as exc:
                self.lost = str(exc)
                raise
            self.record = record
            self._last_renewed = time.monotonic()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                self.renew()
            except LeaseLostError as exc:
                log.error("%s", exc)
                return
            except Exception as exc:  # noqa: BLE001 - a transient store error: try again next beat
                unrenewed = time.monotonic() - self._last_renewed
                log.warning("could not renew the lease %s (%.0f s since the last renewal): %s: %s", self.where,
                            unrenewed, type(exc).__name__, exc)  # fmt: skip
                if unrenewed > self.ttl_s:
                    self.lost = f"the lease {self.where} was not renewed for {unrenewed:.0f} s (> TTL {self.ttl_s:.0f} s)"
                    log.error("%s; this run stops before committing anything else", self.lost)
                    return

    def ensure_held(self) -> None:
        """Raise :class:`LeaseLostError` unless it is safe to commit now (call before every commit)."""
        if self.record is None:
            raise LeaseLostError(f"the lease {self.where} is not held")
        if self.lost:
            raise LeaseLostError(self.lost)
        unrenewed = time.monotonic() - self._last_renewed
        if unrenewed > self.ttl_s / 2:
            raise LeaseLostError(
                f"the lease {self.where} has not been renewed for {unrenewed:.0f} s (over half its {self.ttl_s:.0f} s "
                "TTL): another run may take it over, so this run stops before committing anything else"
            )

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours (idempotent; never raises)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, self.renew_s))
        with self._lock:
            record, self.record = self.record, None
            if record is None:
                return
            try:
                self._store.release(record)
            except Exception as exc:  # noqa: BLE001 - it expires after its TTL anyway
                log.warning("could not release the lease %s: %s: %s", self.where, type(exc).__name__, exc)
        _HELD.discard(self)

    def __enter__(self) -> OutputLease:
        return self.acquire() if self.record is None else self

    def __exit__(self, *exc: object) -> None:
        self.release()


def release_all() -> None:
    """Release every lease this process holds (used right before a forced exit, e.g. a second Ctrl-C)."""
    for lease in list(_HELD):
        lease.release()
