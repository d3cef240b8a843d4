#!/usr/bin/env python3
"""Find a Go new enough for the test control plane, or fetch the pinned one into the cache.

Prints the directory that holds ``go`` on the last line of stdout; progress goes to stderr.
Run by scripts/prereqs.sh before tests/controlplane/build.sh, so that a Debian machine with
only Python and make needs nothing installed by hand (Debian 12's Go is 1.19; the control
plane's go.mod asks for more).

Order:

1. ``go`` on PATH when its version is at least go.mod's ``go`` line (prereqs.sh puts
   ``/usr/local/go/bin`` on PATH first when it exists);
2. the pinned toolchain already unpacked in the cache
   (``$TOKENBUDGET_CACHE/go/<version>.<os>-<arch>``, by default under
   ``~/.cache/token-budget-operator``);
3. the pinned toolchain fetched: the Go toolchain is itself a module, ``golang.org/toolchain``
   at ``v0.0.1-go<version>.<os>-<arch>``, served as a zip by the Go module proxy
   (``$GOPROXY``'s first URL, else the Go default). The zip is verified against the pinned
   go.sum line in scripts/go-toolchain.sum (the module hash ``h1:``, dirhash Hash1, which is
   what the Go checksum database records) before anything is unpacked. When the checksum
   database answers (directly or through the proxy, as the go command asks it) its record
   must say the same; its signed tree is not checked here - the pin is the trust anchor,
   and it was read with the go command, which does check it.

The verified zip is kept in ``$TOKENBUDGET_GO_DOWNLOADS`` (default ``<cache>/go/downloads``)
so that unpacking again needs no network; it is verified again before every unpacking.

Standard library only: it runs before any virtualenv exists.
"""

from __future__ import annotations

import base64
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GO_MOD = ROOT / "tests" / "controlplane" / "go.mod"
PINS = Path(__file__).resolve().parent / "go-toolchain.sum"
MODULE = "golang.org/toolchain"
# The go command's own defaults (GOPROXY, GOSUMDB) when the environment sets none.
DEFAULT_PROXY = "https://proxy.golang.org"
SUMDB = "sum.golang.org"
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


class ToolchainError(Exception):
    """No usable Go could be found or fetched; the message says why."""


def log(msg: str) -> None:
    print(f"go_toolchain: {msg}", file=sys.stderr, flush=True)


def parse_version(text: str) -> tuple[int, int, int] | None:
    """``go1.25.4`` / ``1.25.0`` / ``go1.26rc1`` -> (1, 25, 4) / (1, 25, 0) / (1, 26, 0)."""
    m = re.search(r"(?:go)?(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        return None
    return int(m[1]), int(m[2]), int(m[3] or 0)


def required_version(go_mod: Path = GO_MOD) -> tuple[int, int, int]:
    """The ``go`` line of the control plane's go.mod: the oldest Go that builds it."""
    for line in go_mod.read_text().splitlines():
        if line.startswith("go "):
            v = parse_version(line.split()[1])
            if v:
                return v
    raise ToolchainError(f"{go_mod} has no `go` line")


def installed_version(go: str) -> tuple[int, int, int] | None:
    """The version of this ``go`` binary itself (GOTOOLCHAIN=local: never a download)."""
    env = {**os.environ, "GOTOOLCHAIN": "local"}
    try:
        out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True,
                             env=env, timeout=60, check=False)
    except OSError:
        return None
    return parse_version(out.stdout) if out.returncode == 0 else None


def module_hash(zip_path: Path) -> str:
    """The go.sum hash of a module zip: dirhash Hash1 over the zip's files.

    Hash1 is SHA-256 over the lines ``"<hex sha256 of file>  <name>\\n"`` for every file
    in the zip, names sorted (bytewise; Python's str order is the same for UTF-8), then
    base64 with the ``h1:`` prefix (golang.org/x/mod/sumdb/dirhash HashZip).
    """
    summary = hashlib.sha256()
    with zipfile.ZipFile(zip_path) as zf:
        for name in sorted(zf.namelist()):
            if "\n" in name:
                raise ToolchainError(f"{zip_path}: file name with a newline: {name!r}")
            h = hashlib.sha256()
            with zf.open(name) as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            summary.update(f"{h.hexdigest()}  {name}\n".encode())
    return "h1:" + base64.b64encode(summary.digest()).decode()


def platform_name() -> str:
    arch = _ARCH.get(platform.machine().lower())
    system = platform.system().lower()
    if arch is None or system != "linux":
        raise ToolchainError(
            f"no pinned Go toolchain for {system}/{platform.machine()}; install Go >= "
            f"{'.'.join(map(str, required_version()))} yourself or set CONTROLPLANE_BIN"
        )
    return f"{system}-{arch}"


def pinned(plat: str, pins: Path = PINS) -> tuple[str, str]:
    """(module version, h1 hash) pinned for this platform in scripts/go-toolchain.sum."""
    for line in pins.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == MODULE and parts[1].endswith("." + plat):
            return parts[1], parts[2]
    raise ToolchainError(f"{pins} pins no toolchain for {plat}")


def proxy_url() -> str:
    """The first URL of $GOPROXY (the go command's list), else the default proxy."""
    for entry in re.split(r"[,|]", os.environ.get("GOPROXY", "")):
        if entry.startswith(("https://", "http://")):
            return entry.rstrip("/")
    return DEFAULT_PROXY


def _get(url: str, timeout: float) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "token-budget-operator prereqs"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        data: bytes = r.read()
        return data


def sumdb_record(version: str, timeout: float = 15.0) -> tuple[str | None, str]:
    """The checksum database's h1 for the toolchain, or None when it cannot be reached.

    Asks the database the way the go command does: through the proxy first
    (``<proxy>/sumdb/<name>/lookup/...``), then the database itself. Returns (hash, where).
    """
    path = f"lookup/{MODULE}@{version}"
    urls = [f"{proxy_url()}/sumdb/{SUMDB}/{path}", f"https://{SUMDB}/{path}"]
    if os.environ.get("GOSUMDB", SUMDB) != SUMDB or os.environ.get("GONOSUMDB"):
        return None, "GOSUMDB/GONOSUMDB set: the checksum database was not asked"
    reasons = []
    for url in urls:
        try:
            body = _get(url, timeout).decode()
        except (urllib.error.URLError, OSError, UnicodeDecodeError) as exc:
            reasons.append(f"{url}: {exc}")
            continue
        for line in body.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[:2] == [MODULE, version]:
                return parts[2], url
        reasons.append(f"{url}: no record for {MODULE} {version}")
    return None, "; ".join(reasons)


def verify(zip_path: Path, expected: str) -> None:
    got = module_hash(zip_path)
    if got != expected:
        raise ToolchainError(
            f"{zip_path.name}: module hash {got} is not the pinned {expected} "
            f"(scripts/go-toolchain.sum); refusing to use it"
        )


def download(version: str, expected: str, downloads: Path) -> Path:
    """The verified toolchain zip, from the downloads directory or the proxy."""
    zip_path = downloads / f"{version}.zip"
    if zip_path.is_file():
        try:
            verify(zip_path, expected)
            return zip_path
        except (ToolchainError, zipfile.BadZipFile) as exc:
            log(f"cached {zip_path} is not the pinned zip ({exc}); fetching it again")
            zip_path.unlink()
    downloads.mkdir(parents=True, exist_ok=True)
    url = f"{proxy_url()}/{MODULE}/@v/{version}.zip"
    log(f"fetching {MODULE}@{version} (~65 MB) from {url}")
    start = time.monotonic()
    fd, tmp_name = tempfile.mkstemp(dir=downloads, suffix=".zip.part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            req = urllib.request.Request(url, headers={"User-Agent": "token-budget-operator"})
            with urllib.request.urlopen(req, timeout=120) as r:
                shutil.copyfileobj(r, out, 1 << 20)
        log(f"fetched {tmp.stat().st_size / 1e6:.1f} MB in {time.monotonic() - start:.1f} s")
        try:
            verify(tmp, expected)
        except zipfile.BadZipFile as exc:
            raise ToolchainError(f"{url} did not return a zip: {exc}") from exc
        recorded, where = sumdb_record(version)
        if recorded is None:
            log(f"checksum database not reached ({where}); verified against the pin only")
        elif recorded != expected:
            raise ToolchainError(
                f"the checksum database ({where}) records {recorded} for {version}, the pin "
                f"says {expected}: refusing both until someone looks"
            )
        else:
            log("the checksum database records the same hash")
        tmp.replace(zip_path)
    except urllib.error.URLError as exc:
        raise ToolchainError(f"could not fetch {url}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return zip_path


def unpack(zip_path: Path, version: str, dest: Path) -> None:
    """Unpack the module zip's ``<module>@<version>/`` tree into ``dest`` (a GOROOT)."""
    prefix = f"{MODULE}@{version}/"
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + ".part"))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for info in zf.infolist():
                rel = info.filename[len(prefix):] if info.filename.startswith(prefix) else ""
                parts = Path(rel).parts
                if not rel or rel.startswith("/") or ".." in parts:
                    raise ToolchainError(f"{zip_path.name}: unexpected entry {info.filename!r}")
                target = tmp.joinpath(*parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                # Module zips keep no file modes; the go command marks the same two places
                # executable when it unpacks a toolchain (cmd/go/internal/toolchain).
                if parts[0] == "bin" or parts[:2] == ("pkg", "tool"):
                    target.chmod(0o755)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def resolve(cache: Path, downloads: Path) -> Path:
    """The directory holding a suitable ``go``; fetches the pinned toolchain if needed."""
    need = required_version()
    need_s = ".".join(map(str, need))
    go = shutil.which("go")
    if go:
        v = installed_version(go)
        if v is not None and v >= need:
            return Path(go).resolve().parent
        log(f"{go} is Go {'.'.join(map(str, v or ()))}, older than go.mod's {need_s}")
    version, expected = pinned(platform_name())
    go_version = version.split("-", 1)[1].rsplit(".", 1)[0]  # go1.25.14
    goroot = cache / "go" / f"{go_version}.{platform_name()}"
    go_bin = goroot / "bin" / "go"
    if go_bin.is_file() and installed_version(str(go_bin)) == parse_version(go_version):
        return go_bin.parent
    if goroot.exists():
        shutil.rmtree(goroot)  # half-unpacked or damaged
    pinned_v = parse_version(go_version)
    if pinned_v is None or pinned_v < need:
        raise ToolchainError(f"the pinned {go_version} is older than go.mod's {need_s}")
    log(f"no Go >= {need_s} installed; using the pinned {go_version} in {goroot}")
    zip_path = download(version, expected, downloads)
    goroot.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    unpack(zip_path, version, goroot)
    got = installed_version(str(go_bin))
    if got != pinned_v:
        shutil.rmtree(goroot, ignore_errors=True)
        raise ToolchainError(f"{go_bin} does not run as {go_version} (it says {got})")
    log(f"unpacked in {time.monotonic() - start:.1f} s: {go_bin}")
    return go_bin.parent


def main() -> int:
    cache = Path(
        os.environ.get("TOKENBUDGET_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "token-budget-operator"
    )
    downloads = Path(os.environ.get("TOKENBUDGET_GO_DOWNLOADS") or cache / "go" / "downloads")
    try:
        print(resolve(cache, downloads))
    except ToolchainError as exc:
        print(f"go_toolchain: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
