"""``tokenbudget validate`` gives every case of the differential corpus its expected verdict.

Covers, without a cluster: each case of :mod:`harness.corpus` (one per schema
rule, metadata rule, kind lookup and webhook rule, and good neighbours of each)
is refused or accepted by ``tokenbudget validate -o json`` as its author
expects, with ``examples/model-catalog.yaml`` as the cluster's catalog; every
refusal names a field path, and the corpus is at least 100 bad and 30 good
manifests. ``tests/e2e/test_validate_differential.py`` checks the same corpus
against the real API server with the webhooks.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from harness import corpus
from token_budget import cli

REPO = Path(__file__).resolve().parents[2]
CATALOG = REPO / "examples" / "model-catalog.yaml"


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[dict[Path, corpus.Case], dict[str, list[str]]]:
    written = corpus.write(tmp_path_factory.mktemp("corpus"))
    out = io.StringIO()
    code = cli.validate([str(p) for p in written], out, [str(CATALOG)], as_json=True)
    report = json.loads(out.getvalue())
    assert report["errors"] == []
    assert code == 1
    return written, {i["file"]: i["problems"] for i in report["invalid"]}


def test_the_corpus_has_at_least_100_bad_and_30_good_manifests() -> None:
    cases = corpus.cases()
    assert sum(not c.valid for c in cases) >= 100
    assert sum(c.valid for c in cases) >= 30


def test_validate_gives_every_case_its_expected_verdict(
        verdicts: tuple[dict[Path, corpus.Case], dict[str, list[str]]]) -> None:
    written, invalid = verdicts
    wrong = [f"{c.id}: expected {'valid' if c.valid else 'invalid'}, got "
             f"{invalid.get(str(p), 'valid')}"
             for p, c in written.items() if c.valid == (str(p) in invalid)]
    assert not wrong, "\n".join(wrong)


def test_every_refusal_names_a_field_and_says_must(
        verdicts: tuple[dict[Path, corpus.Case], dict[str, list[str]]]) -> None:
    _, invalid = verdicts
    for problems in invalid.values():
        for line in problems:
            path, _, message = line.partition(": ")
            assert path and " " not in path.replace("(object)", ""), line
            assert "must" in message, line
