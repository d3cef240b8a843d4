"""The running operator: kopf registration and the evaluation loop (thin orchestration)."""

from token_budget.handlers.operator import registry, run

__all__ = ["registry", "run"]
