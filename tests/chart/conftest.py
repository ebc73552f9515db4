"""Fixtures for the chart tests: the test bed's helm binary and `helm template` as Python objects.

Tests that run helm are marked `testbed`: helm is one of the bed's binaries
(scripts/build-testbed.sh), built after collection like the others, and skipped with them under
KUBEDREAM_SKIP_TESTBED=1.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from kubedream_operator.devbed.build import BuildError, ensure_binaries

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubedream"
KUBE_VERSION = "v1.29.0"
"""The chart's minimum Kubernetes version (Chart.yaml kubeVersion), given to helm template and
lint: helm's built-in default depends on how helm was built."""

Docs = list[dict[str, Any]]
Render = Callable[..., Docs]


def load_render_script() -> ModuleType:
    """scripts/render-manifests.py as a module (its name has a dash, so no plain import)."""
    spec = importlib.util.spec_from_file_location(
        "render_manifests", ROOT / "scripts" / "render-manifests.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Helm:
    """The bed's helm with a private home; every call captures its output."""

    def __init__(self, binary: Path, home: Path) -> None:
        self.binary = binary
        self.env = {
            **os.environ,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )

    def template(self, *args: str, release: str = "kd", namespace: str = "ops") -> str:
        """`helm template` output; fails the test with helm's message if it fails."""
        proc = self.run(
            "template",
            release,
            str(CHART),
            "--namespace",
            namespace,
            "--kube-version",
            KUBE_VERSION,
            *args,
        )
        if proc.returncode != 0:
            pytest.fail(f"helm template {' '.join(args)} failed:\n{proc.stderr}")
        return proc.stdout


def set_args(values: dict[str, Any]) -> list[str]:
    """`--set-json key=value` for each (dotted) key: exact types, no --set string guessing."""
    import json

    args: list[str] = []
    for key, value in values.items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """The test bed's helm binary (built after collection when testbed tests are selected)."""
    if os.environ.get("KUBEDREAM_SKIP_TESTBED") == "1":
        pytest.skip("KUBEDREAM_SKIP_TESTBED=1: the bed's binaries (helm) are not built")
    try:
        binary = ensure_binaries(build=False).helm
    except BuildError as exc:
        pytest.fail(f"helm is not built: {exc}")
    return Helm(binary, tmp_path_factory.mktemp("helm-home"))


@pytest.fixture
def render(helm: Helm) -> Render:
    """Render the chart with `--set-json` values (and extra helm args) into a list of objects."""

    def run(values: dict[str, Any] | None = None, *args: str, **kwargs: str) -> Docs:
        text = helm.template(*set_args(values or {}), *args, **kwargs)
        return [doc for doc in yaml.safe_load_all(text) if doc]

    return run


def find(docs: Docs, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    """The objects of a kind (and name)."""
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: Docs, kind: str, name: str | None = None) -> dict[str, Any]:
    """The single object of a kind (and name)."""
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]
