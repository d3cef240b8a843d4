"""``make demo`` in its non-interactive mode: the whole product on one machine.

The demo starts its own control plane, Prometheus, synthetic agents and the
operator; ``--once`` exits 0 only when the runaway agent is blocked (replicas 0)
and the search agent is rerouted to the catalog's cheaper model.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from harness.controlplane import ControlPlane

REPO = Path(__file__).resolve().parents[2]


def test_the_demo_runs_to_the_expected_transitions_without_a_terminal(
        controlplane: ControlPlane) -> None:
    # `controlplane` only guarantees the binary is built; the demo starts its own cluster.
    done = subprocess.run([sys.executable, str(REPO / "examples" / "demo" / "demo.py"),
                           "--once", "--timeout", "300"], capture_output=True, text=True,
                          timeout=480, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    # Each budget's status reached its rung. From which one depends on how far the spend
    # moved between two evaluations and two polls of the demo: CI once saw the search
    # agents' budget go from Ok to Rerouted in one step, past Warning (right: both rungs
    # were crossed by then).
    transitions = [line for line in out.splitlines() if " -> " in line]
    assert any(re.search(r"TokenBudget/sandbox/sandbox: \w+ -> Blocked$", t)
               for t in transitions), transitions
    assert any(re.search(r"TokenBudget/team-search/search-agents: \w+ -> Rerouted$", t)
               for t in transitions), transitions
    assert "expected transitions seen" in out
    assert "sandbox/runaway           Blocked" in out
