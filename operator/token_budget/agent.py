"""The agent side: read the operator's directive and obey it, with no Kubernetes dependency.

An agent pod mounts its own annotations through a downward API volume (the
kubelet refreshes the file when annotations change, no restart needed)::

    volumes:
      - name: tokenbudget
        downwardAPI:
          items:
            - path: annotations
              fieldRef: {fieldPath: metadata.annotations}

and asks before each LLM call::

    from token_budget.agent import Governor

    gov = Governor("/etc/tokenbudget/annotations", default_model="gpt-4o")
    model = gov.model()                 # the model to use now (Reroute)
    gov.acquire(estimated_tokens)       # waits for the token rate (Throttle); raises Blocked
    ...call the model...
    gov.spent(actual_tokens - estimated_tokens)   # settle the difference

Only the standard library is used, so any agent can vendor this file.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

PREFIX = "tokenbudget.io/"
DEFAULT_PATH = "/etc/tokenbudget/annotations"


class Blocked(RuntimeError):
    """The budget blocks this workload: do not call a model."""


class ModelNotAllowed(RuntimeError):
    """The model asked for is not among the allowed models."""


@dataclass(frozen=True)
class Directive:
    state: str = "Ok"
    budget: str = ""
    reason: str = ""
    use_model: str | None = None
    allowed_models: frozenset[str] | None = None
    tokens_per_minute: int | None = None

    @property
    def blocked(self) -> bool:
        return self.state == "Blocked"


def parse_annotations(text: str) -> dict[str, str]:
    """The downward API file format: ``key="value"`` per line, Go-quoted values."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if "=" not in line:
            continue
        key, _, raw = line.partition("=")
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = raw[1:-1].encode().decode("unicode_escape")
        out[key.strip()] = raw
    return out


def directive_from(annotations: Mapping[str, str]) -> Directive:
    def get(name: str) -> str | None:
        value = annotations.get(PREFIX + name)
        return value if value else None

    allowed = get("allowed-models")
    rate = get("tokens-per-minute")
    return Directive(
        state=get("state") or "Ok",
        budget=get("budget") or "",
        reason=get("reason") or "",
        use_model=get("use-model"),
        allowed_models=frozenset(allowed.split(",")) if allowed is not None else None,
        tokens_per_minute=int(rate) if rate and rate.isdigit() else None,
    )


class TokenBucket:
    """Tokens per minute with a burst of one minute's worth; thread-safe."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self.level = float(per_minute)
        self.at = clock()
        self.lock = threading.Lock()

    def _refill(self) -> None:
        now = self.clock()
        refill = (now - self.at) * self.per_minute / 60
        self.level = min(float(self.per_minute), self.level + refill)
        self.at = now

    def wait_time(self, tokens: int) -> float:
        """Seconds until ``tokens`` may be spent (0: now). Takes them when 0."""
        with self.lock:
            self._refill()
            need = min(tokens, self.per_minute)  # a request larger than a minute waits a minute
            if self.level >= need:
                self.level -= tokens
                return 0.0
            return (need - self.level) * 60 / self.per_minute

    def settle(self, tokens: int) -> None:
        with self.lock:
            self.level -= tokens


class Governor:
    """Reads the directive file (re-read when it changes) and enforces it in-process."""

    def __init__(self, path: str = DEFAULT_PATH, default_model: str = "",
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.path = path
        self.default_model = default_model
        self.clock = clock
        self.sleep = sleep
        self._mtime: float | None = None
        self._directive = Directive()
        self._bucket: TokenBucket | None = None

    def directive(self) -> Directive:
        try:
            mtime = os.stat(self.path).st_mtime
        except FileNotFoundError:
            return self._directive  # no file: not governed (or not yet): keep the last one
        if mtime != self._mtime:
            with open(self.path) as f:
                d = directive_from(parse_annotations(f.read()))
            self._mtime = mtime
            if d.tokens_per_minute != self._directive.tokens_per_minute:
                self._bucket = (TokenBucket(d.tokens_per_minute, self.clock)
                                if d.tokens_per_minute else None)
            self._directive = d
        return self._directive

    def model(self, wanted: str | None = None) -> str:
        """The model to call: the reroute target, else ``wanted``, if allowed."""
        d = self.directive()
        if d.blocked:
            raise Blocked(f"blocked by {d.budget}: {d.reason}")
        model = d.use_model or wanted or self.default_model
        if d.allowed_models is not None and model not in d.allowed_models:
            raise ModelNotAllowed(f"{model} is not allowed by {d.budget}; allowed: "
                                  f"{', '.join(sorted(d.allowed_models))}")
        return model

    def acquire(self, tokens: int, max_wait: float = 300.0) -> None:
        """Block until ``tokens`` fit the rate; raise Blocked if the budget blocks."""
        deadline = self.clock() + max_wait
        while True:
            d = self.directive()
            if d.blocked:
                raise Blocked(f"blocked by {d.budget}: {d.reason}")
            bucket = self._bucket
            if bucket is None:
                return
            wait = bucket.wait_time(tokens)
            if wait == 0:
                return
            if self.clock() + wait > deadline:
                raise TimeoutError(f"{tokens} tokens do not fit {d.tokens_per_minute}/min "
                                   f"within {max_wait}s")
            self.sleep(min(wait, 5.0))  # re-read the directive at least every 5 s

    def spent(self, extra_tokens: int) -> None:
        """Settle the difference between the estimate and what the call really used."""
        if self._bucket is not None and extra_tokens:
            self._bucket.settle(extra_tokens)
