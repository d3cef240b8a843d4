"""Issue 15: what the LiteLLM callback adds to a request, and what a decision request costs.

A real LiteLLM proxy (1.108.0, :mod:`harness.litellm_proxy`) in front of an
OpenAI-compatible stub that answers at once, measured twice at the same open-loop
rate: without the callback, then with ``token_budget.litellm_callback``. The
directive service is the operator's own code (:class:`token_budget.webhooks.
directives.Service` and its store), run alone in a process of its own so its CPU
can be read, over plain HTTP with a TokenReview that is always a cache hit after
the first request: it stands for the operator's answering path, not its TLS. The
requests name 100 different pods (Throttled, at a rate no request reaches), so the
callback asks the service about once a second per pod: the full path (fetch,
cache, bucket, settle) on every request.

Figures: p50/p99 latency through the proxy without and with the callback at
``RATE`` requests a second; the directive service's CPU per directive request.
First, without the proxy: the service's CPU per request by pod name and by
caller IP (``pod-ip``/``checked`` identity), asked in alternating blocks on one
kept-alive connection so both see the same machine.

Run: ``.venv/bin/python bench/run.py --only gateway`` (``--quick``: fewer requests).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import Figure, Report, cpu_seconds, load, percentile, wait_for_quiet
from harness.controlplane import free_ports
from harness.litellm_proxy import Proxy, Upstream
from harness.operator_process import REPO_ROOT

RATE = 20.0  # requests a second, open loop
PODS = 100
NS = "bench"
ROUNDS = 4  # blocks of each kind of request, alternating (by name, by IP, by name, ...)


def _ip(i: int) -> str:
    return f"10.1.{i // 256}.{i % 256}"


def serve(port: int) -> None:
    """The directive service alone (``python -m bench.gateway_bench PORT``)."""
    from aiohttp import web

    from token_budget.webhooks import directives

    async def review(token: str) -> dict[str, object]:
        return {"authenticated": token == "gateway",
                "user": {"username": "system:serviceaccount:gw:litellm"}}

    async def main() -> None:
        store = directives.DirectiveStore()
        store.bind(asyncio.get_running_loop())
        for i in range(PODS):
            store.pod_event({"metadata": {"namespace": NS, "name": f"agent-{i}", "annotations": {
                "tokenbudget.io/state": "Throttled", "tokenbudget.io/budget": "b",
                "tokenbudget.io/reason": "r", "tokenbudget.io/tokens-per-minute": "100000000"}},
                "spec": {}, "status": {"phase": "Running", "podIP": _ip(i)}}, deleted=False)
        service = directives.Service(store, directives.Authenticator(review),
                                     readers=frozenset({"gw:litellm"}))
        served = [0]

        @web.middleware
        async def count(request: web.Request, handler: object) -> web.StreamResponse:
            if request.path != "/count":
                served[0] += 1
            return await handler(request)  # type: ignore[operator, no-any-return]

        app = web.Application(middlewares=[count])
        service.add_routes(app)

        async def counted(_: web.Request) -> web.Response:
            return web.json_response({"served": served[0]})

        app.router.add_get("/count", counted)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    asyncio.run(main())


def _load(proxy: Proxy, n: int, rng: random.Random) -> list[float]:
    """``n`` requests at RATE a second (open loop); their latencies in seconds."""
    out: list[float] = []

    def one(i: int) -> None:
        t0 = time.monotonic()
        status, body = proxy.chat("gpt-4o", {"namespace": NS,
                                             "pod": f"agent-{rng.randrange(PODS)}"})
        if status == 200:
            out.append(time.monotonic() - t0)

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        futures = []
        for i in range(n):
            time.sleep(max(0.0, start + i / RATE - time.monotonic()))
            futures.append(pool.submit(one, i))
        for f in futures:
            f.result()
    return out


def _service_cost(report: Report, port: int, pid: int, n: int, kb: dict[str, object]) -> None:
    """The service's CPU per request by name and by IP, side by side."""
    paths = {"by pod name": lambda i: f"/v1/namespaces/{NS}/pods/agent-{i % PODS}/directive",
             "by caller IP": lambda i: f"/v1/callers/{_ip(i % PODS)}/directive"}
    cpu = dict.fromkeys(paths, 0.0)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Authorization": "Bearer gateway"}
    load0 = load()
    try:
        for path in paths.values():  # warm-up: the TokenReview cache, imports
            for i in range(20):
                conn.request("GET", path(i), headers=headers)
                conn.getresponse().read()
        for _ in range(ROUNDS):
            for what, path in paths.items():
                cpu0 = cpu_seconds(pid)
                for i in range(n // ROUNDS):
                    conn.request("GET", path(i), headers=headers)
                    resp = conn.getresponse()
                    resp.read()
                    assert resp.status == 200, (path(i), resp.status)
                cpu[what] += cpu_seconds(pid) - cpu0
    finally:
        conn.close()
    for what, seconds in cpu.items():
        report.add(Figure(**kb, name=f"directive service CPU per request {what}",
                          value=seconds / n * 1000, unit="ms",
                          note=f"{n} requests in {ROUNDS} blocks alternating with the other "
                               f"kind, one connection; {seconds:.2f} s CPU; load {load0} -> "
                               f"{load()}"))


def run(report: Report, quick: bool, wait_seconds: float = 300) -> None:
    n = 200 if quick else 1_200
    quiet = wait_for_quiet(0 if quick else wait_seconds)
    kb = {"benchmark": "gateway", "contended": not quiet}
    workdir = Path(tempfile.mkdtemp(prefix="tbo-bench-gateway-"))
    (workdir / "token").write_text("gateway")
    [port] = free_ports(1)
    service = subprocess.Popen([sys.executable, "-m", "bench.gateway_bench", str(port)],
                               cwd=REPO_ROOT, env={"PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT}/tests:"
                                                   f"{REPO_ROOT}/operator"})
    upstream = Upstream()
    upstream.start()
    rng = random.Random(15)
    try:
        _wait_serving(port)
        _service_cost(report, port, service.pid, 800 if quick else 8_000, kb)
        for callback in (False, True):
            proxy = Proxy(workdir, upstream, ["gpt-4o"], {
                "TOKENBUDGET_DIRECTIVE_BASE_URL": f"http://127.0.0.1:{port}",
                "TOKENBUDGET_GATEWAY_TOKEN_FILE": str(workdir / "token"),
                "TOKENBUDGET_GATEWAY_FAIL_CLOSED": "true"}, callback=callback)
            proxy.start()
            try:
                _load(proxy, 40, rng)  # warm-up: imports, connections
                count0 = json.loads(urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/count").read())["served"]
                cpu0, load0 = cpu_seconds(service.pid), load()
                lat = _load(proxy, n, rng)
                cpu = cpu_seconds(service.pid) - cpu0
                asked = json.loads(urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/count").read())["served"] - count0
            finally:
                proxy.stop()
            what = "with the callback" if callback else "without the callback"
            note = (f"{len(lat)} of {n} answered 200 at {RATE:g}/s; load {load0} -> {load()}")
            report.add(Figure(**kb, name=f"proxy latency {what}, p50", unit="ms",
                              value=(percentile(lat, 50) or 0) * 1000, note=note))
            report.add(Figure(**kb, name=f"proxy latency {what}, p99", unit="ms",
                              value=(percentile(lat, 99) or 0) * 1000, note=note))
            if callback:
                report.add(Figure(**kb, name="directive service CPU per directive request",
                                  value=cpu / asked * 1000 if asked else None, unit="ms",
                                  note=f"{asked} directive requests for {n} proxied requests "
                                       f"({PODS} callers, each cached 1 s); {cpu:.2f} s CPU"))
    finally:
        upstream.stop()
        service.terminate()
        service.wait(10)


def _wait_serving(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
