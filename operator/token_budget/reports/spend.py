"""``tokenbudget report``: what the tokens bought, from Prometheus, without writing PromQL.

Spend over ``--since`` by namespace, budget, model and workload, cost per
outcome where a budget declares outcomes, and the savings the catalog makes
visible: spend on frontier models in namespaces whose budgets allow a cheaper
equivalent, and what the same tokens would have cost there.

Spend is read the one way the operator reads it, so a report and a budget's
status agree on the same window: the planner's queries
(:func:`token_budget.policy.planner.report_plan`), the Prometheus adapter's
snapshot (:meth:`PrometheusSource.collect`), and the engine's per-scope sums
with every spend and outcome matcher (:func:`token_budget.policy.engine.scope_spend`).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from token_budget.api import v1alpha1 as api
from token_budget.api.types import display_money, plain_money
from token_budget.errors import MetricsError
from token_budget.metrics import costs as cost_reading
from token_budget.metrics.prometheus import PrometheusSource
from token_budget.policy import costs, engine, planner, sources
from token_budget.policy.catalog import MILLION, Catalog
from token_budget.policy.inputs import BudgetKey, CostQuery, SpendSeries, SpendSnapshot
from token_budget.policy.windows import WindowKey
from token_budget.reports import tables


@dataclass
class Row:
    tokens: float = 0.0
    cost: Decimal = Decimal(0)

    def add(self, tokens: float, cost: Decimal) -> None:
        self.tokens += tokens
        self.cost += cost


@dataclass
class Saving:
    namespace: str
    model: str
    instead: str
    tokens: float
    cost: Decimal
    cost_instead: Decimal

    @property
    def saved(self) -> Decimal:
        return self.cost - self.cost_instead


@dataclass
class Report:
    since_seconds: int
    at: dt.datetime
    currency: str
    total: Row = field(default_factory=Row)
    by_namespace: dict[str, Row] = field(default_factory=lambda: defaultdict(Row))
    by_model: dict[str, Row] = field(default_factory=lambda: defaultdict(Row))
    by_workload: dict[tuple[str, str], Row] = field(default_factory=lambda: defaultdict(Row))
    by_budget: dict[str, Row] = field(default_factory=lambda: defaultdict(Row))
    outcomes: dict[str, tuple[float, Decimal | None]] = field(default_factory=dict)
    savings: list[Saving] = field(default_factory=list)
    unpriced: set[str] = field(default_factory=set)
    # Where the money goes: (kind, name) -> cost; tokens by input, output and cached
    # input, then each cost source (policy.costs).
    by_kind: dict[tuple[str, str], Row] = field(default_factory=lambda: defaultdict(Row))
    # Partitioned budgets: per budget, its spend by the partition label's value ("" for
    # the unpartitioned spend), and how many of those values to list (its statusTop).
    by_partition: dict[str, Partitioned] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        def rows(d: dict[Any, Row], key: str) -> list[dict[str, Any]]:
            out = []
            for k, r in sorted(d.items(), key=lambda kv: -kv[1].cost):
                name = "/".join(k) if isinstance(k, tuple) else k
                out.append({key: name, "tokens": round(r.tokens), "cost": plain_money(r.cost)})
            return out

        return {
            "since": f"{self.since_seconds}s", "at": self.at.isoformat(),
            "currency": self.currency,
            "total": {"tokens": round(self.total.tokens),
                      "cost": plain_money(self.total.cost)},
            "byNamespace": rows(self.by_namespace, "namespace"),
            "byBudget": rows(self.by_budget, "budget"),
            "byModel": rows(self.by_model, "model"),
            "byWorkload": rows(self.by_workload, "workload"),
            "costPerOutcome": [{"budget": b, "outcomes": round(n),
                                "costPerOutcome": plain_money(c, Decimal("0.0001"))
                                if c is not None else None}
                               for b, (n, c) in sorted(self.outcomes.items())],
            "savings": [{"namespace": s.namespace, "model": s.model, "instead": s.instead,
                         "tokens": round(s.tokens), "cost": plain_money(s.cost),
                         "costInstead": plain_money(s.cost_instead),
                         "saved": plain_money(s.saved)}
                        for s in sorted(self.savings, key=lambda s: -s.saved)],
            "unpricedModels": sorted(self.unpriced),
            "byKind": [{"kind": k, "name": n, "tokens": round(r.tokens),
                        "cost": plain_money(r.cost)} for (k, n), r in self.kinds()],
            "byPartition": [p.to_json(b) for b, p in sorted(self.by_partition.items())],
        }

    def kinds(self) -> list[tuple[tuple[str, str], Row]]:
        """The breakdown by kind: token parts first, then cost sources by cost."""
        tokens = [(k, r) for k, r in self.by_kind.items() if k[0] == costs.TOKENS[0]]
        order = {n: i for i, n in enumerate(_TOKEN_PARTS)}
        others = [(k, r) for k, r in self.by_kind.items() if k[0] != costs.TOKENS[0]]
        return (sorted(tokens, key=lambda kv: order.get(kv[0][1], len(order)))
                + sorted(others, key=lambda kv: (-kv[1].cost, kv[0])))


@dataclass
class Partitioned:
    """A partitioned budget's spend by value, of which the ``top`` most are listed."""

    label: str
    top: int
    rows: dict[str, Row] = field(default_factory=lambda: defaultdict(Row))

    def ranked(self) -> list[tuple[str, Row]]:
        """The people, most spent first (the unpartitioned spend apart), at most ``top``."""
        people = [(v, r) for v, r in self.rows.items() if v != api.UNPARTITIONED]
        return sorted(people, key=lambda kv: (-kv[1].cost, -kv[1].tokens, kv[0]))[:self.top]

    @property
    def count(self) -> int:
        return sum(1 for v in self.rows if v != api.UNPARTITIONED)

    def to_json(self, budget: str) -> dict[str, Any]:
        unpartitioned = self.rows.get(api.UNPARTITIONED, Row())
        return {"budget": budget, "label": self.label, "count": self.count,
                "top": [{"value": v, "tokens": round(r.tokens), "cost": plain_money(r.cost)}
                        for v, r in self.ranked()],
                "unpartitioned": {"tokens": round(unpartitioned.tokens),
                                  "cost": plain_money(unpartitioned.cost)}}


#: The token parts of the breakdown by kind; "reported" is cost a source reports itself.
_TOKEN_PARTS = ("input", "output", "cached-input", "reported")


def _token_parts(s: SpendSeries, catalog: Catalog) -> list[tuple[str, float, Decimal]]:
    """A series' tokens and cost by part (one "reported" part when the source prices it)."""
    if s.cost is not None:
        return [("reported", s.tokens, s.cost)]
    m = catalog.resolve(s.model)
    if m is None:
        return []
    p = m.pricing
    cached = p.cached_input if p.cached_input is not None else p.input
    return [(name, n, Decimal(round(n)) * price / MILLION)
            for name, n, price in (("input", s.input_tokens, p.input),
                                   ("output", s.output_tokens, p.output),
                                   ("cached-input", s.cached_input_tokens, cached)) if n]


def _cost(s: SpendSeries, catalog: Catalog) -> Decimal | None:
    if s.cost is not None:
        return s.cost
    return catalog.cost(s.model, s.input_tokens, s.output_tokens, s.cached_input_tokens)


def build(source: PrometheusSource, budgets: Sequence[api.Budget], catalog: Catalog,
          namespaces: Mapping[str, Mapping[str, str]], since_seconds: int, at: dt.datetime,
          presets: Iterable[api.SpendSource] = (), top: int | None = None) -> Report:
    """Read spend over ``since`` as the operator reads it and fold it into a report.

    Raises:
        MetricsError: a source, a window or an outcome counter could not be read.
        ValueError: ``since_seconds`` is not a whole number of minutes.
    """
    report = Report(since_seconds=since_seconds, at=at, currency=catalog.currency)
    key = planner.rolling_key(since_seconds)
    plan = planner.report_plan(budgets, {sources.resolve(p) for p in presets}, key, at)
    snapshot = source.collect(plan, at)
    snapshot = cost_reading.with_costs(
        source, snapshot, costs.plan(budgets, catalog, at, snapshot.recent_seconds, (key,)), at)
    _raise_errors(snapshot)
    series = [s for (_, k), found in snapshot.windows.items() if k == key for s in found]
    for s in series:
        cost = _cost(s, catalog)
        if cost is None:
            report.unpriced.add(s.model)
            cost = Decimal(0)
        model = catalog.canonical(s.model)
        for row in (report.total, report.by_namespace[s.namespace], report.by_model[model],
                    report.by_workload[(s.namespace, s.workload)]):
            row.add(s.tokens, cost)
        for part, n, c in _token_parts(s, catalog):
            report.by_kind[(costs.TOKENS[0], part)].add(n, c)
        entry = catalog.resolve(s.model)
        if entry is not None and entry.tier is api.Tier.FRONTIER:
            _saving(report, s, cost, entry, budgets, catalog, namespaces)
    world = engine.World(budgets=list(budgets), catalog=catalog,
                         namespaces=namespaces or _seen(series))
    counted: dict[str, tuple[float, Decimal]] = {}
    of_key = {BudgetKey.of(b): b for b in budgets}
    sourced: set[tuple[str, str, CostQuery]] = set()
    for spent in engine.scope_spend(world, snapshot, at, key):
        b = spent.scope.budget
        name = f"{b.kind}/{b}"
        report.by_budget[name].add(spent.tokens, spent.cost)
        budget = of_key.get(b)
        if spent.by_kind and budget is not None:
            _cost_rows(report, budget.spec, catalog, snapshot, key, spent.namespaces, sourced)
        if spent.outcomes is not None:
            n, cost = counted.get(name, (0.0, Decimal(0)))
            counted[name] = (n + spent.outcomes, cost + spent.cost)
    for name, (n, cost) in counted.items():
        # One scope: the engine's own figure; several (PerNamespace): their sums, alike.
        report.outcomes[name] = (n, cost / Decimal(round(n, 6)) if n > 0 else None)
    _partitions(report, budgets, catalog, world, series, top)
    return report


def _partitions(report: Report, budgets: Sequence[api.Budget], catalog: Catalog,
                world: engine.World, series: Sequence[SpendSeries], top: int | None) -> None:
    """Each partitioned budget's token spend by its label's value, summed as its partitions
    sum it: its namespaces' series under its spend matchers (cost sources, which carry no
    person, are in byKind and byNamespace, not here)."""
    index = engine.NamespaceIndex(world.namespaces)
    for b in budgets:
        p = b.spec.partition
        if p is None:
            continue
        within = {ns for _, namespaces in engine.scopes(b, index) for ns in namespaces}
        found = Partitioned(label=p.label, top=top if top is not None else p.status_top)
        for s in series:
            if s.namespace not in within or \
                    not engine.series_matches(s, b.spec.spend_matchers):
                continue
            found.rows[s.label(p.label) or api.UNPARTITIONED].add(
                s.tokens, _cost(s, catalog) or Decimal(0))
        report.by_partition[f"{b.kind}/{BudgetKey.of(b)}"] = found


def _cost_rows(report: Report, spec: api.TokenBudgetSpec, catalog: Catalog,
               snapshot: SpendSnapshot, key: WindowKey, namespaces: tuple[str, ...],
               sourced: set[tuple[str, str, CostQuery]]) -> None:
    """A scope's cost sources into the totals, by kind and by namespace: each (namespace,
    workload, cost query) once, however many budgets' scopes read it (a Shared cluster
    budget over a and b and a TokenBudget in a both count a's CPU)."""
    within = set(namespaces)
    for c in costs.merged(spec, catalog):
        q = costs.query_of(c)
        for r in snapshot.costs.get((q, key), ()):
            if r.namespace not in within or (r.namespace, r.workload, q) in sourced:
                continue
            sourced.add((r.namespace, r.workload, q))
            cost = costs.price(r.units, c)
            report.by_kind[(c.kind.value, c.name)].add(0.0, cost)
            report.total.add(0.0, cost)
            report.by_namespace[r.namespace].add(0.0, cost)


def _raise_errors(snapshot: SpendSnapshot) -> None:
    """A report is all or nothing: the first source, window or outcome not read fails it."""
    problems = [*snapshot.errors.values(), *snapshot.window_errors.values(),
                *snapshot.outcome_errors.values(), *snapshot.cost_errors.values(),
                *snapshot.cost_namespace_errors.values()]
    if problems:
        raise MetricsError(problems[0])


def _seen(series: Iterable[SpendSeries]) -> dict[str, dict[str, str]]:
    return {s.namespace: {} for s in series}


def _saving(report: Report, s: SpendSeries, cost: Decimal, entry: api.CatalogModel,
            budgets: Sequence[api.Budget], catalog: Catalog,
            namespaces: Mapping[str, Mapping[str, str]]) -> None:
    """Frontier spend that a cheaper equivalent allowed in that namespace could have served."""
    allowed: frozenset[str] | None = None
    labels = namespaces.get(s.namespace, {})
    for b in budgets:
        in_scope = (b.metadata.namespace == s.namespace if isinstance(b, api.TokenBudget)
                    else b.spec.namespace_selector.matches(labels))
        if in_scope:
            a = engine.allowed_models(b.spec, catalog)
            if a is not None:
                allowed = a if allowed is None else allowed & a
    instead = engine.cheapest_equivalent(entry.name, allowed, catalog)
    if instead is None:
        return
    other = catalog.cost(instead, s.input_tokens, s.output_tokens, s.cached_input_tokens)
    if other is None or other >= cost:
        return
    for existing in report.savings:
        if (existing.namespace, existing.model, existing.instead) == \
                (s.namespace, entry.name, instead):
            existing.tokens += s.tokens
            existing.cost += cost
            existing.cost_instead += other
            return
    report.savings.append(Saving(s.namespace, entry.name, instead, s.tokens, cost, other))


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


def table(report: Report) -> str:
    out = io.StringIO()
    c = report.currency
    days = report.since_seconds / 86400
    total = display_money(report.total.cost, c)
    print(f"Spend over the last {days:g} days (to {report.at:%Y-%m-%d %H:%M} UTC): "
          f"{total} for {report.total.tokens:,.0f} tokens", file=out)
    sections: list[tuple[str, dict[Any, Row]]] = [
        ("NAMESPACE", report.by_namespace), ("BUDGET", report.by_budget),
        ("MODEL", report.by_model), ("WORKLOAD", report.by_workload)]
    for title, rows in sections:
        if not rows:
            continue
        print(file=out)
        lines = [[title, "TOKENS", "COST", "SHARE"]]
        for k, r in sorted(rows.items(), key=lambda kv: -kv[1].cost):
            share = (r.cost * 100 / report.total.cost) if report.total.cost else Decimal(0)
            lines.append(["/".join(k) if isinstance(k, tuple) else k, f"{r.tokens:,.0f}",
                          display_money(r.cost, c), f"{share:.1f}%"])
        tables.render(lines, out)
    if any(k[0] != costs.TOKENS[0] for k in report.by_kind):
        # Where the money goes, when there is more than tokens to it.
        print(file=out)
        lines = [["KIND", "NAME", "COST", "SHARE"]]
        for (kind, name), r in report.kinds():
            share = (r.cost * 100 / report.total.cost) if report.total.cost else Decimal(0)
            lines.append([kind, name, display_money(r.cost, c), f"{share:.1f}%"])
        tables.render(lines, out)
    for name, part in sorted(report.by_partition.items()):
        # Per person: the most spent first, bounded (1,000 people are not 1,000 lines).
        print(file=out)
        print(f"{name}: {part.count:,} values of {part.label}, the top {len(part.ranked())}",
              file=out)
        lines = [[part.label.upper(), "TOKENS", "COST"]]
        for value, r in part.ranked():
            lines.append([value, f"{r.tokens:,.0f}", display_money(r.cost, c)])
        rest = part.rows.get(api.UNPARTITIONED)
        if rest is not None:
            lines.append([f"({part.label} unset)", f"{rest.tokens:,.0f}",
                          display_money(rest.cost, c)])
        tables.render(lines, out)
    if report.outcomes:
        print(file=out)
        lines = [["BUDGET", "OUTCOMES", "COST/OUTCOME"]]
        for b, (n, cpo) in sorted(report.outcomes.items()):
            lines.append([b, f"{n:,.0f}",
                          display_money(cpo, c, per_unit=True) if cpo is not None else "-"])
        tables.render(lines, out)
    if report.savings:
        print(file=out)
        lines = [["NAMESPACE", "MODEL", "INSTEAD", "COST", "WOULD COST", "SAVED"]]
        for s in sorted(report.savings, key=lambda s: -s.saved):
            lines.append([s.namespace, s.model, s.instead, display_money(s.cost, c),
                          display_money(s.cost_instead, c), display_money(s.saved, c)])
        tables.render(lines, out)
    if report.unpriced:
        print(f"\nmodels without a catalog price (counted as zero): "
              f"{', '.join(sorted(report.unpriced))}", file=out)
    return out.getvalue()


def to_csv(report: Report) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["dimension", "key", "tokens", "cost", "currency"])
    for dim, rows in (("namespace", report.by_namespace), ("budget", report.by_budget),
                      ("model", report.by_model), ("workload", report.by_workload)):
        for k, r in sorted(rows.items(), key=lambda kv: -kv[1].cost):
            w.writerow([dim, "/".join(k) if isinstance(k, tuple) else k, round(r.tokens),
                        plain_money(r.cost), report.currency])
    for s in report.savings:
        w.writerow(["saving", f"{s.namespace}/{s.model}->{s.instead}", round(s.tokens),
                    plain_money(s.saved), report.currency])
    for name, part in sorted(report.by_partition.items()):
        for value, r in part.ranked():
            w.writerow(["partition", f"{name}/{part.label}={value}", round(r.tokens),
                        plain_money(r.cost), report.currency])
    return out.getvalue()


def _bars(title: str, rows: list[tuple[str, Decimal]], currency: str, color: str) -> str:
    if not rows:
        return ""
    top = max(v for _, v in rows) or Decimal(1)
    height = 28 * len(rows) + 40
    parts = [f'<h2>{_esc(title)}</h2><svg width="760" height="{height}" role="img" '
             f'aria-label="{_esc(title)}">']
    for i, (label, value) in enumerate(rows):
        y = 20 + i * 28
        width = int(460 * (value / top))
        parts.append(f'<text x="0" y="{y + 15}" font-size="13">{_esc(label[:34])}</text>'
                     f'<rect x="240" y="{y}" width="{max(width, 1)}" height="20" '
                     f'fill="{color}" rx="3"/>'
                     f'<text x="{248 + width}" y="{y + 15}" font-size="13">'
                     f'{_esc(display_money(value, currency))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace(
        '"', "&quot;")


def html(report: Report) -> str:
    c = report.currency
    by = sorted(((k, r.cost) for k, r in report.by_namespace.items()), key=lambda kv: -kv[1])
    models = sorted(((k, r.cost) for k, r in report.by_model.items()), key=lambda kv: -kv[1])
    saves = [(f"{s.namespace}: {s.model} → {s.instead}", s.saved) for s in
             sorted(report.savings, key=lambda s: -s.saved)]
    days = report.since_seconds / 86400
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Token spend report</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:32px;color:#1d2433}"
        "h1{font-size:22px}h2{font-size:16px;margin-top:28px}.big{font-size:32px;"
        "font-weight:600}</style></head><body>"
        f"<h1>Token spend, last {days:g} days</h1>"
        f"<div class='big'>{_esc(display_money(report.total.cost, c))}</div>"
        f"<div>{report.total.tokens:,.0f} tokens to {report.at:%Y-%m-%d %H:%M} UTC</div>"
        + _bars("Spend by namespace", by, c, "#3b6fd8")
        + _bars("Spend by model", models, c, "#8a5cd6")
        + _bars("Savings a cheaper allowed equivalent would have made", saves, c, "#2f9e62")
        + "</body></html>"
    )
