"""PromQL text for a plan: one query per (source, window), grouped, never per budget.

Pure string building. A source's counters (input, output, cached input, cost)
are read by one query: each counter is summed by the grouping labels and
tagged with its kind by ``label_replace``, and the parts are joined with
``or`` (their label sets differ by the tag, so none hides another)::

    label_replace(sum by (namespace, pod, model) (increase(llm_tokens_total{token_type="input"}[86400s])),
                  "tb_kind", "input", "", "")
    or label_replace(sum by (...) (increase(llm_tokens_total{token_type="output"}[86400s])), ...)

``increase`` copes with counter resets (an agent restarting) and keeps the
spend of pods that no longer exist, as long as their samples are inside the
window.
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


def spend(rs: ResolvedSource, range_seconds: int, extra: tuple[str, ...] = ()) -> str:
    """Spend per namespace, workload, model (and ``extra`` labels) over the last range."""
    by = ", ".join(group_labels(rs, extra))
    parts = []
    for kind, sel in rs.counters:
        inner = f"sum by ({by}) (increase({selector(sel.metric, sel.matchers)}[{range_seconds}s]))"
        parts.append(f'label_replace({inner}, "{KIND_LABEL}", "{kind.value}", "", "")')
    return " or ".join(parts)


def outcomes(metric: str, namespace_label: str, range_seconds: int,
             extra: tuple[str, ...] = ()) -> str:
    by = ", ".join((namespace_label, *extra))
    return f"sum by ({by}) (increase({metric}[{range_seconds}s]))"
