"""A machine with no Go: scripts/go_toolchain.py (the Go step of prereqs.sh) fetches it.

Covers:
- with ``go`` missing from PATH, or only a Go too old for tests/controlplane/go.mod (Debian
  12's 1.19, faked), the resolver unpacks the pinned toolchain into an empty cache and prints
  its ``bin``; that ``go`` reports the pinned version and builds a program (CGO off, as
  build.sh builds);
- the zip it used is kept in the downloads directory (the resolver verifies it against the
  pin before each unpacking).

The ~65 MB zip is fetched from the Go module proxy once per machine, into the shared cache's
``go/downloads`` (``TOKENBUDGET_GO_DOWNLOADS``), and verified again on every run; each case
unpacks it into its own empty cache (~4 s). The control plane itself is not built here:
with another toolchain than the cached binary's that is a cold ~6 min build.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RESOLVER = REPO / "scripts" / "go_toolchain.py"
SHARED_CACHE = Path(
    os.environ.get("TOKENBUDGET_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "token-budget-operator"
)


def _pinned_go_version() -> str:
    for line in (REPO / "scripts" / "go-toolchain.sum").read_text().splitlines():
        if line.startswith("golang.org/toolchain "):
            return line.split()[1].split("-", 1)[1].rsplit(".", 1)[0]  # go1.25.14
    raise AssertionError("scripts/go-toolchain.sum pins nothing")


@pytest.mark.parametrize(
    "old_go",
    [pytest.param(False, id="no go on PATH"), pytest.param(True, id="only Go 1.19 on PATH")],
)
def test_prereqs_fetches_the_pinned_go_when_none_suitable_is_installed(
    tmp_path: Path, old_go: bool
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if old_go:
        fake = bin_dir / "go"
        fake.write_text("#!/bin/sh\necho go1.19.8\n")
        fake.chmod(0o755)
    env = {
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "PATH": str(bin_dir),
        "TOKENBUDGET_CACHE": str(tmp_path / "cache"),
        "TOKENBUDGET_GO_DOWNLOADS": str(SHARED_CACHE / "go" / "downloads"),
    }
    for name in ("GOPROXY", "GOSUMDB", "GONOSUMDB", "HTTPS_PROXY", "https_proxy"):
        if name in os.environ:
            env[name] = os.environ[name]
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(RESOLVER)], env=env, capture_output=True, text=True, timeout=600
    )
    took = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    godir = Path(done.stdout.strip().splitlines()[-1])
    assert godir.parent.parent == tmp_path / "cache" / "go"
    assert godir.parent.name.startswith(_pinned_go_version() + ".linux-")
    assert "using the pinned" in done.stderr
    if old_go:
        assert "older than go.mod's" in done.stderr
    print(f"resolver: {took:.1f} s; {done.stderr.strip()}")

    go = str(godir / "go")
    version = subprocess.run(
        [go, "env", "GOVERSION"], env={**env, "GOTOOLCHAIN": "local"},
        capture_output=True, text=True, check=True,
    )
    assert version.stdout.strip() == _pinned_go_version()

    src = tmp_path / "hello"
    src.mkdir()
    (src / "go.mod").write_text("module hello\n\ngo 1.25.0\n")
    (src / "main.go").write_text('package main\n\nfunc main() { println("built") }\n')
    build_env = {
        **env, "GOTOOLCHAIN": "local", "CGO_ENABLED": "0", "GOFLAGS": "-trimpath",
        # Go's build cache, shared across runs: a cold one costs ~15 s here, a warm one ~1 s.
        "GOCACHE": str(SHARED_CACHE / "go" / "build-cache"),
    }
    subprocess.run([go, "build", "-o", str(src / "hello"), "."], cwd=src, env=build_env,
                   check=True, capture_output=True, timeout=300)
    ran = subprocess.run([str(src / "hello")], capture_output=True, text=True, check=True)
    assert ran.stderr.strip() == "built"

    # The zip stays for the next unpacking.
    zips = list((SHARED_CACHE / "go" / "downloads").glob(f"*{_pinned_go_version()}*.zip"))
    assert zips
