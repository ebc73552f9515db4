"""Turn a pod's spec into what a local process needs: its volumes as folders, its environment
and its command line, with every volume mountPath rewritten to the folder that stands in for it.

The node agent has no containers and no mount namespaces, so a path such as /etc/kubedream/job.yaml
cannot exist. Instead each volume is materialised under DIR/pods/<ns>/<pod>/volumes/<volume>, and
any occurrence of a container's mountPath as a path (the whole string, or after '=', ':', ',' or
whitespace, followed by '/' or the end of the path) in the command, args, env values and
workingDir is replaced by that folder. Cluster DNS names (`*.svc`, `*.svc.cluster.local`) in
the command, args and env values become 127.0.0.1 (`resolve_service_names`): the bed has no
DNS and every pod runs on this host. Called by devbed.pod_runner.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

Obj = dict[str, Any]
POD_IP = "127.0.0.1"


class PodConfigError(Exception):
    """A reference the pod needs cannot be resolved yet (a missing ConfigMap, Secret or key).
    The kubelet reports this as CreateContainerConfigError and retries; so does the agent."""


class UnsupportedPod(Exception):
    """The pod uses something the node agent cannot provide (e.g. an ephemeral volume)."""


@dataclass(frozen=True)
class Lookups:
    """How podspec reads the cluster. Each returns the object as a dict, or None if absent."""

    config_map: Callable[[str, str], Obj | None]
    secret: Callable[[str, str], Obj | None]
    token: Callable[[Obj, str, int, str | None], str]
    """(pod, service account, expirationSeconds, audience) -> a bound service-account token."""


def _decoded(obj: Obj, secret: bool) -> dict[str, bytes]:
    data: dict[str, bytes] = {}
    if secret:
        for key, value in (obj.get("data") or {}).items():
            data[key] = base64.b64decode(value)
        for key, value in (obj.get("stringData") or {}).items():
            data[key] = value.encode()
    else:
        for key, value in (obj.get("data") or {}).items():
            data[key] = value.encode()
        for key, value in (obj.get("binaryData") or {}).items():
            data[key] = base64.b64decode(value)
    return data


def _source_data(namespace: str, ref: Obj, kind: str, lookups: Lookups) -> dict[str, bytes] | None:
    """The keys of a referenced ConfigMap or Secret; None if optional and absent."""
    name = ref.get("name") or ref.get("secretName") or ""
    obj = (lookups.secret if kind == "Secret" else lookups.config_map)(namespace, name)
    if obj is None:
        if ref.get("optional"):
            return None
        raise PodConfigError(f'{kind.lower()} "{name}" not found')
    return _decoded(obj, secret=kind == "Secret")


# --- the downward API --------------------------------------------------------------------------

_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_value(pod: Obj, field_path: str) -> str:
    """The value of a fieldRef, as the kubelet renders it."""
    meta = pod.get("metadata") or {}
    subscript = _SUBSCRIPT.match(field_path)
    if subscript:
        return str((meta.get(subscript.group(1)) or {}).get(subscript.group(2), ""))
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": (pod.get("spec") or {}).get("nodeName", ""),
        "spec.serviceAccountName": (pod.get("spec") or {}).get("serviceAccountName", ""),
        "status.hostIP": POD_IP,
        "status.hostIPs": POD_IP,
        "status.podIP": POD_IP,
        "status.podIPs": POD_IP,
    }
    if field_path in simple:
        return str(simple[field_path])
    if field_path in ("metadata.labels", "metadata.annotations"):
        values = meta.get(field_path.split(".")[1]) or {}
        return "\n".join(f"{k}={json.dumps(v)}" for k, v in sorted(values.items()))
    raise UnsupportedPod(f"fieldRef {field_path!r} is not supported by the node agent")


_SUFFIXES = {
    "m": Decimal("0.001"), "": Decimal(1), "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9),
    "T": Decimal(10**12), "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
}  # fmt: skip


def quantity(text: str) -> Decimal:
    """Parse a Kubernetes quantity such as 500m, 2, 1Gi or 3e3."""
    match = re.fullmatch(r"([0-9.]+(?:[eE][0-9]+)?)([a-zA-Z]*)", str(text).strip())
    if not match or match.group(2) not in _SUFFIXES:
        raise UnsupportedPod(f"cannot parse quantity {text!r}")
    return Decimal(match.group(1)) * _SUFFIXES[match.group(2)]


def resource_value(
    pod: Obj, ref: Obj, container_name: str, node_allocatable: Mapping[str, str]
) -> str:
    """A resourceFieldRef: the container's request or limit (a limit defaults to what the node
    offers), divided by the divisor and rounded up, as the kubelet does."""
    name = ref.get("containerName") or container_name
    containers = (pod.get("spec") or {}).get("containers") or []
    container: Obj = next((c for c in containers if c.get("name") == name), {})
    kind, _, resource = str(ref.get("resource", "")).partition(".")
    resources = container.get("resources") or {}
    value = (resources.get(kind) or {}).get(resource)
    if value is None and kind == "limits":
        value = node_allocatable.get(resource)
    if value is None:
        value = "0"
    divisor = quantity(ref.get("divisor") or "1")
    return str(math.ceil(quantity(value) / divisor))


# --- volumes ---------------------------------------------------------------------------------


def _write_items(
    folder: Path, data: Mapping[str, bytes], items: list[Obj] | None, mode: int | None
) -> None:
    """Write keys as files, all of them or only `items` (key -> path), like the kubelet."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = items if items else [{"key": k, "path": k} for k in data]
    for item in wanted:
        if item["key"] not in data:
            raise PodConfigError(f"key {item['key']!r} not found")
        target = folder / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data[item["key"]])
        target.chmod(int(item.get("mode") or mode or 0o644))


def _projected(
    pod: Obj, folder: Path, sources: list[Obj], lookups: Lookups, node: Mapping[str, str]
) -> None:
    namespace = pod["metadata"]["namespace"]
    folder.mkdir(parents=True, exist_ok=True)
    for source in sources:
        if "configMap" in source or "secret" in source:
            kind = "ConfigMap" if "configMap" in source else "Secret"
            ref = source.get("configMap") or source.get("secret") or {}
            data = _source_data(namespace, ref, kind, lookups)
            if data is not None:
                _write_items(folder, data, ref.get("items"), None)
        elif "downwardAPI" in source:
            _downward(pod, folder, source["downwardAPI"].get("items") or [], node)
        elif "serviceAccountToken" in source:
            spec = source["serviceAccountToken"]
            account = pod["spec"].get("serviceAccountName") or "default"
            token = lookups.token(
                pod, account, int(spec.get("expirationSeconds") or 3600), spec.get("audience")
            )
            _write_items(
                folder, {"token": token.encode()}, [{"key": "token", "path": spec["path"]}], 0o600
            )
        else:
            raise UnsupportedPod(
                f"projected source {sorted(source)} is not supported by the node agent"
            )


def _downward(pod: Obj, folder: Path, items: list[Obj], node: Mapping[str, str]) -> None:
    data: dict[str, bytes] = {}
    for item in items:
        if "fieldRef" in item:
            value = field_value(pod, item["fieldRef"]["fieldPath"])
        else:
            first = (pod["spec"].get("containers") or [{}])[0].get("name", "")
            value = resource_value(pod, item["resourceFieldRef"], first, node)
        data[item["path"]] = value.encode()
    _write_items(folder, data, [{"key": p, "path": p} for p in data], None)


def materialize_volumes(
    pod: Obj, folder: Path, claims: Path, lookups: Lookups, node: Mapping[str, str]
) -> dict[str, Path]:
    """Create a folder (or use a host path) for each of the pod's volumes; return name -> path.
    Volumes are written under `folder`; persistentVolumeClaims share `claims`/<ns>/<claim>, so
    they outlive the pod as a claim does."""
    namespace = pod["metadata"]["namespace"]
    paths: dict[str, Path] = {}
    for volume in pod["spec"].get("volumes") or []:
        name = volume["name"]
        target = folder / name
        if "emptyDir" in volume:
            target.mkdir(parents=True, exist_ok=True)
        elif "configMap" in volume or "secret" in volume:
            kind = "ConfigMap" if "configMap" in volume else "Secret"
            ref = volume.get("configMap") or volume.get("secret") or {}
            data = _source_data(namespace, ref, kind, lookups)
            _write_items(
                target, data or {}, ref.get("items") if data else None, ref.get("defaultMode")
            )
        elif "projected" in volume:
            _projected(pod, target, volume["projected"].get("sources") or [], lookups, node)
        elif "downwardAPI" in volume:
            _downward(pod, target, volume["downwardAPI"].get("items") or [], node)
        elif "hostPath" in volume:
            target = Path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") == "DirectoryOrCreate":
                target.mkdir(parents=True, exist_ok=True)
        elif "persistentVolumeClaim" in volume:
            target = claims / namespace / volume["persistentVolumeClaim"]["claimName"]
            target.mkdir(parents=True, exist_ok=True)
        else:
            kinds = sorted(set(volume) - {"name"})
            raise UnsupportedPod(
                f"volume {name!r} of type {kinds} is not supported by the node agent"
            )
        paths[name] = target
    return paths


# --- mounts, env, command --------------------------------------------------------------------


def container_mounts(container: Obj, volumes: Mapping[str, Path]) -> dict[str, Path]:
    """mountPath -> the local path standing in for it (subPath applied)."""
    mounts: dict[str, Path] = {}
    for mount in container.get("volumeMounts") or []:
        mount_path = mount["mountPath"].rstrip("/")
        if not mount_path:
            raise UnsupportedPod("a volume mounted at / cannot be emulated by the node agent")
        if mount["name"] not in volumes:
            raise UnsupportedPod(f"volumeMount {mount['name']!r} names no volume")
        local = volumes[mount["name"]]
        if mount.get("subPath"):
            local = local / mount["subPath"]
            if not local.exists():
                local.mkdir(parents=True)
        mounts[mount_path] = local
    return mounts


def rewriter(mounts: Mapping[str, Path]) -> Callable[[str], str]:
    """A function replacing each mountPath, used as a path, by its local folder."""
    if not mounts:
        return lambda text: text
    ordered = sorted(mounts, key=len, reverse=True)
    pattern = re.compile(
        r"(?<![^\s=:,'\"])(" + "|".join(re.escape(p) for p in ordered) + r")(?=$|[/\s:,;'\"])"
    )
    return lambda text: pattern.sub(lambda m: str(mounts[m.group(1)]), text)


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_SERVICE_NAME = re.compile(
    rf"(?<![A-Za-z0-9.-])(?:{_LABEL}\.)+svc(?:\.cluster\.local)?(?![A-Za-z0-9-]|\.[A-Za-z0-9])"
)


def resolve_service_names(text: str) -> str:
    """Cluster DNS names (`<pod>.<service>.<ns>.svc`, `....svc.cluster.local`) replaced by
    the bed's one address, 127.0.0.1: the bed has no cluster DNS, and every pod runs on this
    host with POD_IP 127.0.0.1, so any pod or Service name means "here". Sandbox only; a real
    cluster resolves these names through its DNS (e.g. torchrun's --master-addr of a
    multi-node FineTuneJob)."""
    return _SERVICE_NAME.sub(POD_IP, text)


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes $(VAR) expansion: defined variables are substituted, undefined references are
    left as written, and $$ escapes a dollar."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR.sub(sub, text)


def container_env(
    pod: Obj, container: Obj, lookups: Lookups, base: Mapping[str, str], node: Mapping[str, str]
) -> dict[str, str]:
    """The container's environment over `base`: envFrom, then env in order, each value expanded
    against what is defined before it."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = dict(base)
    for source in container.get("envFrom") or []:
        kind = "ConfigMap" if "configMapRef" in source else "Secret"
        data = _source_data(
            namespace, source.get("configMapRef") or source.get("secretRef") or {}, kind, lookups
        )
        for key, value in (data or {}).items():
            env[source.get("prefix", "") + key] = value.decode()
    for var in container.get("env") or []:
        name = var["name"]
        if "valueFrom" not in var:
            env[name] = expand(var.get("value", ""), env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            env[name] = field_value(pod, source["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in source:
            env[name] = resource_value(pod, source["resourceFieldRef"], container["name"], node)
        else:
            kind = "ConfigMap" if "configMapKeyRef" in source else "Secret"
            ref = source.get("configMapKeyRef") or source.get("secretKeyRef") or {}
            data = _source_data(namespace, ref, kind, lookups)
            if data is None:
                continue
            if ref["key"] not in data:
                if ref.get("optional"):
                    continue
                raise PodConfigError(
                    f"couldn't find key {ref['key']} in {kind} {namespace}/{ref.get('name')}"
                )
            env[name] = data[ref["key"]].decode()
    return env
