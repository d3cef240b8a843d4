"""Rules a CRD schema cannot say: across fields of one object, and across objects.

Used by ``tokenbudget validate``, by the validating admission webhook and by
the operator before it acts on an object, so the three say the same thing.
Each :class:`Problem` names the field path (``spec.actions[2].atPercent``) and
says what would be valid, in the API-convention "must" form; a rule across
fields names the other field too.

Spend-matcher regular expressions end up in PromQL, so they are checked with
RE2 (google-re2, the C++ library whose syntax Go's regexp, and so Prometheus,
implements) in the form Prometheus compiles them, ``^(?s:...)$``; Python's
``re`` would accept lookaheads and backreferences that Prometheus refuses.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pydantic
import re2

from token_budget.api import v1alpha1 as api
from token_budget.api.types import Calendar, LabelSelector, parse_window, pattern_matches

_SEVERITY = {
    api.ActionType.WARN: 0,
    api.ActionType.REROUTE: 1,
    api.ActionType.THROTTLE: 2,
    api.ActionType.BLOCK: 3,
}


@dataclass(frozen=True, order=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def schema_problems(body: dict[str, Any]) -> list[Problem]:
    """Parse a manifest; schema violations as problems (empty when it parses)."""
    try:
        api.parse(body)
    except pydantic.ValidationError as exc:
        found = [(_path(e["loc"]) or "(object)", _must(e), e["type"]) for e in exc.errors()]
        # A list whose only item failed also "has too few items": say only the real cause.
        return [Problem(path, msg) for path, msg, kind in found
                if not (kind == "too_short" and any(p.startswith(path + "[") for p, _, _ in found))]
    except ValueError as exc:
        return [Problem("(object)", str(exc))]
    return []


# pydantic's wording ("Tuple should have at least 1 item", "Extra inputs are not
# permitted") speaks of Python; these say the same in the API-convention "must" form.
_MUST = {
    "missing": "must be set",
    "extra_forbidden": "must not be set: the API has no such field (check its spelling)",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
    "string_too_short": "must have at least {min_length} character(s)",
    "string_too_long": "must have at most {max_length} character(s)",
    "string_pattern_mismatch": "must match the pattern {pattern}",
    "greater_than_equal": "must be greater than or equal to {ge}",
    "less_than_equal": "must be less than or equal to {le}",
    "enum": "must be one of {expected}",
    "literal_error": "must be {expected}",
    "timezone_aware": "must have a time-zone offset, such as 2025-07-01T00:00:00Z or "
                      "2025-07-01T09:00:00+02:00",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "string_type": "must be a string",
}


def _must(error: Any) -> str:
    template = _MUST.get(error["type"])
    if template is None:
        return str(error["msg"]).removeprefix("Value error, ")
    return template.format(**(error.get("ctx") or {}))


def _path(loc: Iterable[Any]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif str(part).startswith(("function-", "union[")):
            continue
        else:
            text += ("." if text else "") + str(part)
    return text


def problems(obj: api.ModelCatalog | api.TokenBudget | api.ClusterTokenBudget,
             catalog_models: Sequence[api.CatalogModel] | None = None) -> list[Problem]:
    """Cross-field problems of a parsed object.

    Args:
        obj: the parsed object.
        catalog_models: every catalog model known (to check reroute targets);
            None when no catalog is at hand, which skips those checks.
    """
    if isinstance(obj, api.ModelCatalog):
        return sorted(_catalog_problems(obj.spec))
    out = _budget_problems(obj.spec, catalog_models)
    if isinstance(obj, api.ClusterTokenBudget):
        sel = obj.spec.namespace_selector
        if not sel.match_labels and not sel.match_expressions:
            out.append(Problem(
                "spec.namespaceSelector",
                "must select by at least one label: an empty selector would govern every "
                "namespace, kube-system included",
            ))
        out += [Problem(f"spec.namespaceSelector.{p.split(' ', 1)[0]}", p.split(" ", 1)[1])
                for p in sel.problems()]
    return sorted(out)


def _selector_problems(sel: LabelSelector, path: str) -> list[Problem]:
    return [Problem(f"{path}.{p.split(' ', 1)[0]}", p.split(" ", 1)[1]) for p in sel.problems()]


def _budget_problems(spec: api.TokenBudgetSpec,
                     catalog_models: Sequence[api.CatalogModel] | None) -> list[Problem]:
    out = _selector_problems(spec.selector, "spec.selector")
    seen: dict[tuple[str, str, str | None], int] = {}
    for i, lim in enumerate(spec.limits):
        kind = parse_window(lim.window)
        if isinstance(kind, Calendar):
            try:
                ZoneInfo(lim.time_zone)
            except (ZoneInfoNotFoundError, ValueError):
                out.append(Problem(f"spec.limits[{i}].timeZone",
                                   f"must be an IANA time zone such as Europe/Berlin, "
                                   f"not {lim.time_zone!r}"))
        elif lim.time_zone != "UTC":
            out.append(Problem(f"spec.limits[{i}].timeZone",
                               "must be left unset for a rolling window; only Day, Week and "
                               "Month start at a time of day"))
        # 24h and 1d (and 1440m) are one span: the same limit twice, the smaller one wins.
        key = (str(kind), lim.time_zone, lim.model)
        if key in seen:
            j = seen[key]
            same = spec.limits[j].window
            spelled = f"{lim.window} is {same}" if same != lim.window else f"both {same}"
            out.append(Problem(f"spec.limits[{i}].window",
                               f"must not repeat spec.limits[{j}].window ({spelled}) for the "
                               "same model: merge the two limits into one"))
        seen.setdefault(key, i)
    prev: api.Action | None = None
    for i, action in enumerate(spec.actions):
        if prev is not None and action.at_percent <= prev.at_percent:
            out.append(Problem(f"spec.actions[{i}].atPercent",
                               f"must be greater than {prev.at_percent} (actions[{i - 1}]): "
                               "list the ladder in ascending order"))
        if prev is not None and _SEVERITY[action.type] < _SEVERITY[prev.type]:
            out.append(Problem(f"spec.actions[{i}].type",
                               f"must not be less restrictive than {prev.type.value} below it: "
                               "the ladder goes Warn, Reroute, Throttle, Block"))
        prev = action
    blocks = [i for i, a in enumerate(spec.actions) if a.type is api.ActionType.BLOCK]
    for i in blocks[1:]:
        out.append(Problem(f"spec.actions[{i}].type",
                           f"must not be a second Block: spec.actions[{blocks[0]}] already "
                           f"blocks at {spec.actions[blocks[0]].at_percent}%"))
    for field, matchers in (("spendMatchers", spec.spend_matchers),
                            ("outcome.matchers", spec.outcome.matchers if spec.outcome else ())):
        for i, m in enumerate(matchers):
            if m.operator in (api.MatchOperator.REGEX, api.MatchOperator.NOT_REGEX):
                error = promql_regex_error(m.value)
                if error:
                    out.append(Problem(f"spec.{field}[{i}].value",
                                       "must be a valid regular expression in RE2 syntax, as "
                                       f"Prometheus reads it: {error}"))
    both = set(spec.allowed_models) & set(spec.denied_models)
    for name in sorted(both):
        out.append(Problem("spec.deniedModels",
                           f"must not also appear in allowedModels: {name!r}"))
    if spec.outcome is not None and spec.outcome.max_cost_per_outcome is None \
            and spec.outcome.on_exceeded is not api.ActionType.WARN:
        out.append(Problem("spec.outcome.maxCostPerOutcome",
                           "must be set when onExceeded is given"))
    out += _reroute_problems(spec, catalog_models)
    out += _trigger_problems(spec.rate_limit, "spec.rateLimit")
    out += _partition_problems(spec)
    out += cost_source_problems(spec.cost_sources)
    if spec.rate_limit is not None and spec.source.preset is api.Preset.ENVOY_AI_GATEWAY \
            and (spec.source.metrics is None or not spec.source.metrics.rate_limited_requests):
        out.append(Problem("spec.source.metrics.rateLimitedRequests",
                           "must be set for a rateLimit trigger with the EnvoyAIGateway "
                           "preset: the gateway records every failed request as "
                           "error.type=\"_OTHER\", so 429 answers cannot be told apart"))
    return out


def _trigger_problems(trigger: api.RateLimitTrigger | None, path: str) -> list[Problem]:
    """The hysteresis must leave a point where a rate-limit reroute lifts."""
    if trigger is None or trigger.hysteresis_percent < trigger.threshold_percent:
        return []
    return [Problem(f"{path}.hysteresisPercent",
                    f"must be less than thresholdPercent ({trigger.threshold_percent}): "
                    "a reroute would never lift")]


def _fallback_problems(spec: api.ModelCatalogSpec, by_name: dict[str, int]) -> list[Problem]:
    """Each rate-limit fallback is another model of the catalog, named once."""
    out = []
    for i, m in enumerate(spec.models):
        seen: set[str] = set()
        for j, fb in enumerate(m.rate_limit_fallbacks):
            path = f"spec.models[{i}].rateLimitFallbacks[{j}]"
            if fb == m.name:
                out.append(Problem(path, "must not name the model itself"))
            elif fb not in by_name:
                out.append(Problem(path, f"must name a model of this catalog; {fb!r} is not one"))
            elif fb in seen:
                out.append(Problem(path, f"must be unique; {fb!r} is named twice"))
            seen.add(fb)
    return out


def _partition_problems(spec: api.TokenBudgetSpec) -> list[Problem]:
    """A partition must be able to have more than one value, on both sides.

    A spend matcher pinning ``partition.label`` with Equal leaves one partition of
    spend; a selector pinning ``partition.podLabel`` governs one partition's
    workloads only: either is a budget that is not split, written as if it were.
    """
    p = spec.partition
    if p is None:
        return []
    out = []
    for i, m in enumerate(spec.spend_matchers):
        if m.label == p.label and m.operator is api.MatchOperator.EQUAL:
            out.append(Problem("spec.partition.label",
                               f"must not be a label spendMatchers[{i}] pins to one value "
                               f'({m.label}="{m.value}"): the budget would have one '
                               "partition; drop the matcher or the partition"))
    pinned = spec.selector.match_labels.get(p.pod_label)
    if pinned is not None:
        out.append(Problem("spec.partition.podLabel",
                           f"must not be a label the selector pins to one value "
                           f'({p.pod_label}="{pinned}"): only that partition\'s workloads '
                           "would be governed; drop it from the selector"))
    return out


def _reroute_problems(spec: api.TokenBudgetSpec,
                      catalog_models: Sequence[api.CatalogModel] | None) -> list[Problem]:
    """A named Reroute target must exist and be a model this same budget allows.

    Otherwise the reroute sends agents to a model that admission then refuses. A
    Reroute without a model needs no check here: the engine only picks equivalents
    the budget allows (``engine.cheapest_equivalent``). Without a catalog, only the
    budget's own allowedModels and deniedModels are checked.
    """
    out = []
    by_name = {m.name: m for m in catalog_models or ()}
    for i, action in enumerate(spec.actions):
        if action.type is not api.ActionType.REROUTE or not action.model:
            continue
        path = f"spec.actions[{i}].model"
        entry = by_name.get(action.model)
        if catalog_models is not None and entry is None:
            out.append(Problem(path, f"must name a model in a ModelCatalog; {action.model!r} "
                                     f"is in none (known: {', '.join(sorted(by_name)) or 'none'})"))
            continue
        names = {action.model, *(entry.aliases if entry else ())}
        denied = next((p for p in spec.denied_models for n in names if pattern_matches(p, n)),
                      None)
        if denied is not None:
            out.append(Problem(path, f"must not be a model this budget denies: {action.model!r} "
                                     f"matches deniedModels {denied!r}"))
        elif entry is not None and entry.tier in spec.denied_tiers:
            out.append(Problem(path, f"must not be a model this budget denies: {action.model!r} "
                                     f"is {entry.tier.value}, and deniedTiers includes it"))
        elif spec.allowed_models and not any(pattern_matches(p, n) for p in spec.allowed_models
                                             for n in names):
            out.append(Problem(path, f"must be a model this budget allows: {action.model!r} "
                                     "matches none of allowedModels "
                                     f"({', '.join(spec.allowed_models)})"))
    return out


@functools.lru_cache(maxsize=1024)
def promql_regex_error(value: str) -> str | None:
    """Why Prometheus would refuse ``value`` as a ``=~`` matcher; None when it would not.

    Prometheus anchors the expression as ``^(?s:value)$`` and compiles it with Go's
    regexp, whose syntax is RE2's. google-re2 accepts one construct Go refuses, ``\\C``
    (any byte), which is refused here by hand.
    """
    options = re2.Options()
    options.log_errors = False
    try:
        re2.compile(f"^(?s:{value})$", options)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        return detail.decode() if isinstance(detail, bytes) else str(detail)
    if _has_any_byte_escape(value):
        return "invalid escape sequence: \\C"
    return None


def _has_any_byte_escape(value: str) -> bool:
    i = 0
    while i < len(value) - 1:
        if value[i] == "\\":
            if value[i + 1] == "C":
                return True
            i += 2
        else:
            i += 1
    return False


def cost_source_problems(found: Sequence[api.CostSource]) -> list[Problem]:
    """Names once each, a positive unit count, matchers Prometheus can read."""
    out = []
    first: dict[str, int] = {}
    for i, c in enumerate(found):
        path = f"spec.costSources[{i}]"
        if c.name in first:
            out.append(Problem(f"{path}.name",
                               f"must be unique: spec.costSources[{first[c.name]}] is also "
                               f"named {c.name!r}"))
        first.setdefault(c.name, i)
        if c.units_per_price <= 0:
            out.append(Problem(f"{path}.unitsPerPrice",
                               "must be greater than 0: it is how many units the price buys"))
        for j, m in enumerate(c.matchers):
            if m.operator in (api.MatchOperator.REGEX, api.MatchOperator.NOT_REGEX):
                error = promql_regex_error(m.value)
                if error:
                    out.append(Problem(f"{path}.matchers[{j}].value",
                                       "must be a valid regular expression in RE2 syntax, as "
                                       f"Prometheus reads it: {error}"))
        if c.labels.namespace == c.labels.workload:
            out.append(Problem(f"{path}.labels.workload",
                               "must differ from labels.namespace: spend is grouped by both"))
    return out


def _catalog_problems(spec: api.ModelCatalogSpec) -> list[Problem]:
    out = []
    by_name: dict[str, int] = {}
    for i, m in enumerate(spec.models):
        if m.name in by_name:
            out.append(Problem(f"spec.models[{i}].name",
                               f"must be unique; {m.name!r} is also "
                               f"spec.models[{by_name[m.name]}]"))
        by_name.setdefault(m.name, i)
    for i, m in enumerate(spec.models):
        price = m.pricing.input + m.pricing.output
        for j, eq in enumerate(m.equivalents):
            path = f"spec.models[{i}].equivalents[{j}]"
            if eq == m.name:
                out.append(Problem(path, "must not name the model itself"))
            elif eq not in by_name:
                out.append(Problem(path, f"must name a model of this catalog; {eq!r} is not one"))
            else:
                other = spec.models[by_name[eq]]
                if other.pricing.input + other.pricing.output > price:
                    out.append(Problem(path, f"must be cheaper than {m.name}: {eq} costs more "
                                             "per million input + output tokens"))
    out += _equivalent_cycles(spec, by_name)
    out += _fallback_problems(spec, by_name)
    out += _trigger_problems(spec.rate_limit, "spec.rateLimit")
    for i, m in enumerate(spec.models):
        for j, alias in enumerate(m.aliases):
            for k, other in enumerate(spec.models):
                if k != i and pattern_matches(alias, other.name):
                    out.append(Problem(f"spec.models[{i}].aliases[{j}]",
                                       f"must not match another model's name ({other.name!r})"))
    out += cost_source_problems(spec.cost_sources)
    return out


def _equivalent_cycles(spec: api.ModelCatalogSpec, by_name: dict[str, int]) -> list[Problem]:
    """Equivalents must not lead back to the model: a reroute would go round in circles.

    Every equivalent costs at most its model (checked above), so a cycle is a ring of
    models at one price, each "cheaper" than the next. Found as the strongly connected
    components of the equivalents graph (linear, whatever the catalog's size), reported
    once per ring at the equivalent of its first model that stays in the ring.
    """
    edges = {m.name: [e for e in m.equivalents if e in by_name and e != m.name]
             for m in spec.models}
    out = []
    for ring in _components(edges):
        if len(ring) < 2:
            continue
        first = min(ring, key=lambda n: by_name[n])
        model = spec.models[by_name[first]]
        j = next(j for j, e in enumerate(model.equivalents) if e in ring and e != first)
        names = ", ".join(sorted(ring, key=lambda n: by_name[n]))
        out.append(Problem(f"spec.models[{by_name[first]}].equivalents[{j}]",
                           f"must not lead back to {first}: the equivalents of {names} form "
                           "a cycle at one price; an equivalent must be a cheaper model"))
    return out


def _components(edges: dict[str, list[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, nxt = work.pop()
            if nxt == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            targets = edges.get(node, [])
            if nxt < len(targets):
                work.append((node, nxt + 1))
                child = targets[nxt]
                if child not in index:
                    work.append((child, 0))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            if low[node] == index[node]:
                ring = set()
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    ring.add(top)
                    if top == node:
                        break
                found.append(ring)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return found
