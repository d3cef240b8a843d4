"""Reading spend: PromQL built from the plan (pure) and the Prometheus adapter (I/O)."""
