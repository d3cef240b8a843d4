"""The local end-to-end demo (``make demo``): the whole product on one machine.

It starts a real control plane (etcd, kube-apiserver, kube-controller-manager built from
the upstream Go modules), a real Prometheus, a fleet of synthetic agents that report token
counters, the example catalog and budgets, and the operator as a real process. The agents
obey their directives through ``token_budget.agent.Governor``: the demo plays the kubelet
and writes each agent's annotations to the file the downward API would project.

    team-search   production   search-agent: gpt-4o, steady      TokenBudget $3/h
    qa-checkout   environment=qa  qa-agent: claude-sonnet-4-5   ClusterTokenBudget (QA pool)
    sandbox       production   runaway: gpt-4o-mini, 40k tok/s   TokenBudget 2M tokens/h

Time is compressed by the spend rates (a budget an hour long fills in a minute or two),
not by faking the operator. Ctrl-C stops everything and removes the temporary files.

``--once`` runs without a terminal view, prints the transitions it saw and exits 0 only
when the expected ones happened (the runaway is blocked and scaled to zero, the search
agent is rerouted to the catalog's cheaper model).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "operator")]

from kubernetes import config  # noqa: E402

from harness import kubeobjects  # noqa: E402
from harness.controlplane import ControlPlane, resolve_binary  # noqa: E402
from harness.exporter import AgentExporter  # noqa: E402
from harness.operator_process import OperatorProcess  # noqa: E402
from harness.prometheus import Prometheus  # noqa: E402
from token_budget.agent import Blocked, Governor, ModelNotAllowed  # noqa: E402
from token_budget.kube import (  # noqa: E402
    CLUSTERTOKENBUDGETS,
    DEPLOYMENTS,
    MODELCATALOGS,
    NAMESPACES,
    TOKENBUDGETS,
    Kube,
    api_client,
)

A = "tokenbudget.io/"


def namespace(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels}}


def deployment(name: str, model: str, replicas: int) -> dict[str, Any]:
    labels = {"app": name, A + "agent": "true"}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "labels": {A + "agent": "true"}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": labels}, "spec": {"containers": [
                         {"name": "agent", "image": "example/agent:1",
                          "env": [{"name": "LLM_MODEL", "value": model}]}]}}}}


BUDGETS: list[dict[str, Any]] = [
    {"apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
     "metadata": {"name": "search-agents", "namespace": "team-search"},
     "spec": {"limits": [{"window": "1h", "cost": "3.00"}],
              "actions": [{"type": "Warn", "atPercent": 40},
                          {"type": "Reroute", "atPercent": 60},
                          {"type": "Throttle", "atPercent": 85},
                          {"type": "Block", "atPercent": 100}],
              "outcome": {"metric": "agent_outcomes_total", "window": "1h",
                          "matchers": [{"label": "outcome", "value": "success"}]}}},
    {"apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
     "metadata": {"name": "sandbox", "namespace": "sandbox"},
     "spec": {"limits": [{"window": "1h", "tokens": 2000000}],
              "actions": [{"type": "Warn", "atPercent": 60},
                          {"type": "Block", "atPercent": 100}]}},
    {"apiVersion": "tokenbudget.io/v1alpha1", "kind": "ClusterTokenBudget",
     "metadata": {"name": "qa-environment"},
     "spec": {"namespaceSelector": {"matchLabels": {"environment": "qa"}},
              "limitScope": "Shared", "deniedTiers": ["Frontier"],
              "limits": [{"window": "1h", "cost": "1.00"}],
              "actions": [{"type": "Warn", "atPercent": 50},
                          {"type": "Throttle", "atPercent": 90, "tokensPerMinute": 60000},
                          {"type": "Block", "atPercent": 100}]}},
]


class Agent(threading.Thread):
    """A synthetic agent: asks its Governor, then 'calls' a model by adding tokens."""

    def __init__(self, demo: Demo, ns: str, name: str, model: str, tokens_per_second: int,
                 output_share: float = 0.15) -> None:
        super().__init__(daemon=True, name=f"agent-{name}")
        self.demo, self.ns, self.name, self.model = demo, ns, name, model
        self.tps = tokens_per_second
        self.output_share = output_share
        self.file = demo.tmp / f"{ns}-{name}.annotations"
        self.file.touch()  # the kubelet projects the file before the container starts
        self.governor = Governor(str(self.file), default_model=model,
                                 sleep=lambda s: demo.stopping.wait(s))
        self.note = ""

    def run(self) -> None:
        step = 0.5
        while not self.demo.stopping.is_set():
            tokens = int(self.tps * step)
            try:
                model = self.governor.model(self.model)
                self.governor.acquire(tokens, max_wait=step * 4)
                self.note = "" if model == self.model else f"rerouted to {model}"
            except Blocked:
                self.note = "blocked"
                self.demo.stopping.wait(step)
                continue
            except ModelNotAllowed as exc:
                self.note = str(exc)[:60]
                self.demo.stopping.wait(step)
                continue
            except TimeoutError:
                self.note = "throttled"
                continue
            out = int(tokens * self.output_share)
            self.demo.exporter.add(namespace=self.ns, workload=self.name, model=model,
                                   input=tokens - out, output=out, pod=f"{self.name}-0")
            self.demo.exporter.add_outcome(self.ns, self.name, "success", 1, pod=f"{self.name}-0")
            self.demo.stopping.wait(step)


class Demo:
    def __init__(self, once: bool, interval: float) -> None:
        self.once = once
        self.interval = interval
        self.tmp = Path(tempfile.mkdtemp(prefix="tokenbudget-demo-"))
        self.stopping = threading.Event()
        self.transitions: list[str] = []
        self.seen: dict[str, str] = {}
        self.exporter = AgentExporter()
        self.cp: ControlPlane | None = None
        self.prom: Prometheus | None = None
        self.op: OperatorProcess | None = None

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def start(self) -> None:
        self.say("building or reusing the control plane binary (a first build takes minutes)")
        binary = resolve_binary()
        self.cp = ControlPlane(workdir=self.tmp / "cp", binary=binary)
        self.cp.start()
        self.say(f"control plane up at {self.cp.server}")
        self.exporter.start()
        self.prom = Prometheus(workdir=self.tmp / "prom", scrape_interval="2s")
        self.prom.add_scrape_target("agents", self.exporter.target, honor_labels=True)
        self.prom.start()
        self.say(f"Prometheus up at {self.prom.url}")
        api = config.new_client_from_config(config_file=str(self.cp.kubeconfig))
        kubeobjects.install_crds(api)
        self.kube = Kube(api_client(str(self.cp.kubeconfig)))
        self.kube.create(MODELCATALOGS, None,
                         yaml.safe_load((REPO / "examples" / "model-catalog.yaml").read_text()))
        for ns, labels in (("team-search", {"environment": "production"}),
                           ("qa-checkout", {"environment": "qa"}),
                           ("sandbox", {"environment": "production"})):
            self.kube.create(NAMESPACES, None, namespace(ns, labels))
        self.agents = [
            Agent(self, "team-search", "search-agent", "gpt-4o", 9000),
            Agent(self, "qa-checkout", "qa-agent", "claude-sonnet-4-5", 800),
            Agent(self, "sandbox", "runaway", "gpt-4o-mini", 40000),
        ]
        for a in self.agents:
            eventually_sa(self.kube, a.ns)
            self.kube.create(DEPLOYMENTS, a.ns, deployment(a.name, a.model, 2))
            self.exporter.add(namespace=a.ns, workload=a.name, model=a.model, pod=f"{a.name}-0")
        time.sleep(5)  # two scrapes of the zero values, so increase() counts from zero
        for b in BUDGETS:
            res = TOKENBUDGETS if b["kind"] == "TokenBudget" else CLUSTERTOKENBUDGETS
            self.kube.create(res, b["metadata"].get("namespace"), b)
        self.op = OperatorProcess(self.cp.kubeconfig, self.prom.url, self.tmp,
                                  interval_seconds=self.interval, identity="demo",
                                  # fresher spend figures in status for the live view
                                  extra_args=["--status-heartbeat-seconds", "5"])
        self.op.start()
        self.say(f"operator running (log: {self.op.log})")
        for a in self.agents:
            a.start()

    def kubelet(self) -> None:
        """Project each agent's Deployment annotations into its downward-API file."""
        for a in self.agents:
            dep = self.kube.get(DEPLOYMENTS, a.ns, a.name)
            lines = [f'{k}="{v}"' for k, v in sorted(
                (dep["metadata"].get("annotations") or {}).items())]
            a.file.write_text("\n".join(lines) + "\n")

    def snapshot(self) -> tuple[list[list[str]], list[list[str]]]:
        budgets = [["BUDGET", "STATE", "SPEND", "LIMIT", "USED", "RUN-OUT", "COST/OUTCOME"]]
        for res in (TOKENBUDGETS, CLUSTERTOKENBUDGETS):
            for b in self.kube.list(res):
                st = b.get("status") or {}
                name = "/".join(x for x in (b["metadata"].get("namespace"),
                                            b["metadata"]["name"]) if x)
                budgets.append([name, st.get("state", "-"), st.get("spend", "-"),
                                st.get("limit", "-"), f"{st.get('usedPercent', '-')}%",
                                (st.get("projectedRunOutTime") or "-")[11:19] or "-",
                                st.get("costPerOutcome") or "-"])
                key = f"{b['kind']}/{name}"
                state = st.get("state")
                if state and self.seen.get(key) != state:
                    self.transitions.append(f"{key}: {self.seen.get(key, 'new')} -> {state}")
                    self.seen[key] = state
        workloads = [["WORKLOAD", "DIRECTIVE", "MODEL", "TOKENS/MIN", "REPLICAS", "AGENT"]]
        for a in self.agents:
            dep = self.kube.get(DEPLOYMENTS, a.ns, a.name)
            an = dep["metadata"].get("annotations") or {}
            workloads.append([f"{a.ns}/{a.name}", an.get(A + "state", "-"),
                              an.get(A + "use-model", a.model), an.get(A + "tokens-per-minute",
                                                                       "-"),
                              str(dep["spec"].get("replicas")), a.note or "running"])
        return budgets, workloads

    def done(self) -> bool:
        # The budgets' states as well as the workloads: the operator annotates a workload
        # before it writes the budget's status in the same evaluation, and a poll between
        # the two saw the search agent rerouted but its budget still at Warning (CI).
        seen = {(t.split(": ", 1)[0], t.rsplit(" -> ", 1)[1]) for t in self.transitions}
        if not {("TokenBudget/sandbox/sandbox", "Blocked"),
                ("TokenBudget/team-search/search-agents", "Rerouted")} <= seen:
            return False
        runaway = self.kube.get(DEPLOYMENTS, "sandbox", "runaway")
        search = self.kube.get(DEPLOYMENTS, "team-search", "search-agent")
        return (runaway["spec"]["replicas"] == 0
                and (search["metadata"].get("annotations") or {}).get(A + "use-model")
                == "gpt-4o-mini")

    def loop(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        tty = sys.stdout.isatty() and not self.once
        while not self.stopping.is_set():
            self.kubelet()
            budgets, workloads = self.snapshot()
            if tty:
                print("\033[2J\033[H", end="")
                print("token-budget-operator demo (Ctrl-C stops and cleans up)\n")
                table(budgets)
                print()
                table(workloads)
                print("\ntransitions:\n  " + "\n  ".join(self.transitions[-12:]), flush=True)
            if self.once:
                if self.done():
                    for t in self.transitions:
                        self.say(t)
                    table(budgets)
                    table(workloads)
                    self.say("expected transitions seen: the runaway is blocked (replicas 0) "
                             "and the search agent rerouted to gpt-4o-mini")
                    return 0
                if time.monotonic() > deadline:
                    for t in self.transitions:
                        self.say(t)
                    table(budgets)
                    table(workloads)
                    self.say(f"FAILED: expected transitions not seen in {timeout:.0f} s; "
                             f"operator log tail:\n{self.op.tail(30) if self.op else ''}")
                    return 1
            self.stopping.wait(1.0)
        return 0

    def stop(self) -> None:
        self.stopping.set()
        for part in (self.op, self.prom, self.cp):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.stop()
        with contextlib.suppress(Exception):
            self.exporter.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def eventually_sa(kube: Kube, ns: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            kube.request("GET", f"/api/v1/namespaces/{ns}/serviceaccounts/default")
            return
        except Exception:  # noqa: BLE001 - not created yet
            time.sleep(0.2)
    raise TimeoutError(f"no default ServiceAccount in {ns}")


def table(rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--once", action="store_true",
                   help="no live view: exit 0 once the expected transitions happened")
    p.add_argument("--timeout", type=float, default=300, help="seconds --once waits")
    p.add_argument("--interval", type=float, default=3, help="operator evaluation interval")
    args = p.parse_args()
    demo = Demo(args.once, args.interval)
    signal.signal(signal.SIGTERM, lambda *_: demo.stopping.set())
    try:
        demo.start()
        return demo.loop(args.timeout)
    except KeyboardInterrupt:
        return 0
    finally:
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())
