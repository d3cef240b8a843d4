"""Spend sources for the tests that read a real Prometheus through ``PrometheusSource``."""

from __future__ import annotations

import datetime as dt

from token_budget.api import v1alpha1 as api
from token_budget.metrics.prometheus import PrometheusSource, ResultItem
from token_budget.policy import planner


class NotedSource(PrometheusSource):
    """A source that notes every query it sends: (kind, text) in ``sent``."""

    def __init__(self, url: str, scrape_interval_seconds: float = 15.0) -> None:
        super().__init__(url, scrape_interval_seconds=scrape_interval_seconds)
        self.sent: list[tuple[str, str]] = []

    def query(self, text: str, at: dt.datetime, kind: str = "spend",
              matrix: bool = False) -> list[ResultItem]:
        self.sent.append((kind, text))
        return super().query(text, at, kind, matrix)


def rolling_day_plan(at: dt.datetime, tokens: int = 10**9, namespace: str = "ns"
                     ) -> planner.Plan:
    """The plan of one TokenBudget in ``namespace`` with a rolling 24 h limit."""
    budget = api.TokenBudget.model_validate({
        "apiVersion": api.API_VERSION, "kind": "TokenBudget",
        "metadata": {"name": "b", "namespace": namespace},
        "spec": {"limits": [{"window": "24h", "tokens": tokens}]}})
    return planner.plan([budget], at)
