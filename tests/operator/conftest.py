"""Fixtures of the operator's tests: a spec and a fake API for the unit tests; the CRD, `jobs`
and an `operator` subprocess for the tests on the real bed (tests/operator/bed_support.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubedream_operator.devbed.bed import BedInfo
from kubedream_operator.spec import FineTuneJobSpec, parse_spec

from .bed_support import Jobs, Operator, establish_crd
from .helpers import FakeKube, minimal_spec


@pytest.fixture
def spec() -> FineTuneJobSpec:
    return parse_spec(minimal_spec())


@pytest.fixture
def kube() -> FakeKube:
    return FakeKube()


@pytest.fixture(scope="module")
def crd(bed: BedInfo) -> dict[str, Any]:
    """The generated CRD, created (or replaced) in the bed and established."""
    return establish_crd(bed)


@pytest.fixture
def jobs(bed: BedInfo, namespace: str, crd: dict[str, Any]) -> Jobs:
    return Jobs(bed, namespace)


@pytest.fixture
def operator(
    bed: BedInfo, namespace: str, crd: dict[str, Any], tmp_path: Path
) -> Iterator[Operator]:
    running = Operator(bed, namespace, tmp_path / "operator.log")
    running.start()
    try:
        yield running
    finally:
        running.stop()
        # Shown by pytest only when the test failed.
        print(f"--- operator log (last lines) ---\n{running.tail()}")
