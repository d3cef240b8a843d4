"""Writing directives to workloads: pure patch computation (the writes go through token_budget.kube)."""
