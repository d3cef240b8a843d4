"""What every benchmark shares: figures with their targets, the machine's load, paths.

A :class:`Figure` is one number a benchmark reached, next to the target it is held to
(or none: context such as a query count or a write rate). Each figure records the load
average when it was taken, because on a 2-core machine shared with other engineers'
test runs the load decides much of what a wall-clock number means.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "operator", REPO / "tests", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


def load() -> tuple[float, float, float]:
    """os.getloadavg(), rounded."""
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


def pytest_running() -> list[str]:
    """Command lines of running pytest processes (other engineers' test runs)."""
    done = subprocess.run(["pgrep", "-af", "pytest"], capture_output=True, text=True,
                          check=False)
    me = str(os.getpid())
    return [line for line in done.stdout.splitlines()
            if line and not line.startswith(me + " ") and "pgrep" not in line]


def wait_for_quiet(max_seconds: float, log: Any = print) -> bool:
    """Poll until no pytest runs (up to ``max_seconds``); whether it is quiet now."""
    deadline = time.monotonic() + max_seconds
    while True:
        busy = pytest_running()
        if not busy:
            return True
        if time.monotonic() >= deadline:
            log(f"  {len(busy)} pytest process(es) still running after {max_seconds:.0f} s "
                "of waiting: figures are taken under contention")
            return False
        log(f"  waiting for {len(busy)} pytest process(es) to finish "
            f"(load {load()[0]}) ...")
        time.sleep(min(20.0, max(1.0, deadline - time.monotonic())))


@dataclass
class Figure:
    """One measured figure and its target."""

    benchmark: str
    name: str
    value: float | None
    unit: str
    target: str = ""  # human text, e.g. "< 1 s"
    met: bool | None = None  # None: no target (context only)
    load: tuple[float, float, float] = field(default_factory=load)
    contended: bool = False  # pytest (other test runs) was running meanwhile
    note: str = ""
    extrapolated: bool = False
    taken_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(
        timespec="seconds"))

    def shown(self) -> str:
        if self.value is None:
            return "n/a"
        v = self.value
        if self.unit == "count" or abs(v) >= 100:
            text = f"{v:,.0f}"
        elif abs(v) >= 10:
            text = f"{v:.1f}"
        else:
            text = f"{v:.3g}"
        unit = "" if self.unit == "count" else f" {self.unit}"
        return text + unit + (" (extrapolated)" if self.extrapolated else "")


def check(value: float | None, op: str, limit: float) -> bool | None:
    if value is None:
        return False
    return {"<": value < limit, "<=": value <= limit, "==": value == limit,
            ">=": value >= limit, ">": value > limit}[op]


@dataclass
class Report:
    """Figures collected by one run of bench/run.py."""

    figures: list[Figure] = field(default_factory=list)
    started: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(
        timespec="seconds"))
    notes: dict[str, list[str]] = field(default_factory=dict)

    def add(self, fig: Figure) -> Figure:
        self.figures.append(fig)
        mark = {True: "met", False: "NOT MET", None: ""}[fig.met]
        print(f"  {fig.benchmark:9} {fig.name:58} {fig.shown():>22}  {fig.target:>14} "
              f"{mark}   load {fig.load[0]}", flush=True)
        return fig

    def note(self, benchmark: str, text: str) -> None:
        self.notes.setdefault(benchmark, []).append(text)
        print(f"  {benchmark:9} note: {text}", flush=True)

    def to_json(self, quick: bool, only: list[str],
                previous: dict[str, Any] | None = None) -> dict[str, Any]:
        """The results; figures of benchmarks not run now are kept from ``previous``."""
        runs = {b: {"started": self.started, "quick": quick} for b in only}
        figures = [asdict(f) for f in self.figures]
        notes = dict(self.notes)
        if previous and previous.get("quick", quick) == quick:
            for b, r in (previous.get("runs") or {}).items():
                if b not in only:
                    runs[b] = r
            figures = [f for f in previous.get("figures", [])
                       if f.get("benchmark") not in only] + figures
            for b, n in (previous.get("notes") or {}).items():
                if b not in only:
                    notes[b] = n
        return {
            "started": self.started,
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "quick": quick,
            "only": only,
            "runs": runs,
            "machine": machine(),
            "figures": figures,
            "notes": notes,
        }


def machine() -> dict[str, Any]:
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "memory_mib": mem, "python": sys.version.split()[0],
            "load_at_end": load()}


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    t0, c0 = time.monotonic(), time.process_time()
    try:
        yield out
    finally:
        out["wall"] = time.monotonic() - t0
        out["cpu"] = time.process_time() - c0


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def rss_mib(pid: int, field: str = "VmRSS") -> float | None:
    """A memory figure of a process from /proc status in MiB: VmRSS, or VmHWM for the peak.

    None once the process is gone.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat, 100 ticks a second)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def agent_deployment(name: str, replicas: int) -> dict[str, Any]:
    """A governed agent Deployment (agent label on the object and its pod template)."""
    agent = "tokenbudget.io/agent"
    labels = {"app": name, agent: "true"}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "labels": {agent: "true"}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": labels}, "spec": {"containers": [
                         {"name": "agent", "image": "example/agent:1",
                          "env": [{"name": "LLM_MODEL", "value": "gpt-4o"}]}]}}}}


def agent_budget(limit_tokens: int) -> dict[str, Any]:
    """A TokenBudget "team": Warn at 50 %, Block at 100 % of ``limit_tokens`` an hour."""
    return {"apiVersion": "tokenbudget.io/v1alpha1", "kind": "TokenBudget",
            "metadata": {"name": "team"},
            "spec": {"limits": [{"window": "1h", "tokens": limit_tokens}],
                     "actions": [{"type": "Warn", "atPercent": 50},
                                 {"type": "Block", "atPercent": 100}]}}
