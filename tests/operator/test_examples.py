"""The example FineTuneJobs in manifests/examples/ are valid, render, and fit the CRD's rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubedream_operator.render import Owner, render_children
from kubedream_operator.spec import load_job
from kubedream_trainer.cli import main

from .helpers import EXAMPLES

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


def test_the_examples_exist() -> None:
    assert {p.name for p in EXAMPLE_FILES} >= {"tiny-local.yaml", "sd15-s3.yaml", "multinode.yaml"}


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_is_valid_and_renders(path: Path) -> None:
    job = load_job(path)
    objects = render_children(Owner(job.name, "ns"), job.spec)
    assert objects[-1]["kind"] == "Job"
    assert len(job.name) <= 52


def test_kubedream_validate_accepts_every_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", *map(str, EXAMPLE_FILES)]) == 0
    assert capsys.readouterr().out.count("is valid") == len(EXAMPLE_FILES)
