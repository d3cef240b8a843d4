"""The operator's OCI image for tests: build it (cached), unpack it, run it with chroot.

:func:`build` is ``make image`` (``image/build.py``, imported from its file): cold it runs
mmdebstrap and pip (~2 min), warm it returns the cached archive in well under a second.
:func:`unpack` turns the archive into a runtime bundle with ``umoci unpack`` (the root
filesystem and the OCI runtime ``config.json`` umoci derives from the image's config), and
:meth:`Bundle.argv` runs a command in it the way that config says: as its user, in its
working directory, with only its environment, through ``chroot`` (the host's network, so
the test control plane and Prometheus on 127.0.0.1 are reachable). :class:`Registry` is a
local registry to ``skopeo copy`` the archive into.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from harness import HarnessError, MissingDependency
from harness.controlplane import Process, free_ports, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]


def builder() -> ModuleType:
    """``image/build.py`` as a module (it is a script, not part of any package)."""
    name = "token_budget_image_build"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "image" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def build() -> Path:
    """The image archive (built on first use, then from the cache).

    Raises:
        MissingDependency: not root, or mmdebstrap/umoci missing.
        HarnessError: the build failed.
    """
    b = builder()
    try:
        path: Path = b.build(say=lambda msg: print(msg, file=sys.stderr, flush=True))
    except b.MissingTool as exc:
        raise MissingDependency(str(exc)) from exc
    except b.BuildError as exc:
        raise HarnessError(str(exc)) from exc
    return path


@dataclass(frozen=True)
class Bundle:
    """An unpacked image: ``rootfs`` and the OCI runtime ``config`` umoci wrote for it."""

    path: Path
    config: dict[str, Any]

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    def argv(self, args: Sequence[str] | None = None,
             env: dict[str, str] | None = None) -> list[str]:
        """Run ``args`` (default: the image's entrypoint) as the image's process would run.

        Args:
            args: the command; ``None`` is ``process.args`` (entrypoint + cmd).
            env: variables added to the image's environment.
        """
        process = self.config["process"]
        user = f"{process['user']['uid']}:{process['user']['gid']}"
        chroot = shutil.which("chroot")
        if chroot is None:
            raise MissingDependency("chroot not found (coreutils)")
        environment = [*process["env"], *(f"{k}={v}" for k, v in (env or {}).items())]
        return [chroot, f"--userspec={user}", str(self.rootfs),
                "/usr/bin/env", "-i", f"--chdir={process['cwd']}", *environment,
                *(process["args"] if args is None else args)]


def unpack(archive: Path, dest: Path, tag: str) -> Bundle:
    """Unpack the oci-archive ``archive`` into ``dest/bundle`` with ``umoci unpack``.

    A container runtime gives the process ``/dev`` and ``/proc``; chroot does not, so the
    device files the operator may open (``/dev/null``, ``/dev/urandom``) are created here.
    """
    umoci = shutil.which("umoci")
    if umoci is None:
        raise MissingDependency("umoci not installed: `apt-get install umoci` "
                                "(scripts/prereqs.sh does it)")
    layout = dest / "layout"
    with tarfile.open(archive) as tar:
        tar.extractall(layout, filter="data")
    bundle = dest / "bundle"
    proc = subprocess.run([umoci, "unpack", "--image", f"{layout}:{tag}", str(bundle)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise HarnessError(f"umoci unpack failed: {proc.stderr.strip()}")
    shutil.rmtree(layout)
    devices = bundle / "rootfs" / "dev"
    devices.mkdir(exist_ok=True)
    for name in ("null", "urandom"):
        subprocess.run(["mknod", "-m", "666", str(devices / name), "c", "1",
                        {"null": "3", "urandom": "9"}[name]], check=True)
    return Bundle(bundle, json.loads((bundle / "config.json").read_text()))


class Registry:
    """Debian's ``docker-registry`` (the CNCF distribution registry) on 127.0.0.1, plain HTTP.

    For ``skopeo copy oci-archive:... docker://...`` as the README tells users to run it.
    """

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("docker-registry")
        if binary is None:
            raise MissingDependency("docker-registry not installed: `apt-get install "
                                    "docker-registry` (scripts/prereqs.sh does it)")
        [port] = free_ports(1)
        self.host = f"127.0.0.1:{port}"
        config = workdir / "registry.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "version": 0.1, "log": {"level": "warn"},
            "storage": {"filesystem": {"rootdirectory": str(workdir / "data")}},
            "http": {"addr": self.host},
        }))
        self.process = Process("registry", [binary, "serve", str(config)],
                               workdir / "registry.log")

    def start(self) -> None:
        self.process.start()
        wait_until("the registry to serve /v2/",
                   lambda: urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2)
                   .status == 200, timeout=30, processes=[self.process])

    def stop(self) -> None:
        self.process.stop()
