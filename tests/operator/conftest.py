"""Fixtures of the operator's unit tests."""

from __future__ import annotations

import pytest

from kubedream_operator.spec import FineTuneJobSpec, parse_spec

from .helpers import FakeKube, minimal_spec


@pytest.fixture
def spec() -> FineTuneJobSpec:
    return parse_spec(minimal_spec())


@pytest.fixture
def kube() -> FakeKube:
    return FakeKube()
