"""The agent side: read the operator's directive and obey it, with no Kubernetes dependency.

An agent pod mounts its own annotations through a downward API volume (the
kubelet refreshes the file when annotations change, no restart needed). The
pod label ``tokenbudget.io/inject=true`` makes the operator's webhook add
exactly this to the pod; without it, write it yourself::

    volumes:
      - name: tokenbudget-directive
        downwardAPI:
          items:
            - path: annotations
              fieldRef: {fieldPath: metadata.annotations}
    containers:
      - volumeMounts:
          - {name: tokenbudget-directive, mountPath: /etc/tokenbudget, readOnly: true}

and asks before each LLM call::

    from token_budget.agent import Governor

    gov = Governor("/etc/tokenbudget/annotations", default_model="gpt-4o")
    model = gov.model()                 # the model to use now (Reroute); raises Blocked
    gov.acquire(estimated_tokens)       # waits for this pod's token rate (Throttle)
    ...call the model...
    gov.spent(actual_tokens - estimated_tokens)   # settle the difference

The file is the kubelet's rendering of ``metadata.annotations``: one
``key="value"`` line per annotation, the value quoted as Go's ``%q`` does
(UTF-8 kept as is, control characters escaped). A missing file is an error
(:class:`DirectiveFileMissing`) unless the Governor is told ``missing_ok``: a
mistyped path must not look like an agent no budget governs.

``tokens-per-minute`` on a pod is that pod's share of its workload's rate (the
operator divides the workload's rate by its live pods), so a Governor per pod
holds the workload to its rate. The token bucket allows a burst of one
minute's worth and keeps its level when the rate changes.

Only the standard library is used, so any agent can vendor this file. It does
not talk to the API server, watch the file with inotify, or share a bucket
between processes: one Governor per process, shared by its threads.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

PREFIX = "tokenbudget.io/"
DEFAULT_PATH = "/etc/tokenbudget/annotations"
# How often a waiting acquire() looks at the file again: a Block or a new rate is obeyed
# this soon after the kubelet writes it (a stat() of a small file costs microseconds).
POLL_SECONDS = 0.5


class Blocked(RuntimeError):
    """The budget blocks this workload: do not call a model."""


class ModelNotAllowed(RuntimeError):
    """The model asked for is not among the allowed models."""


class DirectiveFileMissing(FileNotFoundError):
    """The annotations file is not there: the volume is not mounted or the path is wrong."""


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


_ESCAPES = {"a": 0x07, "b": 0x08, "f": 0x0C, "n": 0x0A, "r": 0x0D, "t": 0x09, "v": 0x0B,
            "\\": 0x5C, '"': 0x22, "'": 0x27}


def unquote(quoted: str) -> str:
    """The value of a Go ``%q`` string literal, without its quotes.

    Printable characters stand for themselves (UTF-8 in the file, so ``Zoë``
    stays ``Zoë``); ``\\xNN`` are bytes (Go writes invalid UTF-8 that way),
    ``\\uNNNN`` and ``\\UNNNNNNNN`` code points, ``\\n`` and friends the usual
    control characters.

    Raises:
        ValueError: a malformed escape.
    """
    out = bytearray()
    i, n = 0, len(quoted)
    while i < n:
        c = quoted[i]
        if c != "\\":
            out += c.encode()
            i += 1
            continue
        if i + 1 >= n:
            raise ValueError(f"a lone backslash ends {quoted!r}")
        e = quoted[i + 1]
        if e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
        elif e in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[e]
            digits = quoted[i + 2: i + 2 + width]
            if len(digits) != width:
                raise ValueError(f"a short \\{e} escape in {quoted!r}")
            value = int(digits, 16)
            out += bytes([value]) if e == "x" else chr(value).encode()
            i += 2 + width
        elif e in "01234567":
            out.append(int(quoted[i + 1: i + 4], 8))
            i += 4
        else:
            raise ValueError(f"an unknown escape \\{e} in {quoted!r}")
    return out.decode("utf-8", errors="replace")


def parse_annotations(text: str) -> dict[str, str]:
    """The downward API file format: ``key="value"`` per line, Go-quoted values.

    A value that is not quoted is taken as it stands (hand-written files).
    """
    out: dict[str, str] = {}
    for line in text.splitlines():
        if "=" not in line:
            continue
        key, _, raw = line.partition("=")
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = unquote(raw[1:-1])
        out[key.strip()] = raw
    return out


def directive_from(annotations: Mapping[str, str]) -> Directive:
    """The directive the ``tokenbudget.io/`` annotations carry (none: ``Ok``)."""
    def get(name: str) -> str | None:
        value = (annotations.get(PREFIX + name) or "").strip()
        return value or None

    allowed = get("allowed-models")
    rate = get("tokens-per-minute")
    return Directive(
        state=get("state") or "Ok",
        budget=get("budget") or "",
        reason=get("reason") or "",
        use_model=get("use-model"),
        allowed_models=(frozenset(m.strip() for m in allowed.split(",") if m.strip())
                        if allowed is not None else None),
        tokens_per_minute=int(rate) if rate and rate.isascii() and rate.isdigit() else None,
    )


class TokenBucket:
    """Tokens per minute with a burst of one minute's worth; thread-safe.

    A rate change keeps the level (capped at the new minute's worth): a new
    rate is never a new full minute to spend. A rate of 0 lets nothing through.
    """

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

    def set_rate(self, per_minute: int) -> None:
        """Go on at ``per_minute`` from the level reached at the old rate."""
        with self.lock:
            self._refill()
            self.per_minute = per_minute
            self.level = min(self.level, float(per_minute))

    def wait_time(self, tokens: int) -> float:
        """Seconds until ``tokens`` may be spent (0: now). Takes them when 0.

        A request larger than a minute's worth waits for a full bucket, then
        leaves it in debt.
        """
        with self.lock:
            self._refill()
            if tokens > 0 and self.per_minute <= 0:
                return math.inf
            need = min(tokens, self.per_minute)
            if self.level >= need:
                self.level -= tokens
                return 0.0
            return (need - self.level) * 60 / self.per_minute

    def settle(self, tokens: int) -> None:
        with self.lock:
            self.level -= tokens


class Governor:
    """Reads the directive file (again when it changes) and enforces it in-process.

    Args:
        path: the annotations file of the downward API volume.
        default_model: the model :meth:`model` returns when nothing else is named.
        clock, sleep: time.monotonic and time.sleep; injected by tests.
        poll_seconds: how often a waiting :meth:`acquire` reads the directive again.
        missing_ok: a missing file means "not governed" (local runs) rather than
            :class:`DirectiveFileMissing`.

    Raises:
        DirectiveFileMissing: the file is missing and ``missing_ok`` is False.
    """

    def __init__(self, path: str = DEFAULT_PATH, default_model: str = "",
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = time.sleep,
                 poll_seconds: float = POLL_SECONDS, missing_ok: bool = False) -> None:
        self.path = path
        self.default_model = default_model
        self.clock = clock
        self.sleep = sleep
        self.poll_seconds = poll_seconds
        self.missing_ok = missing_ok
        self._seen: tuple[int, int, int] | None = None
        self._directive = Directive()
        self._bucket: TokenBucket | None = None
        self._lock = threading.Lock()
        self.directive()

    def directive(self) -> Directive:
        """The directive now; the file is read again only when it changed.

        Raises:
            DirectiveFileMissing: the file is missing and ``missing_ok`` is False.
        """
        with self._lock:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                if not self.missing_ok:
                    raise DirectiveFileMissing(
                        f"{self.path} does not exist: mount the pod's annotations there "
                        "(label the pod tokenbudget.io/inject=true) or pass missing_ok=True"
                    ) from None
                self._seen = None
                self._apply(Directive())
                return self._directive
            # The kubelet swaps in a new file (a new inode) on every change; the size and
            # mtime also catch a file rewritten in place within one mtime tick.
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)
            if seen != self._seen:
                with open(self.path, encoding="utf-8") as f:
                    self._apply(directive_from(parse_annotations(f.read())))
                self._seen = seen
            return self._directive

    def _apply(self, d: Directive) -> None:
        rate = d.tokens_per_minute
        if rate is None:
            self._bucket = None
        elif self._bucket is None:
            self._bucket = TokenBucket(rate, self.clock)
        elif rate != self._bucket.per_minute:
            self._bucket.set_rate(rate)
        self._directive = d

    def model(self, wanted: str | None = None) -> str:
        """The model to call: the reroute target, else ``wanted``, else the default.

        Raises:
            Blocked: the budget blocks this workload.
            ModelNotAllowed: that model is not among ``allowed-models``.
        """
        d = self.directive()
        if d.blocked:
            raise Blocked(f"blocked by {d.budget}: {d.reason}")
        model = d.use_model or wanted or self.default_model
        if d.allowed_models is not None and model not in d.allowed_models:
            raise ModelNotAllowed(f"{model} is not allowed by {d.budget}; allowed: "
                                  f"{', '.join(sorted(d.allowed_models))}")
        return model

    def acquire(self, tokens: int, max_wait: float = 300.0) -> None:
        """Wait until ``tokens`` fit this pod's rate, then take them.

        The directive is read again every ``poll_seconds`` while waiting, so a
        Block or a new rate applies at once.

        Raises:
            Blocked: the budget blocks this workload (also while waiting).
            TimeoutError: ``max_wait`` seconds passed and the tokens still do not fit.
        """
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
            left = deadline - self.clock()
            if left <= 0:
                raise TimeoutError(f"{tokens} tokens did not fit {d.tokens_per_minute}/min "
                                   f"within {max_wait}s")
            self.sleep(min(wait, self.poll_seconds, left))

    def spent(self, extra_tokens: int) -> None:
        """Settle the difference between the estimate and what the call really used."""
        bucket = self._bucket
        if bucket is not None and extra_tokens:
            bucket.settle(extra_tokens)
