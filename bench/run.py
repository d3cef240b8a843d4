"""The benchmark suite: ``make bench`` (not part of ``make test``).

    .venv/bin/python bench/run.py                     # everything, full sizes (~45 min)
    .venv/bin/python bench/run.py --quick             # small sizes (minutes)
    .venv/bin/python bench/run.py --only engine,promql

Benchmarks (one module each): ``engine`` (policy engine, pure), ``promql`` (queries per
evaluation; batched vs one query per budget on a real Prometheus), ``kube`` (writes,
memory and a spend spike on the real control plane), ``latency`` (spend visible ->
workload enforced), ``overshoot`` (spend past the limit for ramps at a 15 s scrape),
``admission`` (the pod webhook directly and through the API server), ``enrolment`` (what
unlabelled pods sent to the webhook cost where enrolment is not mandatory), ``directive`` (a
Block reaching 1,000 agents' Governors through the directive service), ``gateway`` (the
LiteLLM callback's added latency, the directive service's CPU per decision request),
``partitions`` (a budget partitioned by user, 1,000 partitions, against it unpartitioned).

Prints a table of target vs reached and writes ``bench/results.json`` (figures, targets,
met or not, the load average next to every figure, timestamps). A run of a subset keeps
the other benchmarks' figures from the previous results of the same size (quick or full).
The cluster benchmarks wait (up to ``--wait-quiet`` seconds) until no pytest runs on the
machine and say so when they had to run under contention.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) in sys.path:  # run as a script: import the modules as the package bench.*
    sys.path.remove(str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench import common  # noqa: E402  (sys.path first)
from bench.common import Figure, Report  # noqa: E402

ORDER = ("engine", "promql", "admission", "enrolment", "latency", "overshoot", "kube",
         "directive", "gateway", "partitions")


def _module(name: str):  # type: ignore[no-untyped-def]
    import importlib

    return importlib.import_module(f"bench.{name}_bench")


def table(report: Report) -> str:
    rows = [("benchmark", "figure", "reached", "target", "met", "load 1m", "")]
    for f in report.figures:
        met = {True: "yes", False: "NO", None: ""}[f.met]
        flag = "contended" if f.contended else ""
        rows.append((f.benchmark, f.name, f.shown(), f.target, met, f"{f.load[0]:.2f}", flag))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[j]) if j in (0, 1, 3, 6) else c.rjust(widths[j])
                               for j, c in enumerate(r)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(data: dict[str, object]) -> str:
    """The README's table, from a results.json."""
    lines = ["| benchmark | figure | reached | target | met | load (1 min) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for raw in data["figures"]:  # type: ignore[attr-defined]
        f = Figure(**{**raw, "load": tuple(raw["load"])})
        met = {True: "yes", False: "**no**", None: ""}[f.met]
        load = f"{f.load[0]:.2f}" + (" (contended)" if f.contended else "")
        lines.append(f"| {f.benchmark} | {f.name.strip()} | {f.shown()} | {f.target} | {met} "
                     f"| {load} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(ORDER)}")
    p.add_argument("--quick", action="store_true", help="small sizes, for development")
    p.add_argument("--wait-quiet", type=float, default=300,
                   help="seconds to wait for other test runs to finish before a cluster "
                        "benchmark (default 300)")
    p.add_argument("--out", type=Path, default=HERE / "results.json")
    p.add_argument("--markdown", action="store_true",
                   help="print the results in --out as a Markdown table; run nothing")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())))
        return 0
    only = [x.strip() for x in args.only.split(",") if x.strip()] or list(ORDER)
    unknown = set(only) - set(ORDER)
    if unknown:
        p.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {','.join(ORDER)}")
    report = Report()
    failed = []
    print(f"benchmarks {','.join(only)} ({'quick' if args.quick else 'full'} sizes); "
          f"load {common.load()}", flush=True)
    for name in ORDER:
        if name not in only:
            continue
        print(f"\n== {name}", flush=True)
        t0 = time.monotonic()
        try:
            _module(name).run(report, args.quick, wait_seconds=args.wait_quiet)
        except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the rest
            traceback.print_exc()
            failed.append(name)
            report.add(Figure(name, "benchmark failed", None, "", target="runs", met=False,
                              note=f"{type(exc).__name__}: {exc}"[:500]))
        print(f"  ({name} took {time.monotonic() - t0:.0f} s)", flush=True)
    print("\n" + table(report))
    for bench, notes in report.notes.items():
        for n in notes:
            print(f"  [{bench}] {n}")
    previous = None
    if args.out.exists() and set(only) != set(ORDER):
        try:
            previous = json.loads(args.out.read_text())
        except ValueError:
            previous = None
    data = report.to_json(args.quick, only, previous)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 1 if failed else 0  # a target not met is a finding, not a failure


if __name__ == "__main__":
    sys.exit(main())
