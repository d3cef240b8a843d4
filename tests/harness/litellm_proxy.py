"""A real LiteLLM proxy in front of an OpenAI-compatible stub, with the token budget callback.

The proxy (``litellm[proxy]==1.108.0`` from PyPI, without a database) runs from a
virtualenv of its own, built once under the cache directory (its dependencies
must not move the operator's), and loads ``token_budget.litellm_callback`` from
this checkout through ``PYTHONPATH``. :class:`Upstream` is the model: every
answer carries a fixed ``usage`` and the stub records which model was asked for.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from harness.controlplane import free_ports
from harness.operator_process import REPO_ROOT

VERSION = "1.108.0"
MASTER_KEY = "sk-" + "tokenbudget-e2e-master-key-0123456789"
USAGE = {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150}


def litellm_bin() -> Path:
    """The ``litellm`` command of the cached virtualenv, installed on first use (~1 min)."""
    cache = Path(os.environ.get("TOKENBUDGET_CACHE", Path.home() / ".cache" /
                                "token-budget-operator"))
    venv = cache / f"litellm-{VERSION}"
    exe = venv / "bin" / "litellm"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q",
                        f"litellm[proxy]=={VERSION}", "prometheus_client"], check=True,
                       timeout=900)
    return exe


class Upstream(threading.Thread):
    """An OpenAI-compatible chat completions server with a fixed ``usage``."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="upstream")
        self.models: list[str] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.models.append(body["model"])
                data = json.dumps({
                    "id": "stub", "object": "chat.completion", "created": 0,
                    "model": body["model"], "usage": USAGE,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "ok"}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def run(self) -> None:
        self.server.serve_forever()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Proxy:
    """``litellm --config`` with the callback (unless told), the models routed to ``upstream``."""

    def __init__(self, workdir: Path, upstream: Upstream, models: list[str],
                 env: dict[str, str], callback: bool = True,
                 metrics: bool = False, config_body: dict[str, Any] | None = None) -> None:
        """``metrics``: LiteLLM's own Prometheus metrics at ``/metrics/``, unauthenticated,
        labelled with the requests' ``metadata.namespace`` and ``metadata.pod``.
        ``config_body``: the proxy's config.yaml as given (``upstream``, ``models``,
        ``callback`` and ``metrics`` are then unused)."""
        [self.port] = free_ports(1)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"litellm-{self.port}.log"
        config = workdir / f"litellm-{self.port}.yaml"
        config.write_text(yaml.safe_dump(config_body) if config_body is not None
                          else yaml.safe_dump({
            "model_list": [{"model_name": m, "litellm_params": {
                "model": f"openai/{m}", "api_base": upstream.url, "api_key": "sk-stub"}}
                for m in models],
            "litellm_settings": {
                "callbacks": [*(["token_budget.litellm_callback.callback"] if callback else []),
                              *(["prometheus"] if metrics else [])],
                **({"custom_prometheus_metadata_labels": ["metadata.namespace", "metadata.pod"],
                    "require_auth_for_metrics_endpoint": False} if metrics else {})}}))
        self.argv = [str(litellm_bin()), "--config", str(config), "--port", str(self.port)]
        self.env = {**os.environ, **env, "LITELLM_MASTER_KEY": MASTER_KEY,
                    "PYTHONPATH": str(REPO_ROOT / "operator")}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the process without waiting (two proxies come up side by side)."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)

    def wait_ready(self, timeout: float = 90) -> None:
        assert self.proc is not None, "spawn() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"litellm exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                urllib.request.urlopen(self.url + "/health/liveliness", timeout=2).read()
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"litellm did not come up in {timeout:.0f} s:\n{self.tail()}")

    def chat(self, model: str, metadata: dict[str, str] | None, source: str = "127.0.0.1",
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        """One chat completion as an agent that ignores every annotation sends it.

        ``metadata`` None sends none; ``source`` is the loopback address the
        connection comes from (any of 127.0.0.0/8: the proxy sees it as the client IP).
        """
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}],
                **({"metadata": metadata} if metadata is not None else {})}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30,
                                          source_address=(source, 0))
        try:
            conn.request("POST", "/chat/completions", json.dumps(body).encode(), headers={
                "Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json",
                **(headers or {})})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}")
        finally:
            conn.close()

    def metrics(self) -> str:
        """LiteLLM's own metrics page (``metrics=True``)."""
        with urllib.request.urlopen(self.url + "/metrics/", timeout=10) as resp:
            return str(resp.read().decode())

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


if __name__ == "__main__":  # scripts/prereqs.sh: install it ahead of the tests
    print(litellm_bin())
