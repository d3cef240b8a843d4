"""The committed Prometheus rules file is what `tokenbudget rules` generates, and valid."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from token_budget.cli import main

RULES = Path(__file__).resolve().parents[2] / "rules" / "token-budget.rules.yaml"


def test_the_committed_rules_file_matches_the_generator(capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    assert main(["rules"]) == 0
    assert capsys.readouterr().out == RULES.read_text(), \
        "rules/token-budget.rules.yaml drifted: run `make crds`"


def test_promtool_accepts_the_rules_file() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:  # `make test-fast` may run before the prereqs on a bare machine
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI=true and promtool is missing: make prereqs installs it")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    out = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 rules found" in out.stdout
