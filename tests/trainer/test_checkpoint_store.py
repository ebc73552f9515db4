"""The checkpoint commit protocol and the output lease, on a real local folder."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from kubedream_trainer.checkpoint import CheckpointExistsError, CheckpointStore
from kubedream_trainer.errors import OutputError, OutputLockedError
from kubedream_trainer.lease import LEASE_KEY, OutputLease
from kubedream_trainer.storage.local import LocalStorage


def _staging(folder: Path, marker: str = "x") -> Path:
    (folder / "unet").mkdir(parents=True)
    (folder / "unet/weights.bin").write_bytes(marker.encode() * 100)
    (folder / "model_index.json").write_text("{}")
    return folder


def _commit(store: CheckpointStore, tmp_path: Path, step: int, marker: str = "x") -> None:
    store.commit(
        step, _staging(tmp_path / f"stage-{step}-{marker}", marker), {"job": "t"}, lambda: None
    )


def test_commit_uploads_verifies_and_writes_the_manifest_last(tmp_path: Path) -> None:
    output = tmp_path / "out"
    store = CheckpointStore(LocalStorage(str(output)))
    checkpoint = store.commit(3, _staging(tmp_path / "stage"), {"job": "t"}, lambda: None)
    folder = output / "checkpoints/step-3"
    assert checkpoint.uri == str(folder)
    manifest = json.loads((folder / "checkpoint.json").read_text())
    assert manifest["step"] == 3
    assert manifest["job"] == "t"
    assert manifest["files"] == [
        {"path": "model_index.json", "size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()},
        {"path": "unet/weights.bin", "size": 100, "sha256": hashlib.sha256(b"x" * 100).hexdigest()},
    ]
    assert [c.step for c in store.committed()] == [3]


def test_a_committed_step_is_never_overwritten(tmp_path: Path) -> None:
    store = CheckpointStore(LocalStorage(str(tmp_path / "out")))
    _commit(store, tmp_path, 3, "a")
    with pytest.raises(CheckpointExistsError, match="already committed"):
        _commit(store, tmp_path, 3, "b")
    assert (tmp_path / "out/checkpoints/step-3/unet/weights.bin").read_bytes() == b"a" * 100


def test_an_uncommitted_leftover_is_replaced(tmp_path: Path) -> None:
    leftover = tmp_path / "out/checkpoints/step-3"
    (leftover / "unet").mkdir(parents=True)
    (leftover / "unet/stale.bin").write_bytes(b"old")
    store = CheckpointStore(LocalStorage(str(tmp_path / "out")))
    assert store.committed() == []
    _commit(store, tmp_path, 3)
    assert not (leftover / "unet/stale.bin").exists()
    assert [c.step for c in store.committed()] == [3]


class _TruncatingStorage(LocalStorage):
    """An output that loses the end of every upload."""

    def upload_file(self, local_path: Path, key: str) -> None:
        super().upload_file(local_path, key)
        path = self._path(key)
        path.write_bytes(path.read_bytes()[:-1])


class _CorruptingStorage(LocalStorage):
    """An output that flips bytes but keeps sizes."""

    def upload_file(self, local_path: Path, key: str) -> None:
        super().upload_file(local_path, key)
        path = self._path(key)
        path.write_bytes(bytes(b ^ 1 for b in path.read_bytes()))


@pytest.mark.parametrize(
    ("storage", "problem"), [(_TruncatingStorage, "size"), (_CorruptingStorage, "sha256")]
)
def test_an_upload_that_does_not_verify_is_never_committed(
    tmp_path: Path, storage: type[LocalStorage], problem: str
) -> None:
    store = CheckpointStore(storage(str(tmp_path / "out")))
    with pytest.raises(OutputError, match=problem):
        _commit(store, tmp_path, 3)
    assert not (tmp_path / "out/checkpoints/step-3/checkpoint.json").exists()
    assert store.committed() == []
    assert store.remove_uncommitted() == ["checkpoints/step-3"]
    assert not (tmp_path / "out/checkpoints/step-3").exists()


def test_a_failing_fence_prevents_the_commit(tmp_path: Path) -> None:
    store = CheckpointStore(LocalStorage(str(tmp_path / "out")))

    def lost() -> None:
        raise OutputLockedError("lost the lease")

    # The step folder may be the new lease holder's upload in progress: never deleted.
    (tmp_path / "out/checkpoints/step-3").mkdir(parents=True)
    (tmp_path / "out/checkpoints/step-3/unet.safetensors").write_text("the other trainer's")
    with pytest.raises(OutputLockedError):
        store.commit(3, _staging(tmp_path / "stage"), {}, lost)
    assert store.committed() == []
    assert (
        tmp_path / "out/checkpoints/step-3/unet.safetensors"
    ).read_text() == "the other trainer's"


def test_rotation_deletes_only_older_committed_checkpoints(tmp_path: Path) -> None:
    store = CheckpointStore(LocalStorage(str(tmp_path / "out")))
    for step in (1, 2, 3, 4):
        _commit(store, tmp_path, step)
    (tmp_path / "out/checkpoints/step-9").mkdir()
    (tmp_path / "out/checkpoints/step-9/partial").write_text("uploading")
    assert store.rotate(None) == []
    assert store.rotate(2) == ["checkpoints/step-1", "checkpoints/step-2"]
    assert sorted(p.name for p in (tmp_path / "out/checkpoints").iterdir()) == [
        "step-3",
        "step-4",
        "step-9",
    ]
    assert store.rotate(1) == ["checkpoints/step-3"]
    assert [c.step for c in store.committed()] == [4]


def test_an_unreadable_manifest_means_not_committed(tmp_path: Path) -> None:
    store = CheckpointStore(LocalStorage(str(tmp_path / "out")))
    _commit(store, tmp_path, 1)
    _commit(store, tmp_path, 2)
    (tmp_path / "out/checkpoints/step-2/checkpoint.json").write_text("{not json")
    assert [c.step for c in store.committed()] == [1]


def test_latest_resumable_skips_a_damaged_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(LocalStorage(str(tmp_path / "out")))
    _commit(store, tmp_path, 1)
    _commit(store, tmp_path, 2)
    (tmp_path / "out/checkpoints/step-2/unet/weights.bin").write_bytes(b"y" * 100)
    latest = store.latest_resumable("unet/")
    assert latest is not None
    assert latest.step == 1
    assert store.latest_resumable("training_state/") is None  # no state files listed at all


def _lease(output: Path, ttl: float = 30, wait: float = 0) -> OutputLease:
    return OutputLease(LocalStorage(str(output)), "job", ttl, wait)


def test_a_live_lease_keeps_a_second_trainer_out(tmp_path: Path) -> None:
    first, second = _lease(tmp_path), _lease(tmp_path)
    first.acquire()
    try:
        with pytest.raises(OutputLockedError, match="in use by another trainer"):
            second.acquire()
        first.check()
    finally:
        first.release()
    assert not (tmp_path / LEASE_KEY).exists()
    second.acquire()
    second.release()


def test_an_abandoned_lease_is_taken_over_after_its_ttl(tmp_path: Path) -> None:
    (tmp_path / LEASE_KEY).write_text(
        json.dumps({"owner": "dead", "host": "gone", "expiresAtUnix": time.time() + 3600})
    )
    lease = _lease(tmp_path, ttl=0.5, wait=5)
    started = time.monotonic()
    lease.acquire()
    try:
        assert 0.5 <= time.monotonic() - started < 5
        assert json.loads((tmp_path / LEASE_KEY).read_text())["owner"] == lease.owner
    finally:
        lease.release()


def test_an_expired_lease_is_taken_over_at_once(tmp_path: Path) -> None:
    (tmp_path / LEASE_KEY).write_text(
        json.dumps({"owner": "dead", "expiresAtUnix": time.time() - 1})
    )
    lease = _lease(tmp_path)
    lease.acquire()
    lease.release()


def test_the_heartbeat_renews_and_notices_a_takeover(tmp_path: Path) -> None:
    lease = _lease(tmp_path, ttl=0.6)
    lease.acquire()
    try:
        renewed = json.loads((tmp_path / LEASE_KEY).read_text())["expiresAtUnix"]
        time.sleep(0.5)
        assert json.loads((tmp_path / LEASE_KEY).read_text())["expiresAtUnix"] > renewed
        (tmp_path / LEASE_KEY).write_text(json.dumps({"owner": "usurper", "host": "other"}))
        with pytest.raises(OutputLockedError, match="lost the lease"):
            lease.check()
    finally:
        lease.release()
    assert json.loads((tmp_path / LEASE_KEY).read_text())["owner"] == "usurper"
