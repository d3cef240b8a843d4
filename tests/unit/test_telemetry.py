"""The operator's own metrics follow the budgets from one evaluation to the next."""

from __future__ import annotations

import builders as b

from token_budget.handlers.telemetry import Telemetry


def _samples(t: Telemetry, name: str) -> dict[tuple[str, ...], float]:
    return {tuple(s.labels.values()): s.value for m in t.registry.collect() if m.name == name
            for s in m.samples}


def test_a_deleted_budgets_series_go_and_the_others_carry_the_new_figures() -> None:
    both = [b.token_budget("search", limits=[{"window": "24h", "tokens": 1000}]),
            b.token_budget("batch", limits=[{"window": "24h", "tokens": 1000}])]
    t = Telemetry(None)
    t.observe(b.evaluate(both, [b.series(300)]), 0.1)
    assert len(_samples(t, "tokenbudget_spend_tokens")) == 2
    search = {"kind": "TokenBudget", "budget_namespace": b.NAMESPACE, "budget": "search",
              "scope": "", "window": "24h"}
    assert t.registry.get_sample_value("tokenbudget_spend_tokens", search) == 300.0

    t.observe(b.evaluate(both[:1], [b.series(700)]), 0.1)  # "batch" deleted, spend moved
    assert t.registry.get_sample_value("tokenbudget_spend_tokens", search) == 700.0
    assert t.registry.get_sample_value("tokenbudget_utilization_ratio", search) == 0.7
    for name in ("tokenbudget_spend_tokens", "tokenbudget_limit_tokens",
                 "tokenbudget_utilization_ratio", "tokenbudget_ungoverned_workloads"):
        assert {labels[2] for labels in _samples(t, name)} == {"search"}, name
    states = _samples(t, "tokenbudget_state")
    assert {labels[2] for labels in states} == {"search"}
    assert sum(states.values()) == 1  # one current state, the others 0

    t.observe(b.evaluate([], []), 0.1)  # every budget gone: nothing exported
    assert _samples(t, "tokenbudget_state") == {}
    assert _samples(t, "tokenbudget_spend_tokens") == {}
