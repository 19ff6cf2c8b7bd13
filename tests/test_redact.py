"""pipeline/redact.py and the refusals built on it (flows/params.py): what a credential looks like in URLs,
headers and options; redaction of text, URLs, options, exceptions and log records."""

from __future__ import annotations

import logging

import pytest

from pipeline.redact import (
    credential_findings,
    install_log_redaction,
    redact,
    redact_exception,
    redact_text,
    redact_url,
    url_credentials,
    url_identity,
)

CANARY = "CaNaRy7f3e"
PRESIGNED = (
    "https://s3.example.com/bkt/shards/a.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    f"&X-Amz-Credential=AKIA{CANARY}%2F20260101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20260101T000000Z"
    f"&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=tok{CANARY}&X-Amz-Signature=ab{CANARY}"
)


@pytest.mark.parametrize(
    "url, expected",
    [
        (f"http://user:{CANARY}@minio:9000/bkt", "http://***@minio:9000/bkt"),
        (f"https://{CANARY}@github.com/x.tar", "https://***@github.com/x.tar"),
        (
            f"https://h/x.tar?versionId=3&sig={CANARY}&sv=2024",
            "https://h/x.tar?versionId=3&sig=***&sv=2024",
        ),
        (f"https://h/c.txt?token={CANARY}", "https://h/c.txt?token=***"),
        (f"https://h/w.pth?access_token={CANARY}#frag", "https://h/w.pth?access_token=***#frag"),
        (f"gs://b/o?X-Goog-Signature={CANARY}", "gs://b/o?X-Goog-Signature=***"),
        ("s3://bkt/path@2x/img.png", "s3://bkt/path@2x/img.png"),  # '@' in a path is not user-info
        ("https://h/x.tar?versionId=3", "https://h/x.tar?versionId=3"),
        ("/data/shards/a.tar", "/data/shards/a.tar"),
    ],
)
def test_redact_url(url, expected):
    assert redact_url(url) == expected
    assert CANARY not in redact_url(url)


def test_presigned_s3_url_is_redacted_and_its_identity_is_the_object_url():
    red = redact_url(PRESIGNED)
    assert CANARY not in red and "X-Amz-Signature=***" in red and "X-Amz-Credential=***" in red
    assert "X-Amz-Date=20260101T000000Z" in red  # not a secret: kept readable
    assert url_identity(PRESIGNED) == "https://s3.example.com/bkt/shards/a.tar"
    # re-signing (new date, new signature) names the same object; other parameters are kept
    resigned = PRESIGNED.replace("20260101T000000Z", "20260202T000000Z").replace(f"ab{CANARY}", "cd99")
    assert url_identity(resigned) == url_identity(PRESIGNED)
    assert url_identity(PRESIGNED + "&versionId=7") == "https://s3.example.com/bkt/shards/a.tar?versionId=7"
    azure = f"https://acct.blob.core.windows.net/c/x.tar?sv=2024-01-01&se=2026&sr=b&sp=r&sig={CANARY}&foo=1"
    assert url_identity(azure) == "https://acct.blob.core.windows.net/c/x.tar?foo=1"
    assert url_identity(f"http://u:{CANARY}@h:9000/b/x.tar") == "http://h:9000/b/x.tar"
    unsigned = "https://h/x.tar?se=2026&sp=r"  # no signature: nothing is dropped
    assert url_identity(unsigned) == unsigned and url_identity("/local/x.tar") == "/local/x.tar"


def test_url_credentials_names_the_kind_never_the_value():
    assert url_credentials(f"http://u:{CANARY}@h") == ["user-info"]
    assert url_credentials(f"https://{CANARY}@h/x") == ["user-info"]  # tokens are sent as user names
    assert url_credentials("sftp://alice@host/data") == []  # a user name alone is not a credential there
    found = url_credentials(PRESIGNED)
    assert "query parameter 'X-Amz-Signature'" in found and "query parameter 'X-Amz-Security-Token'" in found
    assert all(CANARY not in f for f in found)
    assert url_credentials("https://h/x.tar?versionId=3") == [] and url_credentials("plain text") == []


def test_credential_findings_in_options_cover_keys_headers_userinfo_and_queries():
    options = {
        "client_kwargs": {
            "endpoint_url": f"http://admin:{CANARY}@127.0.0.1:9000",
            "headers": {"Authorization": f"Bearer {CANARY}", "User-Agent": "x"},
            "region_name": "eu",
        },
        "headers": {"x-api-key": CANARY, "X-Amz-Security-Token": CANARY},
        "anon": False,
        "endpoints": [f"https://h/?token={CANARY}"],
        "secret": CANARY,
    }
    found = credential_findings(options)
    assert found == [
        ("['client_kwargs']['endpoint_url']", "user-info"),
        ("['client_kwargs']['headers']['Authorization']", "header"),
        ("['headers']['x-api-key']", "header"),
        ("['headers']['X-Amz-Security-Token']", "credential key"),
        ("['endpoints'][0]", "query parameter 'token'"),
        ("['secret']", "credential key"),
    ]
    assert (
        credential_findings({"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}, "anon": True}) == []
    )
    red = redact(options)
    assert CANARY not in repr(red)
    assert red["client_kwargs"]["headers"] == {"Authorization": "***", "User-Agent": "x"}
    assert red["client_kwargs"]["endpoint_url"] == "http://***@127.0.0.1:9000"
    assert redact({"key": "cat.jpg"}, keys=False) == {"key": "cat.jpg"}  # data keys stay with keys=False


def test_redact_text_in_messages():
    text = (
        f"403, message='Forbidden', url='{PRESIGNED}' ; retry http://bob:{CANARY}@h/x and "
        f"{{'Authorization': 'Bearer {CANARY}'}} Authorization: Basic {CANARY}"
    )
    out = redact_text(text)
    assert CANARY not in out and "message='Forbidden'" in out and "http://***@h/x" in out


def test_exceptions_are_redacted_in_place_keeping_type_and_chain():
    try:
        try:
            raise FileNotFoundError(2, "No such file", f"https://h/x.tar?sig={CANARY}")
        except FileNotFoundError as inner:
            raise ValueError(f"cannot read https://u:{CANARY}@h/x.tar", 3) from inner
    except ValueError as raised:
        exc = raised
    out = redact_exception(exc)
    assert out is exc and type(exc) is ValueError and exc.args[1] == 3
    assert CANARY not in str(exc) and CANARY not in str(exc.__cause__)
    assert isinstance(exc.__cause__, FileNotFoundError) and exc.__cause__.errno == 2


def test_log_records_are_redacted_before_any_handler(caplog):
    install_log_redaction()
    install_log_redaction()  # idempotent
    logger = logging.getLogger("pipeline.test_redact")
    with caplog.at_level(logging.INFO, logger="pipeline.test_redact"):
        logger.info("downloading %s", PRESIGNED)
        logger.warning("endpoint http://u:%s@h:9000 unreachable", CANARY)
        try:
            raise OSError(f"boom at https://h/x?token={CANARY}")
        except OSError:
            logger.exception("read failed")
        logger.info("plain %d%%", 5)
    text = caplog.text
    assert CANARY not in text and "X-Amz-Signature=***" in text and "http://***@h:9000" in text
    assert "boom at https://h/x?token=***" in text and "plain 5%" in text


def test_parameters_with_credentials_are_refused_naming_where_not_what(tmp_path):
    from flows.params import ParameterError, annotate_config
    from flows.train import train_config

    base = {
        "input": str(tmp_path),
        "output": str(tmp_path / "out"),
        "vocab_file": "coco_panoptic",
        "model": "tiny",
    }
    cases = {
        "storage_options['client_kwargs']['endpoint_url'] is a URL with a user name / password": {
            "storage_options": {"client_kwargs": {"endpoint_url": f"http://u:{CANARY}@127.0.0.1:9"}}
        },
        "storage_options['client_kwargs']['headers']['Authorization'] is a credential header": {
            "storage_options": {"client_kwargs": {"headers": {"Authorization": f"Bearer {CANARY}"}}}
        },
        "output_storage_options['headers']['authorization'] is a credential header": {
            "output_storage_options": {"headers": {"authorization": CANARY}}
        },
        "input is a URL with a credential (query parameter 'X-Amz-Signature')": {"input": PRESIGNED},
        "input[1] is a URL with a credential": {"input": [str(tmp_path), PRESIGNED]},
        "vocab_file is a URL with a credential (query parameter 'token')": {
            "vocab_file": f"https://h/classes.txt?token={CANARY}"
        },
        "checkpoint is a URL with a user name / password": {"checkpoint": f"https://u:{CANARY}@h/w.pth"},
    }
    for expected, change in cases.items():
        with pytest.raises(ParameterError) as info:
            annotate_config({**base, **change}, cwd=tmp_path)
        message = str(info.value)
        assert expected in message, message
        assert CANARY not in message and "AKIA" not in message
    with pytest.raises(ParameterError, match=r"train is a URL with a credential") as info:
        train_config({"train": PRESIGNED, "output": str(tmp_path / "run"), "model": "tiny"})
    assert CANARY not in str(info.value) and "manifest" in str(info.value)
    ok = annotate_config(
        {**base, "storage_options": {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}}, cwd=tmp_path
    )
    assert ok.storage_options == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
