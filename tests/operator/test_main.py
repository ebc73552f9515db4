"""`kubedream operator` settings: defaults from flags and the environment."""

from __future__ import annotations

import argparse

from kubedream_operator.main import defaults_from
from kubedream_operator.render import DEFAULT_TRAINER_IMAGE


def test_flag_beats_environment_beats_default() -> None:
    none = argparse.Namespace(trainer_image=None)
    assert defaults_from(none, {}).trainer_image == DEFAULT_TRAINER_IMAGE
    assert defaults_from(none, {"KUBEDREAM_TRAINER_IMAGE": "env:1"}).trainer_image == "env:1"
    flag = argparse.Namespace(trainer_image="flag:1")
    assert defaults_from(flag, {"KUBEDREAM_TRAINER_IMAGE": "env:1"}).trainer_image == "flag:1"


def test_service_account_and_grace_period_from_environment() -> None:
    defaults = defaults_from(
        argparse.Namespace(trainer_image=None),
        {
            "KUBEDREAM_TRAINER_SERVICE_ACCOUNT": "trainer",
            "KUBEDREAM_TERMINATION_GRACE_SECONDS": "900",
        },
    )
    assert (defaults.service_account, defaults.termination_grace_seconds) == ("trainer", 900)
