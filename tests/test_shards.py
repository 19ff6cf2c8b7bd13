"""pipeline.shards: listing (glob, braces, manifests, folders; local and S3), reading, hostile tars."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import add_member, tar_bytes
from PIL import Image

from pipeline.shards import (
    RETRY_DELAYS_S,
    SHARD_ERROR_KEY,
    InputError,
    ShardRef,
    iter_samples,
    list_shards,
    read_shard,
)


def jpeg(seed: int, size: tuple[int, int] = (24, 32)) -> bytes:
    """A small photo-like JPEG (gradient + noise), different per seed."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, seed * 37 % 255)], -1).astype(float)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def simple_shard(index: int, n: int = 2) -> bytes:
    members = []
    for i in range(n):
        key = f"s{index:02d}-{i:04d}"
        members += [(f"{key}.jpg", jpeg(index * 100 + i)), (f"{key}.json", json.dumps({"i": i}).encode())]
    return tar_bytes(members)


@pytest.fixture
def local_shards(tmp_path: Path) -> Path:
    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(3):
        (folder / f"shard-{i:06d}.tar").write_bytes(simple_shard(i))
    return folder


# --------------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------------


def test_list_local_glob_brace_folder_manifest(local_shards: Path, tmp_path: Path) -> None:
    by_glob = list_shards(str(local_shards / "*.tar"))
    assert [s.kind for s in by_glob] == ["tar"] * 3
    assert [s.url for s in by_glob] == sorted(s.url for s in by_glob)
    assert all(s.url.startswith("file://") and s.url.endswith(".tar") for s in by_glob)
    assert all(re.fullmatch(r"shard-00000\d-[0-9a-f]{8}", s.shard_id) for s in by_glob)
    assert len({s.shard_id for s in by_glob}) == 3

    by_brace = list_shards(str(local_shards / "shard-{000000..000002}.tar"))
    by_folder = list_shards(str(local_shards))
    by_file_url = list_shards("file://" + str(local_shards / "*.tar"))
    assert by_brace == by_glob == by_folder == by_file_url

    manifests = tmp_path / "lists"
    manifests.mkdir()
    (manifests / "train.txt").write_text(
        "# training shards\n\n../shards/shard-000000.tar\n"
        f"{local_shards / 'shard-000001.tar'}\n  ../shards/shard-000002.tar  \n../shards/shard-000000.tar\n"
    )
    assert list_shards(str(manifests / "train.txt")) == by_glob
    # several specs with overlap: each shard once; ids stable; picklable.
    both = list_shards([str(local_shards / "shard-000001.tar"), str(local_shards / "*.tar")])
    assert both == by_glob
    assert pickle.loads(pickle.dumps(both)) == both


def test_tar_gz_is_a_shard(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tf:
        for i in range(3):
            add_member(tf, f"k{i}.jpg", jpeg(i, (64, 64)))
    (tmp_path / "x.tar.gz").write_bytes(buf.getvalue())
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "y.tgz").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    age(tmp_path / "cut" / "y.tgz")
    (shard,) = list_shards(str(tmp_path / "*.tar.gz"))
    assert shard.shard_id.startswith("x-")
    samples = read_shard(shard)
    assert [s.key for s in samples] == ["k0", "k1", "k2"] and samples[1].image_bytes == jpeg(1, (64, 64))
    cut = read_shard(list_shards(str(tmp_path / "cut"))[0])
    assert cut[-1].key == SHARD_ERROR_KEY and cut[-1].error.startswith("truncated tar")
    assert [s.error is None for s in cut[:-1]].count(False) <= 1  # at most the sample being read


def test_folder_of_images_gives_virtual_shards(tmp_path: Path) -> None:
    root = tmp_path / "My Photos"
    for rel, seed in [("b/002.jpg", 2), ("a/001.png", 1), ("a/001.jpg", 3), ("c.webp", 4), ("d.JPG", 5)]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg(seed))
    (root / "notes.txt").write_text("not an image")
    shards = list_shards(str(root), images_per_virtual_shard=2)
    assert [s.kind for s in shards] == ["images"] * 3
    assert [len(s.members) for s in shards] == [2, 2, 1]
    assert all(re.fullmatch(r"My-Photos-images-00000\d-[0-9a-f]{8}", s.shard_id) for s in shards)
    assert shards[0].url.endswith("My Photos#images-000000")
    keys = [x.key for s in shards for x in read_shard(s)]
    assert keys == ["a/001.jpg", "a/001.png", "b/002.jpg", "c.webp", "d.JPG"]  # sorted, unique, ext kept
    first = read_shard(shards[0])
    assert first[0].image_bytes == jpeg(3) and first[0].image_ext == "jpg" and first[0].shard_total == 2
    assert list_shards(str(root), images_per_virtual_shard=2) == shards  # deterministic

    # a file that vanishes after listing becomes an error record (retryable), not a silent gap
    (root / "c.webp").unlink()
    last = read_shard(shards[1])
    assert [s.key for s in last] == ["b/002.jpg", "c.webp"]
    assert last[1].error and "vanished" in last[1].error and last[1].image_bytes is None
    assert (last[1].error_kind, last[1].retryable) == ("vanished", True)
    assert [s.image_url for s in last] == [f"file://{root}/b/002.jpg", f"file://{root}/c.webp"]  # fsspec form


def test_missing_and_unusable_inputs_raise_input_error(local_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"shard-000007\.tar"):
        list_shards(str(local_shards / "shard-{000000..000007}.tar"))
    with pytest.raises(InputError, match="no files match"):
        list_shards(str(local_shards / "*.tgz"))
    with pytest.raises(FileNotFoundError, match="not found"):  # InputError is a FileNotFoundError
        list_shards(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(InputError, match="no .tar shards and no images"):
        list_shards(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="unsupported input file"):
        list_shards(str(tmp_path / "empty" / "readme.md"))
    (tmp_path / "bad.lst").write_text("shards/shard-000000.tar\nshards/missing.tar\n")
    with pytest.raises(InputError, match=r"bad\.lst.*missing\.tar"):
        list_shards(str(tmp_path / "bad.lst"))
    with pytest.raises(InputError, match="cannot open this kind of URL"):
        list_shards("nosuchproto://bucket/x.tar")
    assert issubclass(InputError, OSError)


# --------------------------------------------------------------------------------------------------
# Reading tars
# --------------------------------------------------------------------------------------------------


def test_webdataset_grouping_rules(tmp_path: Path) -> None:
    import webdataset as wds

    path = tmp_path / "wds.tar"
    with wds.TarWriter(str(path)) as sink:  # shards as WebDataset writes them
        sink.write({"__key__": "0001", "jpg": jpeg(1), "json": json.dumps({"caption": "a cat"}).encode()})
        sink.write({"__key__": "0002", "png": jpeg(2), "seg.png": b"mask", "jpeg": jpeg(3)})
        sink.write({"__key__": "0003", "json": b"{}"})
        sink.write({"__key__": "dir/0004", "webp": jpeg(4), "json": b"not json"})
    (shard,) = list_shards(str(path))
    samples = read_shard(shard)
    assert [s.key for s in samples] == ["0001", "0002", "0003", "dir/0004"]
    assert all(
        s.shard_total == 4 and s.shard_id == shard.shard_id and s.shard_url == shard.url for s in samples
    )
    s1, s2, s3, s4 = samples
    assert (
        s1.image_bytes == jpeg(1)
        and s1.image_ext == "jpg"
        and s1.meta == {"caption": "a cat"}
        and s1.error is None
    )
    assert s2.image_ext == "jpeg" and s2.image_bytes == jpeg(3)  # priority order jpg > jpeg > png
    assert s3.error == "no image member (have: json)" and s3.image_bytes is None
    assert s4.image_ext == "webp" and s4.meta is None and s4.error is None  # bad json: meta dropped
    assert [s.key for s in iter_samples(shard)] == [s.key for s in samples]  # streaming: same records
    assert next(iter_samples(shard)).shard_total is None


def test_duplicate_keys_and_leading_dot_slash(tmp_path: Path) -> None:
    path = tmp_path / "dup.tar"
    path.write_bytes(
        tar_bytes([("./a.jpg", jpeg(1)), ("b.jpg", jpeg(2)), ("a.json", b"{}"), ("noext", b"x")])
    )
    samples = read_shard(list_shards(str(path))[0])
    assert [s.key for s in samples] == ["a", "b", "a#dup2", "noext"]
    assert samples[0].error is None and samples[1].error is None
    assert "duplicate key 'a'" in samples[2].error
    assert samples[3].error == "no image member (have: <no extension>)"


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_hostile_members_are_never_written_and_are_reported(tmp_path: Path, monkeypatch) -> None:
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        add_member(tf, "good.jpg", jpeg(1))
        add_member(tf, "/tmp/odise-abs-evil.jpg", b"evil")
        add_member(tf, "../../escape.jpg", b"evil")
        add_member(tf, "sub/../../up.jpg", b"evil")
        add_member(tf, "link.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add_member(tf, "hard.jpg", kind=tarfile.LNKTYPE, link="good.jpg")
        add_member(tf, "dev.jpg", kind=tarfile.CHRTYPE)
        add_member(tf, "pipe.jpg", kind=tarfile.FIFOTYPE)
        add_member(tf, "mixed.jpg", jpeg(2))
        add_member(tf, "mixed.json", kind=tarfile.SYMTYPE, link="/etc/shadow")
        add_member(tf, "last.jpg", jpeg(3))
    shard_path = work / "hostile.tar"
    shard_path.write_bytes(buf.getvalue())
    before = _tree(tmp_path)
    monkeypatch.chdir(work)
    (shard,) = list_shards("hostile.tar")  # relative to the working folder
    samples = read_shard(shard)
    assert _tree(tmp_path) == before  # nothing written anywhere under tmp_path
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path / "up.jpg").exists()
    assert not Path("/tmp/odise-abs-evil.jpg").exists()
    by_key = {s.key: s for s in samples}
    assert by_key["good"].error is None and by_key["last"].error is None
    expected = {
        "/tmp/odise-abs-evil": "absolute path",
        "../../escape": "'..' path component",
        "sub/../../up": "'..' path component",
        "link": "symbolic link",
        "hard": "hard link",
        "dev": "device",
        "pipe": "fifo",
        "mixed": "symbolic link",  # one unsafe member spoils its whole sample
    }
    for key, reason in expected.items():
        assert by_key[key].image_bytes is None and reason in by_key[key].error, (key, by_key[key].error)
    assert len(samples) == 10 and all(s.shard_total == 10 for s in samples)


def age(path: Path, seconds: float = 3600) -> None:
    """Set a file's mtime in the past: a cut shard written just now counts as still being written."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def _offsets(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getmembers()


def test_truncated_and_corrupt_tars(tmp_path: Path) -> None:
    full = tar_bytes([(f"k{i}.jpg", jpeg(i, (48, 64))) for i in range(4)])
    members = _offsets(full)
    shard_for = {}
    cuts = {
        "mid_data": members[2].offset_data + members[2].size // 2,
        "boundary": members[2].offset,
        "mid_header": members[2].offset + 100,
    }
    for name, cut in cuts.items():
        (tmp_path / f"{name}.tar").write_bytes(full[:cut])
    corrupt = bytearray(full)
    corrupt[members[2].offset : members[2].offset + 512] = np.random.default_rng(2).bytes(512)
    (tmp_path / "corrupt.tar").write_bytes(bytes(corrupt))
    (tmp_path / "zero.tar").write_bytes(b"")
    (tmp_path / "garbage.tar").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "full.tar").write_bytes(full)
    for path in tmp_path.glob("*.tar"):
        age(path)
    for shard in list_shards(str(tmp_path / "*.tar")):
        shard_for[shard.shard_id.rsplit("-", 1)[0]] = shard

    ok = read_shard(shard_for["full"])
    assert [s.key for s in ok] == ["k0", "k1", "k2", "k3"] and all(s.error is None for s in ok)

    mid = read_shard(shard_for["mid_data"])
    assert [s.key for s in mid] == ["k0", "k1", "k2", SHARD_ERROR_KEY]
    assert mid[0].error is None and mid[1].image_bytes == jpeg(1, (48, 64))
    assert mid[2].error.startswith("incomplete sample") and mid[2].image_bytes is None
    assert mid[3].error.startswith("truncated tar") and mid[3].shard_total == 4
    assert [(s.error_kind, s.retryable) for s in mid[2:]] == [("truncated_shard", False)] * 2

    for name, detail in [
        ("boundary", "truncated tar: archive ends at byte"),
        ("mid_header", "truncated tar: header cut"),
        ("corrupt", "corrupt tar: invalid tar header at byte"),
    ]:
        got = read_shard(shard_for[name])
        assert [s.key for s in got] == ["k0", "k1", SHARD_ERROR_KEY], name
        assert got[0].error is None and got[1].error is None
        assert got[2].error.startswith(detail), got[2].error
        kind = "corrupt_shard" if name == "corrupt" else "truncated_shard"
        assert (got[2].error_kind, got[2].retryable) == (kind, False)

    for name in ("zero", "garbage"):
        (only,) = read_shard(shard_for[name])
        assert only.key == SHARD_ERROR_KEY and only.error.startswith("not a readable tar archive")
        assert (only.error_kind, only.retryable) == ("corrupt_shard", False)


def test_shard_still_being_written_is_retryable(tmp_path: Path) -> None:
    """A cut tar modified moments ago (an upload in progress) is ``shard_growing``, retryable; the same cut
    an hour old is ``truncated_shard``; a shard that grows while it is read is ``shard_growing`` too."""
    full = tar_bytes([(f"k{i}.jpg", jpeg(i, (48, 64))) for i in range(4)])
    cut = full[: _offsets(full)[2].offset]
    path = tmp_path / "upload.tar"
    path.write_bytes(cut)
    (shard,) = list_shards(str(path))
    fresh = read_shard(shard)
    assert [s.key for s in fresh] == ["k0", "k1", SHARD_ERROR_KEY]
    assert fresh[2].error_kind == "shard_growing" and fresh[2].retryable
    assert fresh[2].error.startswith("shard still being written (modified")
    age(path)
    old = read_shard(shard)
    assert (old[2].error_kind, old[2].retryable) == ("truncated_shard", False)

    # the writer appends while we read: size and mtime change between the start and the cut
    age(path)
    samples = iter_samples(shard)
    first = next(samples)
    assert first.key == "k0" and first.error is None
    with open(path, "ab") as f:
        f.write(full[len(cut) : len(cut) + 700])
    rest = list(samples)
    assert rest[-1].key == SHARD_ERROR_KEY and rest[-1].error_kind == "shard_growing", rest[-1]
    assert "changed while being read" in rest[-1].error


def test_vanished_shard_is_a_retryable_shard_record(tmp_path: Path) -> None:
    path = tmp_path / "gone.tar"
    path.write_bytes(simple_shard(0))
    (shard,) = list_shards(str(path))
    os.remove(path)
    started = time.perf_counter()
    (only,) = read_shard(shard)
    assert time.perf_counter() - started >= sum(RETRY_DELAYS_S)  # retried first: ENOENT can be a blip
    assert only.key == SHARD_ERROR_KEY and "vanished" in only.error and only.shard_total == 1
    assert (only.error_kind, only.retryable) == ("vanished", True)


def test_file_that_comes_back_after_a_blip_is_read(tmp_path: Path) -> None:
    """ENOENT that lasts less than the retries (eventual consistency) is no error at all."""
    import threading

    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg(1))
    (folder / "b.jpg").write_bytes(jpeg(2))
    (shard,) = list_shards(str(folder))
    hidden = tmp_path / "b.jpg.away"
    os.rename(folder / "b.jpg", hidden)
    timer = threading.Timer(0.2, os.rename, (hidden, folder / "b.jpg"))
    timer.start()
    samples = read_shard(shard)
    timer.join()
    assert [(s.key, s.error, s.image_bytes == jpeg(i + 1)) for i, s in enumerate(samples)] == [
        ("a.jpg", None, True),
        ("b.jpg", None, True),
    ]


# --------------------------------------------------------------------------------------------------
# S3 (moto server)
# --------------------------------------------------------------------------------------------------


def test_s3_listing_and_reading(s3_bucket: str, s3_storage_options: dict) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**s3_storage_options)
    for i in range(3):
        fs.pipe(f"{s3_bucket}/train/shard-{i:06d}.tar", simple_shard(i))
    fs.pipe(
        f"{s3_bucket}/lists/train.manifest",
        b"../train/shard-000000.tar\n# c\ns3://%s/train/shard-000002.tar\n" % s3_bucket.encode(),
    )
    for i in range(3):
        fs.pipe(f"{s3_bucket}/photos/sub/{i}.jpg", jpeg(i))
    so = s3_storage_options

    by_glob = list_shards(f"s3://{s3_bucket}/train/*.tar", so)
    assert [s.url for s in by_glob] == [f"s3://{s3_bucket}/train/shard-{i:06d}.tar" for i in range(3)]
    assert list_shards(f"s3://{s3_bucket}/train/shard-{{000000..000002}}.tar", so) == by_glob
    assert list_shards(f"s3://{s3_bucket}/train", so) == by_glob
    assert list_shards(f"s3://{s3_bucket}/lists/train.manifest", so) == [by_glob[0], by_glob[2]]

    samples = read_shard(by_glob[1], so)
    assert [s.key for s in samples] == ["s01-0000", "s01-0001"]
    assert samples[0].image_bytes == jpeg(100) and samples[1].meta == {"i": 1}

    (photos,) = list_shards(f"s3://{s3_bucket}/photos", so, images_per_virtual_shard=10)
    assert photos.kind == "images" and photos.shard_id.startswith("photos-images-000000-")
    assert [(s.key, s.image_bytes) for s in read_shard(photos, so)] == [
        (f"sub/{i}.jpg", jpeg(i)) for i in range(3)
    ]

    with pytest.raises(InputError, match=r"7 shard\(s\) do not exist: .*shard-000003\.tar"):
        list_shards(f"s3://{s3_bucket}/train/shard-{{000000..000009}}.tar", so)
    with pytest.raises(InputError, match="no files match"):
        list_shards(f"s3://{s3_bucket}/val/*.tar", so)
    start = time.perf_counter()
    with pytest.raises(InputError, match="no-such-bucket-x1"):
        list_shards("s3://no-such-bucket-x1/train/*.tar", so)
    with pytest.raises(InputError, match="no-such-bucket-x1"):
        list_shards("s3://no-such-bucket-x1/train/shard-{0..2}.tar", so)
    assert time.perf_counter() - start < 10


def test_unreachable_endpoint_fails_fast() -> None:
    so = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    start = time.perf_counter()
    with pytest.raises(InputError) as err:
        list_shards("s3://bucket/train/*.tar", so)
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "s3://bucket/train/*.tar" in message and "endpoint" in message and "127.0.0.1:9" in message


def test_shardref_is_plain_data() -> None:
    ref = ShardRef(url="s3://b/x.tar", shard_id="x-0123abcd")
    assert ref.kind == "tar" and ref.members == () and pickle.loads(pickle.dumps(ref)) == ref


def test_connection_dropped_mid_shard_is_retried_without_duplicates(tmp_path: Path, caplog) -> None:
    """A real HTTP server that drops the connection once in the middle of a tar: the reader reads the shard
    again, skips the records it already gave, and every sample comes exactly once."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    data = tar_bytes([(f"k{i}.jpg", jpeg(i, (64, 64))) for i in range(6)])
    state = {"gets": 0, "dropped": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _headers(self, code: int, body_len: int, extra: dict | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(body_len))
            self.send_header("Accept-Ranges", "bytes")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()

        def do_HEAD(self) -> None:
            self._headers(200, len(data))

        def do_GET(self) -> None:
            state["gets"] += 1
            start, end = 0, len(data) - 1
            rng = self.headers.get("Range")
            if rng:
                a, b = rng.removeprefix("bytes=").split("-")
                start, end = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
            if start > len(data) // 2 and state["dropped"] < 2:  # twice: the HTTP client retries once itself
                state["dropped"] += 1
                self.close_connection = True  # no response at all: the client sees the server disconnect
                return
            body = data[start : end + 1]
            self._headers(
                206 if rng else 200, len(body), {"Content-Range": f"bytes {start}-{end}/{len(data)}"}
            )
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shard.tar"
        shard = ShardRef(url=url, shard_id="shard-http")
        samples = read_shard(shard, {"block_size": 4096})
    finally:
        server.shutdown()
    assert state["dropped"] == 2 and state["gets"] > 2
    assert any("reading it again" in r.getMessage() for r in caplog.records)  # our retry, not the client's
    assert [s.key for s in samples] == [f"k{i}" for i in range(6)]
    assert all(s.error is None and s.image_bytes == jpeg(i, (64, 64)) for i, s in enumerate(samples))
