"""Enrolment by LLM signal and the gateway's variables (issues 19 and 15), without a cluster.

Covers:
- :mod:`token_budget.policy.signals`: which pods (templates) show a signal,
  table-driven: provider keys, gateway URLs, globs, Secret and ConfigMap keys,
  init containers, the model annotation and variables, the admin's additions;
  what does not count (other names, other case, a longer name, ``envFrom``,
  malformed specs); entries that are refused;
- ``mutate-pods`` in a mandatory namespace labels an unlabelled pod that shows a
  signal and stamps it like any governed pod, whose admission checks then apply
  (a Blocked budget refuses it); elsewhere, without a signal or with enrolment
  by signal off, nothing changes;
- ``enrol-*`` at CREATE labels the workload and its pod template (CronJob:
  the job template's; a template without metadata gets it); at UPDATE the
  object only, the template byte for byte as sent;
- the gateway's variables go on a new governed pod's containers that do not set
  them, never replace one, skip a container with ``envFrom``, and never reach an
  unlabelled pod that is not enrolled;
- dry-run only warns, and the
  configurations send unlabelled pods at CREATE and workloads at CREATE and
  UPDATE, after the labelled pods' webhook, or nothing with ``enrol=False``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from builders import CATALOG_BODY
from test_admission_webhooks import (
    NOW,
    NS,
    _patched,
    budget,
    deployment,
    pod,
    review,
)

from token_budget.policy import signals
from token_budget.policy.workloads import DEFAULT_MODEL_ENV
from token_budget.webhooks import admission, configuration

A = "tokenbudget.io/"
AGENT = A + "agent"
MANDATORY = "agents"  # labelled tokenbudget.io/enrolment=Mandatory
URL = "http://litellm.litellm.svc:4000"


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[admission.AdmissionCache]:
    cache = admission.AdmissionCache()
    monkeypatch.setattr(admission, "cache", cache)
    monkeypatch.setattr(admission, "_now", lambda: NOW)
    cache.budget_event(copy.deepcopy(CATALOG_BODY), deleted=False)
    cache.namespaces.update({NS: {"environment": "production"},
                             MANDATORY: {A + "enrolment": "Mandatory"}})
    cache.budget_event(budget(namespace=MANDATORY), deleted=False)
    yield cache


def _pod(env: list[dict[str, Any]] | None = None, namespace: str = MANDATORY,
         labels: Mapping[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    p = pod(namespace=namespace, labels=labels if labels is not None else {"app": "x"},
            models=(), **spec)
    p["spec"]["containers"][0]["env"] = list(env or [])
    return p


def _env(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "value": "v"} for n in names]


DEFAULT = signals.Signals.parse(signals.DEFAULT, DEFAULT_MODEL_ENV)
ADMIN = signals.Signals.parse([*signals.DEFAULT, "ACME_*", "annotation:acme.io/*"])


def _template(containers: list[dict[str, Any]], annotations: dict[str, str] | None = None,
              init: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": containers}
    if init is not None:
        spec["initContainers"] = init
    return {"metadata": {"annotations": annotations or {}}, "spec": spec}


def _c(*env: dict[str, Any], name: str = "agent", **more: Any) -> dict[str, Any]:
    return {"name": name, "image": "x", "env": list(env), **more}


def _secret(name: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": "llm", "key": key}}}


SHOWN = [
    pytest.param(DEFAULT, _template([_c(*_env("OPENAI_API_KEY"))]),
                 "variable OPENAI_API_KEY of container agent", id="a provider key"),
    pytest.param(DEFAULT, _template([_c(*_env("PORT", "ANTHROPIC_BASE_URL"))]),
                 "variable ANTHROPIC_BASE_URL of container agent", id="a gateway URL"),
    pytest.param(DEFAULT, _template([_c(*_env("LITELLM_PROXY_URL"))]),
                 "variable LITELLM_PROXY_URL of container agent", id="a glob of the list"),
    pytest.param(DEFAULT, _template([_c(_secret("KEY", "GEMINI_API_KEY"))]),
                 "variable GEMINI_API_KEY of container agent",
                 id="the Secret key a variable of another name reads"),
    pytest.param(DEFAULT, _template([_c({"name": "U", "valueFrom": {"configMapKeyRef": {
                     "name": "llm", "key": "OPENAI_BASE_URL"}}})]),
                 "variable OPENAI_BASE_URL of container agent", id="a ConfigMap key"),
    pytest.param(DEFAULT, _template([_c(name="main")],
                                    init=[_c(*_env("AWS_BEARER_TOKEN_BEDROCK"), name="setup")]),
                 "variable AWS_BEARER_TOKEN_BEDROCK of container setup",
                 id="an init container's Bedrock key"),
    pytest.param(DEFAULT, _template([_c()], annotations={A + "model": "gpt-4o"}),
                 f"annotation {A}model", id="the model annotation"),
    pytest.param(DEFAULT, _template([_c(*_env("LLM_MODEL"))]),
                 "variable LLM_MODEL of container agent", id="a model variable"),
    pytest.param(ADMIN, _template([_c(*_env("ACME_LLM_TOKEN"))]),
                 "variable ACME_LLM_TOKEN of container agent", id="an admin's variable glob"),
    pytest.param(ADMIN, _template([_c()], annotations={"acme.io/llm": "yes"}),
                 "annotation acme.io/llm", id="an admin's annotation glob"),
    pytest.param(DEFAULT, _template([_c(*_env("DATABASE_URL", "API_KEY"))]), None,
                 id="other variables"),
    pytest.param(DEFAULT, _template([_c(*_env("openai_api_key"))]), None,
                 id="another case"),
    pytest.param(DEFAULT, _template([_c(*_env("MY_OPENAI_API_KEY", "OPENAI_API_KEY_FILE"))]),
                 None, id="a longer name"),
    pytest.param(DEFAULT, _template([_c(envFrom=[{"secretRef": {"name": "openai"}}])]), None,
                 id="a whole Secret through envFrom (unseen)"),
    pytest.param(DEFAULT, _template([_c(*_env("ACME_LLM_TOKEN"))]), None,
                 id="an admin's variable before the admin adds it"),
    pytest.param(DEFAULT, {"metadata": None, "spec": {"containers": [None, {"env": [None, {}]}]}},
                 None, id="a malformed spec"),
    pytest.param(DEFAULT, {}, None, id="nothing at all"),
]


@pytest.mark.parametrize(("found", "template", "said"), SHOWN)
def test_which_pods_show_a_signal(found: signals.Signals, template: dict[str, Any],
                                  said: str | None) -> None:
    assert found.shown(template) == said


@pytest.mark.parametrize("entry", ["anotation:acme.io/llm", "env:", "annotation:", "", "x:y"])
def test_an_entry_that_could_never_match_is_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="must be NAME, env:NAME or annotation:KEY"):
        signals.Signals.parse([entry])


def test_the_default_list_holds_the_issues_providers_and_gateways() -> None:
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "AZURE_OPENAI_API_KEY", "GEMINI_API_KEY",
                 "GOOGLE_API_KEY", "MISTRAL_API_KEY", "COHERE_API_KEY", "GROQ_API_KEY",
                 "AWS_BEARER_TOKEN_BEDROCK", "OPENAI_BASE_URL", "OPENAI_API_BASE",
                 "ANTHROPIC_BASE_URL", "LITELLM_MASTER_KEY", *DEFAULT_MODEL_ENV):
        assert DEFAULT.shown(_template([_c(*_env(name))])), name
    assert DEFAULT.shown(_template([_c(*_env("AWS_ACCESS_KEY_ID"))])) is None, \
        "plain AWS credentials would enrol every pod that reads S3"


# ---------------------------------------------------------------------------
# the webhooks
# ---------------------------------------------------------------------------


def _respond(webhook: str, obj: dict[str, Any], operation: str = "CREATE",
             old: dict[str, Any] | None = None) -> dict[str, Any]:
    r = review(obj, operation)
    if old is not None:
        r["request"]["oldObject"] = old
    response: dict[str, Any] = admission.respond(webhook, r)["response"]
    return response


def test_an_unlabelled_pod_with_a_key_is_enrolled_and_stamped_in_a_mandatory_namespace(
        ) -> None:
    obj = _pod(_env("OPENAI_API_KEY"))
    response = _respond("mutate-pods", obj)
    got = _patched(obj, response)
    assert got["metadata"]["labels"] == {"app": "x", AGENT: "true", A + "enforced": "true"}
    assert got["metadata"]["annotations"][A + "budget"] == f"TokenBudget/{MANDATORY}/search"
    assert response["warnings"] == [
        f"namespace {MANDATORY} is under mandatory enrolment and this pod shows variable "
        f"OPENAI_API_KEY of container agent: {AGENT}=true is set, so its budgets' admission "
        "checks apply to it"]


def test_an_enrolled_pod_is_refused_while_its_budget_blocks(
        fresh_cache: admission.AdmissionCache) -> None:
    """The one pod webhook judges a pod it enrols as the governed pod it becomes."""
    fresh_cache.budget_event(budget(namespace=MANDATORY, state="Blocked"), deleted=False)
    response = _respond("mutate-pods", _pod(_env("OPENAI_API_KEY")))
    assert response["allowed"] is False and response["status"]["code"] == 403
    assert f"TokenBudget {MANDATORY}/search is Blocked" in response["status"]["message"]
    assert "patch" not in response


@pytest.mark.parametrize(("obj", "why"), [
    pytest.param(_pod(_env("OPENAI_API_KEY"), namespace=NS), "not mandatory",
                 id="a namespace not under mandatory enrolment"),
    pytest.param(_pod(_env("DATABASE_URL")), "no signal", id="a pod without a signal"),
])
def test_an_unlabelled_pod_is_left_alone(obj: dict[str, Any], why: str,
                                         fresh_cache: admission.AdmissionCache) -> None:
    fresh_cache.gateway_env = {"OPENAI_BASE_URL": URL}
    fresh_cache.directive_url = "https://tb.example:443"
    response = _respond("mutate-pods", obj)
    assert "patch" not in response and "warnings" not in response, why


def test_enrolment_by_signal_switched_off_labels_nothing(
        fresh_cache: admission.AdmissionCache) -> None:
    fresh_cache.enrol_by_signal = False
    assert "patch" not in _respond("mutate-pods", _pod(_env("OPENAI_API_KEY")))
    assert "patch" not in _respond("enrol-deployments", _unlabelled_deployment())


def test_a_cluster_budgets_mandatory_enrolment_counts_like_the_namespace_label(
        fresh_cache: admission.AdmissionCache) -> None:
    obj = _pod(_env("OPENAI_API_KEY"), namespace=NS)
    assert "patch" not in _respond("mutate-pods", obj)
    fresh_cache.budget_event({
        "apiVersion": "tokenbudget.io/v1alpha1", "kind": "ClusterTokenBudget",
        "metadata": {"name": "prod", "generation": 1},
        "spec": {"namespaceSelector": {"matchLabels": {"environment": "production"}},
                 "enrolment": "Mandatory", "limits": [{"window": "24h", "tokens": 1000}]}},
        deleted=False)
    assert _patched(obj, _respond("mutate-pods", obj))["metadata"]["labels"][AGENT] == "true"


def _unlabelled_deployment(kind: str = "Deployment", namespace: str = MANDATORY,
                           env: tuple[str, ...] = ("OPENAI_API_KEY",)) -> dict[str, Any]:
    d = deployment(kind, models=())
    d["metadata"] = {"name": "agent", "namespace": namespace, "labels": {"app": "x"}}
    template = admission.pod_template(d)
    template["metadata"]["labels"] = {"app": "x"}  # type: ignore[index]
    template["spec"]["containers"][0]["env"] = _env(*env)  # type: ignore[index]
    return d


@pytest.mark.parametrize("kind", ["Deployment", "CronJob"])
def test_a_new_workload_gets_the_label_on_itself_and_its_pod_template(kind: str) -> None:
    obj = _unlabelled_deployment(kind)
    response = _respond(f"enrol-{kind.lower()}s", obj)
    got = _patched(obj, response)
    assert got["metadata"]["labels"] == {"app": "x", AGENT: "true"}
    assert admission.pod_template(got)["metadata"]["labels"] == {"app": "x", AGENT: "true"}
    want = copy.deepcopy(obj)
    want["metadata"]["labels"][AGENT] = "true"
    admission.pod_template(want)["metadata"]["labels"][AGENT] = "true"
    assert got == want, "nothing but the two labels"
    assert f"this {kind} shows variable OPENAI_API_KEY" in response["warnings"][0]


def test_a_new_job_whose_template_has_no_metadata_gets_it() -> None:
    obj = _unlabelled_deployment()
    obj["kind"], obj["apiVersion"] = "Job", "batch/v1"
    del obj["spec"]["template"]["metadata"]
    got = _patched(obj, _respond("enrol-jobs", obj))
    assert got["spec"]["template"]["metadata"] == {"labels": {AGENT: "true"}}


@pytest.mark.parametrize("kind", ["Deployment", "CronJob"])
def test_an_updated_workload_gets_the_label_on_itself_never_on_its_template(kind: str) -> None:
    """A changed template would roll the workload's pods: only metadata.labels changes."""
    old = _unlabelled_deployment(kind)
    new = copy.deepcopy(old)
    new["metadata"]["annotations"] = {"team": "search"}
    response = _respond(f"enrol-{kind.lower()}s", new, "UPDATE", old)
    got = _patched(new, response)
    assert got["metadata"]["labels"] == {"app": "x", AGENT: "true"}
    assert got["spec"] == new["spec"]


@pytest.mark.parametrize(("obj", "operation"), [
    pytest.param(_unlabelled_deployment(namespace=NS), "CREATE", id="not mandatory"),
    pytest.param(_unlabelled_deployment(env=("DATABASE_URL",)), "UPDATE", id="no signal"),
])
def test_a_workload_is_left_alone(obj: dict[str, Any], operation: str) -> None:
    response = _respond("enrol-deployments", obj, operation, obj if operation == "UPDATE"
                        else None)
    assert response["allowed"] and "patch" not in response


def test_a_workload_that_carries_the_label_is_not_patched() -> None:
    obj = _unlabelled_deployment()
    obj["metadata"]["labels"][AGENT] = "yes"
    assert "patch" not in _respond("enrol-deployments", obj)


def _governed(*containers: dict[str, Any]) -> dict[str, Any]:
    p = pod(namespace=MANDATORY)
    p["spec"]["containers"] = list(containers)
    return p


def test_the_gateways_variables_go_where_a_container_does_not_set_them(
        fresh_cache: admission.AdmissionCache) -> None:
    fresh_cache.gateway_env = {"OPENAI_BASE_URL": URL, "ANTHROPIC_BASE_URL": URL}
    obj = _governed(_c(*_env("PORT"), name="plain"),
                    _c({"name": "OPENAI_BASE_URL", "value": "http://mine:8080"}, name="own"),
                    _c(name="from-secret", envFrom=[{"secretRef": {"name": "urls"}}]))
    got = _patched(obj, _respond("mutate-pods", obj))
    env = {c["name"]: c["env"] for c in got["spec"]["containers"]}
    assert env["plain"] == [*_env("PORT"), {"name": "OPENAI_BASE_URL", "value": URL},
                            {"name": "ANTHROPIC_BASE_URL", "value": URL}]
    assert env["own"] == [{"name": "OPENAI_BASE_URL", "value": "http://mine:8080"},
                          {"name": "ANTHROPIC_BASE_URL", "value": URL}], "the pod's own kept"
    assert env["from-secret"] == [], "envFrom: what it sets is unknown, left alone"


def test_the_gateways_and_the_directive_services_variables_go_together(
        fresh_cache: admission.AdmissionCache) -> None:
    fresh_cache.gateway_env = {"OPENAI_BASE_URL": URL}
    fresh_cache.directive_url = "https://tb.example:443"
    obj = _pod(_env("ANTHROPIC_API_KEY"))  # enrolled on the way
    got = _patched(obj, _respond("mutate-pods", obj))
    names = [e["name"] for e in got["spec"]["containers"][0]["env"]]
    assert names[0] == "ANTHROPIC_API_KEY" and names[-1] == "OPENAI_BASE_URL"
    assert "TOKENBUDGET_DIRECTIVE_URL" in names
    assert "patch" not in _respond("mutate-pods", got), "applied once, nothing left to add"


SAME = [
    pytest.param("mutate-pods", _pod(_env("OPENAI_API_KEY")), "CREATE", id="a pod enrolled"),
    pytest.param("enrol-deployments", _unlabelled_deployment(), "CREATE",
                 id="a new Deployment"),
    pytest.param("enrol-cronjobs", _unlabelled_deployment("CronJob"), "UPDATE",
                 id="an updated CronJob"),
]


@pytest.mark.parametrize(("webhook", "obj", "operation"), SAME)
def test_in_dry_run_enrolment_only_warns(webhook: str, obj: dict[str, Any],
                                         operation: str) -> None:
    response = admission.respond(webhook, review(obj, operation), dry_run=True)["response"]
    assert response["allowed"] and "patch" not in response
    assert any(f"would set label {AGENT}=true" in w for w in response["warnings"])


def test_the_configuration_sends_unlabelled_objects_after_the_labelled_pods() -> None:
    _, mutating = configuration.configurations({"url": "https://127.0.0.1:9443"}, b"ca", "ops")
    hooks = mutating["webhooks"]
    assert [h["name"].removesuffix(".tokenbudget.io") for h in hooks] == [
        "pods", "enrol-pods", "enrol-deployments", "enrol-statefulsets", "enrol-jobs",
        "enrol-cronjobs"]
    for h in hooks[1:]:
        assert h["objectSelector"] == {"matchExpressions": [
            {"key": AGENT, "operator": "DoesNotExist"}]}
        assert h["failurePolicy"] == "Ignore" and h["reinvocationPolicy"] == "Never"
        assert "ops" in h["namespaceSelector"]["matchExpressions"][0]["values"]
        ops = h["rules"][0]["operations"]
        assert ops == (["CREATE"] if h["name"].startswith("enrol-pods") else
                       ["CREATE", "UPDATE"])
    assert hooks[1]["clientConfig"]["url"].endswith("/mutate-pods")
    _, off = configuration.configurations({"url": "https://127.0.0.1:9443"}, b"ca", "ops",
                                          enrol=False)
    assert [h["name"] for h in off["webhooks"]] == ["pods.tokenbudget.io"]


def test_a_label_removed_from_a_workload_with_a_signal_comes_back_before_the_check() -> None:
    """Mutating webhooks run first: keep-agent-label then sees the label still there."""
    old = _unlabelled_deployment()
    old["metadata"]["labels"][AGENT] = "true"
    new = _unlabelled_deployment()
    restored = _patched(new, _respond("enrol-deployments", new, "UPDATE", old))
    assert restored["metadata"]["labels"][AGENT] == "true"
    assert _respond("keep-agent-label-deployments", restored, "UPDATE", old)["allowed"]
    assert not _respond("keep-agent-label-deployments", new, "UPDATE", old)["allowed"], \
        "not put back, the removal would be refused"
