"""Real faults on a MinIO of the test's own: the server killed and restarted under a read
and an upload (the retries ride it out), killed for good (a bounded wait, then a message
naming the endpoint), and killed in the middle of a multipart upload (no object appears)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from boto3.s3.transfer import TransferConfig

from kubedream_operator.devbed.minio import StandaloneMinio
from kubedream_operator.spec import StorageSpec
from kubedream_trainer.storage import StorageError
from kubedream_trainer.storage.retry import RetryPolicy
from kubedream_trainer.storage.s3 import S3Storage, make_client

pytestmark = [pytest.mark.testbed, pytest.mark.timeout(180)]

MIB = 1024 * 1024
SMALL_PARTS = TransferConfig(
    multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB, max_concurrency=2
)


@pytest.fixture
def storage(own_minio: StandaloneMinio, monkeypatch: pytest.MonkeyPatch) -> S3Storage:
    """s3://faults/data on the test's own MinIO, retrying for up to a minute."""
    for key, value in own_minio.env.items():
        monkeypatch.setenv(key, value)
    own_minio.client().create_bucket(Bucket="faults")
    settings = StorageSpec(endpoint=own_minio.endpoint, region=own_minio.region)
    return S3Storage(
        "s3://faults/data",
        settings,
        make_client(settings, shared=False),  # the tests hook into its events
        transfer=SMALL_PARTS,
        retry=RetryPolicy(budget_s=60, first_delay_s=0.5, max_delay_s=2),
    )


def _restart_later(server: StandaloneMinio, delay: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(delay), server.start()), daemon=True)
    thread.start()
    return thread


def test_reads_listings_and_uploads_ride_out_a_server_restart(
    storage: S3Storage, own_minio: StandaloneMinio, tmp_path: Path
) -> None:
    storage.write_bytes("a.bin", b"before the crash")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * MIB))

    own_minio.stop(kill=True)
    restart = _restart_later(own_minio, 3.0)
    started = time.monotonic()
    assert storage.read_bytes("a.bin") == b"before the crash"
    assert time.monotonic() - started >= 2.5, "the read waited for the restart"
    restart.join()

    own_minio.stop(kill=True)
    restart = _restart_later(own_minio, 3.0)
    storage.upload_file(big, "big.bin")  # multipart, verified by size and ETag
    restart.join()
    assert [(o.key, o.size) for o in storage.list()] == [("a.bin", 16), ("big.bin", 11 * MIB)]


def test_a_server_that_stays_down_fails_in_bounded_time_naming_the_endpoint(
    storage: S3Storage, own_minio: StandaloneMinio
) -> None:
    storage.write_bytes("a.bin", b"x")
    own_minio.stop(kill=True)
    impatient = S3Storage(
        storage.uri, storage.settings, retry=RetryPolicy(budget_s=2, first_delay_s=0.2)
    )
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        impatient.read_bytes("a.bin")
    assert time.monotonic() - started < 20
    message = str(caught.value)
    assert f"s3://faults/data/a.bin (endpoint {own_minio.endpoint})" in message
    assert "gave up after" in message


def test_a_crash_in_the_middle_of_a_multipart_upload_leaves_no_object(
    storage: S3Storage, own_minio: StandaloneMinio, tmp_path: Path
) -> None:
    big = tmp_path / "unet.safetensors"
    big.write_bytes(os.urandom(20 * MIB))
    parts: list[int] = []

    def crash_on_third_part(params: dict[str, Any], **_: Any) -> None:
        parts.append(params["PartNumber"])
        if len(parts) == 3:
            own_minio.stop(kill=True)

    storage.client.meta.events.register("provide-client-params.s3.UploadPart", crash_on_third_part)
    impatient = S3Storage(
        storage.uri,
        storage.settings,
        storage.client,
        transfer=SMALL_PARTS,
        retry=RetryPolicy(budget_s=1, first_delay_s=0.2),
    )
    with pytest.raises(StorageError, match=r"cannot upload s3://faults/data/step-9/unet"):
        impatient.upload_file(big, "step-9/unet.safetensors")
    own_minio.start()
    assert not storage.exists("step-9/unet.safetensors")
    assert list(storage.list()) == []
