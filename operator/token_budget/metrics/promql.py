"""PromQL text for a plan: one query per (source, window), grouped, never per budget.

Pure string building. A source's counters (input, output, cached input, cost)
are read by one query: each counter is summed by the grouping labels and
tagged with its kind by ``label_replace``, and the parts are joined with
``or`` (their label sets differ by the tag, so none hides another)::

    label_replace(sum by (namespace, pod, model) (<increase of llm_tokens_total{token_type="input"} over 86400s>),
                  "tb_kind", "input", "", "")
    or label_replace(sum by (...) (<increase of ...{token_type="output"}>), ...)

The increase of one counter series over a window is read without
extrapolation (:func:`increase`): Prometheus's ``increase()`` stretches the
samples it sees to the edges of the range, which for a series younger than a
few scrapes over-reads by up to the whole last step (a pod that spent 1,000
tokens between its first two scrapes reads as up to 2,000). Budgets must be
exact to the last scrape, so each series is read as:

* alive when the window starts, no counter reset: last sample in the window
  minus the value at its start (exact; consecutive windows tile, so hourly
  recorded buckets add up to the month exactly);
* a counter reset in the window (an agent restarting): ``increase()``, which
  handles resets (its extrapolation is a fraction of one scrape over the
  window);
* born inside the window: its last value (counters start at zero).

``last_over_time`` keeps the spend of pods that no longer exist (their series
went stale, but their samples are inside the window).
"""

from __future__ import annotations

from token_budget.policy.sources import ResolvedSource

KIND_LABEL = "tb_kind"


def quote(value: str) -> str:
    """A PromQL string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def selector(metric: str, matchers: tuple[tuple[str, str], ...]) -> str:
    if not matchers:
        return metric
    inner = ",".join(f"{k}={quote(v)}" for k, v in matchers)
    return f"{metric}{{{inner}}}"


def group_labels(rs: ResolvedSource, extra: tuple[str, ...]) -> tuple[str, ...]:
    base = (rs.namespace_label, rs.workload_label, rs.model_label)
    return base + tuple(x for x in extra if x not in base)


#: Prometheus's default lookback: how far before the window start ``x offset r`` looks.
LOOKBACK_SECONDS = 300
#: Range selectors over the window in one :func:`increase` (for the sample estimate).
RANGE_READS = 3


def increase(sel: str, range_seconds: int) -> str:
    """The increase of each series of ``sel`` over the last range, to the last scrape.

    No extrapolation except for series with a counter reset (see the module text).
    ``resets`` looks one lookback further back than the window, so a reset between
    the start value and the window's first sample is caught too.
    """
    r = f"{range_seconds}s"
    last = f"last_over_time({sel}[{r}])"
    start = f"{sel} offset {r}"
    reset = f"resets({sel}[{range_seconds + LOOKBACK_SECONDS}s]) > 0"
    return (f"(({last} - {start}) unless ({reset}))"
            f" or (increase({sel}[{r}]) and ({reset}))"
            f" or ({last} unless {start})")


def spend(rs: ResolvedSource, range_seconds: int, extra: tuple[str, ...] = ()) -> str:
    """Spend per namespace, workload, model (and ``extra`` labels) over the last range."""
    by = ", ".join(group_labels(rs, extra))
    parts = []
    for kind, sel in rs.counters:
        inner = f"sum by ({by}) ({increase(selector(sel.metric, sel.matchers), range_seconds)})"
        parts.append(f'label_replace({inner}, "{KIND_LABEL}", "{kind.value}", "", "")')
    return " or ".join(parts)


def outcomes(metric: str, namespace_label: str, range_seconds: int,
             extra: tuple[str, ...] = ()) -> str:
    by = ", ".join((namespace_label, *extra))
    return f"sum by ({by}) ({increase(metric, range_seconds)})"


# ---------------------------------------------------------------------------
# Recording rules: hourly spend, pre-aggregated, for long windows
# ---------------------------------------------------------------------------

RULE_STEP_SECONDS = 3600


def rule_name(rs: ResolvedSource) -> str:
    """The recorded series of a source: ``tokenbudget:spend_counters:increase1h``."""
    slug = "".join(c if c.isalnum() else "_" for c in rs.preset.lower()).strip("_")
    return f"tokenbudget:spend_{slug}:increase1h"


def rules_file(resolved: list[ResolvedSource]) -> dict[str, object]:
    """A Prometheus rules file recording each source's hourly spend, tagged by kind.

    One sample an hour per (namespace, workload, model, kind) instead of one per
    scrape: a 30-day window reads 720 samples a series instead of 172,800 at a
    15 s scrape interval. The rule keeps only the grouping labels; budgets whose
    spend matchers name other labels read the raw series.
    """
    return {"groups": [{
        "name": "tokenbudget.spend",
        "interval": f"{RULE_STEP_SECONDS // 60}m",
        "rules": [{"record": rule_name(rs), "expr": spend(rs, RULE_STEP_SECONDS)}
                  for rs in resolved],
    }]}


def recorded(rs: ResolvedSource, range_seconds: int) -> str:
    """The recorded hourly buckets whose samples fall within the last range, summed."""
    by = ", ".join((*group_labels(rs, ()), KIND_LABEL))
    return f"sum by ({by}) (sum_over_time({rule_name(rs)}[{range_seconds}s]))"


def last_recorded(rs: ResolvedSource) -> str:
    """The recorded samples of the last two rule runs (a matrix: their true timestamps)."""
    return f"{rule_name(rs)}[{2 * RULE_STEP_SECONDS}s]"
