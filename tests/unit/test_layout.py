"""The source layout keeps the standard library's ``operator`` module intact.

Covers:
- ``import operator`` gives the standard-library module, not the repository's
  ``operator/`` source root (STYLE 6.0: a package there breaks dataclasses,
  collections and typing);
- ``operator/`` holds no ``__init__.py``;
- the project imports as ``token_budget``.
"""

from __future__ import annotations

import importlib
import operator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_import_operator_gives_the_standard_library_module() -> None:
    origin = Path(operator.__file__ or "").resolve()
    assert not origin.is_relative_to(REPO), f"operator was imported from {origin}"
    assert operator.eq(1, 1) and operator.itemgetter(0)("ab") == "a"


def test_the_operator_source_root_is_not_a_package() -> None:
    assert (REPO / "operator" / "token_budget" / "__init__.py").is_file()
    assert not (REPO / "operator" / "__init__.py").exists()


def test_the_project_imports_as_token_budget_from_the_source_root() -> None:
    token_budget = importlib.import_module("token_budget")
    assert Path(token_budget.__file__ or "").resolve().parent == REPO / "operator" / "token_budget"
