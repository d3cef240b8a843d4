"""token-budget-operator: LLM token spend as Kubernetes policy."""

__version__ = "0.1.0"
