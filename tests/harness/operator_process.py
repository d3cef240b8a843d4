"""The operator under test as a real process: ``python -m token_budget run``.

A test starts it with the control plane's kubeconfig and the Prometheus URL,
can kill it (SIGKILL, to test crash recovery), stop it (SIGTERM) and start it
again, and read its log and its ``/metrics``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from harness.controlplane import free_ports

REPO_ROOT = Path(__file__).resolve().parents[2]


class OperatorProcess:
    def __init__(self, kubeconfig: Path, prometheus_url: str, workdir: Path,
                 interval_seconds: float = 2.0, identity: str = "op-1",
                 extra_args: Sequence[str] = (), lease_namespace: str = "default",
                 command: Sequence[str] = ()) -> None:
        """``command`` replaces ``python -m token_budget run`` (e.g. the image's entrypoint
        run through chroot: ``harness.image.Bundle.argv``); the flags follow it."""
        self.kubeconfig = kubeconfig
        self.prometheus_url = prometheus_url
        self.workdir = workdir
        self.interval_seconds = interval_seconds
        self.identity = identity
        self.extra_args = list(extra_args)
        self.lease_namespace = lease_namespace
        self.command = list(command) or [sys.executable, "-m", "token_budget", "run"]
        self.metrics_port, self.health_port = free_ports(2)
        self.log = workdir / f"operator-{identity}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return [
            *self.command,
            "--prometheus-url", self.prometheus_url,
            "--interval-seconds", str(self.interval_seconds),
            "--recent-seconds", "60",
            "--metrics-port", str(self.metrics_port),
            "--metrics-host", "127.0.0.1",
            "--health-port", str(self.health_port),
            "--id", self.identity,
            "--lease-namespace", self.lease_namespace,
            "--lease-seconds", "6",
            *self.extra_args,
        ]

    def start(self) -> None:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PYTHONPATH"] = str(REPO_ROOT / "operator")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True, cwd=REPO_ROOT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the operator exited with {self.proc.returncode}:\n"
                                   f"{self.tail()}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                       timeout=2).read()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"the operator did not serve /metrics in 60 s:\n{self.tail()}")

    def metrics(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                      timeout=5).read().decode()

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as when a node dies."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, grace: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
