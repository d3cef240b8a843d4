"""Agents that ask the directive service, and how late they learn of a decision.

The control plane has no kubelet, so nothing runs in the pods: an "agent" here is
a :class:`token_budget.agent.Governor` in the test's process, built from what the
mutating webhook injected into its pod (the URL, with ``$(VAR)`` expanded as the
kubelet would, and the CA) and a ServiceAccount token the API server issued for
that pod (a TokenRequest bound to it, as a projected token is).

:class:`StateWatch` watches the pods itself and records when each one's
``tokenbudget.io/state`` annotation first reads a state: the moment the
operator's write reached a watcher of the API server, which is the start of
"decision written -> Governor sees it".
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from token_budget.agent import Governor
from token_budget.kube import PODS, Kube
from token_budget.webhooks import directives

STATE = "tokenbudget.io/state"


def pod_body(name: str, service_account: str = "default") -> dict[str, Any]:
    """A bare governed agent pod (the agent label; the webhook adds the rest)."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"tokenbudget.io/agent": "true",
                                                  "app": "directive-agent"}},
            "spec": {"serviceAccountName": service_account,
                     "containers": [{"name": "agent", "image": "example/agent:1",
                                     "env": [{"name": "LLM_MODEL", "value": "gpt-4o"}]}]}}


def token_for(kube: Kube, pod: dict[str, Any], seconds: int = 3600) -> str:
    """A token of the pod's ServiceAccount, bound to the pod (a TokenRequest)."""
    meta = pod["metadata"]
    account = pod["spec"].get("serviceAccountName") or "default"
    answer = kube.request(
        "POST", f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token",
        body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
              "spec": {"expirationSeconds": seconds,
                       "boundObjectRef": {"kind": "Pod", "apiVersion": "v1",
                                          "name": meta["name"], "uid": meta["uid"]}}})
    return str(answer["status"]["token"])


def injected(pod: dict[str, Any]) -> tuple[str, str | None]:
    """The directive URL (expanded as the kubelet would) and CA the webhook gave the pod."""
    env = {e["name"]: e for e in pod["spec"]["containers"][0].get("env") or []}
    meta = pod["metadata"]
    url = env[directives.URL_ENV]["value"] \
        .replace(f"$({directives.POD_NAMESPACE_ENV})", meta["namespace"]) \
        .replace(f"$({directives.POD_NAME_ENV})", meta["name"])
    ca = env.get(directives.CA_ENV, {}).get("value")
    return url, ca


class Agent:
    """One pod's Governor, with the time it first saw each state."""

    def __init__(self, kube: Kube, pod: dict[str, Any], workdir: Path,
                 wait_seconds: float = 30.0) -> None:
        self.name = pod["metadata"]["name"]
        self.seen: dict[str, float] = {}
        token = workdir / f"{self.name}.token"
        token.write_text(token_for(kube, pod))
        url, ca = injected(pod)
        self.governor = Governor(str(workdir / f"{self.name}.absent"), url=url, ca=ca or "",
                                 token_file=str(token), wait_seconds=wait_seconds,
                                 missing_ok=True, on_change=self._changed)

    def _changed(self, d: Any) -> None:
        self.seen.setdefault(d.state, time.monotonic())


def connect(kube: Kube, pods: Sequence[dict[str, Any]], workdir: Path,
            workers: int = 16, wait_seconds: float = 30.0) -> list[Agent]:
    """An Agent per pod, built in parallel (each one's first answer takes a TokenReview)."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda p: Agent(kube, p, workdir, wait_seconds), pods))


class StateWatch(threading.Thread):
    """Records when each pod of a namespace first carries ``state`` (our own watch)."""

    def __init__(self, kube: Kube, namespace: str, state: str) -> None:
        super().__init__(daemon=True, name=f"watch-{state}")
        self.kube, self.namespace, self.state = kube, namespace, state
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()
        self.started = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            data = self.kube.request("GET", PODS.path(self.namespace), {"limit": 1})
            version = data["metadata"]["resourceVersion"]
            self.started.set()
            try:
                for event in self.kube.stream(PODS.path(self.namespace), {
                        "watch": "true", "resourceVersion": version,
                        "timeoutSeconds": 300}, self.stop):
                    obj = event.get("object") or {}
                    ann = (obj.get("metadata") or {}).get("annotations") or {}
                    if ann.get(STATE) == self.state:
                        self.seen.setdefault(obj["metadata"]["name"], time.monotonic())
            except Exception:  # noqa: BLE001 - watch again, as the operator does
                self.stop.wait(0.5)


def lags(agents: Sequence[Agent], watch: StateWatch, state: str) -> tuple[list[float], int]:
    """Seconds from our watch seeing ``state`` on each pod to its Governor seeing it.

    Also how many agents saw it before our watch did (the two watches race: a
    Governor may win by a few milliseconds; those count as 0).
    """
    out, early = [], 0
    for a in agents:
        if a.name in watch.seen and state in a.seen:
            lag = a.seen[state] - watch.seen[a.name]
            early += lag < 0
            out.append(max(0.0, lag))
    return out, early
