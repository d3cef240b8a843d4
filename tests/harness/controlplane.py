"""A real Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager.

The three components come from one busybox binary built from the upstream Go modules by
``tests/controlplane/build.sh`` (see ``tests/controlplane/README.md``). Each runs in its own
process and its own session, with logs in files, on free loopback ports.

What you get: a conformant API server with RBAC, admission (including the ServiceAccount
plugin), CRDs with structural schemas, and the controllers that make Deployments produce
ReplicaSets and Pods, delete namespaces, collect garbage and create the ``default``
ServiceAccount in new namespaces.

What you do not get: a scheduler, kubelets or a network. Pods stay ``Pending`` forever and
no container ever runs. Services have no endpoints. Webhooks must be reached by URL
(``https://127.0.0.1:<port>``), not through a Service.

Usage::

    cp = ControlPlane(workdir=tmp_path)
    cp.start()
    try:
        ...  # cp.kubeconfig, cp.server, cp.ca
    finally:
        cp.stop()
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from harness import HarnessError, MissingDependency, pki

#: The repository root (tests/harness/controlplane.py -> ../../).
REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "tests" / "controlplane" / "build.sh"

#: A cold build on 2 cores took about 5.5 min here; leave plenty of room for slower CI.
BUILD_TIMEOUT_SECONDS = 40 * 60

_LOG_TAIL_LINES = 40


class ControlPlaneError(HarnessError):
    """The control plane did not start; the message carries the tail of every log."""


class _PortClash(ControlPlaneError):
    """A component could not bind its port (someone took it after we picked it)."""


def resolve_binary(timeout: float = BUILD_TIMEOUT_SECONDS, build_log: Path | None = None) -> Path:
    """Find the control plane binary, building it if needed.

    Order: ``$CONTROLPLANE_BIN``; else ``tests/controlplane/build.sh``, which prints the
    cached binary at once when the Go sources have not changed and otherwise builds it.

    Args:
        timeout: seconds to allow for a build.
        build_log: where to write the build's stderr (default: a temporary file).

    Raises:
        MissingDependency: Go is not installed and there is no cached binary.
        HarnessError: the build failed or timed out.
    """
    env_bin = os.environ.get("CONTROLPLANE_BIN")
    if env_bin:
        path = Path(env_bin)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise HarnessError(f"CONTROLPLANE_BIN={env_bin} is not an executable file")
        return path
    if build_log is None:
        fd, name = tempfile.mkstemp(prefix="controlplane-build-", suffix=".log")
        os.close(fd)
        build_log = Path(name)
    build_log.parent.mkdir(parents=True, exist_ok=True)
    with build_log.open("wb") as err:
        try:
            done = subprocess.run(
                ["bash", str(BUILD_SCRIPT)],
                stdout=subprocess.PIPE,
                stderr=err,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(
                f"building the control plane took more than {timeout:.0f} s; "
                f"see {build_log}"
            ) from exc
    if done.returncode == 3:
        raise MissingDependency(
            "Go toolchain not found: install Go >= 1.25 from https://go.dev/dl (Debian 12's "
            "golang-go is 1.19, too old) or set CONTROLPLANE_BIN"
        )
    log_text = build_log.read_text(errors="replace")
    if done.returncode != 0 and "requires go >=" in log_text:
        raise MissingDependency(
            "Go is too old for the control plane: install Go >= 1.25 from https://go.dev/dl "
            "or set CONTROLPLANE_BIN"
        )
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    if done.returncode != 0 or not lines:
        raise HarnessError(
            f"tests/controlplane/build.sh failed (exit {done.returncode}); "
            f"last lines of {build_log}:\n{_tail(build_log, _LOG_TAIL_LINES)}"
        )
    path = Path(lines[-1])
    if not os.access(path, os.X_OK):
        raise HarnessError(f"build.sh printed {path}, which is not an executable file")
    return path


def free_ports(count: int) -> list[int]:
    """Ask the kernel for ``count`` distinct free loopback ports.

    This is racy (another process may take a port before we bind it), which is why
    :meth:`ControlPlane.start` retries once on a port clash.
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def _die_with_parent() -> None:
    """In the child: be SIGKILLed if the thread that started us dies (pytest killed hard).

    SIGKILL rather than SIGTERM: a kube-apiserver that loses etcd at the same moment can
    hang in its graceful shutdown forever, and nothing of a test process is worth keeping.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


class Process:
    """One child process in its own session, logging to a file.

    Shared by the control plane and the Prometheus harness.
    """

    def __init__(self, name: str, argv: Sequence[str], log: Path, cwd: Path | None = None):
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def start(self) -> None:
        """Start the process; stdout and stderr are appended to :attr:`log`."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log.open("ab")
        self._log_file.write(f"--- starting: {' '.join(self.argv)}\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    @property
    def running(self) -> bool:
        """Whether the process was started and has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the process group, wait up to ``grace`` seconds, then SIGKILL it."""
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                self._signal(proc, signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    self._signal(proc, signal.SIGKILL)
                    proc.wait(10)
            # The group may still hold stray children even if the leader exited.
            self._signal(proc, signal.SIGKILL)
            self.proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        # start_new_session makes the child the leader of its own group: pgid == pid.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the log."""
        return _tail(self.log, lines)


def wait_until(
    what: str,
    check: Callable[[], bool],
    timeout: float,
    processes: Sequence[Process] = (),
    interval: float = 0.25,
) -> float:
    """Poll ``check`` until it returns True; fail early if a watched process exits.

    Exceptions from ``check`` count as "not yet" and the last one is reported on timeout.

    Returns:
        Seconds waited.

    Raises:
        HarnessError: on timeout or when a process in ``processes`` exited.
    """
    start = time.monotonic()
    last: BaseException | None = None
    while True:
        for p in processes:
            if p.proc is not None and p.proc.poll() is not None:
                raise HarnessError(f"{p.name} exited with code {p.proc.returncode} while "
                                   f"waiting for {what}")
        try:
            if check():
                return time.monotonic() - start
        except Exception as exc:  # noqa: BLE001 - anything means "not ready yet"
            if isinstance(exc, urllib.error.HTTPError):
                exc.close()  # it holds the response socket open
            last = exc
        if time.monotonic() - start > timeout:
            detail = f" (last error: {last!r})" if last else ""
            raise HarnessError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
        time.sleep(interval)


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on loopback ports.

    Attributes (valid after :meth:`start`):
        server: the API server URL, ``https://127.0.0.1:<port>``.
        kubeconfig: path of ``admin.kubeconfig`` (user ``admin`` in ``system:masters``).
        ca: path of the CA certificate that signed the API server's serving certificate.
        pki: every certificate and key, including the CA key for issuing more.
        logs: component name -> log file path.
        timings: seconds each component took to become ready on the last start.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        binary: Path | None = None,
        controller_manager: bool = True,
        apiserver_args: Sequence[str] = (),
        controller_manager_args: Sequence[str] = (),
        ready_timeout: float = 180.0,
    ) -> None:
        """Prepare (but do not start) a control plane.

        Args:
            workdir: where PKI, etcd data, kubeconfig and logs go (default: a new temp dir,
                removed by :meth:`stop`).
            binary: the busybox binary (default: :func:`resolve_binary`).
            controller_manager: also run kube-controller-manager. Without it the
                ServiceAccount admission plugin is disabled, as envtest does.
            apiserver_args: extra kube-apiserver flags (e.g. ``--runtime-config=...``).
            controller_manager_args: extra kube-controller-manager flags.
            ready_timeout: seconds each component may take to become ready. The API server
                needs 60-120 s on a loaded 2-core machine the first time.
        """
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="tbo-controlplane-"))
        self.binary = binary
        self.with_controller_manager = controller_manager
        self.apiserver_args = list(apiserver_args)
        self.controller_manager_args = list(controller_manager_args)
        self.ready_timeout = ready_timeout
        self.pki: pki.ControlPlanePki | None = None
        self.server = ""
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self.ca = self.workdir / "pki" / "ca.crt"
        self.logs: dict[str, Path] = {}
        self.timings: dict[str, float] = {}
        self._processes: list[Process] = []

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start every component and wait until the cluster is usable.

        Ready means: etcd ``/health`` is true; kube-apiserver ``/readyz`` is 200 and the
        ``default`` namespace exists; kube-controller-manager ``/healthz`` is 200 and the
        ``default/default`` ServiceAccount exists. Retries once with new ports if a port was
        taken between picking and binding it.

        Raises:
            MissingDependency: no binary and no Go toolchain to build one.
            ControlPlaneError: a component failed; the message has the tail of every log.
        """
        if self.binary is None:
            self.binary = resolve_binary(build_log=self.workdir / "logs" / "build.log")
        if self.pki is None:
            self.pki = pki.generate_control_plane_pki(self.workdir / "pki")
        for attempt in (1, 2):
            try:
                self._start_once()
                return
            except _PortClash:
                self._stop_processes()
                if attempt == 2:
                    raise
            except BaseException:
                self._stop_processes()
                raise

    def stop(self) -> None:
        """Stop the components in reverse order; remove the workdir if we created it."""
        self._stop_processes()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _stop_processes(self) -> None:
        for p in reversed(self._processes):
            p.stop()
        self._processes.clear()

    def restart_apiserver(self, down_seconds: float = 0.0, grace: float = 30.0) -> float:
        """Stop kube-apiserver alone and start it again with the same flags and port.

        etcd keeps running, so every object survives; clients see refused connections
        meanwhile, and a watch resumed afterwards from a resourceVersion older than the
        restart gets 410 Gone (the new watch cache starts at etcd's current revision).

        Args:
            down_seconds: how long the API server stays down before it starts again.
            grace: seconds it may take to stop after SIGTERM before it gets SIGKILL (it
                takes about 30 s to close its watches).

        Returns:
            Seconds from the new start until ``/readyz`` answered 200.

        Raises:
            ControlPlaneError: it did not become ready; the message has every log tail.
        """
        [old] = [p for p in self._processes if p.name == "kube-apiserver"]
        old.stop(grace)
        time.sleep(down_seconds)
        fresh = Process(old.name, old.argv, old.log, cwd=old.cwd)
        self._processes[self._processes.index(old)] = fresh
        fresh.start()
        ctx = self._admin_ssl()

        def ready() -> bool:
            with urllib.request.urlopen(self.server + "/readyz", context=ctx, timeout=10) as r:
                return bool(r.status == 200)

        t0 = time.monotonic()
        self._wait("kube-apiserver /readyz after a restart", ready, [fresh])
        return time.monotonic() - t0

    # -- public helpers --------------------------------------------------------------------

    def issue_client_kubeconfig(
        self, user: str, groups: Sequence[str] = (), path: Path | None = None,
        namespace: str | None = None,
    ) -> Path:
        """Write a kubeconfig that authenticates as ``user`` in ``groups`` (client cert).

        The API server applies RBAC to it like to any other user. To act as a
        ServiceAccount ``ns/name`` for RBAC purposes, use
        ``user="system:serviceaccount:ns:name"`` and
        ``groups=["system:serviceaccounts", "system:serviceaccounts:ns"]``.
        """
        assert self.pki is not None, "start() the control plane first"
        pair = self.pki.ca.issue_client(user, groups)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in user)
        path = path or self.workdir / "users" / f"{safe}.kubeconfig"
        path.parent.mkdir(parents=True, exist_ok=True)
        pki.write_private(
            path, pki.kubeconfig(self.server, self.pki.ca.cert_pem, pair, user=safe,
                                 namespace=namespace).encode()
        )
        return path

    def issue_serving_cert(self, hosts: Sequence[str]) -> pki.KeyPair:
        """A serving certificate signed by the cluster CA (the API server trusts it when the
        CA is given as a webhook's ``caBundle``; see :attr:`ca_pem`)."""
        assert self.pki is not None, "start() the control plane first"
        return self.pki.ca.issue_serving(hosts)

    @property
    def ca_pem(self) -> bytes:
        """The cluster CA certificate, PEM."""
        assert self.pki is not None, "start() the control plane first"
        return self.pki.ca.cert_pem

    def get(self, path: str, timeout: float = 10.0) -> Any:
        """GET an API path as admin and decode the JSON (a tiny client for readiness checks)."""
        with urllib.request.urlopen(
            self.server + path, context=self._admin_ssl(), timeout=timeout
        ) as resp:
            return json.load(resp)

    def log_tails(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines of each component's log, for error messages."""
        out = []
        for p in self._processes:
            out.append(f"===== {p.name} ({p.log}) =====\n{p.tail(lines)}")
        return "\n".join(out)

    # -- internals -------------------------------------------------------------------------

    def _admin_ssl(self) -> ssl.SSLContext:
        assert self.pki is not None
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_crt))
        ctx.load_cert_chain(str(self.pki.admin_crt), str(self.pki.admin_key))
        return ctx

    def _start_once(self) -> None:
        assert self.pki is not None and self.binary is not None
        etcd_port, peer_port, api_port, kcm_port = free_ports(4)
        self.server = f"https://127.0.0.1:{api_port}"
        self.timings = {}
        logs = self.workdir / "logs"
        data = self.workdir / "etcd"
        if data.exists():
            shutil.rmtree(data)  # a retry must not see a half-initialised member
        data.mkdir(mode=0o700, parents=True)
        pk = self.pki
        pki.write_private(
            self.kubeconfig,
            pki.kubeconfig(self.server, pk.ca.cert_pem, pk.admin).encode(),
        )
        t0 = time.monotonic()

        etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        etcd = self._spawn("etcd", [
            "--name=tbo-test",
            f"--data-dir={data}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=tbo-test={peer_url}",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ], logs)

        def etcd_healthy() -> bool:
            with urllib.request.urlopen(etcd_url + "/health", timeout=5) as resp:
                return bool(json.load(resp).get("health") == "true")

        self._wait("etcd /health", etcd_healthy, [etcd])
        self.timings["etcd"] = time.monotonic() - t0

        apiserver_flags = [
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            f"--secure-port={api_port}",
            "--advertise-address=127.0.0.1",
            "--endpoint-reconciler-type=none",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={pk.apiserver_crt}",
            f"--tls-private-key-file={pk.apiserver_key}",
            f"--client-ca-file={pk.ca_crt}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pk.sa_pub}",
            f"--service-account-signing-key-file={pk.sa_key}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--authorization-mode=Node,RBAC",
            f"--requestheader-client-ca-file={pk.front_proxy_ca_crt}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pk.front_proxy_client_crt}",
            f"--proxy-client-key-file={pk.front_proxy_client_key}",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
        ]
        if not self.with_controller_manager:
            # Nobody would create the default ServiceAccount, so Pods could never be admitted.
            apiserver_flags.append("--disable-admission-plugins=ServiceAccount")
        apiserver = self._spawn("kube-apiserver", apiserver_flags + self.apiserver_args, logs)
        ctx = self._admin_ssl()

        def apiserver_ready() -> bool:
            with urllib.request.urlopen(self.server + "/readyz", context=ctx, timeout=10) as r:
                return bool(r.status == 200)

        self._wait("kube-apiserver /readyz", apiserver_ready, [etcd, apiserver])
        self._wait("namespace default", lambda: self._exists("/api/v1/namespaces/default"),
                   [etcd, apiserver])
        self.timings["kube-apiserver"] = time.monotonic() - t0

        if not self.with_controller_manager:
            return
        kcm = self._spawn("kube-controller-manager", [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={kcm_port}",
            f"--cert-dir={self.workdir / 'kcm-certs'}",
            "--leader-elect=false",
            "--controllers=*",
            f"--service-account-private-key-file={pk.sa_key}",
            f"--root-ca-file={pk.ca_crt}",
            f"--cluster-signing-cert-file={pk.ca_crt}",
            f"--cluster-signing-key-file={pk.ca_key}",
            "--use-service-account-credentials=false",
            "--v=1",
            *self.controller_manager_args,
        ], logs)
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE  # KCM serves a self-signed certificate

        def kcm_healthy() -> bool:
            url = f"https://127.0.0.1:{kcm_port}/healthz"
            with urllib.request.urlopen(url, context=insecure, timeout=10) as r:
                return bool(r.status == 200)

        everyone = [etcd, apiserver, kcm]
        self._wait("kube-controller-manager /healthz", kcm_healthy, everyone)
        self._wait(
            "serviceaccount default/default",
            lambda: self._exists("/api/v1/namespaces/default/serviceaccounts/default"),
            everyone,
        )
        self.timings["kube-controller-manager"] = time.monotonic() - t0

    def _exists(self, path: str) -> bool:
        try:
            self.get(path)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 404:
                return False
            raise
        return True

    def _spawn(self, name: str, flags: list[str], logs: Path) -> Process:
        assert self.binary is not None
        log = logs / f"{name}.log"
        self.logs[name] = log
        proc = Process(name, [str(self.binary), name, *flags], log, cwd=self.workdir)
        self._processes.append(proc)
        proc.start()
        return proc

    def _wait(self, what: str, check: Callable[[], bool], procs: list[Process]) -> None:
        try:
            wait_until(what, check, self.ready_timeout, procs)
        except HarnessError as exc:
            tails = self.log_tails()
            cls = _PortClash if "address already in use" in tails else ControlPlaneError
            raise cls(f"control plane did not start: {exc}\n{tails}") from exc
