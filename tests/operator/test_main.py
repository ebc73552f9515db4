"""`kubedream operator` settings: defaults from flags and the environment."""

from __future__ import annotations

import pytest

from kubedream_operator.render import DEFAULT_TRAINER_IMAGE, defaults_from, storage_defaults
from kubedream_operator.spec import SpecError


def test_flag_beats_environment_beats_default() -> None:
    assert defaults_from(None, {}).trainer_image == DEFAULT_TRAINER_IMAGE
    assert defaults_from(None, {"KUBEDREAM_TRAINER_IMAGE": "env:1"}).trainer_image == "env:1"
    assert defaults_from("flag:1", {"KUBEDREAM_TRAINER_IMAGE": "env:1"}).trainer_image == "flag:1"


def test_service_account_and_grace_period_from_environment() -> None:
    defaults = defaults_from(
        None,
        {
            "KUBEDREAM_TRAINER_SERVICE_ACCOUNT": "trainer",
            "KUBEDREAM_TERMINATION_GRACE_SECONDS": "900",
        },
    )
    assert (defaults.service_account, defaults.termination_grace_seconds) == ("trainer", 900)


def test_s3_defaults_from_environment() -> None:
    storage = storage_defaults(
        {
            "KUBEDREAM_S3_ENDPOINT": "http://minio:9000",
            "KUBEDREAM_S3_REGION": "",
            "KUBEDREAM_S3_ADDRESSING_STYLE": "path",
        }
    )
    assert storage.model_fields_set == {"endpoint", "addressing_style"}  # empty means no default
    with pytest.raises(SpecError) as bad:
        storage_defaults({"KUBEDREAM_S3_ENDPOINT": "minio:9000"})
    assert bad.value.problems[0].startswith(
        "KUBEDREAM_S3_ENDPOINT: must be an http:// or https:// URL"
    )
