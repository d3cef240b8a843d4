"""Build the operator's OCI image archive without a container engine (`make image`).

What it builds is described by ``image/image.toml`` (entrypoint, user, ports, labels, the
Debian packages) and tagged ``<repository>:<project.version>`` from pyproject.toml:

    mmdebstrap (Debian's packages)  ->  layer 1: a minimal Debian root filesystem with
                                        python3, the ``nonroot`` user, an empty venv
    pip wheel + pip download        ->  layer 2: /opt/venv with the project and its
                                        dependencies (no pip in the image)
    umoci                           ->  OCI layout: layers, config, manifest, tag
    tar                             ->  <repository-name>-<version>.oci.tar (an oci-archive)

No base image is pulled from a registry: the machines this is built on reach Debian's
mirrors and PyPI only. Both layers are cached under
``$TOKENBUDGET_CACHE/image`` (default ``~/.cache/token-budget-operator/image``), keyed by
their inputs: the Debian layer by image.toml's ``[debian]`` table, this file and the month
(so security updates land at least monthly; ``--refresh`` rebuilds it now), the archive by
that plus the package sources (pyproject.toml, README.md, operator/) and image.toml. A warm
run with unchanged sources prints the cached archive's path in well under a second.

Needs root (mmdebstrap in root mode and chroot), ``mmdebstrap`` and ``umoci`` (Debian
packages; scripts/prereqs.sh installs them) and pip in the Python that runs this file. It
does not push anything; see the README for loading the archive into a cluster.

Prints the archive's path on the last line of stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "image" / "image.toml"
#: What goes into the project's wheel (the same list as .dockerignore).
PACKAGE_INPUTS = ("pyproject.toml", "README.md", "operator")
#: Debian 12's python3; the wheels are fetched for this interpreter, not the one running here.
PYTHON_VERSION = "3.11"
#: Debian 12's glibc is 2.36: the newest manylinux wheels the image can load.
GLIBC_MINOR = 36
#: Bump when the build itself changes in a way the inputs do not show.
BUILD_FORMAT = "1"


class BuildError(RuntimeError):
    """The image could not be built; the message says which step and why."""


class MissingTool(BuildError):
    """A tool the build needs is not installed; the message says what to install."""


@dataclass(frozen=True)
class Spec:
    """image/image.toml, with the tag from pyproject.toml."""

    repository: str
    version: str
    user: str
    user_name: str
    workdir: str
    entrypoint: list[str]
    exposed_ports: list[int]
    venv: str
    env: dict[str, str]
    labels: dict[str, str]
    debian: dict[str, Any]

    @property
    def name(self) -> str:
        """``repository:version``, what the chart deploys by default."""
        return f"{self.repository}:{self.version}"

    @property
    def archive_name(self) -> str:
        """``token-budget-operator-0.1.0.oci.tar``: the repository's last part and the tag."""
        return f"{self.repository.rsplit('/', 1)[-1]}-{self.version}.oci.tar"

    @property
    def all_labels(self) -> dict[str, str]:
        """The labels with ``org.opencontainers.image.version`` (the package version)."""
        return {**self.labels, "org.opencontainers.image.version": self.version}


def load_spec() -> Spec:
    """Read image.toml and the package version."""
    raw = tomllib.loads(SPEC.read_text())
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    return Spec(version=version, **raw)


def cache_dir() -> Path:
    base = os.environ.get("TOKENBUDGET_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
        "token-budget-operator")
    return Path(base) / "image"


def _files(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += [f for f in p.rglob("*") if f.is_file() and _wanted(f)]
        else:
            out.append(p)
    return sorted(out)


def _wanted(path: Path) -> bool:
    return not any(part == "__pycache__" or part.endswith(".egg-info") for part in path.parts)


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def base_key(spec: Spec, month: str) -> str:
    """The Debian layer's cache key: its recipe (build_base's source too) and the month."""
    debian = json.dumps(spec.debian, sort_keys=True).encode()
    recipe = json.dumps([spec.user, spec.user_name, spec.venv]).encode()
    return _digest(debian, recipe, inspect.getsource(build_base).encode(), month.encode(),
                   platform.machine().encode())


def archive_key(spec: Spec, base: str) -> str:
    """The archive's cache key: the Debian layer's key, image.toml and the package's sources."""
    files = _files(REPO / p for p in PACKAGE_INPUTS)
    parts = [base.encode(), SPEC.read_bytes(), BUILD_FORMAT.encode()]
    for f in files:
        parts += [str(f.relative_to(REPO)).encode(), f.read_bytes()]
    return _digest(*parts)


def _run(what: str, argv: Sequence[str], env: dict[str, str] | None = None) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    except OSError as exc:
        raise BuildError(f"{what}: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise BuildError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def check_tools() -> None:
    """Raise :class:`MissingTool` unless root, mmdebstrap, umoci and chroot are here."""
    missing = [t for t in ("mmdebstrap", "umoci", "chroot") if shutil.which(t) is None]
    if missing:
        raise MissingTool(f"{' '.join(missing)} not installed: `apt-get install mmdebstrap "
                          f"umoci` (scripts/prereqs.sh does it)")
    if os.geteuid() != 0:
        raise MissingTool("building the image needs root (mmdebstrap in root mode, chroot)")


# -- layer 1: Debian ---------------------------------------------------------------------------


def build_base(spec: Spec, out: Path, epoch: int) -> None:
    """mmdebstrap a minimal Debian with python3, the non-root user and an empty venv."""
    debian = spec.debian
    uid, gid = spec.user.split(":")
    name, venv = spec.user_name, spec.venv
    passwd = f"{name}:x:{uid}:{gid}:{name}:/nonexistent:/usr/sbin/nologin"
    hooks = [
        f'echo "{passwd}" >> "$1/etc/passwd"',
        f'echo "{name}:x:{gid}:" >> "$1/etc/group"',
        # --without-pip: Debian's venv needs python3-venv (ensurepip) only for pip, and the
        # image has no pip; layer 2 installs with a pip wheel run from outside the image.
        f'chroot "$1" python3 -m venv --without-pip {venv}',
        # Nothing that changes per build: no machine-id, no apt state.
        'rm -f "$1/etc/machine-id" "$1/var/lib/dbus/machine-id"',
    ]
    argv = ["mmdebstrap", "--mode=root", f"--variant={debian['variant']}",
            f"--include={','.join(debian['packages'])}",
            "--skip=output/dev",  # the runtime provides /dev; no device nodes in a layer
            *[f"--dpkgopt=path-exclude={p}" for p in debian["path_exclude"]],
            *[f"--dpkgopt=path-include={p}" for p in debian["path_include"]],
            *[f"--customize-hook={h}" for h in hooks],
            str(debian["suite"]), str(out), *debian["mirrors"]]
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(epoch))
    _run("mmdebstrap (the Debian root filesystem)", argv, env=env)


# -- layer 2: the venv -----------------------------------------------------------------------


def fetch_wheels(dest: Path) -> None:
    """The project's wheel, its dependencies' wheels for CPython 3.11, and a pip wheel."""
    src = dest.parent / "src"
    for p in PACKAGE_INPUTS:
        if (REPO / p).is_dir():
            shutil.copytree(REPO / p, src / p,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            src.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / p, src / p)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run("pip wheel (the project)", [*pip, "wheel", "--no-deps", "-w", str(dest), str(src)])
    [wheel] = dest.glob("*.whl")
    # Binary wheels for the image's interpreter and glibc (Debian 12: 2.36), whatever runs
    # this script. pip takes --platform literally, so every manylinux tag up to 2.36 is named.
    arch = platform.machine()
    platforms = [f"manylinux_2_{minor}_{arch}" for minor in range(GLIBC_MINOR, 16, -1)]
    platforms += [f"manylinux2014_{arch}"]
    target = ["--only-binary=:all:", "--implementation", "cp", "--python-version",
              PYTHON_VERSION, "--abi", "cp" + PYTHON_VERSION.replace(".", "")]
    target += [arg for p in platforms for arg in ("--platform", p)]
    _run("pip download (the dependencies)", [*pip, "download", *target, "-d", str(dest),
                                             str(wheel)])
    _run("pip download (pip, to install with)", [*pip, "download", "--only-binary=:all:",
                                                 "-d", str(dest.parent / "pip"), "pip"])


def install_venv(spec: Spec, rootfs: Path, wheels: Path, pip_dir: Path) -> None:
    """Install every wheel into the image's venv with the image's own python, offline."""
    staged = rootfs / "tmp" / "wheels"
    shutil.copytree(wheels, staged)
    [pip_whl] = pip_dir.glob("pip-*.whl")
    shutil.copy2(pip_whl, rootfs / "tmp" / pip_whl.name)
    [project] = [w.name for w in wheels.glob("token_budget_operator-*.whl")]
    venv = spec.venv
    # pip run from its own wheel (a supported way to bootstrap it), so no pip is installed.
    chroot = shutil.which("chroot") or "chroot"
    argv = [chroot, str(rootfs), f"{venv}/bin/python", f"/tmp/{pip_whl.name}/pip", "install",
            "--no-index", "--find-links", "/tmp/wheels", "--no-cache-dir",
            "--disable-pip-version-check", "-q", f"/tmp/wheels/{project}"]
    _run("pip install (into the image's venv)", argv,
         env={"PATH": "/usr/bin:/bin", "HOME": "/root", "LC_ALL": "C.UTF-8"})
    shutil.rmtree(staged)
    (rootfs / "tmp" / pip_whl.name).unlink()


def tar_tree(root: Path, top: str, out: Path, epoch: int) -> None:
    """A layer holding ``root/top`` as ``top``: sorted, owned by root, mtimes clamped."""

    def clamp(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = min(int(info.mtime), epoch)
        return info

    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        base = root / top.lstrip("/")
        for path in [base, *sorted(base.rglob("*"))]:
            tar.add(path, arcname=str(path.relative_to(root)), recursive=False, filter=clamp)


# -- packing ---------------------------------------------------------------------------------


def pack(spec: Spec, layers: Sequence[Path], out: Path, created: str) -> None:
    """umoci: an OCI layout with the layers and the config, then an oci-archive tar."""
    layout = out.parent / "layout"
    ref = f"{layout}:{spec.version}"
    _run("umoci init", ["umoci", "init", "--layout", str(layout)])
    _run("umoci new", ["umoci", "new", "--image", ref])
    for layer, what in zip(layers, ("Debian root filesystem (mmdebstrap)",
                                    "the operator and its dependencies (venv)"), strict=True):
        _run("umoci raw add-layer", ["umoci", "raw", "add-layer", "--image", ref,
                                     "--history.created", created,
                                     "--history.created_by", what, str(layer)])
    config = ["umoci", "config", "--image", ref, "--no-history", "--created", created,
              "--author", "token-budget-operator maintainers",
              "--config.user", spec.user, "--config.workingdir", spec.workdir,
              "--clear=config.env", "--clear=config.entrypoint", "--clear=config.cmd"]
    config += [f"--config.env={k}={v}" for k, v in spec.env.items()]
    config += [f"--config.entrypoint={a}" for a in spec.entrypoint]
    config += [f"--config.exposedports={p}/tcp" for p in spec.exposed_ports]
    config += [f"--config.label={k}={v}" for k, v in spec.all_labels.items()]
    _run("umoci config", config)
    _run("umoci gc", ["umoci", "gc", "--layout", str(layout)])
    # umoci names the manifest by its tag only; containerd (`kind load image-archive`,
    # `ctr images import`) reads the full name from this annotation.
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    for m in index["manifests"]:
        m.setdefault("annotations", {})["io.containerd.image.name"] = spec.name
    index_path.write_text(json.dumps(index, separators=(",", ":")))
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(layout.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(layout)))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if info.isfile():
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)


def build(refresh: bool = False, say: Callable[[str], None] = lambda _: None) -> Path:
    """Build (or take from the cache) the archive and return its path in the cache.

    Raises:
        MissingTool: root, mmdebstrap or umoci is missing.
        BuildError: a step failed.
    """
    spec = load_spec()
    now = dt.datetime.now(dt.UTC)
    cache = cache_dir()
    bkey = base_key(spec, now.strftime("%Y-%m"))
    akey = archive_key(spec, bkey)
    archive = cache / akey / spec.archive_name
    if archive.is_file() and not refresh:
        return archive
    check_tools()
    cache.mkdir(parents=True, exist_ok=True)
    epoch = int(now.timestamp())
    created = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    base = cache / f"debian-{bkey}.tar"
    with tempfile.TemporaryDirectory(dir=cache, prefix="build-") as tmp_name:
        tmp = Path(tmp_name)
        if not base.is_file() or refresh:
            say("image: building the Debian root filesystem (mmdebstrap; cold ~1-2 min)")
            started = time.monotonic()
            build_base(spec, tmp / "debian.tar", epoch)
            os.replace(tmp / "debian.tar", base)
            say(f"image: Debian root filesystem in {time.monotonic() - started:.0f} s")
        say("image: wheels (pip), the venv (chroot), layers and archive (umoci)")
        fetch_wheels(tmp / "wheels")
        rootfs = tmp / "rootfs"
        rootfs.mkdir()
        _run("unpacking the Debian layer", ["tar", "-xpf", str(base), "-C", str(rootfs)])
        install_venv(spec, rootfs, tmp / "wheels", tmp / "pip")
        venv_layer = tmp / "venv.tar"
        tar_tree(rootfs, spec.venv, venv_layer, epoch)
        (tmp / "pack").mkdir()
        pack(spec, [base, venv_layer], tmp / "pack" / archive.name, created)
        archive.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / "pack" / archive.name, archive)
    _prune(cache, keep={base.name, akey})
    return archive


def _prune(cache: Path, keep: set[str]) -> None:
    """Drop older Debian layers and archives: the cache holds the current ones only."""
    for entry in cache.iterdir():
        if entry.name in keep or entry.name.startswith("build-"):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith("debian-"):
            entry.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="copy the archive here (a file, or a directory ending in /)")
    ap.add_argument("--refresh", action="store_true",
                    help="rebuild both layers even if cached (e.g. for Debian security updates)")
    ap.add_argument("--print-name", action="store_true",
                    help="print the image name (repository:tag) and exit")
    args = ap.parse_args(argv)
    if args.print_name:
        print(load_spec().name)
        return 0
    try:
        archive = build(refresh=args.refresh, say=lambda m: print(m, file=sys.stderr, flush=True))
    except BuildError as exc:
        print(f"image: FAILED: {exc}", file=sys.stderr)
        return 1
    if args.out:
        out = Path(args.out)
        dest = out / archive.name if args.out.endswith("/") or out.is_dir() else out
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(archive, dest)
        archive = dest
    size = archive.stat().st_size
    print(f"image: {load_spec().name} ({size / 1e6:.0f} MB)", file=sys.stderr)
    print(archive)
    return 0


if __name__ == "__main__":
    sys.exit(main())
