"""The Helm chart for tests: render it, run helm, read the README's install commands.

Shared by ``tests/unit/test_chart.py`` (lint, template, schema, RBAC table) and
``tests/e2e/test_helm.py`` (install on the real control plane). Like the rest of the
harness it does not import the operator.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from harness import HarnessError
from harness.controlplane import REPO_ROOT

CHART = REPO_ROOT / "charts" / "token-budget-operator"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
README = REPO_ROOT / "README.md"
#: The API group the monitoring objects need (helm template --api-versions).
MONITORING_API = "monitoring.coreos.com/v1"


def run(argv: Sequence[str | Path], timeout: float = 300.0, check: bool = True,
        env: Mapping[str, str] | None = None, cwd: Path = REPO_ROOT,
        input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command (``input_text`` on its stdin); on ``check`` raise when it fails."""
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=cwd, input=input_text,
                          env=dict(env) if env is not None else None)
    if check and done.returncode != 0:
        raise HarnessError(f"{shlex.join(str(a) for a in argv)} exited {done.returncode}:\n"
                           f"{done.stdout}{done.stderr}")
    return done


def template(helm: Path, values: Iterable[Path] = (), sets: Iterable[str] = (),
             api_versions: Iterable[str] = (), release: str = "token-budget-operator",
             namespace: str = "token-budget", check: bool = True
             ) -> subprocess.CompletedProcess[str]:
    """``helm template`` of the chart (its stdout is the manifest)."""
    argv: list[str | Path] = [helm, "template", release, CHART, "--namespace", namespace]
    for v in values:
        argv += ["--values", v]
    for s in sets:
        argv += ["--set", s]
    for a in api_versions:
        argv += ["--api-versions", a]
    return run(argv, check=check)


def documents(manifest: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a manifest."""
    return [d for d in yaml.safe_load_all(manifest) if d]


def render(helm: Path, values: Iterable[Path] = (), sets: Iterable[str] = (),
           api_versions: Iterable[str] = (), release: str = "token-budget-operator",
           namespace: str = "token-budget") -> list[dict[str, Any]]:
    """The objects ``helm template`` renders."""
    return documents(template(helm, values, sets, api_versions, release, namespace).stdout)


def find(docs: Iterable[dict[str, Any]], kind: str, name: str | None = None
         ) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind
            and (name is None or d["metadata"]["name"] == name)]


Rule = tuple[str, str, str, str, str]  # (where, apiGroup, resource, verb, resourceName)


def rules_of(docs: Iterable[dict[str, Any]], skip_aggregated: bool = True) -> set[Rule]:
    """Every (where, group, resource, verb, resourceName) the ClusterRoles and Roles grant.

    ``where`` is ``cluster`` for a ClusterRole and the namespace for a Role. The ClusterRoles
    that only aggregate into the built-in roles (for people, not the operator) are left out
    unless ``skip_aggregated`` is false.
    """
    out: set[Rule] = set()
    for d in docs:
        if d.get("kind") not in ("ClusterRole", "Role"):
            continue
        labels = d["metadata"].get("labels") or {}
        if skip_aggregated and any(k.startswith("rbac.authorization.k8s.io/aggregate-to-")
                                   for k in labels):
            continue
        where = "cluster" if d["kind"] == "ClusterRole" else d["metadata"]["namespace"]
        for r in d.get("rules") or []:
            for g in r.get("apiGroups") or [""]:
                for res in r.get("resources") or []:
                    for verb in r.get("verbs") or []:
                        for name in r.get("resourceNames") or [""]:
                            out.add((where, g, res, verb, name))
    return out


def expand(table: Iterable[tuple[str, str, str, str, str]]) -> set[Rule]:
    """A compact table (space-separated resources, verbs, names) as atomic rules."""
    out: set[Rule] = set()
    for where, group, resources, verbs, names in table:
        for res in resources.split():
            for verb in verbs.split():
                for name in names.split() or [""]:
                    out.add((where, group, res, verb, name))
    return out


# -- README -------------------------------------------------------------------------------


def readme_section(title: str, readme: Path = README) -> str:
    """The text of ``## title`` up to the next ``## `` heading."""
    text = readme.read_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    if m is None:
        raise HarnessError(f"README.md has no section '## {title}'")
    return m.group(1)


def shell_blocks(section: str) -> list[list[str]]:
    """The ``sh`` fenced blocks of a README section (indented ones too), as commands.

    Each command is one logical line: backslash continuations are joined.
    """
    blocks: list[list[str]] = []
    for m in re.finditer(r"^( *)```sh\n(.*?)^\1```", section, re.S | re.M):
        indent = len(m.group(1))
        lines = [line[indent:] for line in m.group(2).splitlines()]
        commands: list[str] = []
        current = ""
        for line in lines:
            if line.rstrip().endswith("\\"):
                current += line.rstrip()[:-1].rstrip() + " "
                continue
            current += line.strip()
            if current.strip() and not current.strip().startswith("#"):
                commands.append(current.strip())
            current = ""
        blocks.append(commands)
    return blocks


def command_env(tools_dir: Path, kubeconfig: Path) -> dict[str, str]:
    """The environment README commands run in: our helm and kubectl first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{tools_dir}{os.pathsep}{env.get('PATH', '')}"
    env["KUBECONFIG"] = str(kubeconfig)
    env.pop("HELM_NAMESPACE", None)
    return env


def run_commands(commands: Iterable[str], env: Mapping[str, str], timeout: float = 300.0
                 ) -> Iterator[subprocess.CompletedProcess[str]]:
    """Run each command (through ``bash -c``, as a reader would) and yield its result."""
    for command in commands:
        yield run(["bash", "-euo", "pipefail", "-c", command], timeout=timeout, env=env)
