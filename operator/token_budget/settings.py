"""Operator settings: one pydantic-settings model read from flags, env and a config file.

Read once at start-up (:func:`load`) and passed down; nothing below reads the
environment. Every field ``foo_bar`` is the flag ``--foo-bar``, the variable
``$TOKENBUDGET_FOO_BAR`` and the key ``foo_bar`` of the YAML file named by
``--config`` or ``$TOKENBUDGET_CONFIG``. Precedence: flag, variable, file,
default. ``tokenbudget run --help`` is generated from the field descriptions.

Kept from the hand-written parser it replaced, so that the chart, the tests and
existing deployments work unchanged:

- ``--namespace`` (repeatable) and ``--webhook-host-name`` (repeatable) are
  short names of ``--namespaces`` and ``--webhook-hosts``; their variables take
  comma-separated lists, as ``--model-env`` does;
- ``$TOKENBUDGET_NO_FORECAST`` (``--no-forecast`` is the flag's negative form);
- ``$POD_NAMESPACE`` is the Lease's namespace when nothing else names it.

Booleans also take a negative form (``--no-dry-run``) and values are validated
(``--metrics-port=eighty`` is a usage error, not a crash at run time).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    EnvSettingsSource,
    NoDecode,
    SettingsConfigDict,
)

from token_budget.policy import signals

ENV_PREFIX = "TOKENBUDGET_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
_TRUE = ("1", "true", "yes", "on")

Names = Annotated[tuple[str, ...], NoDecode]
"""A list of names: repeated flags, or one comma-separated value (env, flag or file)."""


class Settings(BaseSettings):
    """Everything ``tokenbudget run`` can be told."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="forbid",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        cli_shortcuts={"namespaces": "namespace", "webhook-hosts": "webhook-host-name",
                       "rules-keep-labels": "rules-keep-label"},
    )

    prometheus_url: str = Field("http://localhost:9090", description="Prometheus base URL")
    prometheus_bearer_token_file: str | None = Field(
        None, description="file holding a bearer token for Prometheus")
    prometheus_username: str | None = Field(None, description="basic-auth user for Prometheus")
    prometheus_password_file: str | None = Field(
        None, description="file holding the basic-auth password for Prometheus")
    prometheus_ca_file: str | None = Field(
        None, description="CA bundle that signed Prometheus's certificate")
    prometheus_insecure_skip_verify: bool = Field(
        False, description="do not verify Prometheus's TLS certificate")
    prometheus_timeout_seconds: float = Field(20.0, gt=0, description="timeout of one query")
    prometheus_scrape_interval_seconds: float = Field(
        15.0, gt=0,
        description="scrape interval of the spend counters (to estimate a query's samples)")
    prometheus_max_samples: int = Field(
        50_000_000, ge=0,
        description="do not send a window query estimated to load more samples (0: no limit)")
    rules_keep_labels: Names = Field(
        (), description="labels the installed recording rules keep besides namespace, workload "
        "and model (--rules-keep-label, repeatable; as given to `tokenbudget rules "
        "--keep-label`): long windows of budgets partitioned or matched on them read the rules")
    interval_seconds: float = Field(30.0, gt=0, description="evaluation interval")
    recent_seconds: int = Field(600, gt=0, description="look-back for the burn rate used in "
                                "forecasts")
    forecast: bool = Field(
        True,
        description="look again at the moment a budget is forecast to cross a threshold, "
        "then every few seconds until it shows (--no-forecast: only at the interval)")
    forecast_poll_seconds: float = Field(
        2.0, gt=0, description="while a budget's forecast crossing is due, evaluate this often")
    namespaces: Names = Field(
        (), description="watch only this namespace (--namespace, repeatable); default all")
    dry_run: bool = Field(False, description="decide and report, touch no workload")
    log_format: Literal["text", "json"] = Field("text", description="log format")
    verbose: bool = Field(False, description="debug logging")
    metrics_port: int = Field(8080, ge=0, le=65535, description="port of /metrics (0: off)")
    metrics_host: str = Field("0.0.0.0", description="address /metrics listens on")
    health_port: int = Field(
        8081, ge=0, le=65535, description="port of the liveness endpoint /healthz (0: off)")
    model_env: Names = Field(
        ("LLM_MODEL", "OPENAI_MODEL", "ANTHROPIC_MODEL", "MODEL_NAME"),
        description="comma-separated environment variables that name a container's model")
    webhook_port: int = Field(
        0, ge=0, le=65535, description="serve admission webhooks on this port (0: off)")
    webhook_host: str = Field("0.0.0.0", description="address the webhook server listens on")
    webhook_url: str | None = Field(
        None, description="URL the API server calls (out-of-cluster, tests); default: the "
        "Service below")
    webhook_service: str = Field(
        "token-budget-operator",
        description="Service in the operator's namespace that fronts the webhook")
    webhook_service_port: int = Field(443, ge=1, le=65535, description="that Service's port")
    webhook_secret: str = Field(
        "token-budget-operator-webhook-tls",
        description="Secret holding the webhook CA and serving certificate (created and "
        "rotated)")
    webhook_hosts: Names = Field(
        (), description="DNS name or IP for the serving certificate (--webhook-host-name, "
        "repeatable)")
    webhook_cert_dir: str | None = Field(
        None, description="serve tls.crt/tls.key from this directory (e.g. a mounted "
        "cert-manager Secret) and leave the Secret and the webhook configurations to whoever "
        "issued it")
    webhook_certificate_seconds: int = Field(
        90 * 86400, gt=0,
        description="lifetime of the serving certificate the operator issues itself; renewed "
        "while running when a third of it remains (default 90 days)")
    webhook_ca_seconds: int = Field(
        5 * 365 * 86400, gt=0,
        description="lifetime of the operator's own webhook CA, at least twice the "
        "certificate's; rotated when a third of it remains, the old CA trusted until it "
        "expires (default 5 years)")
    directives: bool = Field(
        True, description="serve each governed pod's directive on the webhook port (GET "
        "/v1/namespaces/NS/pods/NAME/directive, long-poll) and inject its URL into governed "
        "pods (--no-directives: neither)")
    directive_url: str | None = Field(
        None, description="base URL agents reach the directive service at; default: "
        "--webhook-url, else the webhook Service")
    directive_readers: Names = Field(
        (), description="ServiceAccounts (namespace:name, comma-separated) that may read every "
        "pod's directive and resolve a caller's pod by its IP (/v1/callers/{ip}/directive): "
        "gateways such as the LiteLLM proxy")
    directive_token_cache_seconds: int = Field(
        60, gt=0, description="trust an agent's token this long after a TokenReview accepted "
        "it")
    enrolment_by_signal: bool = Field(
        True, description="in namespaces under mandatory enrolment, add the agent label to a "
        "new pod, Deployment, StatefulSet, Job or CronJob that shows an LLM signal (its pod "
        "template too, at creation only), and to an updated workload's own labels "
        "(--no-enrolment-by-signal: unlabelled objects never reach the webhook)")
    enrolment_signals: Names = Field(
        signals.DEFAULT, description="comma-separated signals: NAME or env:NAME (a "
        "container variable, or the Secret/ConfigMap key it reads; globs such as LITELLM_*), "
        "annotation:KEY; the --model-env variables count too")
    enrolment_signals_extra: Names = Field(
        (), description="comma-separated signals added to --enrolment-signals (the admin's "
        "own: an in-house gateway's variable, a provider's key)")
    gateway_env: dict[str, str] = Field(
        default_factory=dict, description="variables set on every container of a new "
        "governed pod that does not set them (e.g. OPENAI_BASE_URL=http://litellm.litellm"
        ".svc:4000, repeatable, or a JSON object); a container with envFrom is left alone")
    id: str | None = Field(None, description="identity of this replica (leader election)")
    agent_label: str = Field(
        "tokenbudget.io/agent",
        description="label key that marks agent workloads and pods (watched server-side)")
    lease_namespace: str = Field(
        "default", description="namespace of the leader-election Lease (default: "
        "$POD_NAMESPACE, else default)")
    lease_name: str = Field("token-budget-operator", description="name of that Lease")
    lease_seconds: int = Field(15, gt=0, description="lease duration")
    status_heartbeat_seconds: int = Field(
        60, gt=0,
        description="refresh status.lastEvaluationTime at most this often when nothing changed")

    @field_validator("namespaces", "model_env", "webhook_hosts", "directive_readers",
                     "enrolment_signals", "enrolment_signals_extra", "rules_keep_labels",
                     mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        """``"a,b"`` or ``["a", "b,c"]`` -> ``("a", "b", "c")``; empty items dropped."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple):
            return tuple(n for v in value for n in str(v).split(",") if n)
        return value

    @field_validator("enrolment_signals", "enrolment_signals_extra")
    @classmethod
    def _signals(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        signals.Signals.parse(value)  # a typo is a usage error at start, not a silent miss
        return value

    @field_validator("gateway_env")
    @classmethod
    def _gateway_env(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not name or "=" in name:
                raise ValueError(f"gateway_env: {name!r} must be a variable name")
        return value

    @property
    def signals(self) -> signals.Signals:
        """The enrolment signals: the list, the admin's additions, the model variables."""
        return signals.Signals.parse([*self.enrolment_signals, *self.enrolment_signals_extra],
                                     self.model_env)

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


class SettingsError(ValueError):
    """The flags, variables or config file do not make valid settings."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add every setting's flag (from the model) and ``--config`` to ``p``.

    The CLI source is kept in the parsed namespace for :func:`from_args`.
    """
    source: CliSettingsSource[Settings] = CliSettingsSource(Settings, root_parser=p)
    p.add_argument("--config", metavar="FILE",
                   help=f"YAML file of settings (keys as the flags, with _); ${CONFIG_ENV}")
    p.set_defaults(settings_source=source)


def _config_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"config file {path}: {exc}") from exc
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise SettingsError(f"config file {path} must be a mapping of settings")
    return {str(k).replace("-", "_"): v for k, v in doc.items()}


def _legacy_env() -> dict[str, Any]:
    """The variables of the hand-written parser whose names the model does not give."""
    out: dict[str, Any] = {}
    no_forecast = os.environ.get(ENV_PREFIX + "NO_FORECAST")
    if no_forecast is not None:
        out["forecast"] = no_forecast.strip().lower() not in _TRUE
    return out


def from_args(args: argparse.Namespace) -> Settings:
    """The settings: flags over ``$TOKENBUDGET_*`` over the config file over defaults.

    Args:
        args: parsed by a parser that :func:`add_arguments` filled.

    Raises:
        SettingsError: a value is invalid (the message names the setting).
    """
    source: CliSettingsSource[Settings] = args.settings_source
    # Lowest first; pydantic-settings puts the flags above all of these.
    values: dict[str, Any] = {}
    if os.environ.get("POD_NAMESPACE"):
        values["lease_namespace"] = os.environ["POD_NAMESPACE"]
    values.update(_config_file(getattr(args, "config", None) or os.environ.get(CONFIG_ENV)))
    values.update(_legacy_env())
    values.update(EnvSettingsSource(Settings)())
    cli_values = {k: v for k, v in vars(args).items() if k != "settings_source"}
    try:
        return Settings(_cli_settings_source=source(parsed_args=cli_values), **values)
    except ValidationError as exc:
        raise SettingsError(str(exc)) from exc
