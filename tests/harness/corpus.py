"""A corpus of manifests for the differential test: one case per rule, bad and good.

Each :class:`Case` is one manifest built from a valid base object by one change,
named after the rule it exercises, with the verdict its author expects. The
cases come from each schema rule of the generated CRDs (types, int64 bounds,
formats, patterns, lengths, bounds, enums, required fields, CEL rules), the
object-metadata rules of the API server, the kind lookup ``kubectl`` does, and
each rule of the operator's validating webhook (:mod:`token_budget.api.rules`);
the good cases sit next to the edges of the same rules (a 64-bit maximum, an
offset in lowercase, ``1d`` beside ``Day``, a null the API server drops).

Used by ``tests/unit/test_corpus.py`` (``tokenbudget validate`` gives each
case its expected verdict, no cluster) and ``tests/e2e/test_validate_differential.py``
(the real API server with the webhooks gives the same verdict as
``tokenbudget validate``). Cross-object cases name models of
``examples/model-catalog.yaml``, which the e2e ``kube`` fixture installs; the
good catalogs here use ``house-*`` names so that they change no budget's verdict.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

API = "tokenbudget.io/v1alpha1"
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Case:
    id: str
    body: dict[str, Any]
    valid: bool

    @property
    def kind(self) -> str:
        return str(self.body.get("kind", ""))


def _budget() -> dict[str, Any]:
    return {"apiVersion": API, "kind": "TokenBudget", "metadata": {"name": "b"},
            "spec": {"limits": [{"window": "24h", "tokens": 1000}],
                     "actions": [{"type": "Warn", "atPercent": 80},
                                 {"type": "Block", "atPercent": 100}]}}


def _cluster_budget() -> dict[str, Any]:
    return {"apiVersion": API, "kind": "ClusterTokenBudget", "metadata": {"name": "c"},
            "spec": {"namespaceSelector": {"matchLabels": {"environment": "qa"}},
                     "limits": [{"window": "Month", "cost": "300"}]}}


def _catalog() -> dict[str, Any]:
    return {"apiVersion": API, "kind": "ModelCatalog", "metadata": {"name": "house"},
            "spec": {"models": [
                {"name": "house-large", "tier": "Frontier",
                 "pricing": {"input": "2.00", "output": "8.00"},
                 "equivalents": ["house-small"]},
                {"name": "house-small", "tier": "Economy",
                 "pricing": {"input": "0.10", "output": "0.40"}}]}}


_BASES: dict[str, Callable[[], dict[str, Any]]] = {
    "tb": _budget, "ctb": _cluster_budget, "cat": _catalog}


def _set(body: dict[str, Any], path: str, value: Any) -> None:
    """Set ``a.b[0].c`` (creating maps on the way); value ``...`` deletes the member."""
    parts: list[str | int] = []
    for chunk in path.split("."):
        name, _, rest = chunk.partition("[")
        if name.isdigit():
            parts.append(int(name))
        elif name:
            parts.append(name)
        for idx in filter(None, rest.replace("]", "").split("[")):
            parts.append(int(idx))
    node: Any = body
    for part in parts[:-1]:
        if isinstance(part, str) and (part not in node or node[part] is None):
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if value is ...:
        del node[last]
    else:
        node[last] = value


def _case(id: str, base: str, valid: bool, **changes: Any) -> Case:
    body = _BASES[base]()
    for path, value in changes.items():
        _set(body, path.replace("__", "."), copy.deepcopy(value))
    return Case(id, body, valid)


def _bad(id: str, base: str, **changes: Any) -> Case:
    return _case(id, base, False, **changes)


def _good(id: str, base: str, **changes: Any) -> Case:
    return _case(id, base, True, **changes)


def _with(id: str, base: str, valid: bool, edit: Callable[[dict[str, Any]], None]) -> Case:
    body = _BASES[base]()
    edit(body)
    return Case(id, body, valid)


def _limits(*limits: dict[str, Any]) -> list[dict[str, Any]]:
    return list(limits)


def _actions(*pairs: tuple[str, int]) -> list[dict[str, Any]]:
    return [{"type": t, "atPercent": p} for t, p in pairs]


def _matchers(value: str, operator: str = "Regex") -> list[dict[str, Any]]:
    return [{"label": "team", "operator": operator, "value": value}]


def _models(*models: tuple[str, str, str, list[str]]) -> list[dict[str, Any]]:
    """(name, input price, output price, equivalents) -> catalog models."""
    return [{"name": n, "tier": "Standard", "pricing": {"input": i, "output": o},
             "equivalents": eq} for n, i, o, eq in models]


def _kind_and_metadata() -> Iterator[Case]:
    yield _bad("apiVersion missing", "tb", apiVersion=...)
    yield _bad("apiVersion group misspelt", "tb", apiVersion="tokenbudgets.io/v1alpha1")
    yield _bad("apiVersion version unknown", "tb", apiVersion="tokenbudget.io/v1beta1")
    yield _bad("apiVersion misspelt on a catalog", "cat", apiVersion="tokenbudget.io/v1")
    yield _bad("kind missing", "tb", kind=...)
    yield _bad("kind unknown in our group", "tb", kind="TokenBudgets")
    yield _bad("kind in the wrong case", "ctb", kind="ClusterTokenbudget")
    yield _bad("unknown top-level field", "tb", specs={"limits": []})
    yield _bad("unknown top-level field on a catalog", "cat", status_={})
    yield _bad("unknown metadata field", "tb", metadata__labelz={"a": "b"})
    yield _bad("metadata missing", "tb", metadata=...)
    yield _bad("metadata.name missing", "tb", metadata={"labels": {"a": "b"}})
    yield _bad("metadata.name with capitals", "tb", metadata__name="Team-Search")
    yield _bad("metadata.name with an underscore", "ctb", metadata__name="team_search")
    yield _bad("metadata.name starting with a dash", "cat", metadata__name="-house")
    yield _bad("metadata.name longer than 253", "tb", metadata__name="a" * 254)
    yield _bad("metadata.name a number", "tb", metadata__name=42)
    yield _bad("metadata.namespace not a DNS label", "tb", metadata__namespace="Team_Search")
    yield _bad("label key with two slashes", "tb", metadata__labels={"a/b/c": "x"})
    yield _bad("label value longer than 63", "tb", metadata__labels={"team": "x" * 64})
    yield _bad("label value with a space", "ctb", metadata__labels={"team": "a b"})
    yield _bad("label value a number", "tb", metadata__labels={"tier": 1})
    yield _bad("annotation value a boolean", "cat", metadata__annotations={"a": True})
    yield _good("resourceVersion on a create (ignored)", "tb", metadata__resourceVersion="12")
    yield _good("name with dots", "tb", metadata__name="team.search.v1")
    yield _good("generateName only", "tb", metadata={"generateName": "team-"})
    yield _good("labels and annotations", "ctb", metadata__labels={"example.com/team": "a.b_c"},
                metadata__annotations={"note": "any text, even: colons"})
    yield _good("name of 253 characters", "cat", metadata__name="a" * 253)


def _types_and_bounds() -> Iterator[Case]:
    yield _bad("tokens as a string", "tb", spec__limits__0__tokens="200000000")
    yield _bad("atPercent as a string", "tb", spec__actions__0__atPercent="75")
    yield _bad("tokens a fraction", "tb", spec__limits__0__tokens=1.5)
    yield _bad("tokens a boolean", "tb", spec__limits__0__tokens=True)
    yield _bad("tokens beyond int64", "tb", spec__limits__0__tokens=INT64_MAX + 1)
    yield _bad("tokensPerMinute beyond int64", "tb",
               spec__actions=[{"type": "Throttle", "atPercent": 90,
                               "tokensPerMinute": 9223372036854775808}])
    yield _bad("staleAfterSeconds beyond int64", "ctb",
               spec__whenSpendUnknown={"staleAfterSeconds": 2**64})
    yield _bad("cost as a number", "tb", spec__limits__0={"window": "1h", "cost": 300})
    yield _bad("cost as a float", "ctb", spec__limits__0__cost=12.5)
    yield _bad("window as a number", "tb", spec__limits__0__window=24)
    yield _bad("mode a boolean", "tb", spec__mode=True)
    yield _bad("limits an object", "tb", spec__limits={"window": "1h", "tokens": 5})
    yield _bad("actions a string", "tb", spec__actions="Warn at 80")
    yield _bad("matchLabels value a number", "tb", spec__selector={"matchLabels": {"a": 1}})
    yield _bad("deniedModels item a number", "tb", spec__deniedModels=[5])
    yield _bad("hysteresisPercent as a string", "tb", spec__hysteresisPercent="5")
    yield _bad("spec a list", "cat", spec=[])
    yield _bad("spec missing", "tb", spec=...)
    yield _bad("a limit that is null", "tb", spec__limits=[None])
    yield _bad("limits null", "tb", spec__limits=None)
    yield _bad("tokens 0", "tb", spec__limits__0__tokens=0)
    yield _bad("tokens negative", "tb", spec__limits__0__tokens=-1)
    yield _bad("atPercent 0", "tb", spec__actions__0__atPercent=0)
    yield _bad("atPercent over 1000", "tb", spec__actions__1__atPercent=1001)
    yield _bad("hysteresisPercent over 50", "ctb", spec__hysteresisPercent=51)
    yield _bad("staleAfterSeconds under 30", "tb",
               spec__whenSpendUnknown={"staleAfterSeconds": 29})
    yield _bad("staleAfterSeconds over a week", "tb",
               spec__whenSpendUnknown={"staleAfterSeconds": 604801})
    yield _bad("tokensPerMinute 0", "tb",
               spec__actions=[{"type": "Throttle", "atPercent": 90, "tokensPerMinute": 0}])
    yield _good("tokens at the int64 maximum", "tb", spec__limits__0__tokens=INT64_MAX)
    # kube-openapi takes 5.0 for an integer, the CEL rule reading it does not.
    yield _bad("tokens written as 5.0", "tb", spec__limits__0__tokens=5.0)
    yield _good("a limit model that is null (dropped)", "tb", spec__limits__0__model=None)
    yield _good("actions null (defaulted)", "tb", spec__actions=None)
    yield _good("bounds at their edges", "tb", spec__hysteresisPercent=50,
                spec__actions=_actions(("Warn", 1), ("Block", 1000)),
                spec__whenSpendUnknown={"staleAfterSeconds": 30})


def _lists_and_strings() -> Iterator[Case]:
    one = {"window": "1h", "tokens": 1}
    yield _bad("limits empty", "tb", spec__limits=[])
    yield _bad("catalog without models", "cat", spec__models=[])
    yield _bad("17 limits", "tb", spec__limits=[dict(one, model=f"m{i}") for i in range(17)])
    yield _bad("9 actions", "tb", spec__actions=_actions(*[("Warn", i + 1) for i in range(9)]))
    yield _bad("17 spend matchers", "tb",
               spec__spendMatchers=[{"label": f"l{i}", "value": "x"} for i in range(17)])
    yield _bad("65 aliases", "cat", spec__models__0__aliases=[f"a{i}" for i in range(65)])
    yield _bad("17 equivalents", "cat", spec__models__0__equivalents=["house-small"] * 17)
    yield _bad("exception reason empty", "tb",
               spec__exceptions=[{"until": "2030-01-01T00:00:00Z", "reason": ""}])
    yield _bad("exception reason too long", "tb",
               spec__exceptions=[{"until": "2030-01-01T00:00:00Z", "reason": "r" * 1025}])
    yield _bad("reroute model longer than 253", "tb",
               spec__actions=[{"type": "Reroute", "atPercent": 90, "model": "m" * 254}])
    yield _bad("provider longer than 63", "cat", spec__models__0__provider="p" * 64)
    yield _bad("timeZone longer than 64", "tb",
               spec__limits__0={"window": "Day", "tokens": 1, "timeZone": "Z" * 65})
    yield _bad("matcher value longer than 1024", "tb",
               spec__spendMatchers=[{"label": "team", "value": "v" * 1025}])
    yield _good("16 limits", "tb", spec__limits=[dict(one, model=f"m{i}") for i in range(16)])


def _patterns_enums_formats() -> Iterator[Case]:
    for window in ("2 hours", "0h", "day", "100000h", "24H", "1w"):
        yield _bad(f"window {window!r}", "tb", spec__limits__0__window=window)
    for cost in ("12.5.0", "-1", "1e3", "1234567890123", "1.1234567890", "12.50\n", "$12"):
        yield _bad(f"cost {cost!r}", "ctb", spec__limits__0__cost=cost)
    yield _bad("currency in lower case", "cat", spec__currency="usd")
    yield _bad("currency of four letters", "cat", spec__currency="EURO")
    yield _bad("model name starting with a dash", "cat", spec__models__0__name="-large")
    yield _bad("price with a currency sign", "cat", spec__models__1__pricing__input="$0.10")
    yield _bad("outcome metric with a dash", "tb", spec__outcome={"metric": "agent-outcomes"})
    yield _bad("outcome namespaceLabel with a dash", "tb",
               spec__outcome={"metric": "agent_outcomes_total", "namespaceLabel": "ns-label"})
    yield _bad("matcher label with a dash", "tb",
               spec__spendMatchers=[{"label": "team-name", "value": "x"}])
    yield _bad("source metric name starting with a digit", "tb",
               spec__source={"metrics": {"inputTokens": "1tokens"}})
    yield _bad("allowedModels item with a space", "tb", spec__allowedModels=["gpt 5"])
    yield _bad("mode in lower case", "tb", spec__mode="enforce")
    yield _bad("preset unknown", "tb", spec__source={"preset": "Prometheus"})
    yield _bad("action type unknown", "tb", spec__actions__0__type="Alert")
    yield _bad("matcher operator unknown", "tb",
               spec__spendMatchers=[{"label": "team", "operator": "Regexp", "value": "x"}])
    yield _bad("tier unknown", "cat", spec__models__0__tier="Premium")
    yield _bad("deniedTiers in lower case", "ctb", spec__deniedTiers=["frontier"])
    yield _bad("whenSpendUnknown policy unknown", "tb",
               spec__whenSpendUnknown={"policy": "Fail"})
    yield _bad("limitScope unknown", "ctb", spec__limitScope="Global")
    yield _bad("selector operator unknown", "tb", spec__selector={
        "matchExpressions": [{"key": "a", "operator": "Equals", "values": ["b"]}]})
    for until in ("2025-07-01", "2025-07-01T00:00:00", "2025-07-01 00:00:00Z",
                  "2025-07-01T25:00:00Z", "2025-07-01T00:00Z", "2025-02-30T00:00:00Z",
                  "July 1st 2025"):
        yield _bad(f"until {until!r}", "tb",
                   spec__exceptions=[{"until": until, "reason": "launch"}])
    yield _bad("until a Unix timestamp", "tb",
               spec__exceptions=[{"until": 1751328000, "reason": "launch"}])
    for until in ("2030-07-01T00:00:00Z", "2030-07-01T09:00:00+02:00",
                  "2030-07-01T00:00:00.250Z", "2030-07-01t00:00:00z"):
        yield _good(f"until {until!r}", "tb",
                    spec__exceptions=[{"until": until, "reason": "launch"}])
    yield _good("cost of a cent", "ctb", spec__limits__0__cost="0.01")
    yield _good("cost with nine decimals", "ctb", spec__limits__0__cost="0.000000001")


def _required_and_cel() -> Iterator[Case]:
    yield _bad("limit window missing", "tb", spec__limits=[{"tokens": 5}])
    yield _bad("action type missing", "tb", spec__actions=[{"atPercent": 80}])
    yield _bad("action atPercent missing", "tb", spec__actions=[{"type": "Block"}])
    yield _bad("exception until missing", "tb", spec__exceptions=[{"reason": "launch"}])
    yield _bad("matcher value missing", "tb", spec__spendMatchers=[{"label": "team"}])
    yield _bad("catalog model name missing", "cat", spec__models__1__name=...)
    yield _bad("catalog model tier missing", "cat", spec__models__1__tier=...)
    yield _bad("pricing output missing", "cat", spec__models__1__pricing__output=...)
    yield _bad("namespaceSelector missing", "ctb", spec__namespaceSelector=...)
    yield _bad("outcome metric missing", "tb", spec__outcome={"window": "24h"})
    yield _bad("selector requirement key missing", "tb", spec__selector={
        "matchExpressions": [{"operator": "Exists"}]})
    # The CEL rules, one case each (and the zero cap both ways it can be written).
    yield _bad("limit without tokens or cost", "tb", spec__limits=[{"window": "1h"}])
    yield _bad("cost 0.00", "tb", spec__limits=[{"window": "Month", "cost": "0.00"}])
    yield _bad("cost 0", "ctb", spec__limits__0__cost="0")
    yield _bad("model on a Warn", "tb",
               spec__actions=[{"type": "Warn", "atPercent": 80, "model": "gpt-5-mini"}])
    yield _bad("tokensPerMinute on a Block", "tb",
               spec__actions=[{"type": "Block", "atPercent": 100, "tokensPerMinute": 5}])
    yield _bad("two actions at one atPercent", "tb",
               spec__actions=_actions(("Warn", 80), ("Throttle", 80)))
    yield _good("tokens and cost together", "tb",
                spec__limits=[{"window": "1h", "tokens": 5, "cost": "0.50"}])
    yield _good("throttle with a rate", "tb", spec__actions=[
        {"type": "Warn", "atPercent": 50},
        {"type": "Throttle", "atPercent": 90, "tokensPerMinute": 1000}])


def _webhook_budget_rules() -> Iterator[Case]:
    yield _bad("ladder out of order", "tb", spec__actions=_actions(("Block", 90), ("Warn", 50)))
    yield _bad("Warn above Throttle", "tb",
               spec__actions=_actions(("Throttle", 50), ("Warn", 90)))
    yield _bad("a second Block", "tb",
               spec__actions=_actions(("Warn", 50), ("Block", 90), ("Block", 100)))
    yield _bad("a second Block on a cluster budget", "ctb",
               spec__actions=_actions(("Block", 90), ("Block", 120)))
    for a, b in (("24h", "24h"), ("24h", "1d"), ("60m", "1h"), ("1440m", "1d"), ("168h", "7d")):
        yield _bad(f"limits {a} and {b}", "tb", spec__limits=_limits(
            {"window": a, "tokens": 100}, {"window": b, "cost": "5"}))
    yield _bad("a calendar window twice", "ctb", spec__limits=_limits(
        {"window": "Week", "cost": "5"}, {"window": "Week", "tokens": 5}))
    yield _bad("time zone misspelt", "tb",
               spec__limits=[{"window": "Day", "timeZone": "Europe/Berln", "tokens": 5}])
    yield _bad("time zone on a rolling window", "tb",
               spec__limits=[{"window": "24h", "timeZone": "Europe/Berlin", "tokens": 5}])
    for name, value in (("lookahead", "search(?=-prod)"), ("lookbehind", "(?<=team-)a"),
                        ("backreference", r"(a)\1"), ("possessive quantifier", "a*+"),
                        ("unbalanced group", "(search"), ("named backreference", r"(?P<x>a)\k<x>"),
                        ("any-byte escape", r"a\C"), ("repetition over 1000", "a{1001}"),
                        ("atomic group", "(?>abc)")):
        yield _bad(f"spend matcher {name}", "tb", spec__spendMatchers=_matchers(value))
    yield _bad("NotRegex matcher with a lookahead", "ctb",
               spec__spendMatchers=_matchers("x(?!y)", "NotRegex"))
    yield _bad("outcome matcher with a backreference", "tb", spec__outcome={
        "metric": "agent_outcomes_total", "matchers": _matchers(r"(s)\1")})
    yield _bad("a model both allowed and denied", "tb",
               spec__allowedModels=["gpt-5"], spec__deniedModels=["gpt-5"])
    yield _bad("onExceeded Block without maxCostPerOutcome", "tb", spec__outcome={
        "metric": "agent_outcomes_total", "onExceeded": "Block"})
    yield _bad("selector In without values", "tb", spec__selector={
        "matchExpressions": [{"key": "a", "operator": "In"}]})
    yield _bad("selector Exists with values", "ctb", spec__selector={
        "matchExpressions": [{"key": "a", "operator": "Exists", "values": ["b"]}]})
    yield _bad("empty namespaceSelector", "ctb", spec__namespaceSelector={})
    yield _bad("namespaceSelector NotIn without values", "ctb", spec__namespaceSelector={
        "matchExpressions": [{"key": "env", "operator": "NotIn"}]})
    reroute = {"type": "Reroute", "atPercent": 90}
    yield _bad("reroute to a model in no catalog", "tb",
               spec__actions=[dict(reroute, model="gpt-7-turbo")])
    yield _bad("reroute to a denied model", "tb", spec__deniedModels=["gpt-5-mini"],
               spec__actions=[dict(reroute, model="gpt-5-mini")])
    yield _bad("reroute to a model a denied pattern matches", "tb", spec__deniedModels=["gpt-5*"],
               spec__actions=[dict(reroute, model="gpt-5-nano")])
    yield _bad("reroute to a model denied by its alias", "ctb",
               spec__deniedModels=["anthropic/*"],
               spec__actions=[dict(reroute, model="claude-haiku-4-5")])
    yield _bad("reroute to a denied tier", "ctb", spec__deniedTiers=["Standard"],
               spec__actions=[dict(reroute, model="gpt-5-mini")])
    yield _bad("reroute to a model outside allowedModels", "tb",
               spec__allowedModels=["claude-*"],
               spec__actions=[dict(reroute, model="gpt-5-mini")])
    # Good neighbours of the same rules.
    yield _good("1d rolling beside a calendar Day", "tb", spec__limits=_limits(
        {"window": "1d", "tokens": 100}, {"window": "Day", "cost": "5"}))
    yield _good("one window on two models", "tb", spec__limits=_limits(
        {"window": "24h", "tokens": 100, "model": "gpt-5*"},
        {"window": "1d", "tokens": 100, "model": "claude-*"}))
    yield _good("one calendar window in two time zones", "ctb", spec__limits=_limits(
        {"window": "Day", "cost": "5"}, {"window": "Day", "cost": "9",
                                         "timeZone": "Europe/Berlin"}))
    yield _good("two Warn rungs", "tb",
                spec__actions=_actions(("Warn", 50), ("Warn", 80), ("Block", 100)))
    for name, value in (("Unicode class", r"\pL+"), ("case-insensitive flag", "(?i)search|ads"),
                        ("POSIX class", "[[:alpha:]]+"), ("end of text", r"search\z"),
                        ("named group", "(?P<team>a|b)")):
        yield _good(f"spend matcher {name}", "tb", spec__spendMatchers=_matchers(value))
    yield _good("reroute to an allowed model", "tb", spec__allowedModels=["gpt-5*"],
                spec__actions=[dict(reroute, model="gpt-5-nano")])
    yield _good("reroute without a model", "ctb", spec__deniedTiers=["Frontier"],
                spec__actions=[reroute, {"type": "Block", "atPercent": 100}])
    yield _good("shared limits", "ctb", spec__limitScope="Shared",
                spec__namespaceSelector={"matchExpressions": [
                    {"key": "env", "operator": "In", "values": ["qa", "dev"]}]})
    yield _good("an outcome with a cap", "tb", spec__outcome={
        "metric": "agent_outcomes_total", "maxCostPerOutcome": "0.75", "onExceeded": "Throttle",
        "matchers": [{"label": "outcome", "value": "success"}]})
    yield _good("DryRun mode with a LiteLLM source", "tb", spec__mode="DryRun",
                spec__source={"preset": "LiteLLM", "labels": {"model": "model_group"}})


def _webhook_catalog_rules() -> Iterator[Case]:
    yield _bad("a model name twice", "cat", spec__models__1__name="house-large")
    yield _bad("an equivalent naming the model itself", "cat",
               spec__models__1__equivalents=["house-small"])
    yield _bad("an equivalent in no catalog", "cat", spec__models__0__equivalents=["house-mini"])
    yield _bad("an equivalent more expensive", "cat",
               spec__models__1__equivalents=["house-large"])
    yield _bad("equivalents in a ring of two at one price", "cat", spec__models=_models(
        ("house-a", "1.00", "2.00", ["house-b"]), ("house-b", "1.00", "2.00", ["house-a"])))
    yield _bad("equivalents in a ring of three at one price", "cat", spec__models=_models(
        ("house-a", "1.00", "2.00", ["house-b"]), ("house-b", "2.00", "1.00", ["house-c"]),
        ("house-c", "1.50", "1.50", ["house-a"])))
    yield _bad("an alias matching another model", "cat", spec__models__0__aliases=["house-*"])
    yield _good("an equivalent at the same price, no ring", "cat", spec__models=_models(
        ("house-a", "1.00", "2.00", ["house-b"]), ("house-b", "1.00", "2.00", [])))
    yield _good("a free model", "cat", spec__models__1__pricing={"input": "0", "output": "0"})
    yield _good("a catalog in euros with aliases", "cat", spec__currency="EUR",
                spec__models__0__aliases=["vendor/house-large*"],
                spec__models__0__provider="vendor")


def _examples() -> Iterator[Case]:
    root = Path(__file__).resolve().parents[2] / "examples"
    for path in sorted(root.glob("*.yaml")):
        for i, body in enumerate(yaml.safe_load_all(path.read_text())):
            if body and body.get("apiVersion") == API and body["kind"] != "ModelCatalog":
                body = copy.deepcopy(body)
                body["metadata"].pop("namespace", None)
                yield Case(f"example {path.name}#{i}", body, True)
    yield _good("minimal budget", "tb")
    yield _good("minimal cluster budget", "ctb")
    yield _good("minimal catalog", "cat")


def cases() -> list[Case]:
    """Every case, with ids unique."""
    out = [*_kind_and_metadata(), *_types_and_bounds(), *_lists_and_strings(),
           *_patterns_enums_formats(), *_required_and_cel(), *_webhook_budget_rules(),
           *_webhook_catalog_rules(), *_examples()]
    ids = [c.id for c in out]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    return out


def write(directory: Path) -> dict[Path, Case]:
    """One YAML file per case under ``directory``, by path.

    JSON is valid YAML and keeps every value as the case holds it (strings stay
    strings, 2**64 stays an integer), so the files say exactly what the API server
    is sent.
    """
    import json

    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for n, case in enumerate(cases()):
        path = directory / f"{n:03d}.yaml"
        path.write_text(json.dumps(case.body, indent=1) + "\n")
        out[path] = case
    return out
