"""Webhook certificates rotating under load, and ModelCatalog status (issue 13).

Both against the real kube-apiserver calling one operator over TLS (module-scoped:
the rotation test is the long one, ~5 minutes):

- a valid ModelCatalog is Ready with its model count; one that breaks a rule is
  not Ready, with reason InvalidSpec and the rule it breaks;
- with a 2-minute serving certificate and a 5-minute CA, the operator renews the
  certificate at least 3 times and rotates the CA (both CAs in ``caBundle``
  while the serving certificate switches, the old one dropped when it expires)
  while admission requests run without pause: every one is answered as it
  should be (0 failures).
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from harness import webhooks
from harness.controlplane import ControlPlane
from harness.operator_process import OperatorProcess
from harness.prometheus import Prometheus
from harness.waiting import eventually
from token_budget.errors import EnforcementError, TargetNotFound
from token_budget.kube import MODELCATALOGS, TOKENBUDGETS, Kube
from token_budget.webhooks.certificates import SECRETS
from token_budget.webhooks.configuration import NAME, VALIDATING

REPO = Path(__file__).resolve().parents[2]
BROKEN = REPO / "tests" / "broken"
VALID_BUDGET = {"apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
                "metadata": {"generateName": "rotation-"},
                "spec": {"limits": [{"window": "1h", "tokens": 100}]}}


def _status(kube: Kube, name: str) -> dict[str, Any]:
    return dict(kube.get(MODELCATALOGS, None, name).get("status") or {})


def _ready(status: dict[str, Any]) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), None)


@pytest.fixture(scope="module")
def invalid_catalog(kube: Kube) -> Iterator[str]:
    """A catalog that breaks a rule (an equivalent dearer than its model), created while no
    webhook would refuse it."""
    webhooks.remove_configurations(kube)
    body = yaml.safe_load((BROKEN / "catalog-equivalent-more-expensive.yaml").read_text())
    body["metadata"]["name"] = f"upside-down-{uuid.uuid4().hex[:6]}"
    kube.create(MODELCATALOGS, None, body)
    try:
        yield body["metadata"]["name"]
    finally:
        try:
            kube.request("DELETE", MODELCATALOGS.path(None, body["metadata"]["name"]))
        except TargetNotFound:
            pass


@pytest.fixture(scope="module")
def rotating(kube: Kube, controlplane: ControlPlane, prometheus: Prometheus,
             tmp_path_factory: pytest.TempPathFactory, invalid_catalog: str
             ) -> Iterator[tuple[OperatorProcess, str]]:
    """An operator with a 2-minute certificate and a 5-minute CA in a Secret of its own."""
    secret = f"rotation-{uuid.uuid4().hex[:6]}"
    with webhooks.serving_operator(
            kube, controlplane.kubeconfig, prometheus.url,
            tmp_path_factory.mktemp("rotating-operator"), identity="rotating",
            extra_args=["--webhook-secret", secret, "--webhook-certificate-seconds", "120",
                        "--webhook-ca-seconds", "300"]) as op:
        try:
            yield op, secret
        finally:
            try:
                kube.request("DELETE", SECRETS.path("default", secret))
            except TargetNotFound:
                pass


def _fingerprints(pem: bytes) -> list[str]:
    return [c.fingerprint(hashes.SHA256()).hex()[:12]
            for c in x509.load_pem_x509_certificates(pem)]


def test_catalogs_are_ready_with_a_model_count_or_say_why_not(
        kube: Kube, rotating: tuple[OperatorProcess, str], invalid_catalog: str) -> None:
    example = yaml.safe_load((REPO / "examples" / "model-catalog.yaml").read_text())
    name = example["metadata"]["name"]
    eventually(lambda: (_ready(_status(kube, name)) or {}).get("status") == "True", 30,
               what="the example catalog Ready")
    assert _status(kube, name)["models"] == len(example["spec"]["models"])
    eventually(lambda: _ready(_status(kube, invalid_catalog)) is not None, 30,
               what="the invalid catalog's status")
    ready = _ready(_status(kube, invalid_catalog))
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "spec.models[0].equivalents[0]: must be cheaper than house-small" in ready["message"]
    assert _status(kube, invalid_catalog)["models"] == 2
    kube.request("DELETE", MODELCATALOGS.path(None, invalid_catalog))  # done with it


def test_certificates_rotate_under_continuous_admission_with_no_failure(
        kube: Kube, rotating: tuple[OperatorProcess, str], namespace: str) -> None:
    """Until 3 serving renewals, a CA rotation with its overlap and the old CA's expiry."""
    op, secret = rotating
    started = time.monotonic()
    served: list[str] = []  # serving certificate fingerprints, in order
    cas: list[str] = []
    bundles: list[tuple[str, ...]] = []  # the caBundle as the API server was told it
    sent = failed = 0
    failures: list[str] = []
    next_look = 0.0

    def look() -> None:
        data = kube.get(SECRETS, "default", secret)["data"]
        tls = _fingerprints(base64.b64decode(data["tls.crt"]))[0]
        ca = _fingerprints(base64.b64decode(data["ca.crt"]))[0]
        hook = kube.get(VALIDATING, None, NAME)["webhooks"][0]
        bundle = tuple(_fingerprints(base64.b64decode(hook["clientConfig"]["caBundle"])))
        for seen, new in ((served, tls), (cas, ca)):
            if not seen or seen[-1] != new:
                seen.append(new)
        if not bundles or bundles[-1] != bundle:
            bundles.append(bundle)

    def done() -> bool:
        # The old CA dropped: the bundle went from two CAs back to one, a new one.
        overlap = any(len(b) == 2 for b in bundles)
        return len(served) >= 4 and len(cas) >= 2 and overlap and len(bundles[-1]) == 1

    while not done():
        assert time.monotonic() - started < 420, \
            f"rotations incomplete: served={served} cas={cas} bundles={bundles}\n{op.tail()}"
        for attempt in (_admit_budget, _admit_pod, _refuse_budget):
            sent += 1
            try:
                attempt(kube, namespace)
            except (EnforcementError, AssertionError) as exc:
                failed += 1
                failures.append(f"{time.monotonic() - started:.1f}s {attempt.__name__}: {exc}")
        if time.monotonic() >= next_look:
            look()
            next_look = time.monotonic() + 2
    took = time.monotonic() - started
    print(f"\nrotation: {len(served) - 1} serving renewals, {len(cas) - 1} CA rotation(s), "
          f"caBundle states {[len(b) for b in bundles]}, {sent} admissions, {failed} failed, "
          f"{took:.0f} s")
    assert failed == 0, "\n".join(failures[:20])
    # The switch came after the new CA was trusted: a bundle of 2 came before the new CA
    # signed anything the API server saw, and the first bundle's CA was the first CA.
    assert bundles[0] == (cas[0],) and (cas[1], cas[0]) in bundles
    assert "webhook certificate reloaded" in op.log.read_text()


def _admit_budget(kube: Kube, namespace: str) -> None:
    kube.request("POST", TOKENBUDGETS.path(namespace), {"dryRun": "All"}, VALID_BUDGET)


def _refuse_budget(kube: Kube, namespace: str) -> None:
    webhooks.budgets_refused(kube, namespace)


def _admit_pod(kube: Kube, namespace: str) -> None:
    # Pods fail open: a webhook that could not be called shows only as a pod not mutated.
    webhooks.pod_mutated(kube, namespace)
