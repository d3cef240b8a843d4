"""Operator settings: command-line flags, each with an environment variable default.

Read once at start-up and passed down; nothing below reads the environment.
Every flag ``--foo-bar`` defaults to ``$TOKENBUDGET_FOO_BAR``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

ENV_PREFIX = "TOKENBUDGET_"


@dataclass(frozen=True)
class Settings:
    prometheus_url: str = "http://localhost:9090"
    prometheus_bearer_token_file: str | None = None
    prometheus_username: str | None = None
    prometheus_password_file: str | None = None
    prometheus_ca_file: str | None = None
    prometheus_insecure_skip_verify: bool = False
    prometheus_timeout_seconds: float = 20.0
    prometheus_scrape_interval_seconds: float = 15.0
    prometheus_max_samples: int = 50_000_000
    interval_seconds: float = 30.0
    recent_seconds: int = 600
    forecast: bool = True  # evaluate sooner when a budget is forecast to cross a threshold
    forecast_poll_seconds: float = 2.0  # while a forecast crossing is due
    namespaces: tuple[str, ...] = ()  # empty: all namespaces
    dry_run: bool = False
    log_format: str = "text"
    verbose: bool = False
    metrics_port: int = 8080
    metrics_host: str = "0.0.0.0"
    health_port: int = 8081
    model_env: tuple[str, ...] = field(
        default=("LLM_MODEL", "OPENAI_MODEL", "ANTHROPIC_MODEL", "MODEL_NAME")
    )
    webhook_port: int = 0  # 0: no webhook server
    webhook_host: str = "0.0.0.0"
    webhook_url: str | None = None  # how the API server reaches the webhook (tests, dev)
    webhook_service: str = "token-budget-operator"
    webhook_service_port: int = 443
    webhook_secret: str = "token-budget-operator-webhook-tls"
    webhook_hosts: tuple[str, ...] = ()
    webhook_cert_dir: str | None = None  # certificate from elsewhere (cert-manager)
    webhook_certificate_seconds: int = 90 * 86400  # self-managed serving certificate
    webhook_ca_seconds: int = 5 * 365 * 86400  # self-managed CA
    id: str | None = None
    agent_label: str = "tokenbudget.io/agent"
    lease_namespace: str = "default"
    lease_name: str = "token-budget-operator"
    lease_seconds: int = 15
    status_heartbeat_seconds: int = 60

    @property
    def auth_kwargs(self) -> dict[str, object]:
        def _read(path: str | None) -> str | None:
            if not path:
                return None
            with open(path) as f:
                return f.read().strip()

        return {
            "bearer_token": _read(self.prometheus_bearer_token_file),
            "username": self.prometheus_username,
            "password": _read(self.prometheus_password_file),
            "ca_file": self.prometheus_ca_file,
            "insecure_skip_verify": self.prometheus_insecure_skip_verify,
        }


def _env(name: str, default: object) -> object:
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"), default)


def _bool(value: object) -> bool:
    return str(value).lower() in ("1", "true", "yes", "on")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Settings()
    add = p.add_argument
    add("--prometheus-url", default=_env("prometheus-url", d.prometheus_url),
        help="Prometheus base URL")
    add("--prometheus-bearer-token-file", default=_env("prometheus-bearer-token-file", None))
    add("--prometheus-username", default=_env("prometheus-username", None))
    add("--prometheus-password-file", default=_env("prometheus-password-file", None))
    add("--prometheus-ca-file", default=_env("prometheus-ca-file", None))
    add("--prometheus-insecure-skip-verify", action="store_true",
        default=_bool(_env("prometheus-insecure-skip-verify", False)))
    add("--prometheus-timeout-seconds", type=float,
        default=float(str(_env("prometheus-timeout-seconds", d.prometheus_timeout_seconds))))
    add("--prometheus-scrape-interval-seconds", type=float,
        default=float(str(_env("prometheus-scrape-interval-seconds",
                               d.prometheus_scrape_interval_seconds))),
        help="scrape interval of the spend counters (to estimate a query's samples)")
    add("--prometheus-max-samples", type=int,
        default=int(str(_env("prometheus-max-samples", d.prometheus_max_samples))),
        help="do not send a window query estimated to load more samples (0: no limit)")
    add("--interval-seconds", type=float,
        default=float(str(_env("interval-seconds", d.interval_seconds))),
        help="evaluation interval (default 30)")
    add("--recent-seconds", type=int, default=int(str(_env("recent-seconds", d.recent_seconds))),
        help="look-back for the burn rate used in forecasts")
    add("--no-forecast", dest="forecast", action="store_false",
        default=not _bool(_env("no-forecast", False)),
        help="evaluate only at the interval, even when a budget is forecast to cross a "
             "threshold sooner (default: look again at the forecast moment, then every "
             "few seconds until it shows)")
    add("--forecast-poll-seconds", type=float,
        default=float(str(_env("forecast-poll-seconds", d.forecast_poll_seconds))),
        help="while a budget's forecast crossing is due, evaluate this often (default 2)")
    add("--namespace", dest="namespaces", action="append",
        default=[n for n in str(_env("namespaces", "")).split(",") if n],
        help="watch only this namespace (repeatable); default all")
    add("--dry-run", action="store_true", default=_bool(_env("dry-run", False)),
        help="decide and report, touch no workload")
    add("--log-format", choices=("text", "json"), default=_env("log-format", d.log_format))
    add("--verbose", action="store_true", default=_bool(_env("verbose", False)))
    add("--metrics-port", type=int, default=int(str(_env("metrics-port", d.metrics_port))),
        help="port of /metrics (0: off)")
    add("--metrics-host", default=_env("metrics-host", d.metrics_host))
    add("--health-port", type=int, default=int(str(_env("health-port", d.health_port))),
        help="port of the liveness endpoint /healthz (0: off)")
    add("--model-env", default=_env("model-env", ",".join(d.model_env)),
        help="comma-separated environment variables that name a container's model")
    add("--webhook-port", type=int, default=int(str(_env("webhook-port", 0))),
        help="serve admission webhooks on this port (0: off)")
    add("--webhook-host", default=_env("webhook-host", d.webhook_host))
    add("--webhook-url", default=_env("webhook-url", None),
        help="URL the API server calls (out-of-cluster); default: the Service below")
    add("--webhook-service", default=_env("webhook-service", d.webhook_service),
        help="Service in the operator's namespace that fronts the webhook")
    add("--webhook-service-port", type=int,
        default=int(str(_env("webhook-service-port", d.webhook_service_port))))
    add("--webhook-secret", default=_env("webhook-secret", d.webhook_secret),
        help="Secret holding the webhook CA and serving certificate (created and rotated)")
    add("--webhook-cert-dir", default=_env("webhook-cert-dir", None),
        help="serve tls.crt/tls.key from this directory (e.g. a mounted cert-manager Secret) "
             "and leave the Secret and the webhook configurations to whoever issued it")
    add("--webhook-certificate-seconds", type=int,
        default=int(str(_env("webhook-certificate-seconds", d.webhook_certificate_seconds))),
        help="lifetime of the serving certificate the operator issues itself; renewed while "
             "running when a third of it remains (default 90 days)")
    add("--webhook-ca-seconds", type=int,
        default=int(str(_env("webhook-ca-seconds", d.webhook_ca_seconds))),
        help="lifetime of the operator's own webhook CA, at least twice the certificate's; "
             "rotated when a third of it remains, the old CA trusted until it expires "
             "(default 5 years)")
    add("--webhook-host-name", dest="webhook_hosts", action="append",
        default=[h for h in str(_env("webhook-hosts", "")).split(",") if h],
        help="DNS name or IP for the serving certificate (repeatable)")
    add("--id", default=_env("id", None), help="identity of this replica (leader election)")
    add("--agent-label", default=_env("agent-label", d.agent_label),
        help="label key that marks agent workloads and pods (watched server-side)")
    add("--lease-namespace",
        default=_env("lease-namespace", os.environ.get("POD_NAMESPACE", d.lease_namespace)),
        help="namespace of the leader-election Lease")
    add("--lease-name", default=_env("lease-name", d.lease_name))
    add("--lease-seconds", type=int, default=int(str(_env("lease-seconds", d.lease_seconds))))
    add("--status-heartbeat-seconds", type=int,
        default=int(str(_env("status-heartbeat-seconds", d.status_heartbeat_seconds))),
        help="refresh status.lastEvaluationTime at most this often when nothing changed")


def from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        prometheus_url=args.prometheus_url,
        prometheus_bearer_token_file=args.prometheus_bearer_token_file,
        prometheus_username=args.prometheus_username,
        prometheus_password_file=args.prometheus_password_file,
        prometheus_ca_file=args.prometheus_ca_file,
        prometheus_insecure_skip_verify=args.prometheus_insecure_skip_verify,
        prometheus_timeout_seconds=args.prometheus_timeout_seconds,
        prometheus_scrape_interval_seconds=args.prometheus_scrape_interval_seconds,
        prometheus_max_samples=args.prometheus_max_samples,
        interval_seconds=args.interval_seconds,
        recent_seconds=args.recent_seconds,
        forecast=args.forecast,
        forecast_poll_seconds=args.forecast_poll_seconds,
        namespaces=tuple(args.namespaces),
        dry_run=args.dry_run,
        log_format=args.log_format,
        verbose=args.verbose,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        health_port=args.health_port,
        model_env=tuple(x for x in str(args.model_env).split(",") if x),
        webhook_port=args.webhook_port,
        webhook_host=args.webhook_host,
        webhook_url=args.webhook_url,
        webhook_service=args.webhook_service,
        webhook_service_port=args.webhook_service_port,
        webhook_secret=args.webhook_secret,
        webhook_hosts=tuple(args.webhook_hosts),
        webhook_cert_dir=args.webhook_cert_dir,
        webhook_certificate_seconds=args.webhook_certificate_seconds,
        webhook_ca_seconds=args.webhook_ca_seconds,
        id=args.id,
        agent_label=args.agent_label,
        lease_namespace=args.lease_namespace,
        lease_name=args.lease_name,
        lease_seconds=args.lease_seconds,
        status_heartbeat_seconds=args.status_heartbeat_seconds,
    )
