"""Spend matchers: which series a budget counts, with PromQL's label-matcher semantics."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from token_budget.api import v1alpha1 as api
from token_budget.policy.inputs import SpendSeries


@functools.lru_cache(maxsize=4096)
def _regex(expr: str) -> re.Pattern[str]:
    return re.compile(expr)


def matcher_ok(m: api.SpendMatcher, value: str) -> bool:
    op = m.operator
    if op is api.MatchOperator.EQUAL:
        return value == m.value
    if op is api.MatchOperator.NOT_EQUAL:
        return value != m.value
    hit = _regex(m.value).fullmatch(value) is not None  # PromQL regexes are anchored
    return hit if op is api.MatchOperator.REGEX else not hit


def series_matches(s: SpendSeries, matchers: Sequence[api.SpendMatcher]) -> bool:
    """Whether a series satisfies every spend matcher (PromQL semantics)."""
    return all(matcher_ok(m, s.label(m.label)) for m in matchers)



OPERATORS = {api.MatchOperator.EQUAL: "=", api.MatchOperator.NOT_EQUAL: "!=",
              api.MatchOperator.REGEX: "=~", api.MatchOperator.NOT_REGEX: "!~"}
