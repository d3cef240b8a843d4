"""Operator settings (pydantic-settings): flags, TOKENBUDGET_* variables, a config file.

Covers:
- the defaults are those of the hand-written parser it replaced;
- every old flag spelling still parses (``--namespace`` and ``--webhook-host-name``
  repeatable or comma-separated, ``--no-forecast``, ``--dry-run``); the chart's own flags are
  tests/unit/test_chart.py;
- variables: comma lists, ``TOKENBUDGET_NO_FORECAST``, ``POD_NAMESPACE`` as the Lease's
  namespace; precedence flag > variable > config file > default;
- an invalid value is a usage error (exit 2) naming the setting; ``run --help`` carries every
  field's description; ``tokenbudget --version``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from token_budget import __version__, cli, settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("TOKENBUDGET_") or name == "POD_NAMESPACE":
            monkeypatch.delenv(name)


def parse(*argv: str) -> settings.Settings:
    p = argparse.ArgumentParser(exit_on_error=False)
    settings.add_arguments(p)
    return settings.from_args(p.parse_args(list(argv)))


def test_the_defaults_are_the_old_parsers() -> None:
    s = parse()
    assert (s.prometheus_url, s.interval_seconds, s.recent_seconds) == (
        "http://localhost:9090", 30.0, 600)
    assert (s.forecast, s.dry_run, s.verbose, s.log_format) == (True, False, False, "text")
    assert (s.metrics_port, s.health_port, s.webhook_port) == (8080, 8081, 0)
    assert s.model_env == ("LLM_MODEL", "OPENAI_MODEL", "ANTHROPIC_MODEL", "MODEL_NAME")
    assert (s.namespaces, s.webhook_hosts, s.id) == ((), (), None)
    assert (s.lease_namespace, s.lease_name, s.lease_seconds) == (
        "default", "token-budget-operator", 15)
    assert (s.webhook_certificate_seconds, s.webhook_ca_seconds) == (90 * 86400, 5 * 365 * 86400)
    assert s.prometheus_max_samples == 50_000_000 and s.status_heartbeat_seconds == 60


def test_old_flag_spellings_still_parse() -> None:
    s = parse("--namespace", "a", "--namespace=b,c", "--webhook-host-name", "h1",
              "--webhook-host-name=h2", "--no-forecast", "--dry-run", "--verbose",
              "--model-env=A,B", "--log-format=json", "--metrics-port", "0", "--id=op-0",
              "--prometheus-insecure-skip-verify", "--interval-seconds=2.5")
    assert s.namespaces == ("a", "b", "c") and s.webhook_hosts == ("h1", "h2")
    assert (s.forecast, s.dry_run, s.verbose, s.log_format) == (False, True, True, "json")
    assert s.model_env == ("A", "B") and s.metrics_port == 0 and s.id == "op-0"
    assert s.prometheus_insecure_skip_verify and s.interval_seconds == 2.5


def test_variables_keep_their_names_and_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENBUDGET_NAMESPACES", "x,y")
    monkeypatch.setenv("TOKENBUDGET_WEBHOOK_HOSTS", "h.example,10.0.0.1")
    monkeypatch.setenv("TOKENBUDGET_MODEL_ENV", "M1,M2")
    monkeypatch.setenv("TOKENBUDGET_NO_FORECAST", "1")
    monkeypatch.setenv("TOKENBUDGET_DRY_RUN", "yes")
    monkeypatch.setenv("POD_NAMESPACE", "ops")
    s = parse()
    assert s.namespaces == ("x", "y") and s.webhook_hosts == ("h.example", "10.0.0.1")
    assert s.model_env == ("M1", "M2") and s.forecast is False and s.dry_run is True
    assert s.lease_namespace == "ops"
    monkeypatch.setenv("TOKENBUDGET_LEASE_NAMESPACE", "leases")
    assert parse().lease_namespace == "leases"
    assert parse("--lease-namespace", "flag").lease_namespace == "flag"


def test_a_flag_beats_a_variable_which_beats_the_config_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "operator.yaml"
    config.write_text("prometheus_url: http://file:9090\ninterval-seconds: 5\n"
                      "lease_seconds: 30\nnamespaces: [a, b]\n")
    s = parse("--config", str(config))
    assert (s.prometheus_url, s.interval_seconds, s.lease_seconds) == (
        "http://file:9090", 5.0, 30)
    assert s.namespaces == ("a", "b")
    monkeypatch.setenv("TOKENBUDGET_CONFIG", str(config))
    monkeypatch.setenv("TOKENBUDGET_INTERVAL_SECONDS", "7")
    s = parse("--lease-seconds", "45")
    assert (s.prometheus_url, s.interval_seconds, s.lease_seconds) == (
        "http://file:9090", 7.0, 45)


def test_a_config_file_with_an_unknown_key_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "operator.yaml"
    config.write_text("prometheus_ulr: http://typo\n")
    with pytest.raises(settings.SettingsError, match="prometheus_ulr"):
        parse("--config", str(config))


def test_an_invalid_value_is_a_usage_error_naming_the_setting(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli.main(["run", "--metrics-port", "eighty"]) == 2
    assert "metrics_port" in capsys.readouterr().err
    monkeypatch.setenv("TOKENBUDGET_LOG_FORMAT", "xml")
    assert cli.main(["run"]) == 2
    assert "log_format" in capsys.readouterr().err


def test_run_help_describes_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, field in settings.Settings.model_fields.items():
        assert f"--{name.replace('_', '-')}" in text, name
        assert field.description and " ".join(field.description.split())[:30] in text, name
    for old in ("--namespace", "--webhook-host-name", "--no-forecast", "--config"):
        assert old in text


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"tokenbudget {__version__}"
