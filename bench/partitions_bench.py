"""Issue 18 part 3: what 1,000 partitions cost an evaluation (the policy engine, pure).

One TokenBudget in one namespace, a Month money cap and a rolling 24h token cap,
the default ladder; 1,000 users each with three spend series (three models,
the ``user`` label set) and one Deployment labelled ``tokenbudget.io/owner``
with their name. Timed on one core (``time.process_time``), best of three:

* the budget unpartitioned (one decision over the 3,000 series);
* the same budget with ``partition: {label: user, podLabel: tokenbudget.io/owner}``
  (1,001 decisions: each user and the unpartitioned spend), and its status
  summary (``status.partitions``);
* the partitioned budget handed the previous evaluation after 1 % of the users'
  spend changed: every partition of the namespace is decided anew (the reuse
  works per namespace), but sums are regrouped once for all partitions.

Then, on a real Prometheus (when its binaries are installed; ``promtool`` backfills
26 hours of ``llm_tokens_total`` for the same 1,000 users x 3 models x 3 token
types, each pod's series labelled with its user), the operator's own reading
(``PrometheusSource.collect``) for the budget with a 24h and a Day limit,
unpartitioned and partitioned: the plan adds ``user`` to the ``by`` clause, which
changes neither the number of queries nor the samples loaded when each pod
serves one user; Prometheus's own ``evalTotalTime`` and the series returned are
printed side by side.

Run: ``.venv/bin/python bench/run.py --only partitions`` or this file directly.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: import the modules as the package bench.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Figure, Report, pytest_running
from bench.engine_bench import NOW, catalog
from token_budget.api import v1alpha1 as api
from token_budget.handlers import status as statuses
from token_budget.policy import engine, planner
from token_budget.policy.decisions import Evaluation
from token_budget.policy.inputs import SpendSeries, SpendSnapshot, Workload, WorkloadKey

NS = "team-agents"
OWNER = "tokenbudget.io/owner"
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4")
PARTITION = {"label": "user", "podLabel": OWNER, "statusTop": 10, "reportAtPercent": 80}


def _budget(partitioned: bool, limits: list[dict[str, Any]] | None = None
            ) -> api.TokenBudget:
    spec: dict[str, Any] = {"limits": limits or [{"window": "Month", "cost": "9.00"},
                                                 {"window": "24h", "tokens": 20_000_000}]}
    if partitioned:
        spec["partition"] = PARTITION
    return api.TokenBudget.model_validate({
        "apiVersion": api.API_VERSION, "kind": "TokenBudget",
        "metadata": {"name": "allowance", "namespace": NS}, "spec": spec})


def _series(users: int, rng: random.Random) -> list[SpendSeries]:
    return [SpendSeries(namespace=NS, workload=f"u{u:04}-agent-0", model=m,
                        input_tokens=float(rng.randint(0, 3_000_000)),
                        output_tokens=float(rng.randint(0, 300_000)),
                        labels=(("user", f"u{u:04}"),))
            for u in range(users) for m in MODELS]


def world_and_snapshot(users: int, partitioned: bool, seed: int = 18
                       ) -> tuple[engine.World, SpendSnapshot]:
    rng = random.Random(seed)
    budget = _budget(partitioned)
    series = tuple(_series(users, rng))
    plan = planner.plan([budget], NOW)
    snap = SpendSnapshot(taken_at=NOW, windows={key: series for key in plan.windows},
                         recent={rs: series[: len(series) // 10] for rs in plan.sources})
    workloads = [Workload(WorkloadKey("Deployment", NS, f"u{u:04}-agent"),
                          {"tokenbudget.io/agent": "true", OWNER: f"u{u:04}"})
                 for u in range(users)]
    return engine.World(budgets=[budget], catalog=catalog(), namespaces={NS: {}},
                        workloads=workloads), snap


def _best(fn: Callable[[], Evaluation], repeats: int = 3) -> tuple[float, Evaluation]:
    best, result = float("inf"), None
    for _ in range(repeats):
        gc.collect()
        gc.disable()
        try:
            c0 = time.process_time()
            result = fn()
            best = min(best, time.process_time() - c0)
        finally:
            gc.enable()
    assert result is not None
    return best, result


def _changed(snap: SpendSnapshot, share: float) -> SpendSnapshot:
    rng = random.Random(7)
    windows = {}
    for key, series in snap.windows.items():
        out = list(series)
        for i in rng.sample(range(len(out)), max(1, int(len(out) * share))):
            out[i] = dataclasses.replace(out[i], input_tokens=out[i].input_tokens + 1000)
        windows[key] = tuple(out)
    return dataclasses.replace(snap, windows=windows)


def run(report: Report, quick: bool, wait_seconds: float = 0) -> None:
    users = 1_000
    contended = bool(pytest_running())
    w0, s0 = world_and_snapshot(users, partitioned=False)
    plain, one = _best(lambda: engine.evaluate(w0, s0, NOW))
    assert len(one.decisions) == 1
    report.add(Figure("partitions", f"  1 budget, {users * len(MODELS):,} series, "
                      f"{users:,} workloads, unpartitioned (CPU)", plain, "s",
                      contended=contended, note="one decision"))
    w1, s1 = world_and_snapshot(users, partitioned=True)
    cpu, result = _best(lambda: engine.evaluate(w1, s1, NOW))
    n = len(result.decisions)
    assert n == users + 1
    blocked = sum(d.state is api.State.BLOCKED for d in result.decisions)
    report.add(Figure("partitions", f"  the same budget partitioned by user: {n:,} "
                      "partitions (CPU)", cpu, "s", contended=contended,
                      note=f"{cpu / plain:.0f}x unpartitioned; {cpu / n * 1e6:.0f} us per "
                           f"partition; {blocked} Blocked"))
    budget = w1.budgets[0]
    c0 = time.process_time()
    status = statuses.partitioned_status(budget, result.decisions, "USD", NOW, 0, None)
    summary = time.process_time() - c0
    p = status["partitions"]
    report.add(Figure("partitions", "  its status (summary of 1,001 partitions; CPU)",
                      summary, "s", contended=contended,
                      note=f"top {len(p['top'])}, over {len(p['over'])} of {p['overCount']}"))
    changed = _changed(s1, 0.01)
    again, inc = _best(lambda: engine.evaluate(w1, changed, NOW, previous=result))
    fresh = engine.evaluate(w1, changed, NOW)
    assert repr(inc.decisions) == repr(fresh.decisions), "differs from a fresh one"
    report.add(Figure("partitions", "  handed the previous one, 1 % of series changed (CPU)",
                      again, "s", contended=contended,
                      note="one namespace: every partition of it is decided anew"))
    promql_cost(report, users)


def _openmetrics(path: Path, users: int, end: int) -> None:
    """26 h of counters at a 15-minute step, 1-minute around the windows' starts and in
    the last 20 minutes (as promql_bench writes them), one pod per user."""
    start, fine = end - 26 * 3600, end - 20 * 60
    day = end - end % 86400
    band = {t for edge in (end - 86400, day) for t in range(edge - 600, edge + 61, 60)}
    stamps = sorted({*range(start, fine, 900), *(t for t in band if start < t < fine),
                     *range(fine, end + 1, 60)})
    with path.open("w") as f:
        f.write("# TYPE llm_tokens counter\n")
        for u in range(users):
            for k, model in enumerate(MODELS):
                labels = (f'namespace="{NS}",pod="u{u:04}-agent-0",model="{model}",'
                          f'user="u{u:04}"')
                for token_type, share in (("input", 1.0), ("output", 0.1),
                                          ("cached_input", 0.05)):
                    rate = (u % 97 + k + 1) * share
                    head = f'llm_tokens_total{{{labels},token_type="{token_type}"}} '
                    f.write("".join(f"{head}{rate * (t - start):.0f} {t}\n" for t in stamps))
        f.write("# EOF\n")


def promql_cost(report: Report, users: int) -> None:
    """The reading of the partitioned budget against the unpartitioned one, real Prometheus."""
    try:
        from bench.promql_bench import watch
        from harness.prometheus import Prometheus, find_binary
        promtool = find_binary("promtool")
        find_binary("prometheus")
    except Exception as exc:  # noqa: BLE001 - no Prometheus here: say so, measure the rest
        report.note("partitions", f"PromQL cost not measured: {exc}")
        return
    from token_budget.metrics.prometheus import PrometheusSource

    end = (int(time.time()) // 60 - 2) * 60
    at = dt.datetime.fromtimestamp(end, dt.UTC)
    work = Path(tempfile.mkdtemp(prefix="tbo-bench-partitions-"))
    prom = Prometheus(workdir=work, retention="400d")
    try:
        history = work / "history.om"
        _openmetrics(history, users, end)
        prom.data_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(promtool), "tsdb", "create-blocks-from", "openmetrics", "-q",
                        str(history), str(prom.data_dir)], check=True, capture_output=True,
                       timeout=1800)
        history.unlink()
        prom.start()
        limits = [{"window": "24h", "tokens": 20_000_000}, {"window": "Day", "cost": "9.00"}]
        for partitioned in (False, True, False, True):  # alternated: a warm cache for both
            src = PrometheusSource(prom.url, timeout_seconds=600, max_samples=0)
            seen = watch(src)
            budget = _budget(partitioned, limits)
            t0 = time.monotonic()
            snap = src.collect(planner.plan([budget], at), at)
            wall = time.monotonic() - t0
            problems = {**snap.errors, **snap.window_errors}
            if problems:
                raise RuntimeError(f"collect() failed: {problems}")
            evaluated = sum(float(st["timings"]["evalTotalTime"]) for st in seen)
            samples = sum(int(st["samples"]["totalQueryableSamples"]) for st in seen)
            returned = sum(len(v) for v in snap.windows.values())
            label = "partitioned by user" if partitioned else "unpartitioned"
            report.add(Figure("partitions", f"  Prometheus query time per evaluation, "
                              f"{label} (evalTotalTime)", evaluated, "s",
                              contended=bool(pytest_running()),
                              note=f"{src.stats.queries} queries, {samples:,} samples, "
                                   f"{returned:,} series returned; wall {wall:.2f} s"))
    finally:
        prom.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    r = Report()
    run(r, quick=True)
    for f in r.figures:
        print(f"{f.name.strip():70} {f.shown():>12}  {f.note}")
