"""The CEL rules of the CRD schemas, each with its Python twin.

A :class:`Rule` is written once, here: its CEL text goes into the generated
CRD (``x-kubernetes-validations``), where the API server evaluates it, and its
twin, a Python function over the same JSON value the rule sees as ``self``
(defaults applied), is what ``tokenbudget validate`` evaluates offline
(:mod:`token_budget.api.schema`). :data:`RULES` maps every rule's text to its
twin; the offline validator refuses a schema holding a rule it has no twin for,
and ``tests/unit/test_cel.py`` enumerates every rule in the generated CRDs and
checks its twin on the cases that make the rule true and false.

Why twins and not a CEL interpreter: the schemas hold a handful of rules, all
of them ``has()`` tests, equality and one ``matches``; a CEL library
(cel-python, or the Rust one) would add a dependency and a second dialect's
edge cases for what five lines of Python say exactly. When a rule needs more
than that, revisit (the e2e differential test sends a manifest breaking each
rule to the real API server, so a twin that drifts from its CEL fails there).

Deliberately not here: rules across objects or needing a catalog (those are
the webhook's, :mod:`token_budget.api.rules`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    """One ``x-kubernetes-validations`` entry and the Python function that says the same."""

    rule: str
    message: str
    holds: Callable[[Mapping[str, Any]], bool]
    field_path: str | None = None  # where the API server reports it (".cost"); None: the object

    def schema(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        return out


LIMIT_TOKENS_OR_COST = Rule(
    "has(self.tokens) || has(self.cost)",
    "a limit must set tokens, cost or both",
    lambda s: "tokens" in s or "cost" in s,
)
# "0.00" as a cap used to mean "no money cap" (the engine skipped a zero limit) while
# "0.01" blocked at once: a zero must not mean the opposite of a small number. Refused
# rather than read as block-all: a Block rung says "block everything" plainly.
LIMIT_COST_POSITIVE = Rule(
    "!has(self.cost) || self.cost.matches('[1-9]')",
    "cost must be greater than zero; leave cost unset for no money cap",
    lambda s: "cost" not in s or bool(re.search("[1-9]", str(s["cost"]))),
    field_path=".cost",
)
ACTION_MODEL_ON_REROUTE = Rule(
    "self.type == 'Reroute' || !has(self.model)",
    "model must be left unset unless type is Reroute",
    lambda s: s.get("type") == "Reroute" or "model" not in s,
    field_path=".model",
)
ACTION_RATE_ON_THROTTLE = Rule(
    "self.type == 'Throttle' || !has(self.tokensPerMinute)",
    "tokensPerMinute must be left unset unless type is Throttle",
    lambda s: s.get("type") == "Throttle" or "tokensPerMinute" not in s,
    field_path=".tokensPerMinute",
)


def _distinct_thresholds(s: Mapping[str, Any]) -> bool:
    seen = [a.get("atPercent") for a in s.get("actions") or ()]
    return len(seen) == len(set(seen))


SPEC_DISTINCT_THRESHOLDS = Rule(
    "!has(self.actions) || self.actions.all(a, "
    "self.actions.exists_one(b, b.atPercent == a.atPercent))",
    "actions must have distinct atPercent values",
    _distinct_thresholds,
    field_path=".actions",
)

RULES: dict[str, Rule] = {r.rule: r for r in (
    LIMIT_TOKENS_OR_COST, LIMIT_COST_POSITIVE, ACTION_MODEL_ON_REROUTE,
    ACTION_RATE_ON_THROTTLE, SPEC_DISTINCT_THRESHOLDS)}
"""Every CEL rule of the API, by its text."""


def validations(*rules: Rule) -> dict[str, Any]:
    """``json_schema_extra`` for a model: its rules as ``x-kubernetes-validations``."""
    return {"x-kubernetes-validations": [r.schema() for r in rules]}
