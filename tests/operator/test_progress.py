"""Reading progress.json through the storage interface, as the status timer does."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from kubedream_operator.progress import ProgressReader
from kubedream_operator.spec import parse_spec

from .helpers import minimal_spec


def test_local_output(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    read = ProgressReader()
    spec = parse_spec(minimal_spec(output={"uri": str(tmp_path)}))
    assert read(spec) == (None, True)  # not written yet: known to be absent
    (tmp_path / "progress.json").write_text(json.dumps({"epoch": 1, "step": 5}))
    assert read(spec) == ({"epoch": 1, "step": 5}, True)
    (tmp_path / "progress.json").write_text("{half")
    with caplog.at_level(logging.WARNING, logger="kubedream_operator.progress"):
        assert read(spec) == (None, False)  # unreadable: unknown, keep what status says
        assert read(spec) == (None, False)
    assert len(caplog.records) == 1  # one warning per distinct error, not one per interval
    (tmp_path / "progress.json").write_text("[1, 2]")
    assert read(spec) == (None, False)


def test_storages_are_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    from kubedream_operator import progress

    real = progress.open_storage

    def counting(uri: str, settings: object | None = None, **kw: bool) -> progress.Storage:
        opened.append(uri)
        return real(uri, settings, **kw)

    monkeypatch.setattr(progress, "open_storage", counting)
    read = ProgressReader()
    spec = parse_spec(minimal_spec(output={"uri": str(tmp_path)}))
    read(spec)
    read(spec)
    assert opened == [str(tmp_path)]


def test_an_unreachable_s3_output_fails_fast_without_retrying(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The status timer runs in kopf's worker threads: an S3 outage must not hold one for the
    trainer's retry budget (120 s) or botocore's retries."""
    import socket

    import kubedream_trainer.storage.retry as retry

    sleeps: list[float] = []
    monkeypatch.setattr(retry.time, "sleep", lambda s: sleeps.append(s))
    with socket.socket() as closed:  # a free port that nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    spec = parse_spec(
        minimal_spec(
            output={"uri": "s3://bucket/run"},
            storage={"endpoint": f"http://127.0.0.1:{port}"},
        )
    )
    started = time.monotonic()
    assert ProgressReader()(spec) == (None, False)
    assert time.monotonic() - started < 5
    assert sleeps == []
