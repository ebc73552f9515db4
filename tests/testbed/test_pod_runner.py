"""The node agent's pod state machine with real local processes but no API server: init
containers in order, SIGKILL after the grace period, pods the agent cannot run."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest

from kubedream_operator.devbed.pod_runner import PodRun, RunContext
from kubedream_operator.devbed.podspec import Lookups, Obj
from kubedream_operator.devbed.procs import start_time


def _ctx(tmp_path: Path) -> RunContext:
    return RunContext(
        pods=tmp_path / "pods",
        claims=tmp_path / "claims",
        lookups=Lookups(
            config_map=lambda ns, n: None, secret=lambda ns, n: None, token=lambda *a: "t"
        ),
        base_env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"},
        allocatable={"cpu": "2"},
    )


def _pod(containers: list[Obj], init: list[Obj] | None = None, **spec: object) -> Obj:
    return {
        "metadata": {"name": "p", "namespace": "ns", "uid": "uid-1"},
        "spec": {
            "restartPolicy": "Never",
            "containers": containers,
            "initContainers": init or [],
            **spec,
        },
    }


def _drive(run: PodRun, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not run.finished:
        assert time.monotonic() < deadline, f"pod still {run.phase} after {timeout}s"
        run.tick()
        time.sleep(0.05)


@pytest.mark.timeout(30)
def test_init_containers_run_first_and_in_order(tmp_path: Path) -> None:
    def say(name: str, text: str) -> Obj:
        return {"name": name, "command": ["python", "-c", f"print({text!r})"]}

    run = PodRun(
        _pod([say("main", "main")], init=[say("one", "init 1"), say("two", "init 2")]),
        _ctx(tmp_path),
    )
    _drive(run, 20)
    status = run.status()
    assert status["phase"] == "Succeeded"
    assert (tmp_path / "pods" / "ns" / "p" / "log").read_text() == "init 1\ninit 2\nmain\n"
    assert [s["state"]["terminated"]["reason"] for s in status["initContainerStatuses"]] == [
        "Completed"
    ] * 2
    assert status["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["Initialized"] == "True"
    assert conditions["Ready"] == "False"


@pytest.mark.timeout(30)
def test_a_process_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(600)
        """
    )
    run = PodRun(_pod([{"name": "main", "command": ["python", "-c", script]}]), _ctx(tmp_path))
    log = tmp_path / "pods" / "ns" / "p" / "log"
    deadline = time.monotonic() + 20
    while not (log.is_file() and "ready" in log.read_text()):
        assert time.monotonic() < deadline
        run.tick()
        time.sleep(0.05)
    assert run.status()["phase"] == "Running"
    assert run.tracked is not None
    pid = run.tracked.pid
    stopped_at = time.monotonic()
    run.stop(1.0, "test")
    _drive(run, 10)
    assert time.monotonic() - stopped_at >= 1.0, "SIGTERM was ignored: only SIGKILL ends it"
    terminated = run.status()["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 137
    assert run.status()["phase"] == "Failed"
    assert start_time(pid) is None


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("container", "reason"),
    [
        ({"name": "main", "image": "busybox"}, "UnsupportedByNodeAgent"),
        ({"name": "main", "command": ["/no/such/program"]}, "StartError"),
    ],
)
def test_pods_the_agent_cannot_run_fail_with_a_reason(
    tmp_path: Path, container: Obj, reason: str
) -> None:
    run = PodRun(_pod([container]), _ctx(tmp_path))
    _drive(run, 5)
    status = run.status()
    assert status["phase"] == "Failed"
    assert status["containerStatuses"][0]["state"]["terminated"]["reason"] == reason


@pytest.mark.timeout(30)
def test_a_failed_container_falls_back_to_its_log_for_the_termination_message(
    tmp_path: Path,
) -> None:
    def failing(policy: str | None) -> Obj:
        script = "for i in range(100): print(f'line {i}')\nraise SystemExit(3)"
        container: Obj = {"name": "main", "command": ["python", "-c", script]}
        if policy:
            container["terminationMessagePolicy"] = policy
        return container

    messages = []
    for folder, policy in (("fallback", "FallbackToLogsOnError"), ("file", None)):
        run = PodRun(_pod([failing(policy)]), _ctx(tmp_path / folder))
        _drive(run, 20)
        terminated = run.status()["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == 3
        messages.append(terminated.get("message"))
    fallback, file_policy = messages
    # The kubelet's limit: the last 80 lines.
    assert fallback == "".join(f"line {i}\n" for i in range(20, 100))
    assert file_policy is None
