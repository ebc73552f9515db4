"""Fixtures for the real test bed: etcd, kube-apiserver, kube-controller-manager, MinIO and the
node agent (kubedream_operator.devbed), started once per session in a temporary folder.

    bed        session: a running bed (devbed.bed.BedInfo): .kubeconfig, .env, .api_client(),
               .rest(), .s3_client(), .s3_endpoint/.s3_access_key/.s3_secret_key/.s3_region,
               .binaries (.helm, .kube_apiserver, ...), .helm(*args), .pod_log(ns, pod),
               .component_log(name), .dir, .node_name
    namespace  function: a fresh namespace (its `default` ServiceAccount exists), deleted after
    wait_for   poll a condition with a deadline (import it: `from tests.plugins.bed import wait_for`)

Tests that use the bed must be marked `@pytest.mark.testbed`. Missing binaries are built after
collection (scripts/build-testbed.sh; long the first time, then cached), outside any test's
timeout. KUBEDREAM_SKIP_TESTBED=1 builds and starts nothing: those tests skip. A failing test
that used the bed gets the tail of every component's log, and of its namespace's pod logs, in
its report.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Generator, Iterator
from typing import TypeVar

import pytest
from kubernetes.client.exceptions import ApiException

from kubedream_operator.devbed.bed import Bed, BedInfo, tail
from kubedream_operator.devbed.build import Binaries, BuildError, ensure_binaries
from kubedream_operator.devbed.layout import COMPONENTS

SKIP_ENV = "KUBEDREAM_SKIP_TESTBED"
BED_FIXTURES = {"bed", "namespace"}
LOG_TAIL_LINES = 30

T = TypeVar("T")
_namespace_key = pytest.StashKey[str]()
_binaries_key = pytest.StashKey[Binaries | BuildError]()
_started_key = pytest.StashKey[BedInfo]()
_startup_key = pytest.StashKey[list[str]]()


def wait_for(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """Call `check` until it returns something truthy, and return that; fail the test after
    `timeout` seconds, saying `what` was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _skipped() -> bool:
    return os.environ.get(SKIP_ENV) == "1"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Check the markers, then build missing binaries before any test (and its timeout) runs."""
    unmarked = [
        item.nodeid
        for item in session.items
        if BED_FIXTURES & set(getattr(item, "fixturenames", ()))
        and not item.get_closest_marker("testbed")
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests using the test bed must be marked @pytest.mark.testbed: " + ", ".join(unmarked)
        )
    if _skipped() or not any(item.get_closest_marker("testbed") for item in session.items):
        return
    capture = session.config.pluginmanager.getplugin("capturemanager")
    try:
        if capture is not None:
            with capture.global_and_fixture_disabled():
                session.stash[_binaries_key] = ensure_binaries()
        else:
            session.stash[_binaries_key] = ensure_binaries()
    except BuildError as exc:
        session.stash[_binaries_key] = exc


@pytest.fixture(scope="session")
def bed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BedInfo]:
    """The running test bed, shared by the whole session."""
    if _skipped():
        pytest.skip(
            f"{SKIP_ENV}=1: the test bed (etcd, kube-apiserver, MinIO) is not built or started"
        )
    built = request.session.stash.get(_binaries_key, None)
    if isinstance(built, BuildError):
        pytest.fail(f"the test bed's binaries could not be built: {built}")
    binaries = built if built is not None else ensure_binaries()
    lines: list[str] = []
    request.session.stash[_startup_key] = lines
    running = Bed(tmp_path_factory.mktemp("bed"), out=lines.append)
    try:
        info = running.up(binaries)
    except BaseException:
        running.down()
        raise
    request.session.stash[_started_key] = info
    yield info
    running.down()


@pytest.fixture
def namespace(bed: BedInfo, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted (with everything in it) afterwards."""
    rest = bed.rest()
    label = re.sub(r"[^a-z0-9.-]+", "-", request.node.name.lower())[:63].strip("-.")
    created = rest.post(
        "/api/v1/namespaces",
        {"metadata": {"generateName": "t-", "labels": {"kubedream.dev/test": label or "test"}}},
    )
    name: str = created["metadata"]["name"]
    request.node.stash[_namespace_key] = name

    def default_account() -> bool:
        try:
            rest.get(f"/api/v1/namespaces/{name}/serviceaccounts/default")
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    wait_for(default_account, 30, f"the default ServiceAccount of namespace {name}")
    yield name
    try:
        rest.delete(f"/api/v1/namespaces/{name}")
    except ApiException as exc:
        if exc.status != 404:
            raise
    finally:
        rest.api.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the tail of each component's log (and of the test's pod logs) to a failure."""
    report = yield
    info = item.session.stash.get(_started_key, None)
    if report.failed and info is not None and BED_FIXTURES & set(getattr(item, "fixturenames", ())):
        report.sections.append(
            ("test bed: startup", "\n".join(item.session.stash.get(_startup_key, [])))
        )
        for component in COMPONENTS:
            text = tail(info.component_log(component), LOG_TAIL_LINES)
            report.sections.append(
                (f"test bed: {component} (last {LOG_TAIL_LINES} lines)", text or "(empty)")
            )
        namespace = item.stash.get(_namespace_key, None)
        if namespace is not None:
            for log in sorted(info.layout.pods.glob(f"{namespace}/*/log")):
                text = tail(log, LOG_TAIL_LINES)
                report.sections.append(
                    (f"test bed: pod {namespace}/{log.parent.name}", text or "(empty)")
                )
    return report
