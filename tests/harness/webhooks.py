"""An operator serving the webhooks, and waiting until the API server really calls them.

A webhook configuration that exists is not yet one the API server uses: kube-apiserver
reads them through an informer, so for a moment after a write it still calls the old
endpoint or none. Tests that expect a refusal wait here first, probing with dry-run
requests (nothing is stored): an invalid budget must be refused with the webhook's own
message, and a pod asking for injection must come back mutated (or, from an operator
in ``--dry-run``, admitted unchanged with a warning saying it would have been).

The configurations are cluster-wide singletons: :func:`serving_operator` removes any left
by an earlier operator first, and its own afterwards, so one test's operator never
answers for another's.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from harness.controlplane import free_ports
from harness.operator_process import OperatorProcess
from harness.waiting import eventually
from token_budget.errors import EnforcementError, TargetNotFound
from token_budget.kube import CLUSTERTOKENBUDGETS, NAMESPACES, PODS, TOKENBUDGETS, Kube
from token_budget.webhooks.configuration import MUTATING, NAME, VALIDATING

A = "tokenbudget.io/"
_INVALID = {"apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
            "metadata": {"generateName": "webhook-probe-"},
            "spec": {"limits": [{"window": "1h", "tokens": 100}],
                     "actions": [{"type": "Block", "atPercent": 90},  # out of order: only
                                 {"type": "Warn", "atPercent": 50}]}}   # the webhook says so
_WARNING = re.compile(r'299 - "((?:[^"\\]|\\.)*)"')
INJECTED_POD: dict[str, Any] = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"generateName": "webhook-probe-",
                 "labels": {A + "agent": "true", A + "inject": "true"}},
    "spec": {"containers": [{"name": "a", "image": "example/agent:1"}]}}


def dry_create(kube: Kube, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """POST ``body`` with ``dryRun=All``: the object as admitted and the Warning headers."""
    method, url, headers, data, _ = kube.client.param_serialize(
        method="POST", resource_path=path, query_params=[("dryRun", "All")],
        header_params={"Accept": "application/json", "Content-Type": "application/json"},
        body=body, auth_settings=["BearerToken"])
    try:
        resp = kube.client.call_api(method, url, header_params=headers, body=data,
                                    _request_timeout=30)
        resp.read()  # type: ignore[no-untyped-call]
    except Exception as exc:  # noqa: BLE001 - the same errors as Kube.request raises
        raise EnforcementError(f"POST {path}: {exc}") from exc
    if resp.status >= 400:
        raise EnforcementError(f"POST {path}: {resp.status} {resp.data!r}")
    # Each warning is `299 - "text"` (RFC 7234), repeated headers possibly joined by ", ".
    headers = resp.getheaders()  # type: ignore[no-untyped-call]
    said = [m.replace('\\"', '"') for h in headers.getlist("Warning")
            for m in _WARNING.findall(h)]
    return json.loads(resp.data or b"{}"), said


def budgets_refused(kube: Kube, namespace: str) -> bool:
    try:
        kube.request("POST", TOKENBUDGETS.path(namespace), {"dryRun": "All"}, _INVALID)
    except EnforcementError as exc:
        # "admission webhook ... denied the request": our server answered. "failed calling
        # webhook" (connection refused, a stopped operator's port) is not an answer.
        assert "denied the request" in str(exc), str(exc)
        return True
    raise AssertionError("an invalid budget was accepted")


def pod_mutated(kube: Kube, namespace: str) -> bool:
    created = kube.request("POST", PODS.path(namespace), {"dryRun": "All"}, INJECTED_POD)
    volumes = [v.get("name") for v in created["spec"].get("volumes") or []]
    assert "tokenbudget-directive" in volumes, f"not mutated: volumes {volumes}"
    return True


def _pod_warned(kube: Kube, namespace: str) -> bool:
    created, warnings = dry_create(kube, PODS.path(namespace), INJECTED_POD)
    volumes = [v.get("name") for v in created["spec"].get("volumes") or []]
    assert "tokenbudget-directive" not in volumes, "mutated in dry-run"
    assert any("would set" in w and "spec.volumes" in w for w in warnings), warnings
    return True


def wait_in_effect(kube: Kube, namespace: str, timeout: float = 60.0,
                   dry_run: bool = False) -> None:
    """Both webhooks answer for ``namespace`` (which must not be an excluded one)."""
    eventually(lambda: budgets_refused(kube, namespace), timeout,
               what="the API server to call the budget webhook")
    probe = _pod_warned if dry_run else pod_mutated
    eventually(lambda: probe(kube, namespace), timeout,
               what="the API server to call the pod mutating webhook")


def remove_configurations(kube: Kube) -> None:
    for res in (VALIDATING, MUTATING):
        with contextlib.suppress(TargetNotFound):
            kube.request("DELETE", res.path(None, NAME))


def _exists(kube: Kube, res: Any) -> bool:
    try:
        kube.get(res, None, NAME)
        return True
    except TargetNotFound:
        return False


@contextlib.contextmanager
def serving_operator(kube: Kube, kubeconfig: Path, prometheus_url: str, workdir: Path,
                     identity: str, extra_args: Sequence[str] = (),
                     dry_run: bool = False) -> Iterator[OperatorProcess]:
    """An operator serving the webhooks on a loopback port, in effect when this yields."""
    [port] = free_ports(1)
    op = OperatorProcess(kubeconfig, prometheus_url, workdir, identity=identity,
                         extra_args=["--lease-name", f"wh-{uuid.uuid4().hex[:6]}",
                                     "--webhook-port", str(port),
                                     "--webhook-url", f"https://127.0.0.1:{port}",
                                     *(["--dry-run"] if dry_run else []), *extra_args])
    # Configurations left by an earlier test would point at a stopped operator: remove them
    # first, so that waiting for them to exist waits for this operator's own.
    remove_configurations(kube)
    op.start()
    try:
        def ours() -> bool:
            # Written by this operator: pointing at its port (not a leftover's).
            if not (_exists(kube, VALIDATING) and _exists(kube, MUTATING)):
                return False
            hooks = kube.get(VALIDATING, None, NAME)["webhooks"] + \
                kube.get(MUTATING, None, NAME)["webhooks"]
            return all(h["clientConfig"].get("url", "").startswith(f"https://127.0.0.1:{port}/")
                       for h in hooks)

        eventually(ours, 30, what="this operator's webhook configurations")
        # Written is not yet used: wait until the API server calls them (dry-run probes).
        probe = f"wh-probe-{uuid.uuid4().hex[:6]}"
        kube.create(NAMESPACES, None, {"apiVersion": "v1", "kind": "Namespace",
                                       "metadata": {"name": probe}})
        try:
            eventually(lambda: _has_service_account(kube, probe), 60,
                       what=f"the default ServiceAccount of {probe}")
            wait_in_effect(kube, probe, dry_run=dry_run)
        finally:
            kube.request("DELETE", NAMESPACES.path(None, probe))
        yield op
    finally:
        op.stop()
        remove_configurations(kube)


def _has_service_account(kube: Kube, namespace: str) -> bool:
    try:
        kube.request("GET", f"/api/v1/namespaces/{namespace}/serviceaccounts/default")
        return True
    except TargetNotFound:
        return False


def deny_frontier_in(kube: Kube, namespace: str) -> str:
    """Label ``namespace`` with a fresh ``environment`` and create a ClusterTokenBudget
    (named like it) that denies the Frontier tier there; its name (delete it after)."""
    env = f"qa-{uuid.uuid4().hex[:6]}"
    kube.patch(NAMESPACES, None, namespace, {"metadata": {"labels": {"environment": env}}})
    kube.create(CLUSTERTOKENBUDGETS, None, {
        "apiVersion": "tokenbudget.io/v1alpha1", "kind": "ClusterTokenBudget",
        "metadata": {"name": env},
        "spec": {"namespaceSelector": {"matchLabels": {"environment": env}},
                 "deniedTiers": ["Frontier"], "limits": [{"window": "Month", "cost": "300"}]}})
    return env


def admission_process(op: OperatorProcess) -> int | None:
    """The pid of the operator's admission process (token_budget.webhooks.process), if any."""
    if op.proc is None:
        return None
    for task in Path(f"/proc/{op.proc.pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    if b"token_budget.webhooks import process" in \
                            Path(f"/proc/{child}/cmdline").read_bytes():
                        return int(child)
    return None
