"""Rules a CRD schema cannot say: across fields of one object, and across objects.

Used by ``tokenbudget validate``, by the validating admission webhook and by
the operator before it acts on an object, so the three say the same thing.
Each :class:`Problem` names the field path (``spec.actions[2].atPercent``) and
says what would be valid, in the API-convention "must" form.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pydantic

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
        key = (lim.window, lim.time_zone, lim.model)
        if key in seen:
            out.append(Problem(f"spec.limits[{i}]",
                               f"must not repeat spec.limits[{seen[key]}] (same window and model)"))
        seen[key] = i
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
    for field, matchers in (("spendMatchers", spec.spend_matchers),
                            ("outcome.matchers", spec.outcome.matchers if spec.outcome else ())):
        for i, m in enumerate(matchers):
            if m.operator in (api.MatchOperator.REGEX, api.MatchOperator.NOT_REGEX):
                try:
                    re.compile(m.value)
                except re.error as exc:
                    out.append(Problem(f"spec.{field}[{i}].value",
                                       f"must be a valid regular expression: {exc}"))
    both = set(spec.allowed_models) & set(spec.denied_models)
    for name in sorted(both):
        out.append(Problem("spec.deniedModels",
                           f"must not also appear in allowedModels: {name!r}"))
    if spec.outcome is not None and spec.outcome.max_cost_per_outcome is None \
            and spec.outcome.on_exceeded is not api.ActionType.WARN:
        out.append(Problem("spec.outcome.maxCostPerOutcome",
                           "must be set when onExceeded is given"))
    if catalog_models is not None:
        names = {m.name for m in catalog_models}
        for i, action in enumerate(spec.actions):
            if action.type is api.ActionType.REROUTE and action.model:
                if action.model not in names:
                    out.append(Problem(f"spec.actions[{i}].model",
                                       f"must name a model in a ModelCatalog; {action.model!r} "
                                       f"is in none (known: {', '.join(sorted(names)) or 'none'})"))
                elif any(pattern_matches(p, action.model) for p in spec.denied_models):
                    out.append(Problem(f"spec.actions[{i}].model",
                                       f"must not be a model this budget denies: {action.model!r}"))
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
    for i, m in enumerate(spec.models):
        for j, alias in enumerate(m.aliases):
            for k, other in enumerate(spec.models):
                if k != i and pattern_matches(alias, other.name):
                    out.append(Problem(f"spec.models[{i}].aliases[{j}]",
                                       f"must not match another model's name ({other.name!r})"))
    return out
