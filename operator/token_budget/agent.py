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

Faster than the file: the directive service. When the operator's mutating
webhook injected ``TOKENBUDGET_DIRECTIVE_URL`` (and ``TOKENBUDGET_DIRECTIVE_CA``,
the CA that signed the operator's certificate), the Governor long-polls that
URL in a thread, with the pod's ServiceAccount token, on one kept-alive
connection, and learns of a change within a second of the operator's write
instead of at the kubelet's next refresh of the file (a minute or more). While
the service does not answer (refused, unreachable, 401/403/404), it falls back
to the file, and goes back to the service once it answers again::

    gov = Governor(default_model="gpt-4o")   # the URL from the environment, else the file

Only the standard library is used, so any agent can vendor this file. It does
not talk to the API server, watch the file with inotify, or share a bucket
between processes: one Governor per process, shared by its threads.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)
PREFIX = "tokenbudget.io/"
DEFAULT_PATH = "/etc/tokenbudget/annotations"
URL_ENV = "TOKENBUDGET_DIRECTIVE_URL"
CA_ENV = "TOKENBUDGET_DIRECTIVE_CA"
TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"
# How long one long-poll waits for a change: the service answers at the latest after this,
# so a connection that died silently is noticed within it (plus READ_MARGIN_SECONDS).
WAIT_SECONDS = 30.0
READ_MARGIN_SECONDS = 10.0
# How long the constructor waits for the service's first answer before it reads the file.
FIRST_ANSWER_SECONDS = 2.0
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


class _Remote(threading.Thread):
    """Long-polls the directive service; hands each new directive to ``apply``.

    ``ok`` says whether the service answered the last request (and the request
    now waiting has not failed): while it is False the Governor reads the file.
    """

    def __init__(self, url: str, token_file: str, ca_pem: str | None,
                 apply: Callable[[Directive], None], wait_seconds: float) -> None:
        super().__init__(daemon=True, name="tokenbudget-directive")
        self.url = urllib.parse.urlsplit(url)
        self.token_file = token_file
        self.context = ssl.create_default_context(cadata=ca_pem or None) \
            if self.url.scheme == "https" else None
        self.apply = apply
        self.wait_seconds = wait_seconds
        self.ok = False
        self.answered = threading.Event()
        self.stopping = threading.Event()
        self.version = ""

    def _connect(self) -> http.client.HTTPConnection:
        host, port, timeout = self.url.hostname or "", self.url.port, \
            self.wait_seconds + READ_MARGIN_SECONDS
        if self.context is not None:
            return http.client.HTTPSConnection(host, port, timeout=timeout,
                                               context=self.context)
        return http.client.HTTPConnection(host, port, timeout=timeout)

    def run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        backoff = 0.0
        while not self.stopping.is_set():
            if backoff:
                self.stopping.wait(backoff)
            try:
                with open(self.token_file, encoding="utf-8") as f:  # rotated by the kubelet
                    token = f.read().strip()
                conn = conn or self._connect()
                query = urllib.parse.urlencode({"version": self.version,
                                                "waitSeconds": self.wait_seconds})
                conn.request("GET", f"{self.url.path}?{query}",
                             headers={"Authorization": f"Bearer {token}"})
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    raise OSError(f"the directive service answered {resp.status} {resp.reason}")
                doc = json.loads(body)
                version = str(doc.get("version") or "")
                if version != self.version or not self.ok:
                    self.apply(directive_from(doc.get("annotations") or {}))
                    self.version = version
                self.ok = True
                backoff = 0.0
            except (OSError, ValueError, http.client.HTTPException) as exc:
                if self.ok or not backoff:
                    log.info("directive service unavailable, reading the file: %s", exc)
                self.ok = False
                if conn is not None:
                    conn.close()
                conn = None
                backoff = min(10.0, max(0.5, backoff * 2))
            finally:
                self.answered.set()
        if conn is not None:
            conn.close()


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
        url: the directive service's URL for this pod; None: ``$TOKENBUDGET_DIRECTIVE_URL``
            (the webhook injects it), "" or unset: the file only.
        ca: PEM of the CA that signed the service's certificate; None:
            ``$TOKENBUDGET_DIRECTIVE_CA``, else the system's CAs.
        token_file: the pod's ServiceAccount token, read again for every request.
        on_change: called with every new directive (from the service's thread too).
        wait_seconds: how long one long-poll waits for a change.

    Raises:
        DirectiveFileMissing: the file is missing, the service did not answer
            within :data:`FIRST_ANSWER_SECONDS`, and ``missing_ok`` is False.
    """

    def __init__(self, path: str = DEFAULT_PATH, default_model: str = "",
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = time.sleep,
                 poll_seconds: float = POLL_SECONDS, missing_ok: bool = False,
                 url: str | None = None, ca: str | None = None,
                 token_file: str = TOKEN_FILE,
                 on_change: Callable[[Directive], object] | None = None,
                 wait_seconds: float = WAIT_SECONDS) -> None:
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
        self.on_change = on_change
        url = os.environ.get(URL_ENV, "") if url is None else url
        self._remote: _Remote | None = None
        if url:
            self._remote = _Remote(url, token_file, os.environ.get(CA_ENV) if ca is None else ca,
                                   self._from_service, wait_seconds)
            self._remote.start()
            self._remote.answered.wait(FIRST_ANSWER_SECONDS)
        self.directive()

    def close(self) -> None:
        """Stop asking the directive service (after the request in flight)."""
        if self._remote is not None:
            self._remote.stopping.set()

    @property
    def served(self) -> bool:
        """Whether the directive comes from the directive service now (not the file)."""
        return self._remote is not None and self._remote.ok

    def _from_service(self, d: Directive) -> None:
        with self._lock:
            self._seen = None  # on a fall back, the file is read afresh
            self._apply(d)

    def directive(self) -> Directive:
        """The directive now: the service's latest answer, else the file's.

        The file is read again only when it changed.

        Raises:
            DirectiveFileMissing: the service does not answer, the file is missing
                and ``missing_ok`` is False.
        """
        with self._lock:
            if self._remote is not None and self._remote.ok:
                return self._directive
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
        if d != self._directive and self.on_change is not None:
            self.on_change(d)
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
