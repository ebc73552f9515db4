"""A MinIO server of its own, that a test or a benchmark may stop and start at will.

The bed's MinIO is shared by a whole test session, so a test that needs the S3 server to
die (a checkpoint upload cut off, retries through a restart) starts one of these instead:
the bed's MinIO binary, its own data folder and port, and `stop()` / `start()` that keep
both, so objects written before a crash are there after the restart. `stop(kill=True)` is
SIGKILL (a crash: no graceful close of open connections).

Used by tests/storage, tests/e2e/test_s3*.py and bench/s3_read_bench.py.
"""

from __future__ import annotations

import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from . import procs
from .bed import S3_REGION, BedError, tail
from .build import ensure_binaries
from .components import http_ok


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class StandaloneMinio:
    """One MinIO process on 127.0.0.1 with a fixed data folder and port across restarts."""

    def __init__(self, directory: Path, binary: Path | None = None) -> None:
        self.dir = directory
        self.binary = binary or ensure_binaries(build=False).minio
        self.port = _free_port()
        self.access_key = "kubedream"
        self.secret_key = secrets.token_urlsafe(18)
        self.region = S3_REGION
        self.log = directory / "minio.log"
        self._popen: subprocess.Popen[bytes] | None = None
        self._tracked: procs.Tracked | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """AWS_* variables that point boto3 (and the trainer) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def running(self) -> bool:
        return self._tracked is not None and self._tracked.alive()

    def start(self, timeout: float = 60.0) -> None:
        """Start (or restart) the server and wait until it is ready."""
        if self.running():
            return
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(self.dir),
            "MINIO_ROOT_USER": self.access_key,
            "MINIO_ROOT_PASSWORD": self.secret_key,
            "MINIO_REGION": self.region,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
        }
        argv = [
            str(self.binary), "server", str(self.dir / "data"), f"--address=127.0.0.1:{self.port}",
            f"--certs-dir={self.dir / 'certs'}", "--quiet",
        ]  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            self._popen, self._tracked = procs.spawn(argv, log=self.log, env=env, cwd=self.dir)
            while not http_ok(f"{self.endpoint}/minio/health/ready"):
                if self._popen.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    self.stop()
                    raise BedError(f"minio not ready after {timeout:.0f}s:\n{tail(self.log)}")
                time.sleep(0.1)
            else:
                return
            # Exited at once: after a SIGKILL the port can stay busy for a moment; try again.
            if time.monotonic() > deadline:
                raise BedError(f"minio exited while starting:\n{tail(self.log)}")
            time.sleep(0.5)

    def stop(self, kill: bool = False) -> None:
        """Stop the server: SIGKILL with `kill` (a crash), else SIGTERM. Keeps the data."""
        if self._tracked is None:
            return
        if kill:
            procs.signal_group(self._tracked, signal.SIGKILL)
        procs.stop_group(self._tracked, grace=10.0, popen=self._popen)
        self._tracked = self._popen = None

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def __enter__(self) -> StandaloneMinio:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
