"""The S3 server dies in the middle of a checkpoint upload (a MinIO of the test's own, killed
with SIGKILL). Staying down: the run fails with exit 4 and a message saying the checkpoint
was not committed, no partial checkpoint counts as committed, the older checkpoint survives
keepLast=1, and once the server is back a new run resumes from that older checkpoint and
finishes. Coming back within the retry budget: the run does not even notice.

The trainer talks to MinIO through a small TCP proxy in the test, which kills the server at
an exact moment: when the Nth PUT of the step-4 checkpoint arrives, before forwarding it."""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kubedream_operator.devbed.bed import BedInfo
from kubedream_operator.devbed.minio import StandaloneMinio
from kubedream_trainer.errors import ExitCode
from kubedream_trainer.tiny import tiny_model_dir

from .test_s3_training import committed, keys, make_images, read_json, upload_tree

pytestmark = [pytest.mark.testbed, pytest.mark.slow, pytest.mark.timeout(300)]


class TriggerProxy:
    """127.0.0.1:<port> -> 127.0.0.1:<target>. When `pattern` has been sent by clients `nth`
    times while armed, `action` runs once, before that request is forwarded."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.pattern = b""
        self.nth = 0
        self.action: Callable[[], None] = lambda: None
        self.seen = 0
        self.fired = threading.Event()
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, pattern: bytes, nth: int, action: Callable[[], None]) -> None:
        with self._lock:
            self.pattern, self.nth, self.action, self.seen = pattern, nth, action, 0
            self.fired.clear()

    def disarm(self) -> None:
        with self._lock:
            self.pattern = b""

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
        except OSError:  # the server is down: the client sees its connection closed
            client.close()
            return
        upstream.settimeout(None)
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
        self._pump(client, upstream, True)

    def _pump(self, source: socket.socket, sink: socket.socket, inspect: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                if inspect and self._fires(data):
                    self.action()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()

    def _fires(self, data: bytes) -> bool:
        with self._lock:
            if not self.pattern or self.fired.is_set() or self.pattern not in data:
                return False
            self.seen += data.count(self.pattern)
            if self.seen < self.nth:
                return False
            self.fired.set()
            return True


class Rig:
    """A MinIO of our own behind the proxy, holding the data root and the tiny model."""

    def __init__(self, minio: StandaloneMinio, proxy: TriggerProxy, tmp: Path) -> None:
        self.minio, self.proxy, self.tmp = minio, proxy, tmp
        self.bucket = "faults"

    @property
    def s3(self) -> Any:
        return self.minio.client()

    def job(self, out: str, name: str = "faulty") -> Path:
        spec = {
            "model": {"base": f"s3://{self.bucket}/models/tiny-sd1"},
            "data": {
                "roots": [{"uri": f"s3://{self.bucket}/data"}],
                "resolution": 64,
                "loaderWorkers": 2,
            },
            "training": {"maxSteps": 4, "batchSize": 2, "unetLearningRate": 1e-4, "seed": 7},
            "output": {
                "uri": f"s3://{self.bucket}/{out}",
                "saveEverySteps": 2,
                "keepLast": 1,
                "progressEverySteps": 1,
            },
            "storage": {
                "endpoint": f"http://127.0.0.1:{self.proxy.port}",
                "region": self.minio.region,
                "addressingStyle": "path",
            },
        }
        path = self.tmp / f"{name}-{uuid.uuid4().hex[:6]}.yaml"
        manifest = {"apiVersion": "kubedream.io/v1alpha1", "kind": "FineTuneJob"}
        path.write_text(yaml.safe_dump({**manifest, "metadata": {"name": name}, "spec": copy.deepcopy(spec)}))  # fmt: skip
        return path


def train(job: Path) -> tuple[int, str]:
    """`kubedream train` in this process: the exit code and what it wrote to stderr."""
    from kubedream_trainer.train_cli import run

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = run(argparse.Namespace(job=str(job), device="cpu"))
    return code, " ".join(stderr.getvalue().split())


@pytest.fixture(scope="module")
def rig(bed: BedInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("s3-faults")
    minio = StandaloneMinio(tmp / "minio", bed.binaries.minio)
    minio.start()
    proxy = TriggerProxy(minio.port)
    s3 = minio.client()
    s3.create_bucket(Bucket="faults")
    upload_tree(s3, make_images(tmp / "data"), "faults", "data")
    upload_tree(s3, tiny_model_dir("sd1", cache_dir=tmp / "build"), "faults", "models/tiny-sd1")
    env = {
        **{k: v for k, v in minio.env.items() if k != "AWS_ENDPOINT_URL"},
        "HF_HUB_OFFLINE": "1",
        "KUBEDREAM_CACHE_DIR": str(tmp / "trainer-cache"),
        "KUBEDREAM_LEASE_TTL": "3",
        "KUBEDREAM_LEASE_WAIT": "15",
        "KUBEDREAM_S3_MAX_ATTEMPTS": "2",
    }
    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            patch.delenv("AWS_ENDPOINT_URL", raising=False)
            torch.set_num_threads(1)
            yield Rig(minio, proxy, tmp)
    finally:
        torch.set_num_threads(threads)
        proxy.close()
        minio.stop()


def _crash(rig: Rig) -> None:
    rig.minio.stop(kill=True)


def test_a_server_down_during_a_checkpoint_upload_commits_nothing_and_resume_recovers(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBEDREAM_S3_RETRY_BUDGET", "3")
    pattern = f"PUT /{rig.bucket}/runs/down/checkpoints/step-4/".encode()
    rig.proxy.arm(pattern, 3, lambda: _crash(rig))
    code, err = train(rig.job("runs/down"))
    assert rig.proxy.fired.is_set(), "the server was killed during the step-4 upload"
    assert code == ExitCode.STORAGE, err
    assert f"checkpoint s3://{rig.bucket}/runs/down/checkpoints/step-4 was not committed" in err
    assert f"endpoint http://127.0.0.1:{rig.proxy.port}" in err

    rig.proxy.disarm()
    rig.minio.start()
    s3 = rig.s3
    assert committed(s3, rig.bucket, "runs/down") == [2], "keepLast=1 kept the newest committed"
    step4 = [k for k in keys(s3, rig.bucket, "runs/down") if k.startswith("checkpoints/step-4/")]
    assert "checkpoints/step-4/checkpoint.json" not in step4
    progress = read_json(s3, rig.bucket, "runs/down/progress.json")
    assert progress["lastCheckpoint"] == f"s3://{rig.bucket}/runs/down/checkpoints/step-2"

    monkeypatch.delenv("KUBEDREAM_S3_RETRY_BUDGET")
    code, err = train(rig.job("runs/down"))
    assert code == 0, err
    assert f"resuming from s3://{rig.bucket}/runs/down/checkpoints/step-2" in err
    assert committed(s3, rig.bucket, "runs/down") == [4]
    manifest = read_json(s3, rig.bucket, "runs/down/checkpoints/step-4/checkpoint.json")
    listed = {
        k.removeprefix("checkpoints/step-4/")
        for k in keys(s3, rig.bucket, "runs/down")
        if k.startswith("checkpoints/step-4/")
    }
    assert listed == {f["path"] for f in manifest["files"]} | {"checkpoint.json"}
    progress = read_json(s3, rig.bucket, "runs/down/progress.json")
    assert (progress["phase"], progress["step"]) == ("Succeeded", 4)


def test_a_server_restart_during_a_checkpoint_upload_is_ridden_out(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBEDREAM_S3_RETRY_BUDGET", "60")
    restarted = threading.Event()

    def crash_and_restart() -> None:
        _crash(rig)

        def later() -> None:
            time.sleep(3)
            rig.minio.start()
            restarted.set()

        threading.Thread(target=later, daemon=True).start()

    pattern = f"PUT /{rig.bucket}/runs/blip/checkpoints/step-2/".encode()
    rig.proxy.arm(pattern, 2, crash_and_restart)
    started = time.monotonic()
    code, err = train(rig.job("runs/blip"))
    assert rig.proxy.fired.is_set()
    assert restarted.wait(30)
    assert code == 0, err
    assert time.monotonic() - started > 3, "the run waited for the server"
    assert committed(rig.s3, rig.bucket, "runs/blip") == [4]
    progress = read_json(rig.s3, rig.bucket, "runs/blip/progress.json")
    assert progress["checkpoints"] == [f"s3://{rig.bucket}/runs/blip/checkpoints/step-4"]
