"""How the node agent turns a pod spec into a local process: $(VAR) expansion, mountPath
rewriting, the downward API, env and volume resolution. Pure, no test bed needed."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from kubedream_operator.devbed.podspec import (
    Lookups,
    Obj,
    PodConfigError,
    UnsupportedPod,
    container_env,
    container_mounts,
    expand,
    field_value,
    materialize_volumes,
    quantity,
    resource_value,
    rewriter,
)

NODE = {"cpu": "2", "memory": "4Gi"}


def _pod(**spec: object) -> Obj:
    return {
        "metadata": {
            "name": "job-0-abcde",
            "namespace": "ns1",
            "uid": "u-1",
            "labels": {"app": "kd"},
            "annotations": {"batch.kubernetes.io/job-completion-index": "3"},
        },
        "spec": {"containers": [{"name": "main", "command": ["true"]}], **spec},
    }


def _lookups(
    config_maps: dict[str, Obj] | None = None, secrets: dict[str, Obj] | None = None
) -> Lookups:
    return Lookups(
        config_map=lambda ns, name: (config_maps or {}).get(name),
        secret=lambda ns, name: (secrets or {}).get(name),
        token=lambda pod, account, seconds, audience: f"token-for-{account}-{audience}",
    )


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)/x", "1/x"),
        ("$(MISSING)", "$(MISSING)"),
        ("$$(A)", "$(A)"),
        ("a$(A)b$(B)", "a1b2"),
    ],
)
def test_expand_follows_kubernetes_rules(text: str, expected: str) -> None:
    assert expand(text, {"A": "1", "B": "2"}) == expected


def test_rewriter_replaces_mount_paths_only_where_they_are_paths(tmp_path: Path) -> None:
    rewrite = rewriter(
        {"/etc/kd": tmp_path / "cfg", "/etc/kd/secret": tmp_path / "sec", "/data": tmp_path / "d"}
    )
    assert rewrite("/etc/kd/job.yaml") == f"{tmp_path}/cfg/job.yaml"
    assert rewrite("/etc/kd/secret/key") == f"{tmp_path}/sec/key"
    assert rewrite("--config=/etc/kd") == f"--config={tmp_path}/cfg"
    assert rewrite("cat /data/x /data") == f"cat {tmp_path}/d/x {tmp_path}/d"
    assert rewrite("/etc/kdx/file") == "/etc/kdx/file"
    assert rewrite("/srv/data/x") == "/srv/data/x"
    assert rewrite("s3://bucket/data/x") == "s3://bucket/data/x"


def test_field_refs() -> None:
    pod = _pod()
    assert field_value(pod, "metadata.name") == "job-0-abcde"
    assert field_value(pod, "metadata.namespace") == "ns1"
    assert (
        field_value(pod, "metadata.annotations['batch.kubernetes.io/job-completion-index']") == "3"
    )
    assert field_value(pod, "metadata.labels['app']") == "kd"
    assert field_value(pod, "status.podIP") == "127.0.0.1"
    assert field_value(pod, "metadata.labels") == 'app="kd"'
    with pytest.raises(UnsupportedPod):
        field_value(pod, "spec.nope")


def test_resource_field_refs_default_limits_to_the_node() -> None:
    pod = _pod(
        containers=[{"name": "main", "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}}]
    )
    assert resource_value(pod, {"resource": "requests.cpu"}, "main", NODE) == "1"
    assert resource_value(pod, {"resource": "requests.cpu", "divisor": "1m"}, "main", NODE) == "500"
    assert (
        resource_value(pod, {"resource": "requests.memory", "divisor": "1Mi"}, "main", NODE)
        == "1024"
    )
    assert resource_value(pod, {"resource": "limits.cpu"}, "main", NODE) == "2"
    assert quantity("1.5Gi") == 1.5 * 2**30


def test_env_resolves_every_source_in_order() -> None:
    container = {
        "name": "main",
        "envFrom": [{"configMapRef": {"name": "cm"}, "prefix": "CM_"}],
        "env": [
            {"name": "PLAIN", "value": "p"},
            {"name": "DERIVED", "value": "$(PLAIN)-$(CM_a)"},
            {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "a"}}},
            {
                "name": "OPTIONAL",
                "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": True}},
            },
            {
                "name": "INDEX",
                "valueFrom": {
                    "fieldRef": {
                        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
                    }
                },
            },
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
        ],
    }
    lookups = _lookups({"cm": {"data": {"a": "A"}}}, {"s": {"data": {"k": _b64("hush")}}})
    env = container_env(_pod(), container, lookups, {"PATH": "/bin"}, NODE)
    assert env == {
        "PATH": "/bin",
        "CM_a": "A",
        "PLAIN": "p",
        "DERIVED": "p-A",
        "SECRET": "hush",
        "FROM_CM": "A",
        "INDEX": "3",
        "CPU": "2",
    }


def test_env_with_a_missing_secret_is_a_config_error() -> None:
    container = {
        "name": "main",
        "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
    }
    with pytest.raises(PodConfigError, match='secret "s" not found'):
        container_env(_pod(), container, _lookups(), {}, NODE)


def test_volumes_are_materialised_and_mounts_mapped(tmp_path: Path) -> None:
    pod = _pod(
        volumes=[
            {
                "name": "cfg",
                "configMap": {
                    "name": "cm",
                    "items": [{"key": "job.yaml", "path": "conf/job.yaml"}],
                },
            },
            {"name": "creds", "secret": {"secretName": "s"}},
            {"name": "scratch", "emptyDir": {}},
            {"name": "claim", "persistentVolumeClaim": {"claimName": "out"}},
            {
                "name": "api",
                "projected": {
                    "sources": [
                        {"serviceAccountToken": {"path": "token", "audience": "aud"}},
                        {
                            "downwardAPI": {
                                "items": [
                                    {"path": "ns", "fieldRef": {"fieldPath": "metadata.namespace"}}
                                ]
                            }
                        },
                    ]
                },
            },
        ]
    )
    lookups = _lookups(
        {"cm": {"data": {"job.yaml": "kind: FineTuneJob\n"}}}, {"s": {"data": {"key": _b64("k1")}}}
    )
    volumes = materialize_volumes(pod, tmp_path / "volumes", tmp_path / "claims", lookups, NODE)
    assert (volumes["cfg"] / "conf" / "job.yaml").read_text() == "kind: FineTuneJob\n"
    assert (volumes["creds"] / "key").read_text() == "k1"
    assert volumes["scratch"].is_dir()
    assert volumes["claim"] == tmp_path / "claims" / "ns1" / "out"
    assert (volumes["api"] / "token").read_text() == "token-for-default-aud"
    assert (volumes["api"] / "ns").read_text() == "ns1"

    container = {
        "name": "main",
        "volumeMounts": [
            {"name": "cfg", "mountPath": "/etc/kd"},
            {"name": "scratch", "mountPath": "/work/cache", "subPath": "hf"},
        ],
    }
    mounts = container_mounts(container, volumes)
    assert mounts == {"/etc/kd": volumes["cfg"], "/work/cache": volumes["scratch"] / "hf"}
    assert (volumes["scratch"] / "hf").is_dir()


def test_unsupported_volume_types_say_so(tmp_path: Path) -> None:
    pod = _pod(volumes=[{"name": "v", "iscsi": {}}])
    with pytest.raises(UnsupportedPod, match="not supported by the node agent"):
        materialize_volumes(pod, tmp_path, tmp_path, _lookups(), NODE)
