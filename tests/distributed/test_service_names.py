"""The bed's node agent resolves cluster DNS names in pod commands and env to 127.0.0.1."""

from __future__ import annotations

import pytest

from kubedream_operator.devbed.podspec import resolve_service_names


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("--master-addr=ddp-0.ddp.team-a.svc", "--master-addr=127.0.0.1"),
        ("ddp-0.ddp.ns.svc.cluster.local:29500", "127.0.0.1:29500"),
        ("http://minio.kube-system.svc:9000/x", "http://127.0.0.1:9000/x"),
        ("http://minio.svc.example.com", "http://minio.svc.example.com"),
        ("s3://bucket/data.svc2", "s3://bucket/data.svc2"),
        ("svc", "svc"),
        ("/etc/kubedream/job.yaml", "/etc/kubedream/job.yaml"),
    ],
)
def test_service_names(text: str, expected: str) -> None:
    assert resolve_service_names(text) == expected
