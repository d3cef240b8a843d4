"""The admission webhooks' answers, as the API server receives them, without a cluster.

Covers:
- every scenario below (a governed pod in an Ok, Blocked or excepted scope; a
  denied model; a PerNamespace ClusterTokenBudget; a DryRun budget; a pod the
  selector does not pick; an owner's directive; the opt-in volume; annotations
  and labels already present; workloads' pod templates; budget validation; a
  DELETE that is not mutated) answers with the expected verdict,
  message and code, and its JSON patch turns the pod into the expected one;
- a new pod costs one webhook: mutate-pods denies (Blocked, a model not
  allowed) or stamps, and no validating pod webhook exists to be called;
- memoised answers follow budget events, namespace labels and an exception's end;
- TokenBudgets of other namespaces are never consulted; a deleted budget is gone;
- malformed reviews (400), unknown resources (404), a handler's error (500);
- :class:`admission.Server` over real TLS on loopback: answers, 404, 400, and
  a renewed certificate served on new connections; a half-written pair keeps
  the old certificate serving;
- the operator's global dry-run: every scenario's pod and workload answers
  allow and patch nothing, with warnings saying what would have happened;
  budgets are still validated.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime as dt
import http.client
import json
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonpatch  # type: ignore[import-untyped]  # kopf's dependency: applies the patches
import pytest
from builders import CATALOG_BODY

from harness.controlplane import free_ports
from token_budget.webhooks import admission, certificates

NOW = dt.datetime(2025, 11, 20, 12, 0, tzinfo=dt.UTC)
STAMP = "2025-11-20T12:00:00Z"
NS = "team-search"
QA = "qa-1"
A = "tokenbudget.io/"
AGENT = {A + "agent": "true"}
GROUP, VERSION = "tokenbudget.io", "v1alpha1"
RESOURCES = {"Pod": ("", "v1", "pods"), "Deployment": ("apps", "v1", "deployments"),
             "CronJob": ("batch", "v1", "cronjobs"), "Job": ("batch", "v1", "jobs"),
             "TokenBudget": (GROUP, VERSION, "tokenbudgets")}


def budget(name: str = "search", namespace: str = NS, state: str | None = None,
           **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "TokenBudget",
        "metadata": {"name": name, "namespace": namespace, "generation": 1},
        "spec": {"limits": [{"window": "24h", "tokens": 1000}], **spec}}
    if state is not None:
        body["status"] = {"state": state, "reason": f"Budget{state}",
                          "message": "1200 of 1000 tokens in 24h",
                          "windows": [{"window": "24h", "resetTime": "2025-11-21T00:00:00Z"}]}
    return body


def cluster_budget(blocked_in: str | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ClusterTokenBudget",
        "metadata": {"name": "qa", "generation": 1},
        "spec": {"namespaceSelector": {"matchLabels": {"environment": "qa"}},
                 "limitScope": "PerNamespace",
                 "limits": [{"window": "24h", "tokens": 1000}], **spec}}
    if blocked_in:
        body["status"] = {"state": "Ok", "namespaces": [
            {"namespace": blocked_in, "state": "Blocked"}]}
    return body


def pod(namespace: str = NS, labels: Mapping[str, str] | None = None,
        models: tuple[str, ...] = ("medium",), annotations: Mapping[str, str] | None = None,
        owner: tuple[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "agent-0", "namespace": namespace,
                            "labels": dict(AGENT if labels is None else labels)}
    if annotations is not None:
        meta["annotations"] = dict(annotations)
    if owner is not None:
        meta["ownerReferences"] = [{"kind": owner[0], "name": owner[1]}]
    env = [{"name": "LLM_MODEL", "value": m} for m in models]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"containers": [{"name": "agent", "image": "agent:1", "env": env}],
                     **spec}}


def deployment(kind: str = "Deployment", models: tuple[str, ...] = ("large",)
               ) -> dict[str, Any]:
    template = {k: v for k, v in pod(models=models).items() if k in ("metadata", "spec")}
    spec: dict[str, Any] = {"template": template}
    if kind == "CronJob":
        spec = {"schedule": "@hourly", "jobTemplate": {"spec": {"template": template}}}
    return {"apiVersion": "apps/v1" if kind == "Deployment" else "batch/v1", "kind": kind,
            "metadata": {"name": "agent", "namespace": NS, "labels": dict(AGENT)},
            "spec": spec}


def review(obj: Mapping[str, Any], operation: str = "CREATE") -> dict[str, Any]:
    group, version, plural = RESOURCES[str(obj["kind"])]
    gvr = {"group": group, "version": version, "resource": plural}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "uid-1", "kind": {"group": group, "version": version,
                                                 "kind": obj["kind"]},
                        "resource": gvr, "requestKind": gvr, "requestResource": gvr,
                        "name": obj["metadata"]["name"],
                        "namespace": obj["metadata"].get("namespace"),
                        "operation": operation, "userInfo": {"username": "alice"},
                        "object": None if operation == "DELETE" else obj,
                        "oldObject": obj if operation != "CREATE" else None,
                        "dryRun": False}}


@dataclass(frozen=True)
class Scenario:
    webhook: str
    obj: dict[str, Any]
    budgets: tuple[dict[str, Any], ...] = (budget(),)
    owners: tuple[dict[str, Any], ...] = ()
    operation: str = "CREATE"
    # expected
    allowed: bool = True
    code: int | None = None
    message: str = ""
    annotations: dict[str, str] = field(default_factory=dict)  # added by the patch
    labels: dict[str, str] = field(default_factory=dict)
    mounted: bool = False  # the directive volume and mounts added


OK_DIRECTIVE = {A + "state": "Ok", A + "budget": "TokenBudget/team-search/search",
                A + "reason": "WithinBudget", A + "updated-at": STAMP}
ENFORCED = {A + "enforced": "true"}
DENY_LARGE = budget(deniedModels=["large"])
LARGE_DENIED = ("model large is not allowed by TokenBudget team-search/search "
                "(deniedModels: large); allowed: medium, tiny")
BLOCKED = ("TokenBudget team-search/search is Blocked in namespace team-search: "
           "1200 of 1000 tokens in 24h; the window resets at 2025-11-21T00:00:00Z")
SOON = (NOW + dt.timedelta(hours=1)).isoformat()
# Admitted by the exception, stamped with the budget's status as written (the evaluation
# writes the state the exception caps it to; this status is a fixture's).
EXCEPTED_DIRECTIVE = {**OK_DIRECTIVE, A + "state": "Blocked", A + "reason": "BudgetBlocked"}

SCENARIOS = {
    "a governed pod within budget is stamped Ok and labelled enforced": Scenario(
        "mutate-pods", pod(), annotations=OK_DIRECTIVE, labels=ENFORCED),
    "a pod declaring a denied model is refused with the rule and the allowed models":
        Scenario("mutate-pods", pod(models=("large",)), (DENY_LARGE,), allowed=False,
                 code=403, message=f"pod denied: {LARGE_DENIED}"),
    "a pod declaring an alias of a denied model is refused": Scenario(
        "mutate-pods", pod(models=("vendor/large-2",)), (DENY_LARGE,), allowed=False,
        code=403, message="pod denied: model vendor/large-2 is not allowed by TokenBudget "
                          "team-search/search (deniedModels: large); allowed: medium, tiny"),
    "the stamp of a restricted budget lists the allowed models": Scenario(
        "mutate-pods", pod(), (DENY_LARGE,),
        annotations={**OK_DIRECTIVE, A + "allowed-models": "medium,tiny"}, labels=ENFORCED),
    "a pod in a Blocked scope is refused with the budget and the reset, not stamped": Scenario(
        "mutate-pods", pod(), (budget(state="Blocked"),), allowed=False, code=403,
        message=f"pod denied: {BLOCKED}"),
    "an exception that caps the ladder below Block lets the pod in": Scenario(
        "mutate-pods", pod(), (budget(state="Blocked", exceptions=[
            {"until": SOON, "reason": "launch", "maxAction": "Warn"}]),),
        annotations=EXCEPTED_DIRECTIVE, labels=ENFORCED),
    "a DryRun budget refuses and stamps nothing": Scenario(
        "mutate-pods", pod(), (budget(state="Blocked", mode="DryRun"),)),
    "a pod its budget's selector does not pick is left alone": Scenario(
        "mutate-pods", pod(labels={A + "agent": "other"}), (budget(state="Blocked"),)),
    "a budget of another namespace does not govern the pod": Scenario(
        "mutate-pods", pod(), (budget(namespace="elsewhere", state="Blocked"),)),
    "a PerNamespace cluster budget refuses in its Blocked namespace": Scenario(
        "mutate-pods", pod(namespace=QA), (cluster_budget(blocked_in=QA),),
        allowed=False, code=403,
        message="pod denied: ClusterTokenBudget qa is Blocked in namespace qa-1; "
                "spend falls as the rolling window moves on"),
    "a PerNamespace cluster budget allows in a namespace it does not pick": Scenario(
        "mutate-pods", pod(), (cluster_budget(blocked_in=NS),)),
    "a pod of a Deployment takes its owner's directive": Scenario(
        "mutate-pods", pod(owner=("ReplicaSet", "agent-5d4f8"),
                           labels={**AGENT, "pod-template-hash": "5d4f8"}),
        owners=({"kind": "Deployment", "metadata": {
            "name": "agent", "namespace": NS, "annotations": {
                A + "state": "Rerouted", A + "use-model": "tiny", "unrelated": "x"}}},),
        annotations={A + "state": "Rerouted", A + "use-model": "tiny",
                     A + "updated-at": STAMP}, labels=ENFORCED),
    "the opt-in label mounts the directive file in every container": Scenario(
        "mutate-pods", pod(labels={**AGENT, A + "inject": "true"},
                           volumes=[{"name": "data", "emptyDir": {}}]),
        annotations=OK_DIRECTIVE, labels=ENFORCED, mounted=True),
    "the opt-in label on an ungoverned pod still mounts the file": Scenario(
        "mutate-pods", pod(labels={**AGENT, A + "inject": "true"}), (),
        mounted=True),
    "annotations already there are kept and the directive added": Scenario(
        "mutate-pods", pod(annotations={"team": "search", A + "state": "Ok"}),
        annotations=OK_DIRECTIVE, labels=ENFORCED),
    "a Deployment whose pod template declares a denied model is refused": Scenario(
        "validate-deployments", deployment(), (DENY_LARGE,), allowed=False, code=403,
        message=f"Deployment pod template denied: {LARGE_DENIED}"),
    "a CronJob whose pod template declares a denied model is refused": Scenario(
        "validate-cronjobs", deployment("CronJob"), (DENY_LARGE,), allowed=False, code=403,
        message=f"CronJob pod template denied: {LARGE_DENIED}"),
    "a valid budget is admitted": Scenario("validate-budgets", budget("new"), ()),
    "a budget with a ladder out of order is refused with the field": Scenario(
        "validate-budgets", budget("new", actions=[{"atPercent": 90, "type": "Warn"},
                                                   {"atPercent": 80, "type": "Block"}]), (),
        allowed=False, code=422,
        message="spec.actions[1].atPercent: must be greater than 90 (actions[0]): "
                "list the ladder in ascending order"),
    "a DELETE is not mutated": Scenario("mutate-pods", pod(), operation="DELETE"),
    "an UPDATE sent to the pod webhook is judged like a CREATE": Scenario(
        "mutate-pods", pod(), (budget(state="Blocked"),), operation="UPDATE",
        allowed=False, code=403, message=f"pod denied: {BLOCKED}"),
}


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[admission.AdmissionCache]:
    cache = admission.AdmissionCache()
    monkeypatch.setattr(admission, "cache", cache)
    monkeypatch.setattr(admission, "_now", lambda: NOW)
    cache.budget_event(copy.deepcopy(CATALOG_BODY), deleted=False)
    cache.namespaces.update({NS: {"environment": "production"}, QA: {"environment": "qa"}})
    yield cache


def _load(cache: admission.AdmissionCache, s: Scenario) -> None:
    for b in s.budgets:
        cache.budget_event(copy.deepcopy(b), deleted=False)
    for o in s.owners:
        cache.workload_event(copy.deepcopy(o), deleted=False)


def _patched(obj: Mapping[str, Any], response: Mapping[str, Any]) -> dict[str, Any]:
    if "patch" not in response:
        return copy.deepcopy(dict(obj))
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    return dict(jsonpatch.apply_patch(copy.deepcopy(dict(obj)), ops))


def _expected(s: Scenario) -> dict[str, Any]:
    out = copy.deepcopy(s.obj)
    meta = out["metadata"]
    if s.annotations:
        meta["annotations"] = {**meta.get("annotations", {}), **s.annotations}
    if s.labels:
        meta["labels"] = {**meta.get("labels", {}), **s.labels}
    if s.mounted:
        spec = out["spec"]
        spec["volumes"] = [*spec.get("volumes", []), {
            "name": admission.VOLUME, "downwardAPI": {"items": [
                {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}}]}}]
        for c in spec["containers"]:
            c["volumeMounts"] = [*c.get("volumeMounts", []), {
                "name": admission.VOLUME, "mountPath": admission.MOUNT_PATH, "readOnly": True}]
    return out


@pytest.mark.parametrize("s", list(SCENARIOS.values()), ids=list(SCENARIOS))
def test_each_scenario_gets_the_expected_answer(fresh_cache: admission.AdmissionCache,
                                                s: Scenario) -> None:
    _load(fresh_cache, s)
    answer = admission.respond(s.webhook, review(s.obj, s.operation))
    response = answer["response"]
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    assert response["uid"] == "uid-1"
    assert response["allowed"] is s.allowed
    if s.allowed:
        assert "status" not in response
    else:
        assert response["status"] == {"message": s.message, "code": s.code}
    assert _patched(s.obj, response) == _expected(s)


def test_values_already_in_place_are_not_patched_again(
        fresh_cache: admission.AdmissionCache) -> None:
    obj = pod(annotations={k: v for k, v in OK_DIRECTIVE.items()}, labels={**AGENT, **ENFORCED})
    response = admission.respond("mutate-pods", review(obj))["response"]
    assert "patch" not in response


def _allowed(webhook: str, obj: Mapping[str, Any]) -> bool:
    return bool(admission.respond(webhook, review(obj))["response"]["allowed"])


def test_a_memoised_answer_follows_a_budget_becoming_blocked_and_deleted(
        fresh_cache: admission.AdmissionCache) -> None:
    fresh_cache.budget_event(budget(), deleted=False)
    assert _allowed("mutate-pods", pod())
    fresh_cache.budget_event(budget(state="Blocked"), deleted=False)
    assert not _allowed("mutate-pods", pod())
    fresh_cache.budget_event(budget(state="Blocked"), deleted=True)
    assert _allowed("mutate-pods", pod())
    assert fresh_cache.budgets == {}


def test_a_memoised_answer_follows_the_namespaces_labels(
        fresh_cache: admission.AdmissionCache) -> None:
    fresh_cache.budget_event(cluster_budget(blocked_in=NS), deleted=False)
    assert _allowed("mutate-pods", pod())
    fresh_cache.namespaces[NS] = {"environment": "qa"}
    assert not _allowed("mutate-pods", pod())


def test_a_memoised_answer_ends_with_the_exception_that_allowed_it(
        fresh_cache: admission.AdmissionCache, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh_cache.budget_event(budget(state="Blocked", exceptions=[
        {"until": SOON, "reason": "launch", "maxAction": "Warn"}]), deleted=False)
    assert _allowed("mutate-pods", pod())
    monkeypatch.setattr(admission, "_now", lambda: NOW + dt.timedelta(minutes=59))
    assert _allowed("mutate-pods", pod())
    monkeypatch.setattr(admission, "_now", lambda: NOW + dt.timedelta(hours=1))
    assert not _allowed("mutate-pods", pod())


def test_the_memo_is_bounded(fresh_cache: admission.AdmissionCache,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admission, "MEMO_SIZE", 3)
    fresh_cache.budget_event(budget(), deleted=False)
    for i in range(10):
        assert _allowed("mutate-pods", pod(labels={**AGENT, "i": str(i)}))
        assert len(fresh_cache._memo) <= 3


def test_only_the_pods_namespace_and_the_cluster_budgets_are_consulted(
        fresh_cache: admission.AdmissionCache) -> None:
    for i in range(50):
        fresh_cache.budget_event(budget(namespace=f"ns-{i}", state="Blocked"), deleted=False)
    fresh_cache.budget_event(budget(), deleted=False)
    fresh_cache.budget_event(cluster_budget(), deleted=False)
    seen: list[int] = []
    real = admission.admission.review

    def counting(budgets: Any, *args: Any) -> Any:
        seen.append(len(budgets))
        return real(budgets, *args)

    admission.admission.review = counting  # type: ignore[assignment]
    try:
        assert _allowed("mutate-pods", pod())
    finally:
        admission.admission.review = real  # type: ignore[assignment]
    assert seen == [2]
    assert len(fresh_cache.budgets) == 52


def test_an_unknown_resource_or_a_malformed_review_is_an_error() -> None:
    other = review(pod())
    other["request"]["resource"] = {"group": "", "version": "v1", "resource": "configmaps"}
    with pytest.raises(admission.UnknownResource):
        admission.respond("mutate-pods", other)
    for broken in ({"request": None}, {"request": {**review(pod())["request"], "userInfo": None}},
                   {"request": {**review(pod())["request"], "object": None}}):
        with pytest.raises(admission.BadReview):
            admission.respond("mutate-pods", broken)


def test_a_handlers_error_denies_with_500_and_its_text(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any) -> Any:
        raise RuntimeError("cache exploded")

    monkeypatch.setattr(admission.cache, "review", broken)
    response = admission.respond("mutate-pods", review(pod()))["response"]
    assert response["allowed"] is False
    assert response["status"] == {"message": "cache exploded", "code": 500}


# -- the server, over TLS on loopback ---------------------------------------------------


@pytest.mark.parametrize("s", list(SCENARIOS.values()), ids=list(SCENARIOS))
def test_in_dry_run_pods_and_workloads_are_admitted_unchanged_with_a_warning(
        fresh_cache: admission.AdmissionCache, s: Scenario) -> None:
    _load(fresh_cache, s)
    normal = admission.respond(s.webhook, review(s.obj, s.operation))["response"]
    dry = admission.respond(s.webhook, review(s.obj, s.operation), dry_run=True)["response"]
    if not admission.ENDPOINTS[s.webhook].enforces:  # budgets: validated all the same
        assert dry == normal
        return
    assert dry["allowed"] is True and "patch" not in dry and "status" not in dry
    warnings = dry.get("warnings", [])
    if not normal["allowed"]:
        assert f"dry-run: would deny: {normal['status']['message']}" in warnings
    if "patch" in normal:
        said = [w for w in warnings if w.startswith("dry-run: would set ")]
        assert len(said) == 1
        already = s.obj["metadata"].get("annotations") or {}
        for key, value in s.annotations.items():
            assert (f"annotation {key}={value}" in said[0]) is (already.get(key) != value)
        assert ("spec.volumes" in said[0]) is s.mounted
    if normal["allowed"] and "patch" not in normal:
        assert warnings == []


def _files(tmp_path: Path, name: str) -> tuple[Path, bytes]:
    bundle = certificates.issue(["127.0.0.1"], dt.datetime.now(dt.UTC))
    directory = tmp_path / name
    directory.mkdir()
    cert, key = directory / "tls.crt", directory / "tls.key"
    cert.write_bytes(bundle.tls_crt)
    key.write_bytes(bundle.tls_key)
    return cert, bundle.ca_crt


def _post(port: int, ca: bytes, path: str, body: bytes) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cadata=ca.decode())
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_the_server_answers_over_tls_and_serves_a_renewed_certificate(
        fresh_cache: admission.AdmissionCache, tmp_path: Path) -> None:
    fresh_cache.budget_event(budget(deniedModels=["large"]), deleted=False)
    cert, ca = _files(tmp_path, "one")
    key = cert.with_name("tls.key")
    [port] = free_ports(1)
    server = admission.Server(addr="127.0.0.1", port=port, certfile=str(cert),
                              pkeyfile=str(key), file_check_interval=0.05)

    async def scenario() -> None:
        configs: list[dict[str, str]] = []

        async def serve() -> None:
            async for config in server():  # as the admission process runs it
                configs.append(config)

        task = asyncio.create_task(serve())
        while not configs:
            await asyncio.sleep(0.01)
        assert configs == [{"url": f"https://127.0.0.1:{port}"}]
        try:
            status, data = await asyncio.to_thread(
                _post, port, ca, "/mutate-pods",
                json.dumps(review(pod(models=("large",)))).encode())
            assert status == 200
            assert json.loads(data)["response"]["status"] == {
                "message": f"pod denied: {LARGE_DENIED}", "code": 403}
            status, _ = await asyncio.to_thread(_post, port, ca, "/validate-nothing", b"{}")
            assert status == 404
            status, _ = await asyncio.to_thread(_post, port, ca, "/mutate-pods", b"not json")
            assert status == 400
            # Renewal: new files with a new CA; new connections trust only the new one.
            new_cert, new_ca = _files(tmp_path, "two")
            cert.write_bytes(new_cert.read_bytes())
            await asyncio.sleep(0.3)  # half the pair: it does not load, the old one serves
            status, _ = await asyncio.to_thread(
                _post, port, ca, "/mutate-pods", json.dumps(review(pod())).encode())
            assert status == 200
            key.write_bytes(new_cert.with_name("tls.key").read_bytes())
            await asyncio.sleep(0.3)
            status, _ = await asyncio.to_thread(
                _post, port, new_ca, "/mutate-pods", json.dumps(review(pod())).encode())
            assert status == 200
            with pytest.raises(ssl.SSLError):
                await asyncio.to_thread(_post, port, ca, "/mutate-pods", b"{}")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(scenario())


# -- keep-agent-label: mandatory enrolment ----------------------------------------------------


def _change(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    out = review(new, "UPDATE")
    out["request"]["oldObject"] = old
    return out


def _unlabelled(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    new = copy.deepcopy(dict(obj))
    if where in ("object", "both"):
        new["metadata"]["labels"].pop(A + "agent")
    if where in ("template", "both"):
        new["spec"]["template"]["metadata"]["labels"].pop(A + "agent")
    return new


@pytest.mark.parametrize(("where", "message"), [
    pytest.param("object", "metadata.labels", id="from the Deployment's own labels"),
    pytest.param("template", "its pod template", id="from its pod template"),
    pytest.param("both", "metadata.labels or its pod template", id="from both"),
])
def test_removing_the_agent_label_is_refused_while_a_cluster_budget_makes_enrolment_mandatory(
        fresh_cache: admission.AdmissionCache, where: str, message: str) -> None:
    fresh_cache.budget_event(cluster_budget(enrolment="Mandatory"), deleted=False)
    old = {**deployment(), "metadata": {**deployment()["metadata"], "namespace": QA}}
    review_ = _change(old, _unlabelled(old, where))
    response = admission.respond("keep-agent-label-deployments", review_)["response"]
    assert response["allowed"] is False
    assert response["status"]["code"] == 403
    assert f"must not be removed from {message}: enrolment is mandatory in namespace {QA}" \
        in response["status"]["message"]


def test_the_namespace_label_an_admin_sets_makes_enrolment_mandatory_too(
        fresh_cache: admission.AdmissionCache) -> None:
    old = pod()
    new = pod(labels={})
    assert admission.respond("keep-agent-label-pods", _change(old, new))["response"]["allowed"]
    fresh_cache.namespaces[NS] = {"tokenbudget.io/enrolment": "Mandatory"}
    assert not admission.respond("keep-agent-label-pods",
                                 _change(old, new))["response"]["allowed"]


@pytest.mark.parametrize("ctb", [
    pytest.param(cluster_budget(), id="a Selected cluster budget"),
    pytest.param(cluster_budget(enrolment="Mandatory",
                                namespaceSelector={"matchLabels": {"environment": "prod"}}),
                 id="a Mandatory cluster budget of other namespaces"),
])
def test_without_mandatory_enrolment_a_team_may_remove_the_label(
        fresh_cache: admission.AdmissionCache, ctb: dict[str, Any]) -> None:
    fresh_cache.budget_event(ctb, deleted=False)
    old = {**deployment(), "metadata": {**deployment()["metadata"], "namespace": QA}}
    answer = admission.respond("keep-agent-label-deployments",
                               _change(old, _unlabelled(old, "both")))
    assert answer["response"]["allowed"] is True


def test_an_update_that_keeps_the_label_is_allowed_under_mandatory_enrolment(
        fresh_cache: admission.AdmissionCache) -> None:
    fresh_cache.budget_event(cluster_budget(enrolment="Mandatory"), deleted=False)
    old = {**deployment(), "metadata": {**deployment()["metadata"], "namespace": QA}}
    new = copy.deepcopy(old)
    new["spec"]["replicas"] = 0
    assert admission.respond("keep-agent-label-deployments",
                             _change(old, new))["response"]["allowed"] is True


# -- partitions: agents running unlabelled before, and the label as a way out of a Block -----

OWNER = A + "owner"


def _partitioned(over: list[dict[str, Any]]) -> dict[str, Any]:
    body = budget(partition={"label": "user", "podLabel": OWNER})
    body["status"] = {"state": "Ok", "partitions": {"label": "user", "over": over}}
    return body


def test_a_pod_of_a_workload_running_unlabelled_before_partitioning_is_admitted(
        fresh_cache: admission.AdmissionCache) -> None:
    fresh_cache.budget_event(_partitioned([{"value": "alice", "state": "Blocked"}]),
                             deleted=False)
    fresh_cache.workload_event(deployment(), deleted=False)  # known, template unlabelled
    rs_pod = pod(owner=("ReplicaSet", "agent-5d4f8"),
                 labels={**AGENT, "pod-template-hash": "5d4f8"})
    answer = admission.respond("mutate-pods", review(rs_pod))["response"]
    assert answer["allowed"] is True
    # A bare pod, or one of a ReplicaSet no known Deployment owns, must name its person.
    for stray in (pod(), pod(owner=("ReplicaSet", "mine-1"))):
        answer = admission.respond("mutate-pods", review(stray))["response"]
        assert answer["allowed"] is False
        assert "must carry the label tokenbudget.io/owner" in answer["status"]["message"]


@pytest.mark.parametrize(("new_owner", "allowed", "words"), [
    pytest.param(None, False, "must not be removed", id="removing it"),
    pytest.param("bob", False, 'Blocked for partition user="alice"', id="leaving the Block"),
    pytest.param("alice", True, "", id="keeping it"),
])
def test_the_owner_label_of_a_blocked_person_stays_on_pods_and_templates(
        fresh_cache: admission.AdmissionCache, new_owner: str | None, allowed: bool,
        words: str) -> None:
    fresh_cache.budget_event(_partitioned([{"value": "alice", "state": "Blocked"}]),
                             deleted=False)
    old = deployment()
    old["spec"]["template"]["metadata"]["labels"][OWNER] = "alice"
    new = copy.deepcopy(old)
    labels = new["spec"]["template"]["metadata"]["labels"]
    labels.pop(OWNER)
    if new_owner is not None:
        labels[OWNER] = new_owner
    answer = admission.respond("keep-agent-label-deployments", _change(old, new))["response"]
    assert answer["allowed"] is allowed
    if not allowed:
        assert words in answer["status"]["message"]
        assert "its pod template" in answer["status"]["message"]
    old_pod = pod(labels={**AGENT, OWNER: "alice"})
    new_pod = pod(labels={**AGENT, **({OWNER: new_owner} if new_owner else {})})
    answer = admission.respond("keep-agent-label-pods", _change(old_pod, new_pod))["response"]
    assert answer["allowed"] is allowed
