"""pipeline.errors: the closed list of error kinds, classify() on real exceptions, the fault-injection gate;
pipeline.shards' stored form of names that are not valid UTF-8 (real files and tar members)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import tar_bytes, write_tar
from PIL import Image

from pipeline.errors import (
    FAULT_ENV,
    KINDS,
    InjectedFault,
    InjectedOutOfMemory,
    classify,
    fault_of,
    inject,
    is_retryable,
)
from pipeline.shards import (
    decode_name,
    decode_name_bytes,
    encode_name,
    iter_tar,
    list_shards,
    read_shard,
    tar_member_url,
)

REPO = Path(__file__).resolve().parents[1]

RETRYABLE = {"network", "timeout", "vanished", "shard_growing", "io_error", "out_of_memory"}


def _jpeg(seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# kinds and classify
# --------------------------------------------------------------------------------------------------


def test_kinds_are_closed_documented_and_retryable_as_specified():
    assert {k for k, v in KINDS.items() if v.retryable} == RETRYABLE
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", k) for k in KINDS)
    readme = (REPO / "README.md").read_text()
    import pipeline.errors as errors

    for kind in KINDS:  # every kind in the module's table and in the README's table, with its flag
        assert re.search(rf"^{kind}\s+(yes|no)\s", errors.__doc__, re.M), kind
        row = re.search(rf"^\|\s*`{kind}`\s*\|\s*(yes|no)\s*\|", readme, re.M)
        assert row, f"README has no error-kind row for {kind}"
        assert (row.group(1) == "yes") == KINDS[kind].retryable, kind


def test_classify_real_exceptions():
    import botocore.exceptions as bce
    import torch

    from pipeline.images import ImageDecodeError, decode_image

    def kind_of(exc, stage=None):
        return classify(exc, stage=stage)

    # storage
    try:
        open("/nonexistent/odise/x.jpg", "rb")
    except FileNotFoundError as exc:
        assert kind_of(exc) == ("vanished", True)
    assert kind_of(PermissionError(13, "Permission denied")) == ("access_denied", False)
    assert kind_of(TimeoutError("read timed out")) == ("timeout", True)
    assert kind_of(ConnectionResetError(104, "Connection reset by peer")) == ("network", True)
    assert kind_of(bce.EndpointConnectionError(endpoint_url="http://127.0.0.1:9")) == ("network", True)
    assert kind_of(bce.ReadTimeoutError(endpoint_url="http://127.0.0.1:9")) == ("timeout", True)
    assert kind_of(OSError(5, "Input/output error")) == ("io_error", True)
    # memory
    assert kind_of(MemoryError()) == ("out_of_memory", True)
    assert kind_of(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) == (
        "out_of_memory",
        True,
    )
    assert kind_of(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")) == ("out_of_memory", True)
    # images (the decoder's own kinds)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    broken = bytearray(buf.getvalue())
    at = broken.find(b"IDAT")
    broken[at + 10 : at + 60] = bytes(50)  # compressed pixel data destroyed
    for data, kind in [
        (b"", "not_an_image"),
        (b"hello", "not_an_image"),
        (_jpeg(1)[:300], "truncated_image"),
        (bytes(broken), "corrupt_image"),
    ]:
        with pytest.raises(ImageDecodeError) as err:
            decode_image(data)
        assert kind_of(err.value) == (kind, False), (data[:10], str(err.value))
    with pytest.raises(ImageDecodeError) as err:
        decode_image(_jpeg(2, (200, 100)), max_pixels=1000)
    assert kind_of(err.value) == ("image_too_large", False)
    # anything else: the stage's kind, not retryable
    assert kind_of(ValueError("shape mismatch"), "model") == ("model_error", False)
    assert kind_of(KeyError("x"), "encode") == ("encode_error", False)
    assert kind_of(ZeroDivisionError(), None) == ("unknown", False)


def test_classify_reason_texts():
    """Texts as the readers write them (and as older outputs hold them) map to the same kinds."""
    cases = {
        "no image member (have: json)": "no_image_member",
        "unsafe tar member '../x.jpg' ('..' path component) not read": "unsafe_member",
        "member 'a.jpg' too large (300 > 100 bytes)": "member_too_large",
        "duplicate key 'a' in shard (occurrence 2; keys must be unique)": "duplicate_key",
        "truncated tar: archive ends at byte 2048 without an end-of-archive marker": "truncated_shard",
        "incomplete sample: tar data ends or is corrupt in member 'k2.jpg'": "truncated_shard",
        "corrupt tar: invalid tar header at byte 1024": "corrupt_shard",
        "shard still being written (modified 3 s before the read): truncated tar: ...": "shard_growing",
        "image file vanished after listing: file:///x/a.jpg": "vanished",
        "timeout: cannot read image: ReadTimeoutError: ... [s3://b/a.jpg]": "timeout",
        "too large: 30000x30000 pixels > limit 44739242 [file:///x/a.png]": "image_too_large",
        "out of memory: OutOfMemoryError: CUDA out of memory [file:///x/a.png]": "out_of_memory",
        "model error: RuntimeError: boom [file:///x/a.png]": "model_error",
        "something else entirely": "unknown",
    }
    for text, kind in cases.items():
        assert classify(text) == (kind, is_retryable(kind)), text


def test_fault_injection_is_off_unless_the_environment_says_so(monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert fault_of({"odise_fault": "model"}) == ""  # production: a stray field does nothing
    monkeypatch.setenv(FAULT_ENV, "1")
    assert fault_of({"odise_fault": "model"}) == "model"
    assert fault_of({"odise_fault": "rm -rf"}) == "" and fault_of(None) == "" and fault_of({}) == ""
    inject("model", "", "k")  # no fault: nothing
    inject("encode", "model", "k")  # another stage's fault: nothing
    with pytest.raises(InjectedFault) as err:
        inject("model_single", "model", "k")
    assert classify(err.value) == ("model_error", False)
    with pytest.raises(InjectedOutOfMemory):
        inject("model", "oom_once", "k")
    inject("model_single", "oom_once", "k")  # alone, the image fits
    with pytest.raises(ConnectionError):
        inject("stage_write", "stage_transient", "k-transient")
    inject("stage_write", "stage_transient", "k-transient")  # the retry succeeds


# --------------------------------------------------------------------------------------------------
# names that are not valid UTF-8
# --------------------------------------------------------------------------------------------------


def test_name_encoding_is_reversible_and_leaves_ordinary_names_alone():
    for name in ["cats/001.jpg", "100%.jpg", "a b/ü é.png", "s3://b/x/y.tar", "%", "50%off"]:
        assert encode_name(name) == name and decode_name(name) == name
    raw = os.fsdecode(b"bad\xff.jpg")
    assert encode_name(raw) == "bad%FF.jpg" and decode_name("bad%FF.jpg") == raw
    assert decode_name_bytes("bad%FF.jpg") == b"bad\xff.jpg"
    assert encode_name("a%41.jpg") == "a%2541.jpg" and decode_name("a%2541.jpg") == "a%41.jpg"
    assert encode_name(os.fsdecode(b"100%\xfe")) == "100%25%FE"
    rng = np.random.default_rng(0)
    alphabet = list(b"ab%4F/.") + [0xC3, 0xA9, 0xFF, 0x80, 0xE2]
    stored = set()
    for _ in range(3000):
        raw_bytes = bytes(rng.choice(alphabet, size=rng.integers(1, 9)).tolist())
        name = os.fsdecode(raw_bytes)
        enc = encode_name(name)
        enc.encode("utf-8")  # always valid UTF-8 (no surrogates)
        assert decode_name(enc) == name and decode_name_bytes(enc) == raw_bytes
        stored.add((enc, raw_bytes))
    assert len({e for e, _ in stored}) == len({b for _, b in stored})  # injective


def test_non_utf8_file_names_in_a_folder_and_a_tar(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    bad = os.fsdecode(b"bad\xff.jpg")
    for name, seed in [(bad, 1), ("good.jpg", 2), ("100%.jpg", 3), ("a%41.jpg", 4)]:
        (folder / name).write_bytes(_jpeg(seed))
    (shard,) = list_shards(str(folder))
    shard.url.encode("utf-8")
    for member in shard.members:
        member.encode("utf-8")
    samples = read_shard(shard)
    by_key = {s.key: s for s in samples}
    assert sorted(by_key) == ["100%.jpg", "a%2541.jpg", "bad%FF.jpg", "good.jpg"]
    assert all(s.error is None for s in samples)
    assert by_key["bad%FF.jpg"].image_bytes == _jpeg(1) and by_key["a%2541.jpg"].image_bytes == _jpeg(4)
    assert decode_name(by_key["bad%FF.jpg"].key) == bad
    import fsspec

    for s in samples:  # image_url opens as it is (decode_name changes nothing for ordinary names)
        with fsspec.open(decode_name(s.image_url), "rb") as f:
            assert f.read() == s.image_bytes
    with fsspec.open(by_key["100%.jpg"].image_url, "rb") as f:
        assert f.read() == _jpeg(3)

    path = tmp_path / "shard.tar"
    write_tar(
        path,
        [(os.fsdecode(b"cats/bad\xff.jpg"), _jpeg(5)), ("cats/ok.jpg", _jpeg(6))],
        format=tarfile.GNU_FORMAT,
    )
    (tar_shard,) = list_shards(str(path))
    got = read_shard(tar_shard)
    assert [s.key for s in got] == ["cats/bad%FF", "cats/ok"] and all(s.error is None for s in got)
    assert got[0].image_url == f"tar://cats/bad%FF.jpg::file://{path}"
    assert got[1].image_url == f"tar://cats/ok.jpg::file://{path}"
    for s in got:
        with fsspec.open(decode_name(s.image_url), "rb") as f:
            assert f.read() == s.image_bytes


def test_member_urls_open_on_s3_as_they_are(s3_bucket, s3_storage_options, tmp_path):
    import fsspec
    import s3fs

    fs = s3fs.S3FileSystem(**s3_storage_options)
    members = [("cats/001.jpg", _jpeg(7)), ("cats/001.json", b"{}"), ("dogs/002.png", _jpeg(8))]
    fs.pipe(f"{s3_bucket}/shard-000.tar", tar_bytes(members))
    (shard,) = list_shards(f"s3://{s3_bucket}/shard-000.tar", s3_storage_options)
    samples = read_shard(shard, s3_storage_options)
    assert [s.image_url for s in samples] == [
        f"tar://cats/001.jpg::s3://{s3_bucket}/shard-000.tar",
        f"tar://dogs/002.png::s3://{s3_bucket}/shard-000.tar",
    ]
    for s in samples:
        with fsspec.open(s.image_url, "rb", s3=s3_storage_options) as f:
            assert f.read() == s.image_bytes
    assert tar_member_url("a.jpg", f"s3://{s3_bucket}/x.tar") == f"tar://a.jpg::s3://{s3_bucket}/x.tar"


def test_labeled_shard_interface(tmp_path):
    """The one tar reader serves labeled shards too: every field of a sample, by key."""
    path = tmp_path / "labeled.tar"
    write_tar(
        path, [("a.jpg", b"img"), ("a.panoptic.png", b"png"), ("a.segments.json", b"{}"), ("b.jpg", b"x")]
    )
    samples = list(iter_tar(str(path), fields=None))
    assert [(s.key, s.files) for s in samples] == [
        ("a", {"jpg": b"img", "panoptic.png": b"png", "segments.json": b"{}"}),
        ("b", {"jpg": b"x"}),
    ]
    only = list(iter_tar(str(path), fields={"segments.json"}))
    assert only[0].files == {"segments.json": b"{}"} and only[0].present == (
        "jpg",
        "panoptic.png",
        "segments.json",
    )


def test_memory_error_while_decoding_is_not_a_corrupt_image(tmp_path):
    """A real MemoryError (address-space limit in a child process) while decoding a large image is re-raised
    as it is (the pipeline records ``out_of_memory``, retryable), not reported as a corrupt image."""
    big = tmp_path / "big.png"
    Image.new("RGB", (6000, 6000), (10, 20, 30)).save(big, optimize=True)
    code = f"""
import resource, sys
from pipeline.images import decode_image
from pipeline.errors import classify
data = open({str(big)!r}, "rb").read()
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + 60 * 2**20, hard))
try:
    decode_image(data, max_pixels=10**9)
except MemoryError as exc:
    print("KIND", classify(exc)[0], classify(exc)[1])
except Exception as exc:
    print("OTHER", type(exc).__name__, exc)
else:
    print("DECODED")
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.stdout.strip() == "KIND out_of_memory True", proc.stdout + proc.stderr
