"""The outer retry policy: which errors are transient, how long it waits, when it gives up.
(Real faults on a real server: test_s3_faults.py.)"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from kubedream_trainer.storage.retry import RetryPolicy, is_transient
from kubedream_trainer.storage.s3 import expected_etag


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (EndpointConnectionError(endpoint_url="http://x"), True),
        (ReadTimeoutError(endpoint_url="http://x"), True),
        (_client_error("SlowDown", 503), True),
        (_client_error("InternalError", 500), True),
        (_client_error("XMinioServerNotInitialized", 503), True),
        (_client_error("NoSuchKey", 404), False),
        (_client_error("AccessDenied", 403), False),
        (_client_error("NoSuchBucket", 404), False),
        (NoCredentialsError(), False),
        (ValueError("a bug"), False),
    ],
)
def test_transient_errors(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


@pytest.mark.parametrize(
    ("cause", "transient"),
    [(_client_error("SlowDown", 503), True), (_client_error("AccessDenied", 403), False)],
)
def test_an_upload_failure_is_as_transient_as_its_cause(
    cause: ClientError, transient: bool
) -> None:
    wrapped = S3UploadFailedError("Failed to upload")
    wrapped.__context__ = cause  # boto3 raises it while handling the ClientError
    assert is_transient(wrapped) is transient


def test_delays_grow_with_jitter_and_stay_capped() -> None:
    policy = RetryPolicy(budget_s=60, first_delay_s=1, max_delay_s=8)
    assert [policy.delay(i, lambda: 0.0) for i in range(6)] == [0.5, 1, 2, 4, 4, 4]
    assert [policy.delay(i, lambda: 1.0) for i in range(6)] == [1, 2, 4, 8, 8, 8]


def test_call_retries_transient_errors_then_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr("kubedream_trainer.storage.retry.time.sleep", sleeps.append)
    failures = [EndpointConnectionError(endpoint_url="http://x")] * 3

    def flaky() -> str:
        if failures:
            raise failures.pop()
        return "ok"

    assert RetryPolicy(budget_s=60, first_delay_s=1, max_delay_s=8).call(flaky, "GET x") == "ok"
    assert len(sleeps) == 3
    assert 0.5 <= sleeps[0] <= 1
    assert 1 <= sleeps[1] <= 2
    assert 2 <= sleeps[2] <= 4


def test_call_gives_up_when_the_budget_is_spent() -> None:
    calls = []

    def down() -> None:
        calls.append(1)
        raise EndpointConnectionError(endpoint_url="http://x")

    with pytest.raises(EndpointConnectionError) as caught:
        RetryPolicy(budget_s=0.3, first_delay_s=0.1, max_delay_s=0.1).call(down, "GET x")
    assert 2 <= len(calls) <= 7
    assert caught.value.kd_attempts == len(calls)  # type: ignore[attr-defined]


def test_call_never_retries_a_permanent_error() -> None:
    calls = []

    def denied() -> None:
        calls.append(1)
        raise _client_error("AccessDenied", 403)

    with pytest.raises(ClientError):
        RetryPolicy(budget_s=60).call(denied, "GET x")
    assert calls == [1]


def test_expected_etag_single_and_multipart(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 12 + b"b" * 12)
    big = TransferConfig(multipart_threshold=100)
    assert expected_etag(path, big) == hashlib.md5(path.read_bytes()).hexdigest()
    # s3transfer never cuts parts below 5 MiB, so a small file is one part of a multipart upload.
    tiny = TransferConfig(multipart_threshold=1, multipart_chunksize=10)
    one_part = hashlib.md5(hashlib.md5(path.read_bytes()).digest()).hexdigest()
    assert expected_etag(path, tiny) == f"{one_part}-1"
