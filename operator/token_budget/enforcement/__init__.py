"""Writing directives to workloads: pure patch computation.

The writes themselves go through :mod:`token_budget.kube`.
"""
