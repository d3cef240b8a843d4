"""The LiteLLM proxy's config as the catalog implies it (``token_budget.proxies.litellm``).

Covers:
- every catalog model, so every equivalent a Reroute picks, gets a ``model_list``
  entry; ``litellm_params`` from the provider's default prefix, a ``--params``
  template or an ``--upstream``;
- merging keeps the user's keys, entries and callbacks, gives no entry of ours to
  a model the user routes, drops ours when their model left the catalog, and is
  idempotent;
- drift lists the unroutable catalog models (saying which Reroute picks them),
  a missing callback or caller label, and honours LiteLLM's wildcards;
- laws over generated catalogs and user configs: merging is idempotent, keeps
  the user's entries first and unchanged, never routes a model twice and agrees
  with the catalog; removing any entry is drift that names it, and merging again
  repairs exactly that;
- the caller labels are those the LiteLLM preset reads with :data:`SOURCE`, and
  the environment listed is what the callback reads;
- ``tokenbudget gateway litellm``: printing, ``--config`` merging, ``--check``
  exit codes, and input errors (exit 1) against usage errors (exit 2);
- ``--apply`` against a fake API server: creates, then writes nothing; keeps the
  ConfigMap's other keys; a change made between its read and its write (409) is
  merged, not overwritten, for an update as for a creation; gives up after three;
  refuses a config that is not YAML.
The real ConfigMap (``--apply``, ``--check`` against the cluster) and a real proxy
routing a Reroute: tests/e2e/test_gateway_config.py.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from token_budget import cli
from token_budget.api import v1alpha1 as api
from token_budget.errors import Conflict, TargetNotFound
from token_budget.policy import engine, sources
from token_budget.policy.catalog import Catalog
from token_budget.proxies import litellm

REPO = Path(__file__).resolve().parents[2]
LAWS = settings(max_examples=200, deadline=None)
EXAMPLE = REPO / "examples" / "model-catalog.yaml"


def _catalog(*models: dict[str, Any]) -> Catalog:
    return Catalog([api.ModelCatalog.model_validate({
        "apiVersion": api.API_VERSION, "kind": "ModelCatalog", "metadata": {"name": "c"},
        "spec": {"models": list(models)}})])


def _model(name: str, provider: str = "openai", equivalents: tuple[str, ...] = (),
           price: str = "1") -> dict[str, Any]:
    return {"name": name, "provider": provider, "tier": "Standard",
            "pricing": {"input": price, "output": price}, "equivalents": list(equivalents)}


CATALOG = _catalog(_model("gpt-4o", equivalents=("gpt-4o-mini",), price="5"),
                   _model("gpt-4o-mini"),
                   _model("gemini-pro", "google", ("gemini-flash",), price="5"),
                   _model("gemini-flash", "google"))


def _names(config: dict[str, Any]) -> list[str]:
    return [e["model_name"] for e in config["model_list"]]


def test_every_catalog_model_and_so_every_reroute_target_gets_an_entry() -> None:
    config = litellm.merge(None, CATALOG, litellm.Options())
    assert _names(config) == ["gpt-4o", "gpt-4o-mini", "gemini-pro", "gemini-flash"]
    routed = set(_names(config))
    for name in CATALOG.models:  # whatever the engine picks for any model is routable
        target = engine.cheapest_equivalent(name, None, CATALOG)
        assert target is None or target in routed
    assert config["model_list"][1] == {
        "model_name": "gpt-4o-mini", "litellm_params": {"model": "openai/gpt-4o-mini"},
        "model_info": {litellm.MANAGED: True}}
    assert config["model_list"][3]["litellm_params"] == {"model": "gemini/gemini-flash"}
    assert config["litellm_settings"] == {
        "callbacks": [litellm.CALLBACK, "prometheus"],
        "custom_prometheus_metadata_labels": ["metadata.namespace", "metadata.pod"]}
    assert "environment_variables" not in config


def test_params_templates_and_upstreams_shape_litellm_params() -> None:
    options = litellm.Options(
        params={"*": {"model": "openai/{name}", "api_key": "os.environ/KEY",
                      "tags": ["{provider}"]},
                "google": {"model": "vertex_ai/{name}", "vertex_location": "europe-west4"}},
        upstreams={"openai": "http://stub/v1"})
    entries = {e["model_name"]: e["litellm_params"]
               for e in litellm.model_entries(CATALOG, options)}
    assert entries["gpt-4o"] == {"model": "openai/gpt-4o", "api_key": "os.environ/KEY",
                                 "tags": ["openai"], "api_base": "http://stub/v1"}
    assert entries["gemini-flash"] == {"model": "vertex_ai/gemini-flash",
                                       "vertex_location": "europe-west4"}
    everywhere = litellm.Options(upstreams={"*": "http://any/v1"})
    assert all(e["litellm_params"]["api_base"] == "http://any/v1"
               for e in litellm.model_entries(CATALOG, everywhere))


def test_a_model_without_a_provider_is_named_as_it_is() -> None:
    catalog = _catalog(_model("local-llama", provider=""))
    assert litellm.model_entries(catalog, litellm.Options())[0]["litellm_params"] == {
        "model": "local-llama"}


USERS = {
    "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
    "router_settings": {"num_retries": 2},
    "model_list": [
        {"model_name": "embedder", "litellm_params": {"model": "openai/text-embedding-3"}},
        {"model_name": "gpt-4o", "litellm_params": {"model": "azure/my-gpt-4o"}},
        {"model_name": "retired", "litellm_params": {"model": "openai/retired"},
         "model_info": {litellm.MANAGED: True}},
    ],
    "litellm_settings": {"callbacks": ["langfuse"], "drop_params": True},
    "environment_variables": {"LANGFUSE_HOST": "https://lf"},
}


def test_merging_keeps_the_users_keys_entries_and_callbacks() -> None:
    merged = litellm.merge(USERS, CATALOG, litellm.Options(
        environment={"TOKENBUDGET_DIRECTIVE_BASE_URL": "https://op.svc"}))
    assert merged["general_settings"] == USERS["general_settings"]
    assert merged["router_settings"] == USERS["router_settings"]
    # The user's entries first, as they were; "gpt-4o" is routed by the user, so no entry
    # of ours competes with it; our entry for a model that left the catalog is gone.
    assert merged["model_list"][:2] == USERS["model_list"][:2]
    assert _names(merged) == ["embedder", "gpt-4o", "gpt-4o-mini", "gemini-pro",
                              "gemini-flash"]
    assert merged["litellm_settings"] == {
        "callbacks": ["langfuse", litellm.CALLBACK, "prometheus"], "drop_params": True,
        "custom_prometheus_metadata_labels": ["metadata.namespace", "metadata.pod"]}
    assert merged["environment_variables"] == {
        "LANGFUSE_HOST": "https://lf", "TOKENBUDGET_DIRECTIVE_BASE_URL": "https://op.svc"}
    assert USERS["model_list"][2]["model_name"] == "retired"  # the input is not changed


@pytest.mark.parametrize("config", [
    pytest.param(None, id="from nothing"),
    pytest.param(USERS, id="into a user's config"),
])
def test_merging_twice_changes_nothing(config: dict[str, Any] | None) -> None:
    options = litellm.Options(upstreams={"*": "http://stub/v1"}, environment={"A": "1"})
    once = litellm.merge(config, CATALOG, options)
    assert litellm.merge(once, CATALOG, options) == once
    # and through YAML, as the ConfigMap holds it
    assert litellm.merge(yaml.safe_load(cli.dump_yaml(once)), CATALOG, options) == once


def test_new_upstreams_rewrite_our_entries_only() -> None:
    once = litellm.merge(USERS, CATALOG, litellm.Options())
    again = litellm.merge(once, CATALOG, litellm.Options(upstreams={"*": "http://new/v1"}))
    assert again["model_list"][1] == USERS["model_list"][1]
    assert {e["litellm_params"].get("api_base") for e in again["model_list"][2:]} == {
        "http://new/v1"}


def test_without_metrics_only_the_callback_is_added() -> None:
    merged = litellm.merge(None, CATALOG, litellm.Options(metrics=False))
    assert merged["litellm_settings"] == {"callbacks": [litellm.CALLBACK]}
    assert litellm.drift(merged, CATALOG, metrics=False) == []
    assert len(litellm.drift(merged, CATALOG)) == 3  # prometheus and the two labels


@pytest.mark.parametrize("config, problem", [
    pytest.param([], "must be a mapping", id="a list"),
    pytest.param({"model_list": {"a": 1}}, "model_list must be a list", id="model_list"),
    pytest.param({"model_list": ["gpt-4o"]}, "model_list must be a list of mappings",
                 id="model_list items"),
    pytest.param({"litellm_settings": ["x"]}, "litellm_settings must be a mapping",
                 id="settings"),
    pytest.param({"litellm_settings": {"callbacks": "langfuse"}},
                 "litellm_settings.callbacks must be a list", id="callbacks"),
    pytest.param({"environment_variables": "A=1"}, "environment_variables must be a mapping",
                 id="environment"),
])
def test_a_config_of_another_shape_is_refused_not_overwritten(config: Any, problem: str
                                                               ) -> None:
    with pytest.raises((litellm.ConfigError, TypeError, ValueError), match=problem):
        litellm.merge(config, CATALOG, litellm.Options(environment={"A": "1"}))


def test_a_generated_config_agrees_with_its_catalog() -> None:
    assert litellm.drift(litellm.merge(USERS, CATALOG, litellm.Options()), CATALOG) == []


def test_drift_names_each_model_a_reroute_could_pick_that_the_proxy_cannot_route() -> None:
    config = litellm.merge(None, CATALOG, litellm.Options())
    config["model_list"] = [e for e in config["model_list"]
                            if e["model_name"] not in ("gpt-4o-mini", "gemini-pro")]
    assert litellm.drift(config, CATALOG) == [
        "model_list: must route the catalog model 'gpt-4o-mini' (a Reroute of gpt-4o picks "
        "it); no entry names it, so the proxy would refuse it",
        "model_list: must route the catalog model 'gemini-pro' (a budget's Reroute may name "
        "it); no entry names it, so the proxy would refuse it"]


def test_drift_names_a_missing_callback_and_caller_labels() -> None:
    config = litellm.merge(None, CATALOG, litellm.Options())
    config["litellm_settings"] = {"callbacks": ["prometheus"],
                                  "custom_prometheus_metadata_labels": ["metadata.pod"]}
    found = litellm.drift(config, CATALOG)
    assert len(found) == 2, found
    assert "callbacks: must include 'token_budget.litellm_callback.callback'" in found[0]
    assert "must include 'metadata.namespace'" in found[1]
    assert "metadata_namespace" in found[1]


@pytest.mark.parametrize("route, routed", [
    pytest.param("*", True, id="everything"),
    pytest.param("gpt-*", True, id="a prefix"),
    pytest.param("openai/*", False, id="another prefix"),
    pytest.param("gpt-4o-mini.", False, id="a dot is no pattern"),
])
def test_drift_honours_litellm_wildcards(route: str, routed: bool) -> None:
    catalog = _catalog(_model("gpt-4o-mini"))
    config = {"model_list": [{"model_name": route, "litellm_params": {"model": "x"}}],
              "litellm_settings": {"callbacks": [litellm.CALLBACK]}}
    assert (litellm.drift(config, catalog, metrics=False) == []) is routed


def test_the_caller_labels_are_those_the_litellm_preset_reads_with_the_source() -> None:
    resolved = sources.resolve(litellm.SOURCE)
    assert (resolved.namespace_label, resolved.workload_label) == (
        "metadata_namespace", "metadata_pod")
    # What the callback reads as the caller is what LiteLLM puts on its metrics.
    gateway = (REPO / "operator" / "token_budget" / "gateway.py").read_text()
    for key in litellm.METADATA_LABELS:
        assert f'metadata.get("{key.split(".", 1)[1]}")' in gateway


def test_the_environment_listed_is_what_the_callback_reads() -> None:
    read = set()
    for module in ("litellm_callback.py", "gateway.py"):
        text = (REPO / "operator" / "token_budget" / module).read_text()
        read |= set(re.findall(r'env\.get\("(TOKENBUDGET_[A-Z_]+)"', text))
    assert read == {name for name, _, _ in litellm.ENVIRONMENT}


# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------


def test_the_command_prints_the_config_with_what_else_the_proxy_needs(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["gateway", "litellm", "--catalog", str(EXAMPLE),
                     "--upstream", "openai=http://stub/v1"]) == 0
    out = capsys.readouterr().out
    config = yaml.safe_load(out)
    assert len(config["model_list"]) == 11
    assert config["model_list"][0]["litellm_params"] == {"model": "openai/gpt-5",
                                                         "api_base": "http://stub/v1"}
    assert "#   TOKENBUDGET_DIRECTIVE_BASE_URL" in out and "--directive-readers=" in out
    assert "labels: {namespace: metadata_namespace, workload: metadata_pod}" in out


def test_the_command_writes_the_environment_into_the_config(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["gateway", "litellm", "--catalog", str(EXAMPLE), "--directive-url",
                     "https://op.svc", "--ca-file", "/ca.crt", "--env",
                     "TOKENBUDGET_GATEWAY_TOKEN_FILE=/t", "--env",
                     "TOKENBUDGET_GATEWAY_REPLICAS=3", "--env",
                     "TOKENBUDGET_GATEWAY_FAIL_CLOSED=true", "--env",
                     "TOKENBUDGET_GATEWAY_IDENTITY=pod-ip"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["environment_variables"] == {
        "TOKENBUDGET_GATEWAY_TOKEN_FILE": "/t", "TOKENBUDGET_GATEWAY_REPLICAS": "3",
        "TOKENBUDGET_GATEWAY_FAIL_CLOSED": "true", "TOKENBUDGET_GATEWAY_IDENTITY": "pod-ip",
        "TOKENBUDGET_DIRECTIVE_BASE_URL": "https://op.svc",
        "TOKENBUDGET_DIRECTIVE_CA_FILE": "/ca.crt"}
    assert "# The proxy's environment" not in out  # all set: nothing left to list


def test_the_command_merges_into_a_config_file_and_checks_it(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    mine = tmp_path / "config.yaml"
    mine.write_text(yaml.safe_dump(USERS))
    assert cli.main(["gateway", "litellm", "--catalog", str(EXAMPLE), "--config",
                     str(mine), "--check"]) == 1
    out = capsys.readouterr().out
    assert "'gpt-5-nano' (a Reroute of gpt-5, gpt-5-mini picks it)" in out
    assert "'gpt-4o'" not in out  # the user's own entry routes it
    assert out.rstrip().endswith("14 disagreement(s) between " + str(mine) +
                                 " and the catalog")
    assert cli.main(["gateway", "litellm", "--catalog", str(EXAMPLE), "--config",
                     str(mine)]) == 0
    mine.write_text(capsys.readouterr().out)
    assert yaml.safe_load(mine.read_text())["router_settings"] == {"num_retries": 2}
    assert cli.main(["gateway", "litellm", "--catalog", str(EXAMPLE), "--config",
                     str(mine), "--check"]) == 0
    assert "agrees with the catalog: all 11 models routable" in capsys.readouterr().out


def test_an_invalid_catalog_is_refused_with_its_problems(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    body = yaml.safe_load(EXAMPLE.read_text())
    body["spec"]["models"][0]["equivalents"] = ["gpt-6"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(body))
    assert cli.main(["gateway", "litellm", "--catalog", str(tmp_path / "c.yaml")]) == 1
    err = capsys.readouterr().err
    assert "spec.models[0].equivalents[0]: must name a model of this catalog" in err


@pytest.mark.parametrize("text, problem", [
    pytest.param("a: [", "is not YAML", id="not YAML"),
    pytest.param("- 1", "must be a mapping", id="a list"),
    pytest.param("model_list: 3", "model_list must be a list", id="model_list"),
])
def test_a_config_file_that_cannot_be_merged_exits_1(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "config.yaml").write_text(text)
    assert cli.main(["gateway", "litellm", "--catalog", str(EXAMPLE), "--config",
                     str(tmp_path / "config.yaml")]) == 1
    assert problem in capsys.readouterr().err


def test_no_catalog_in_the_files_exits_1(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    (tmp_path / "other.yaml").write_text("apiVersion: v1\nkind: Namespace\n"
                                         "metadata: {name: x}\n")
    assert cli.main(["gateway", "litellm", "--catalog", str(tmp_path)]) == 1
    assert "found no ModelCatalog" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    pytest.param(["--apply"], id="apply without a namespace"),
    pytest.param(["--check"], id="check without a namespace or a file"),
    pytest.param(["--apply", "--config", "x.yaml", "-n", "x"], id="apply from a file"),
    pytest.param(["--catalog-name", "x"], id="catalogs from files and the cluster"),
])
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert cli.main(["gateway", "litellm", "--catalog", str(EXAMPLE), *argv]) == 2
    assert "tokenbudget gateway litellm:" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    pytest.param(["--upstream", "openai"], id="an upstream without a URL"),
    pytest.param(["--apply", "--check", "-n", "x"], id="apply and check"),
])
def test_argument_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["gateway", "litellm", "--catalog", str(EXAMPLE), *argv])
    assert exc.value.code == 2


# ---------------------------------------------------------------------------
# --apply against a fake API server (the real one: tests/e2e/test_gateway_config.py)
# ---------------------------------------------------------------------------


class FakeConfigMaps:
    """One ConfigMap as the API server keeps it: resourceVersion, 409 on a stale write.

    ``meddle`` runs before each write, as another client changing the object
    between this command's read and write would.
    """

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.obj: dict[str, Any] | None = None
        self.version = 1
        self.writes: list[str] = []
        self.meddle: list[Any] = []
        if config is not None:
            self.store({"config.yaml": yaml.safe_dump(config), "other": "kept"})

    def store(self, data: dict[str, str]) -> None:
        self.version += 1
        self.obj = {"metadata": {"name": "cm", "namespace": "ns",
                                 "resourceVersion": str(self.version)}, "data": data}

    def config(self) -> dict[str, Any]:
        assert self.obj is not None
        return dict(yaml.safe_load(self.obj["data"]["config.yaml"]))

    def get(self, res: Any, ns: str, name: str) -> dict[str, Any]:
        if self.obj is None:
            raise TargetNotFound(f"GET {name}: 404")
        return copy.deepcopy(self.obj)

    def request(self, method: str, path: str, query: dict[str, str], body: Any,
                content_type: str | None = None) -> dict[str, Any]:
        if self.meddle:
            self.meddle.pop(0)(self)
        self.writes.append(method)
        assert query["fieldManager"] == "tokenbudget"
        if method == "POST":
            if self.obj is not None:
                raise Conflict("POST: 409 already exists")
            self.store(dict(body["data"]))
        else:
            assert (method, content_type) == ("PATCH", "application/apply-patch+yaml")
            applied = json.loads(body)
            assert self.obj is not None
            if applied["metadata"]["resourceVersion"] != self.obj["metadata"]["resourceVersion"]:
                raise Conflict("PATCH: 409 the object has been modified")
            self.store({**self.obj["data"], **applied["data"]})
        assert self.obj is not None
        return self.obj


def _apply(api: FakeConfigMaps, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.apply_litellm(api, "ns", "cm", "config.yaml", CATALOG, litellm.Options(),
                             sys.stdout)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_apply_creates_then_changes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    api = FakeConfigMaps()
    code, said = _apply(api, capsys)
    assert code == 0 and said.startswith("ConfigMap ns/cm (config.yaml) created\n"), said
    assert "+- model_name: gpt-4o-mini" in said
    assert _names(api.config()) == list(CATALOG.models)
    assert _apply(api, capsys) == (0, "ConfigMap ns/cm (config.yaml) unchanged\n")
    assert api.writes == ["POST"]


def test_apply_keeps_the_configmaps_other_keys_and_the_users_config(
        capsys: pytest.CaptureFixture[str]) -> None:
    api = FakeConfigMaps(USERS)
    code, said = _apply(api, capsys)
    assert code == 0 and "updated" in said and "\n-  model_name: retired" in said, said
    assert api.obj is not None and api.obj["data"]["other"] == "kept"
    assert api.config()["router_settings"] == {"num_retries": 2}
    assert api.writes == ["PATCH"]


def test_a_change_between_read_and_write_is_merged_not_overwritten(
        capsys: pytest.CaptureFixture[str]) -> None:
    api = FakeConfigMaps(USERS)

    def someone_edits(a: FakeConfigMaps) -> None:
        a.store({"config.yaml": yaml.safe_dump({**a.config(), "router_settings": {"x": 1}})})

    api.meddle = [someone_edits]
    assert _apply(api, capsys)[0] == 0
    assert api.writes == ["PATCH", "PATCH"]
    assert api.config()["router_settings"] == {"x": 1}
    assert "gpt-4o-mini" in _names(api.config())


def test_a_configmap_created_meanwhile_is_merged_into(capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    api = FakeConfigMaps()
    api.meddle = [lambda a: a.store({"config.yaml": yaml.safe_dump(USERS)})]
    code, said = _apply(api, capsys)
    assert code == 0 and "updated" in said, said
    assert api.writes == ["POST", "PATCH"]
    assert api.config()["general_settings"] == USERS["general_settings"]


def test_apply_gives_up_after_three_conflicts(capsys: pytest.CaptureFixture[str]) -> None:
    api = FakeConfigMaps(USERS)
    api.meddle = [lambda a: a.store(dict(a.obj["data"]))] * 3  # a new version each time
    code, said = _apply(api, capsys)
    assert code == 1 and "changed under us three times" in said, said
    assert api.config() == USERS


def test_apply_refuses_a_configmap_whose_config_is_not_yaml(
        capsys: pytest.CaptureFixture[str]) -> None:
    api = FakeConfigMaps()
    api.store({"config.yaml": "model_list: [\n"})
    with pytest.raises(cli._InputError, match="ConfigMap ns/cm: is not YAML"):
        _apply(api, capsys)
    assert api.writes == []


def test_the_readmes_example_is_what_the_command_prints(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Every line of the README's example, bar its ``# ...`` elision, in the same order."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Enforcing at the gateway"):]
    example = section[section.index("```yaml\n") + 8:]
    example = example[:example.index("```")]
    assert cli.main(["gateway", "litellm", "--catalog", str(EXAMPLE), "--directive-url",
                     "https://token-budget-operator.tokenbudget.svc",
                     "--ca-file", "/etc/tokenbudget/ca.crt"]) == 0
    printed = iter(capsys.readouterr().out.splitlines())
    for line in example.splitlines():
        if not line.startswith("# ..."):
            assert any(p == line for p in printed), f"README line not printed: {line!r}"


# ---------------------------------------------------------------------------
# laws, over generated catalogs and user configs
# ---------------------------------------------------------------------------

NAMES = ["a", "b", "c", "d", "e"]


@st.composite
def catalogs(draw: st.DrawFn) -> Catalog:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, unique=True))
    # Equivalents point down the list only: cheaper, no cycles, as the webhook demands.
    return _catalog(*(_model(n, draw(st.sampled_from(["openai", "google", ""])),
                             tuple(draw(st.lists(st.sampled_from(names[i + 1:]), unique=True)))
                             if i + 1 < len(names) else (), price=str(10 - i))
                      for i, n in enumerate(names)))


@st.composite
def user_configs(draw: st.DrawFn) -> dict[str, Any] | None:
    if draw(st.booleans()):
        return None
    entries = [{"model_name": draw(st.sampled_from([*NAMES, "x", "y", "*"])),
                "litellm_params": {"model": draw(st.sampled_from(["u/1", "u/2"]))},
                **({"model_info": {litellm.MANAGED: True}} if draw(st.booleans()) else {})}
               for _ in range(draw(st.integers(0, 4)))]
    callbacks = draw(st.lists(st.sampled_from(["langfuse", litellm.CALLBACK]), unique=True))
    return {"model_list": entries, "litellm_settings": {"callbacks": callbacks},
            "general_settings": {"k": draw(st.integers())}}


OPTIONS = st.builds(litellm.Options, upstreams=st.dictionaries(
    st.sampled_from(["openai", "google", "*"]), st.sampled_from(["http://a", "http://b"])),
    metrics=st.booleans(), environment=st.dictionaries(st.sampled_from(["A", "B"]),
                                                       st.sampled_from(["1", "2"])))


@LAWS
@given(catalogs(), user_configs(), OPTIONS)
def test_merging_is_idempotent_keeps_the_users_work_and_agrees_with_the_catalog(
        catalog: Catalog, config: dict[str, Any] | None, options: litellm.Options) -> None:
    merged = litellm.merge(config, catalog, options)
    assert litellm.merge(merged, catalog, options) == merged
    assert litellm.drift(merged, catalog, options.metrics) == []
    users = [e for e in (config or {}).get("model_list", [])
             if e.get("model_info", {}).get(litellm.MANAGED) is not True]
    assert merged["model_list"][:len(users)] == users
    assert all(e.get("model_info", {}).get(litellm.MANAGED) is True
               for e in merged["model_list"][len(users):])
    for key in ("general_settings",):
        assert merged.get(key) == (config or {}).get(key)
    for cb in (config or {}).get("litellm_settings", {}).get("callbacks", []):
        assert cb in merged["litellm_settings"]["callbacks"]
    # No model is routed twice by the two owners together.
    names = [e["model_name"] for e in merged["model_list"][len(users):]]
    assert len(names) == len(set(names)) and not set(names) & {e["model_name"] for e in users}


@LAWS
@given(catalogs(), OPTIONS, st.data())
def test_removing_any_entry_a_reroute_can_pick_is_drift_and_merging_repairs_it(
        catalog: Catalog, options: litellm.Options, data: st.DataObject) -> None:
    merged = litellm.merge(None, catalog, options)
    gone = data.draw(st.sampled_from(list(catalog.models)))
    broken = {**merged, "model_list": [e for e in merged["model_list"]
                                       if e["model_name"] != gone]}
    found = litellm.drift(broken, catalog, options.metrics)
    assert len(found) == 1 and f"'{gone}'" in found[0]
    assert litellm.merge(broken, catalog, options) == merged
