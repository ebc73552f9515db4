"""The checkpoint commit protocol on the bed's MinIO: multipart uploads committed by
checkpoint.json, leftovers that never count, rotation that keeps the newest, and a fetch that
refuses files changed after the commit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from boto3.s3.transfer import TransferConfig

from kubedream_operator.spec import StorageSpec
from kubedream_trainer.checkpoint import CheckpointStore
from kubedream_trainer.errors import OutputError
from kubedream_trainer.storage.s3 import S3Storage

pytestmark = [pytest.mark.testbed, pytest.mark.timeout(120)]

MIB = 1024 * 1024


def _staging(folder: Path, big: int = 6 * MIB) -> Path:
    (folder / "training_state").mkdir(parents=True)
    (folder / "training_state/unet.safetensors").write_bytes(os.urandom(big))
    (folder / "training_state/trainer.pt").write_bytes(b"trainer state")
    (folder / "model_index.json").write_text("{}")
    return folder


@pytest.fixture
def store(bucket: str, settings: StorageSpec) -> CheckpointStore:
    small_parts = TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)
    return CheckpointStore(S3Storage(f"s3://{bucket}/runs/job", settings, transfer=small_parts))


def test_commit_uploads_multipart_and_writes_the_manifest_last(
    store: CheckpointStore, tmp_path: Path
) -> None:
    checkpoint = store.commit(2, _staging(tmp_path / "s2"), {"job": "t"}, lambda: None)
    assert checkpoint.uri == f"{store.output.uri}/checkpoints/step-2"
    listed = {o.key: o for o in store.output.list("checkpoints/step-2")}
    assert set(listed) == {
        "checkpoints/step-2/checkpoint.json",
        "checkpoints/step-2/model_index.json",
        "checkpoints/step-2/training_state/trainer.pt",
        "checkpoints/step-2/training_state/unet.safetensors",
    }
    assert listed["checkpoints/step-2/training_state/unet.safetensors"].etag.endswith("-2")
    sizes = {f["path"]: f["size"] for f in checkpoint.manifest["files"]}
    assert sizes["training_state/unet.safetensors"] == 6 * MIB
    assert [c.step for c in store.committed()] == [2]


def test_leftovers_never_count_and_rotation_keeps_the_newest(
    store: CheckpointStore, tmp_path: Path
) -> None:
    for step in (1, 2, 3):
        store.commit(step, _staging(tmp_path / f"s{step}", 1024), {}, lambda: None)
    store.output.write_bytes("checkpoints/step-9/training_state/unet.safetensors", b"half")
    assert [c.step for c in store.committed()] == [1, 2, 3]
    assert store.latest_resumable("training_state/").step == 3  # type: ignore[union-attr]
    assert store.rotate(1) == ["checkpoints/step-1", "checkpoints/step-2"]
    assert [c.step for c in store.committed()] == [3]
    assert store.remove_uncommitted() == ["checkpoints/step-9"]
    assert {o.key.split("/")[1] for o in store.output.list("checkpoints")} == {"step-3"}


def test_fetch_downloads_the_state_and_refuses_a_changed_file(
    store: CheckpointStore, tmp_path: Path
) -> None:
    checkpoint = store.commit(4, _staging(tmp_path / "s4"), {}, lambda: None)
    fetched = store.fetch(checkpoint, "training_state", tmp_path / "fetched")
    assert (fetched / "training_state/trainer.pt").read_bytes() == b"trainer state"
    assert (fetched / "training_state/unet.safetensors").read_bytes() == (
        tmp_path / "s4/training_state/unet.safetensors"
    ).read_bytes()
    store.output.write_bytes("checkpoints/step-4/training_state/trainer.pt", b"trainer staTe")
    assert store.latest_resumable("training_state/") is not None, "same sizes: listing passes"
    with pytest.raises(OutputError, match=r"trainer.pt: sha256 after download differs"):
        store.fetch(checkpoint, "training_state", tmp_path / "again")
