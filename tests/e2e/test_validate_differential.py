"""``tokenbudget validate`` and the cluster give every manifest of a corpus the same verdict.

Covers (issue 14): each case of :mod:`harness.corpus` (at least 100 bad and 30
good manifests, one per schema rule, metadata rule, kind lookup and webhook
rule) goes through ``tokenbudget validate -o json`` (one process for the whole
corpus, with the cluster's ModelCatalogs as ``--catalog``) and through a
server-side dry-run create (``dryRun=All``, ``fieldValidation=Strict``, what
``kubectl apply --dry-run=server`` sends) on the real API server with the
operator's validating webhooks in effect; any case where one accepts and the
other refuses fails the test, with both answers. The kind lookup is kubectl's:
an ``apiVersion``/``kind`` that discovery does not serve is refused before any
request, as "no matches for kind".

Cost, kept small for CI: one operator process, one ``tokenbudget`` process, the
dry-runs sent 8 at a time; no Prometheus (the webhooks never ask it). The wall
time of each part is printed (``-s`` shows it) and the whole is bounded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import corpus, webhooks
from harness.controlplane import ControlPlane
from harness.operator_process import REPO_ROOT, OperatorProcess
from token_budget.errors import EnforcementError, TargetNotFound
from token_budget.kube import MODELCATALOGS, Kube

# Nothing listens here: the webhooks never read spend, and no budget of this test is stored.
NO_PROMETHEUS = "http://127.0.0.1:9"
PARALLEL = 8
WALL_TIME_BUDGET = 120.0  # seconds for the operator's start, the offline run and the dry-runs


@pytest.fixture(scope="module")
def operator(kube: Kube, controlplane: ControlPlane,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    with webhooks.serving_operator(kube, controlplane.kubeconfig, NO_PROMETHEUS,
                                   tmp_path_factory.mktemp("differential-operator"),
                                   identity="differential") as op:
        yield op


class _Discovery:
    """kubectl's kind lookup: which (apiVersion, kind) the API server serves, and where."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self.served: dict[str, dict[str, dict[str, Any]]] = {}

    def resource(self, api_version: Any, kind: Any) -> dict[str, Any] | None:
        if not isinstance(api_version, str) or not isinstance(kind, str):
            return None
        if api_version not in self.served:
            path = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
            try:
                found = self.kube.request("GET", path)["resources"]
            except TargetNotFound:
                found = []
            self.served[api_version] = {r["kind"]: r for r in found if "/" not in r["name"]}
        return self.served[api_version].get(kind)


def _cluster_verdict(kube: Kube, discovery: _Discovery, namespace: str,
                     body: dict[str, Any]) -> str | None:
    """None when a server-side dry-run create passes, else why it was refused."""
    res = discovery.resource(body.get("apiVersion"), body.get("kind"))
    if res is None:
        return f"kubectl: no matches for kind {body.get('kind')!r} in {body.get('apiVersion')!r}"
    api_version = body["apiVersion"]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{res['name']}" if res["namespaced"] \
        else f"{base}/{res['name']}"
    try:
        kube.request("POST", path, {"dryRun": "All", "fieldValidation": "Strict"}, body)
    except EnforcementError as exc:
        text = str(exc)
        # Not a verdict but a broken setup: the webhook unreachable, the server failing.
        assert "failed calling webhook" not in text, text
        assert getattr(exc, "status", 400) < 500, text
        return text
    return None


def test_validate_and_the_cluster_agree_on_every_manifest_of_the_corpus(
        kube: Kube, operator: OperatorProcess, namespace: str, tmp_path: Path) -> None:
    started = time.monotonic()
    written = corpus.write(tmp_path / "corpus")
    catalogs = [{"apiVersion": corpus.API, "kind": "ModelCatalog", **c}
                for c in kube.list(MODELCATALOGS)]
    context = tmp_path / "cluster-catalogs.yaml"
    context.write_text(yaml.safe_dump_all(catalogs))

    t0 = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "token_budget", "validate", "-o", "json",
         "--catalog", str(context), str(tmp_path / "corpus")],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
        env={"PYTHONPATH": str(REPO_ROOT / "operator"), "PATH": "/usr/bin:/bin"})
    offline_seconds = time.monotonic() - t0
    report = json.loads(run.stdout)
    assert report["errors"] == [], report["errors"]
    offline = {Path(i["file"]).name: i["problems"] for i in report["invalid"]}

    t0 = time.monotonic()
    discovery = _Discovery(kube)
    with ThreadPoolExecutor(PARALLEL) as pool:
        answers = dict(zip(written, pool.map(
            lambda p: _cluster_verdict(kube, discovery, namespace, written[p].body), written),
            strict=True))
    cluster_seconds = time.monotonic() - t0
    total = time.monotonic() - started

    bad = sum(not c.valid for c in written.values())
    print(f"\ndifferential corpus: {bad} bad + {len(written) - bad} good manifests; "
          f"tokenbudget validate {offline_seconds:.1f} s, {len(written)} dry-runs "
          f"{cluster_seconds:.1f} s, test body {total:.1f} s")
    disagreements = []
    for path, case in written.items():
        refused_offline = offline.get(path.name)
        refused_cluster = answers[path]
        if bool(refused_offline) != bool(refused_cluster):
            disagreements.append(
                f"{case.id} ({path.name}): validate {refused_offline or 'accepts'}; "
                f"cluster {refused_cluster or 'accepts'}")
    assert not disagreements, f"{len(disagreements)} disagreement(s):\n" + \
        "\n".join(disagreements)
    # The corpus's own expectations hold too (the unit test checks them offline).
    assert all(case.valid == (answers[p] is None) for p, case in written.items())
    assert total < WALL_TIME_BUDGET
