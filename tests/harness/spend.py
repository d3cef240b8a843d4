"""Spend that the operator will see: exporter counters, waited for through Prometheus.

A new agent's counters are first published at zero and scraped twice
(:func:`seed`), as a running agent's would be; :func:`spend` then adds tokens
and returns once Prometheus shows the new total.
"""

from __future__ import annotations

import time

from harness.exporter import AgentExporter
from harness.prometheus import Prometheus
from harness.waiting import eventually


def seed(exporter: AgentExporter, prometheus: Prometheus, ns: str, pod: str,
         model: str = "gpt-4o") -> None:
    """Create the agent's series at zero and wait until Prometheus holds two samples."""
    exporter.add(namespace=ns, workload=pod, model=model)
    prometheus.wait_for(f'llm_tokens_total{{namespace="{ns}"}}', timeout=30)
    eventually(lambda: prometheus.query(
        f'count_over_time(llm_tokens_total{{namespace="{ns}"}}[1m]) > 1'), 30,
        what=f"two samples of {ns}'s counters")


def spend(exporter: AgentExporter, prometheus: Prometheus, ns: str, pod: str, tokens: int,
          model: str = "gpt-4o") -> float:
    """Add input tokens; return the monotonic time at which Prometheus shows them."""
    exporter.add(namespace=ns, workload=pod, model=model, input=tokens)
    total = exporter.emitted("counters", namespace=ns)
    prometheus.wait_for(f'sum(llm_tokens_total{{namespace="{ns}"}})',
                        lambda r: bool(r) and float(r[0]["value"][1]) >= total, timeout=30)
    return time.monotonic()
