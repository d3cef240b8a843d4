"""A synthetic agent exporter: token counters the test controls, for Prometheus to scrape.

It speaks the formats the operator's spend sources read, on its own
``CollectorRegistry`` and its own HTTP server (a daemon thread) on a free loopback port:

``counters`` (agent pods export plain counters)
    ``llm_tokens_total{namespace, pod, model, token_type}`` with token_type
    ``input|output|cached_input``, and ``agent_outcomes_total{namespace, pod, outcome}``.

``litellm`` (LiteLLM proxy)
    ``litellm_input_tokens_metric_total``, ``litellm_output_tokens_metric_total`` and
    ``litellm_spend_metric_total`` (USD) with labels end_user, hashed_api_key,
    api_key_alias, model, team, team_alias, user, requested_model. The namespace is
    ``team_alias`` and the workload is ``api_key_alias``. As LiteLLM 1.110 counts them,
    input includes the cached input (``add``'s ``input + cached_input``) and
    ``litellm_input_cached_tokens_metric_total`` (same labels) counts the cached part,
    its series appearing with the first request that had some.

``otel`` (``gen_ai.client.token.usage`` after the OpenTelemetry collector's Prometheus
exporter)
    a histogram ``gen_ai_client_token_usage_bucket/_sum/_count`` with labels
    gen_ai_token_type (``input|output``), gen_ai_request_model, gen_ai_provider_name,
    k8s_namespace_name, k8s_pod_name. Each :meth:`AgentExporter.add` is one request: one
    observation per token type with a non-zero count, so ``_sum`` is the token total and
    ``_count`` the number of requests.

``envoy`` (Envoy AI Gateway v0.4 and later, its Prometheus endpoint)
    the same histogram as the gateway records it: labels gen_ai_operation_name,
    gen_ai_original_model, gen_ai_provider_name, gen_ai_request_model,
    gen_ai_response_model, gen_ai_token_type, otel_scope_name, and the caller's
    k8s_namespace_name and k8s_pod_name, which the gateway takes from the request
    headers ``x-k8s-namespace`` and ``x-k8s-pod`` when configured with
    ``controller.metricsRequestHeaderAttributes:
    "x-k8s-namespace:k8s.namespace.name,x-k8s-pod:k8s.pod.name"``. As the gateway
    counts them, ``input`` includes the cached input (``add``'s ``input +
    cached_input``), and ``reasoning`` (half of ``output`` here) is observed besides
    ``output``, which includes it. Each :meth:`AgentExporter.add` is one request
    that observes every type, zeros included.

``envoy-v0.3`` (Envoy AI Gateway v0.3)
    gen_ai_token_type ``input``, ``output`` and ``total`` (their sum), labels
    gen_ai_operation_name, gen_ai_request_model, gen_ai_system_name and the
    header-mapped ones; no cached-input type.

Counters only go up (except through :meth:`AgentExporter.reset`, which simulates a
restarted pod on purpose). Values are kept exactly as added, so a test can compare
``sum by (...) (metric)`` with what it added.

Prometheus must scrape it with ``honor_labels: true`` so that the ``namespace`` and ``pod``
labels are the exporter's, as when scraping agent pods via a PodMonitor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

Format = Literal["counters", "litellm", "otel", "envoy", "envoy-v0.3"]
FORMATS: tuple[Format, ...] = ("counters", "litellm", "otel", "envoy", "envoy-v0.3")
#: The formats with a cached-input series.
CACHED_FORMATS: tuple[Format, ...] = ("counters", "litellm", "otel", "envoy")

#: The bucket boundaries the OpenTelemetry GenAI semantic conventions advise for
#: ``gen_ai.client.token.usage``.
OTEL_TOKEN_BUCKETS: tuple[float, ...] = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)

_LITELLM_LABELS = (
    "end_user", "hashed_api_key", "api_key_alias", "model", "team", "team_alias", "user",
    "requested_model",
)
_OTEL_LABELS = (
    "gen_ai_token_type", "gen_ai_request_model", "gen_ai_provider_name",
    "k8s_namespace_name", "k8s_pod_name",
)


@dataclasses.dataclass
class _Histogram:
    buckets: list[int] = dataclasses.field(default_factory=lambda: [0] * len(OTEL_TOKEN_BUCKETS))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(OTEL_TOKEN_BUCKETS):
            if value <= bound:
                self.buckets[i] += 1
        self.total += value
        self.count += 1


@dataclasses.dataclass(frozen=True)
class _RateKey:
    fmt: Format
    namespace: str
    workload: str
    model: str
    pod: str | None


@dataclasses.dataclass
class Rate:
    """A background stream of tokens; stop it with :meth:`stop`."""

    exporter: AgentExporter
    key: _RateKey
    input_per_second: float
    output_per_second: float
    cached_input_per_second: float
    cost_per_second: float | None
    _carry: dict[str, float] = dataclasses.field(default_factory=dict)

    def stop(self) -> None:
        """Stop adding tokens (what was added stays)."""
        self.exporter._remove_rate(self.key)

    def _tick(self, seconds: float) -> None:
        whole: dict[str, int] = {}
        for name, per_second in (
            ("input", self.input_per_second),
            ("output", self.output_per_second),
            ("cached_input", self.cached_input_per_second),
        ):
            amount = self._carry.get(name, 0.0) + per_second * seconds
            whole[name] = math.floor(amount)
            self._carry[name] = amount - whole[name]
        cost = None
        if self.cost_per_second is not None:
            cost = self.cost_per_second * seconds
        if any(whole.values()) or cost:
            self.exporter.add(
                namespace=self.key.namespace,
                workload=self.key.workload,
                model=self.key.model,
                input=whole["input"],
                output=whole["output"],
                cached_input=whole["cached_input"],
                cost=cost,
                fmt=self.key.fmt,
                pod=self.key.pod,
            )


class AgentExporter:
    """Token counters in each format, served over HTTP for Prometheus.

    Attributes:
        url: the scrape URL, ``http://127.0.0.1:<port>/metrics``.
        target: ``127.0.0.1:<port>`` for a Prometheus static config.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tick_seconds: float = 0.1):
        """Prepare the exporter; :meth:`start` serves it.

        Args:
            host: address to bind (loopback by default).
            port: port to bind (0: a free port).
            tick_seconds: how often the background rate thread adds tokens.
        """
        self.host = host
        self._port = port
        self.tick_seconds = tick_seconds
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        self._lock = threading.RLock()
        self._tokens: dict[tuple[str, str, str, str], float] = {}
        self._outcomes: dict[tuple[str, str, str], float] = {}
        self._litellm: dict[tuple[str, ...], dict[str, float]] = {}
        self._otel: dict[tuple[str, ...], _Histogram] = {}
        # The GenAI conventions' cache-read counter, by (model, provider, namespace, pod).
        self._otel_cached: dict[tuple[str, ...], float] = {}
        # Envoy AI Gateway histograms, keyed by their sorted (label, value) pairs.
        self._envoy: dict[tuple[tuple[str, str], ...], _Histogram] = {}
        self._emitted: dict[tuple[Format, str, str, str, str], float] = {}
        self._rates: dict[_RateKey, Rate] = {}
        self._rate_thread: threading.Thread | None = None
        self._rate_stop = threading.Event()
        self._server: WSGIServer | None = None
        self._server_thread: threading.Thread | None = None

    # -- serving ---------------------------------------------------------------------------

    def start(self) -> None:
        """Serve ``/metrics`` on a daemon thread."""
        if self._server is not None:
            return
        self._server, self._server_thread = start_http_server(
            self._port, addr=self.host, registry=self.registry
        )
        self._port = int(self._server.server_port)

    def stop(self) -> None:
        """Stop the rate thread and the HTTP server (values are kept for a restart)."""
        self.stop_rates()
        self._rate_stop.set()
        if self._rate_thread is not None:
            self._rate_thread.join(5)
            self._rate_thread = None
        self._rate_stop.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._server_thread is not None
            self._server_thread.join(5)
            self._server = None
            self._server_thread = None

    def __enter__(self) -> AgentExporter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        return self._port

    @property
    def target(self) -> str:
        """``host:port`` for a Prometheus static config."""
        return f"{self.host}:{self._port}"

    @property
    def url(self) -> str:
        """The scrape URL."""
        return f"http://{self.target}/metrics"

    def exposition(self) -> str:
        """The current exposition text, as Prometheus would receive it (text format)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    # -- adding values ---------------------------------------------------------------------

    def add(
        self,
        namespace: str,
        workload: str,
        model: str,
        input: int = 0,  # noqa: A002 - the name the tests read best
        output: int = 0,
        cached_input: int = 0,
        cost: float | None = None,
        fmt: Format = "counters",
        pod: str | None = None,
        provider: str = "openai",
        requested_model: str | None = None,
    ) -> None:
        """Add tokens (and, for LiteLLM, spend) at once.

        Args:
            namespace: the agent's namespace (``namespace`` / ``team_alias`` /
                ``k8s_namespace_name``).
            workload: the agent workload; the LiteLLM ``api_key_alias``. For the other
                formats it is the pod name unless ``pod`` is given.
            model: the model name.
            input: input (prompt) tokens.
            output: output (completion) tokens.
            cached_input: cached input tokens; the ``envoy-v0.3`` format has no series
                for them (``otel`` counts them in input and in the cache-read counter).
            cost: USD spend; only the ``litellm`` format has a spend series.
            fmt: ``counters``, ``litellm``, ``otel``, ``envoy`` or ``envoy-v0.3``.
            pod: the pod label for ``counters`` and ``otel`` (default: ``workload``).
            provider: ``gen_ai_provider_name`` for ``otel`` and ``envoy``.
            requested_model: LiteLLM's ``requested_model`` (default: ``model``).

        Raises:
            ValueError: negative amounts, or a value the format cannot express.
        """
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; use one of {FORMATS}")
        if min(input, output, cached_input) < 0 or (cost is not None and cost < 0):
            raise ValueError("counters only go up: amounts must be >= 0")
        if cached_input and fmt not in CACHED_FORMATS:
            raise ValueError(f"the {fmt} format has no cached-input series")
        if cost is not None and fmt != "litellm":
            raise ValueError(f"the {fmt} format has no spend series; use fmt='litellm'")
        pod_name = pod or workload
        with self._lock:
            if fmt == "counters":
                for token_type, amount in (
                    ("input", input), ("output", output), ("cached_input", cached_input),
                ):
                    key = (namespace, pod_name, model, token_type)
                    if amount or key not in self._tokens:
                        self._tokens[key] = self._tokens.get(key, 0.0) + amount
            elif fmt == "litellm":
                labels = self._litellm_labels(namespace, workload, model, requested_model)
                entry = self._litellm.setdefault(labels, {"input": 0.0, "output": 0.0})
                entry["input"] += input + cached_input
                entry["output"] += output
                if cached_input:
                    entry["cached"] = entry.get("cached", 0.0) + cached_input
                if cost is not None:
                    entry["spend"] = entry.get("spend", 0.0) + cost
            elif fmt == "otel":
                # Input tokens include the cached ones; the cache reads have their own
                # counter (gen_ai.client.inference.usage.cache_read.input_tokens).
                for token_type, amount in (("input", input + cached_input), ("output", output)):
                    if amount:
                        hkey = (token_type, model, provider, namespace, pod_name)
                        self._otel.setdefault(hkey, _Histogram()).observe(amount)
                if cached_input:
                    ckey = (model, provider, namespace, pod_name)
                    self._otel_cached[ckey] = self._otel_cached.get(ckey, 0.0) + cached_input
            else:
                self._observe_envoy(fmt, namespace, pod_name, model, provider,
                                    input, output, cached_input)
            for token_type, amount in (
                ("input", input), ("output", output), ("cached_input", cached_input),
            ):
                ekey = (fmt, namespace, workload, model, token_type)
                self._emitted[ekey] = self._emitted.get(ekey, 0.0) + amount
            if cost is not None:
                ekey = (fmt, namespace, workload, model, "cost")
                self._emitted[ekey] = self._emitted.get(ekey, 0.0) + cost

    def _observe_envoy(self, fmt: Format, namespace: str, pod: str, model: str, provider: str,
                       input: int, output: int, cached_input: int) -> None:  # noqa: A002
        """One request through the gateway, recorded as the gateway records it."""
        common = {"gen_ai_operation_name": "chat", "gen_ai_request_model": model,
                  "k8s_namespace_name": namespace, "k8s_pod_name": pod,
                  "otel_scope_name": "envoyproxy/ai-gateway"}
        if fmt == "envoy":
            common |= {"gen_ai_original_model": model, "gen_ai_provider_name": provider,
                       "gen_ai_response_model": model}
            observed = [("input", input + cached_input), ("cached_input", cached_input),
                        ("output", output), ("reasoning", output // 2)]
        else:
            common |= {"gen_ai_system_name": provider}
            observed = [("input", input), ("output", output), ("total", input + output)]
        # Every type the provider reported is observed, zeros included (OpenAI reports
        # cached and reasoning counts on every answer).
        for token_type, amount in observed:
            key = tuple(sorted((common | {"gen_ai_token_type": token_type}).items()))
            self._envoy.setdefault(key, _Histogram()).observe(amount)

    def add_outcome(self, namespace: str, workload: str, outcome: str, n: int = 1,
                    pod: str | None = None) -> None:
        """Count ``n`` agent outcomes (e.g. ``success``, ``failure``) for a pod."""
        if n < 0:
            raise ValueError("counters only go up: n must be >= 0")
        key = (namespace, pod or workload, outcome)
        with self._lock:
            self._outcomes[key] = self._outcomes.get(key, 0.0) + n

    def reset(self, namespace: str, workload: str | None = None) -> None:
        """Zero every series of ``namespace`` (and ``workload``), as a restarted pod would.

        This breaks monotonicity on purpose: Prometheus' ``increase()``/``rate()`` treat
        it as a counter reset. The ``emitted`` bookkeeping is not changed.
        """
        with self._lock:
            for tkey in self._tokens:
                if tkey[0] == namespace and workload in (None, tkey[1]):
                    self._tokens[tkey] = 0.0
            for okey in self._outcomes:
                if okey[0] == namespace and workload in (None, okey[1]):
                    self._outcomes[okey] = 0.0
            for lkey, entry in self._litellm.items():
                if lkey[5] == namespace and workload in (None, lkey[2]):
                    for name in entry:
                        entry[name] = 0.0
            for hkey in list(self._otel):
                if hkey[3] == namespace and workload in (None, hkey[4]):
                    self._otel[hkey] = _Histogram()
            for ckey in self._otel_cached:
                if ckey[2] == namespace and workload in (None, ckey[3]):
                    self._otel_cached[ckey] = 0.0
            for ekey in [k for k in self._envoy if _envoy_caller(k, namespace, workload)]:
                self._envoy[ekey] = _Histogram()

    def remove(self, namespace: str, workload: str) -> None:
        """Stop exposing every series of the pod, as when the pod is deleted.

        Prometheus marks the series stale at its next scrape; their samples stay.
        """
        with self._lock:
            for tkey in [k for k in self._tokens if k[0] == namespace and k[1] == workload]:
                del self._tokens[tkey]
            for okey in [k for k in self._outcomes if k[0] == namespace and k[1] == workload]:
                del self._outcomes[okey]
            for lkey in [k for k in self._litellm if k[5] == namespace and k[2] == workload]:
                del self._litellm[lkey]
            for hkey in [k for k in self._otel if k[3] == namespace and k[4] == workload]:
                del self._otel[hkey]
            for ckey in [k for k in self._otel_cached
                         if k[2] == namespace and k[3] == workload]:
                del self._otel_cached[ckey]
            for ekey in [k for k in self._envoy if _envoy_caller(k, namespace, workload)]:
                del self._envoy[ekey]

    def emitted(
        self,
        fmt: Format,
        namespace: str | None = None,
        workload: str | None = None,
        model: str | None = None,
        token_type: str | None = None,
    ) -> float:
        """What was added so far (tokens, or USD with ``token_type="cost"``), filtered.

        With a background rate the amount grows over time; compare it with PromQL only
        after stopping the rate.
        """
        with self._lock:
            return sum(
                value
                for (f, ns, wl, m, tt), value in self._emitted.items()
                if f == fmt
                and namespace in (None, ns)
                and workload in (None, wl)
                and model in (None, m)
                and (tt == token_type if token_type else tt != "cost")
            )

    # -- background rates ------------------------------------------------------------------

    def set_rate(
        self,
        namespace: str,
        workload: str,
        model: str,
        input_per_second: float = 0.0,
        output_per_second: float = 0.0,
        cached_input_per_second: float = 0.0,
        cost_per_second: float | None = None,
        fmt: Format = "counters",
        pod: str | None = None,
    ) -> Rate:
        """Add tokens continuously from a background thread until stopped.

        Calling it again for the same (fmt, namespace, workload, model, pod) replaces the
        rate; all-zero rates stop it. Whole tokens are added every ``tick_seconds``; the
        fractional remainder carries over, so the long-run rate is exact.

        Returns:
            A :class:`Rate` whose ``stop()`` ends this stream.
        """
        key = _RateKey(fmt, namespace, workload, model, pod)
        rate = Rate(self, key, input_per_second, output_per_second, cached_input_per_second,
                    cost_per_second)
        if not (input_per_second or output_per_second or cached_input_per_second
                or cost_per_second):
            self._remove_rate(key)
            return rate
        # Check the format accepts these values now rather than in the thread.
        self.add(namespace, workload, model, fmt=fmt, pod=pod,
                 cached_input=0, cost=0.0 if cost_per_second is not None else None)
        if cached_input_per_second and fmt not in CACHED_FORMATS:
            raise ValueError(f"the {fmt} format has no cached-input series")
        with self._lock:
            self._rates[key] = rate
            if self._rate_thread is None or not self._rate_thread.is_alive():
                self._rate_thread = threading.Thread(
                    target=self._run_rates, name="agent-exporter-rates", daemon=True
                )
                self._rate_thread.start()
        return rate

    def stop_rates(self) -> None:
        """Stop every background rate."""
        with self._lock:
            self._rates.clear()

    def _remove_rate(self, key: _RateKey) -> None:
        with self._lock:
            self._rates.pop(key, None)

    def _run_rates(self) -> None:
        last = time.monotonic()
        while not self._rate_stop.wait(self.tick_seconds):
            now = time.monotonic()
            with self._lock:
                rates = list(self._rates.values())
            for rate in rates:
                rate._tick(now - last)
            last = now

    # -- exposition ------------------------------------------------------------------------

    @staticmethod
    def _litellm_labels(namespace: str, workload: str, model: str,
                        requested_model: str | None) -> tuple[str, ...]:
        hashed = hashlib.sha256(f"sk-{namespace}-{workload}".encode()).hexdigest()
        team = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{namespace}.team.litellm"))
        values = {
            "end_user": "",
            "hashed_api_key": hashed,
            "api_key_alias": workload,
            "model": model,
            "team": team,
            "team_alias": namespace,
            "user": "",
            "requested_model": requested_model or model,
        }
        return tuple(values[name] for name in _LITELLM_LABELS)

    def _collect(self) -> Iterator[Metric]:
        with self._lock:
            tokens = CounterMetricFamily(
                "llm_tokens", "LLM tokens used by agent pods.",
                labels=("namespace", "pod", "model", "token_type"),
            )
            for key, value in sorted(self._tokens.items()):
                tokens.add_metric(list(key), value)
            outcomes = CounterMetricFamily(
                "agent_outcomes", "Agent task outcomes.",
                labels=("namespace", "pod", "outcome"),
            )
            for okey, value in sorted(self._outcomes.items()):
                outcomes.add_metric(list(okey), value)
            lite_in = CounterMetricFamily(
                "litellm_input_tokens_metric", "Total number of input tokens from LLM requests",
                labels=_LITELLM_LABELS,
            )
            lite_out = CounterMetricFamily(
                "litellm_output_tokens_metric",
                "Total number of output tokens from LLM requests",
                labels=_LITELLM_LABELS,
            )
            lite_spend = CounterMetricFamily(
                "litellm_spend_metric", "Total spend on LLM requests", labels=_LITELLM_LABELS,
            )
            lite_cached = CounterMetricFamily(
                "litellm_input_cached_tokens_metric",
                "Provider-side cached input tokens", labels=_LITELLM_LABELS,
            )
            for lkey, entry in sorted(self._litellm.items()):
                lite_in.add_metric(list(lkey), entry["input"])
                lite_out.add_metric(list(lkey), entry["output"])
                if "spend" in entry:
                    lite_spend.add_metric(list(lkey), entry["spend"])
                if "cached" in entry:
                    lite_cached.add_metric(list(lkey), entry["cached"])
            otel = HistogramMetricFamily(
                "gen_ai_client_token_usage", "Number of input and output tokens used.",
                labels=_OTEL_LABELS,
            )
            for hkey, hist in sorted(self._otel.items()):
                buckets = [(_le(bound), float(n)) for bound, n in
                           zip(OTEL_TOKEN_BUCKETS, hist.buckets, strict=True)]
                buckets.append(("+Inf", float(hist.count)))
                otel.add_metric(list(hkey), buckets, hist.total)
            # The gateway's series share the family; their label sets differ from otel's.
            for ekey, hist in sorted(self._envoy.items()):
                labels = dict(ekey)
                for bound, n in zip(OTEL_TOKEN_BUCKETS, hist.buckets, strict=True):
                    otel.add_sample("gen_ai_client_token_usage_bucket",
                                    labels | {"le": _le(bound)}, float(n))
                otel.add_sample("gen_ai_client_token_usage_bucket", labels | {"le": "+Inf"},
                                float(hist.count))
                otel.add_sample("gen_ai_client_token_usage_count", labels, float(hist.count))
                otel.add_sample("gen_ai_client_token_usage_sum", labels, hist.total)
            otel_cached = CounterMetricFamily(
                "gen_ai_client_inference_usage_cache_read_input_tokens",
                "The number of input tokens served from a provider-managed cache.",
                labels=("gen_ai_request_model", "gen_ai_provider_name", "k8s_namespace_name",
                        "k8s_pod_name", "gen_ai_token_modality"),
            )
            for ckey, value in sorted(self._otel_cached.items()):
                otel_cached.add_metric([*ckey, "text"], value)
            families: list[Metric] = [tokens, outcomes, lite_in, lite_out, lite_spend,
                                      lite_cached, otel, otel_cached]
        for family in families:
            if family.samples:
                yield family


def _envoy_caller(key: tuple[tuple[str, str], ...], namespace: str,
                  pod: str | None) -> bool:
    labels = dict(key)
    return labels["k8s_namespace_name"] == namespace and pod in (None, labels["k8s_pod_name"])


def _le(bound: float) -> str:
    return str(float(bound))


class _Collector(Collector):
    def __init__(self, exporter: AgentExporter) -> None:
        self._exporter = exporter

    def collect(self) -> Iterator[Metric]:
        return self._exporter._collect()
