"""Operator settings (pydantic-settings): flags, TOKENBUDGET_* variables, a config file.

Covers:
- the defaults are those of the hand-written parser it replaced;
- every old flag spelling still parses (``--namespace`` and ``--webhook-host-name``
  repeatable or comma-separated, ``--no-forecast``, ``--dry-run``); the chart's own flags are
  tests/unit/test_chart.py;
- variables: comma lists, ``TOKENBUDGET_NO_FORECAST``, ``POD_NAMESPACE`` as the Lease's
  namespace; precedence flag > variable > config file > default;
- enrolment signals (additions, a replaced list, the model variables) and the gateway's
  variables from flags, variables and a file; a misspelt signal or a variable name with
  ``=`` stops the start;
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


def test_enrolment_signals_and_gateway_variables_from_flags_variables_and_a_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = parse()
    assert default.enrolment_by_signal and default.gateway_env == {}
    assert "OPENAI_API_KEY" in default.signals.env and "LLM_MODEL" in default.signals.env
    s = parse("--enrolment-signals-extra", "ACME_*,annotation:acme.io/llm",
              "--gateway-env", "OPENAI_BASE_URL=http://gw:4000", "--gateway-env", "X=1",
              "--no-enrolment-by-signal", "--model-env", "MY_MODEL")
    assert s.enrolment_signals_extra == ("ACME_*", "annotation:acme.io/llm")
    assert s.gateway_env == {"OPENAI_BASE_URL": "http://gw:4000", "X": "1"}
    assert not s.enrolment_by_signal
    assert {"ACME_*", "MY_MODEL", "OPENAI_API_KEY"} <= set(s.signals.env)
    assert "LLM_MODEL" not in s.signals.env, "the model variables are --model-env's"
    assert parse("--enrolment-signals", "ONLY_THIS").signals.env[-1] == "ONLY_THIS"
    monkeypatch.setenv("TOKENBUDGET_GATEWAY_ENV", '{"OPENAI_BASE_URL": "http://env:4000"}')
    monkeypatch.setenv("TOKENBUDGET_ENROLMENT_SIGNALS_EXTRA", "A_*,B_*")
    s = parse()
    assert s.gateway_env == {"OPENAI_BASE_URL": "http://env:4000"}
    assert s.enrolment_signals_extra == ("A_*", "B_*")
    monkeypatch.delenv("TOKENBUDGET_GATEWAY_ENV")
    monkeypatch.delenv("TOKENBUDGET_ENROLMENT_SIGNALS_EXTRA")
    config = tmp_path / "operator.yaml"
    config.write_text("gateway_env: {ANTHROPIC_BASE_URL: 'http://file:4000'}\n"
                      "enrolment_signals_extra: [C_*, 'annotation:c.io/llm']\n")
    s = parse("--config", str(config))
    assert s.gateway_env == {"ANTHROPIC_BASE_URL": "http://file:4000"}
    assert s.signals.annotations[-1] == "c.io/llm"


@pytest.mark.parametrize(("argv", "named"), [
    pytest.param(("--enrolment-signals-extra", "anotation:acme.io/llm"),
                 "enrolment_signals_extra", id="a misspelt signal prefix"),
    pytest.param(("--gateway-env", '{"A=B": "x"}'), "gateway_env",
                 id="a gateway variable name with '='"),
])
def test_a_signal_or_gateway_variable_that_cannot_work_stops_the_start(
        argv: tuple[str, ...], named: str) -> None:
    with pytest.raises(settings.SettingsError, match=named):
        parse(*argv)
