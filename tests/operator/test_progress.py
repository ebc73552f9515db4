"""Reading progress.json through the storage interface, as the status timer does."""

from __future__ import annotations

import json
import logging
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

    def counting(uri: str, settings: object | None = None) -> progress.Storage:
        opened.append(uri)
        return real(uri, settings)

    monkeypatch.setattr(progress, "open_storage", counting)
    read = ProgressReader()
    spec = parse_spec(minimal_spec(output={"uri": str(tmp_path)}))
    read(spec)
    read(spec)
    assert opened == [str(tmp_path)]
