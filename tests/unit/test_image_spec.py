"""One image, described once: image/image.toml, the Dockerfile and the chart agree.

Covers:
- the Dockerfile's last stage has image.toml's entrypoint, user, working directory, exposed
  ports, environment (PATH: the venv in front of the base image's) and labels, with
  ``org.opencontainers.image.version`` the package version;
- the chart's default image is what ``make image`` builds: ``image.repository`` is
  image.toml's repository, ``image.tag`` is empty so the tag is the chart's appVersion, which
  is the package version; the Artifact Hub annotation and the Dockerfile's build line name it;
- the archive file name ``make image`` writes.

The built image's own config is checked against image.toml in tests/e2e/test_image.py.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import yaml

from harness import image
from token_budget import __version__

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "token-budget-operator"


def dockerfile_final_stage(text: str) -> dict[str, list[str]]:
    """Instruction -> its argument strings, for the stage after the last ``FROM``.

    Enough of the Dockerfile syntax for this file: comments, ``\\`` continuations, one
    entry per instruction occurrence.
    """
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    stage: dict[str, list[str]] = {}
    for line in lines:
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            stage = {}
        stage.setdefault(instruction.upper(), []).append(args.strip())
    return stage


def pairs(args: list[str]) -> dict[str, str]:
    """``KEY=value`` pairs of ENV or LABEL instructions (shell-quoted values)."""
    out: dict[str, str] = {}
    for arg in args:
        for word in shlex.split(arg):
            key, _, value = word.partition("=")
            out[key] = value
    return out


def test_the_dockerfile_describes_the_image_that_image_toml_describes() -> None:
    spec = image.builder().load_spec()
    stage = dockerfile_final_stage((REPO / "Dockerfile").read_text())
    [entrypoint] = stage["ENTRYPOINT"]
    assert json.loads(entrypoint) == spec.entrypoint
    assert stage["USER"] == [spec.user]
    assert stage["WORKDIR"] == [spec.workdir]
    [expose] = stage["EXPOSE"]
    assert [int(p) for p in expose.split()] == spec.exposed_ports
    env = pairs(stage["ENV"])
    path = env.pop("PATH")
    venv_bin = spec.env["PATH"].split(":")[0]
    assert venv_bin == f"{spec.venv}/bin" and path == f"{venv_bin}:$PATH"
    assert env == {k: v for k, v in spec.env.items() if k != "PATH"}
    assert pairs(stage["LABEL"]) == spec.all_labels
    assert spec.all_labels["org.opencontainers.image.version"] == __version__


def test_the_charts_default_image_is_the_one_make_image_builds() -> None:
    spec = image.builder().load_spec()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert values["image"]["repository"] == spec.repository
    assert values["image"]["tag"] == "", "empty: the tag is the chart's appVersion"
    assert chart["appVersion"] == spec.version == __version__
    assert f"image: {spec.name}" in chart["annotations"]["artifacthub.io/images"]
    assert f"docker build -t {spec.name} ." in (REPO / "Dockerfile").read_text()


def test_make_image_writes_an_archive_named_after_the_repository_and_the_tag() -> None:
    spec = image.builder().load_spec()
    assert spec.archive_name == f"token-budget-operator-{__version__}.oci.tar"
    assert f"dist/{spec.archive_name}" in (REPO / "README.md").read_text()
