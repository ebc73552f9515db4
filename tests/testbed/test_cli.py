"""`kubedream dev up|status|down` as a user runs them: a second bed in its own folder, started
twice (harmless), then stopped with no process left behind. Also helm against the session bed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kubedream_operator.devbed.bed import BedInfo
from kubedream_operator.devbed.layout import COMPONENTS, Layout
from kubedream_operator.devbed.procs import group_members, read_pidfile, start_time

pytestmark = pytest.mark.testbed


def _dev(command: str, directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubedream_trainer.cli", "dev", command, "--dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.mark.timeout(300)
def test_dev_up_twice_then_down_leaves_no_process_behind(bed: BedInfo, tmp_path: Path) -> None:
    directory = tmp_path / "dev"
    up = _dev("up", directory)
    assert up.returncode == 0, up.stderr + up.stdout
    layout = Layout(directory)
    env = layout.env_file.read_text()
    for name in (
        "KUBECONFIG",
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
    ):
        assert f"export {name}=" in env
    assert layout.kubeconfig.is_file()
    pids = {name: read_pidfile(layout.pidfile(name)) for name in COMPONENTS}
    assert all(t is not None and t.alive() for t in pids.values()), pids

    again = _dev("up", directory)
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout
    assert {name: read_pidfile(layout.pidfile(name)) for name in COMPONENTS} == pids, (
        "nothing restarted"
    )
    status = _dev("status", directory)
    assert status.returncode == 0, status.stdout
    assert "not running" not in status.stdout

    down = _dev("down", directory)
    assert down.returncode == 0, down.stderr
    for name, tracked in pids.items():
        assert tracked is not None
        assert start_time(tracked.pid) is None, f"{name} (pid {tracked.pid}) still runs"
        assert group_members(tracked.pid) == [], f"{name}'s process group still has members"
    assert not list(layout.run.glob("*.pid"))
    assert _dev("status", directory).returncode == 1


@pytest.mark.timeout(120)
def test_helm_installs_a_chart_into_the_bed(bed: BedInfo, namespace: str, tmp_path: Path) -> None:
    chart = tmp_path / "demo"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: demo\nversion: 0.1.0\n")
    (chart / "values.yaml").write_text("greeting: hello\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-cm\ndata:\n  greeting: {{ .Values.greeting }}\n"
    )
    bed.helm(
        "install",
        "demo",
        str(chart),
        "--namespace",
        namespace,
        "--set",
        "greeting=hi",
        "--wait",
        "--timeout",
        "60s",
    )
    cm = bed.rest().get(f"/api/v1/namespaces/{namespace}/configmaps/demo-cm")
    assert cm["data"] == {"greeting": "hi"}
    assert "demo" in bed.helm("list", "--namespace", namespace, "--short").stdout
    bed.helm("uninstall", "demo", "--namespace", namespace, "--wait")
