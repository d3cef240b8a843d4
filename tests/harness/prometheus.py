"""A real Prometheus server for tests (Debian's ``prometheus`` 2.42 binary).

The harness writes a config file, runs Prometheus on a free loopback port with its TSDB
in a temporary directory, and offers what tests need on top of the HTTP API:

- :meth:`Prometheus.query` runs an instant PromQL query and returns the ``result`` list;
- :meth:`Prometheus.wait_for` polls a query until a predicate holds (scrapes are
  asynchronous, so a test waits until a value is visible rather than sleeping);
- :meth:`Prometheus.add_scrape_target` / :meth:`Prometheus.add_rule_file` change the
  config and hot-reload it (``--web.enable-lifecycle``);
- :meth:`Prometheus.stop` / :meth:`Prometheus.start` simulate an outage: the server
  comes back on the same port with the same data directory, so history survives.

It deliberately does not know about the operator's metric names; tests bring the PromQL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from harness import HarnessError, MissingDependency
from harness.controlplane import Process, free_ports, wait_until

#: A PromQL instant-vector result: ``[{"metric": {...}, "value": [ts, "1.5"]}, ...]``.
Result = list[dict[str, Any]]


class PrometheusError(HarnessError):
    """Prometheus failed to start, reload or answer a query."""


@dataclasses.dataclass
class ScrapeTarget:
    """One scrape job in the generated config."""

    job: str
    targets: list[str]
    metrics_path: str = "/metrics"
    honor_labels: bool = True
    scrape_interval: str | None = None
    labels: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_config(self) -> dict[str, Any]:
        """The ``scrape_configs`` entry for this job."""
        static: dict[str, Any] = {"targets": list(self.targets)}
        if self.labels:
            static["labels"] = dict(self.labels)
        job: dict[str, Any] = {
            "job_name": self.job,
            "metrics_path": self.metrics_path,
            "honor_labels": self.honor_labels,
            "static_configs": [static],
        }
        if self.scrape_interval:
            job["scrape_interval"] = self.scrape_interval
        return job


def find_binary(name: str = "prometheus") -> Path:
    """The ``prometheus`` (or ``promtool``) binary on PATH.

    Raises:
        MissingDependency: it is not installed.
    """
    found = shutil.which(name)
    if not found:
        raise MissingDependency(
            f"{name} not found: install it with `apt-get install prometheus` "
            "(or run scripts/prereqs.sh)"
        )
    return Path(found)


class Prometheus:
    """A Prometheus server owned by the test session.

    Attributes:
        url: ``http://127.0.0.1:<port>`` (stable across :meth:`stop`/:meth:`start`).
        data_dir: the TSDB directory (kept across restarts).
        log: the server's log file.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        scrape_interval: str = "1s",
        evaluation_interval: str | None = None,
        targets: Sequence[ScrapeTarget] = (),
        rule_files: Sequence[Path] = (),
        port: int | None = None,
        binary: Path | None = None,
        ready_timeout: float = 60.0,
        retention: str = "1d",
    ) -> None:
        """Prepare (but do not start) a Prometheus server.

        Args:
            workdir: config, TSDB and log go here (default: a temp dir removed by
                :meth:`close`).
            scrape_interval: global scrape interval; 1s keeps tests fast.
            evaluation_interval: rule evaluation interval (default: the scrape interval).
            targets: initial scrape jobs.
            rule_files: recording/alerting rule files to load.
            port: fixed port (default: a free one, picked once and reused on restart).
            binary: the ``prometheus`` binary (default: from PATH).
            ready_timeout: seconds to wait for ``/-/ready``.
            retention: ``--storage.tsdb.retention.time`` (tests of backfilled history need
                more than the default day).
        """
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="tbo-prometheus-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval or scrape_interval
        self.targets: list[ScrapeTarget] = list(targets)
        self.rule_files: list[Path] = [Path(p) for p in rule_files]
        self.port = port or free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.binary = binary
        self.ready_timeout = ready_timeout
        self.retention = retention
        self.data_dir = self.workdir / "data"
        self.config_file = self.workdir / "prometheus.yml"
        self.log = self.workdir / "prometheus.log"
        self.startup_seconds: float | None = None
        self._process: Process | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server (again) and wait for ``/-/ready``.

        Raises:
            MissingDependency: ``prometheus`` is not installed.
            PrometheusError: it exited or did not become ready; the message has its log tail.
        """
        if self.running:
            return
        if self.binary is None:
            self.binary = find_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._process = Process(
            "prometheus",
            [
                str(self.binary),
                f"--config.file={self.config_file}",
                f"--storage.tsdb.path={self.data_dir}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
                "--web.enable-admin-api",
                f"--storage.tsdb.retention.time={self.retention}",
                "--log.level=info",
            ],
            self.log,
            cwd=self.workdir,
        )
        self._process.start()
        try:
            self.startup_seconds = wait_until(
                f"prometheus {self.url}/-/ready",
                lambda: self._get_status("/-/ready") == 200,
                self.ready_timeout,
                [self._process],
            )
        except HarnessError as exc:
            tail = self._process.tail()
            self._process.stop()
            self._process = None
            raise PrometheusError(f"{exc}\n===== prometheus ({self.log}) =====\n{tail}") from exc

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 30 s). Data and port are kept."""
        if self._process is not None:
            self._process.stop()
            self._process = None

    def close(self) -> None:
        """Stop the server and remove the workdir if the harness created it."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.running

    def __enter__(self) -> Prometheus:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- configuration ---------------------------------------------------------------------

    def add_scrape_target(
        self,
        job: str,
        target: str | Sequence[str],
        metrics_path: str = "/metrics",
        honor_labels: bool = True,
        scrape_interval: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> ScrapeTarget:
        """Add (or replace, by job name) a scrape job and reload if running.

        Args:
            job: the job name (becomes the ``job`` label unless the target sets one and
                ``honor_labels`` is true).
            target: ``host:port`` or a list of them.
            metrics_path: the path to scrape.
            honor_labels: keep the target's own ``namespace``/``pod``/``job`` labels, as a
                Prometheus scraping agent pods through a PodMonitor effectively does.
            scrape_interval: per-job override.
            labels: extra labels attached to every series of the job.
        """
        targets = [target] if isinstance(target, str) else list(target)
        new = ScrapeTarget(job, targets, metrics_path, honor_labels, scrape_interval,
                           dict(labels or {}))
        self.targets = [t for t in self.targets if t.job != job] + [new]
        if self.running:
            self.reload()
        return new

    def remove_scrape_target(self, job: str) -> None:
        """Drop a scrape job and reload if running."""
        self.targets = [t for t in self.targets if t.job != job]
        if self.running:
            self.reload()

    def add_rule_file(self, path: Path) -> None:
        """Load a recording/alerting rule file (checked with ``promtool`` first)."""
        path = Path(path).resolve()
        promtool = find_binary("promtool")
        done = subprocess.run([str(promtool), "check", "rules", str(path)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise PrometheusError(f"promtool rejected {path}:\n{done.stdout}{done.stderr}")
        if path not in self.rule_files:
            self.rule_files.append(path)
        if self.running:
            self.reload()

    def backfill(self, openmetrics: str, timeout: float = 600) -> None:
        """Write history into the TSDB before :meth:`start` (``promtool`` from OpenMetrics).

        A hidden promtool flag makes one block per 30 days instead of one per 2 hours
        (seconds instead of minutes for a month of history).
        """
        source = self.workdir / "history.om"
        source.write_text(openmetrics)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(find_binary("promtool")), "tsdb", "create-blocks-from",
                        "openmetrics", "-q", "--max-block-duration=720h", str(source),
                        str(self.data_dir)], check=True, capture_output=True, timeout=timeout)

    def reload(self) -> None:
        """Rewrite the config and POST ``/-/reload`` (synchronous in Prometheus)."""
        self._write_config()
        req = urllib.request.Request(self.url + "/-/reload", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                resp.read()
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")
            exc.close()
            raise PrometheusError(f"reload failed ({exc.code}): {body}") from exc

    def _write_config(self) -> None:
        config: dict[str, Any] = {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.evaluation_interval,
            },
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [t.to_config() for t in self.targets],
        }
        tmp = self.config_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        tmp.replace(self.config_file)

    # -- queries ---------------------------------------------------------------------------

    def api(self, path: str, params: dict[str, str] | None = None, timeout: float = 10.0) -> Any:
        """GET ``/api/v1/<path>`` and return ``data``; raise on a non-success status."""
        url = f"{self.url}/api/v1/{path.lstrip('/')}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            exc.close()
            raise PrometheusError(f"GET {url}: HTTP {exc.code}: {detail}") from exc
        if body.get("status") != "success":
            raise PrometheusError(f"GET {url}: {body}")
        return body["data"]

    def query(self, promql: str, at: float | None = None) -> Result:
        """Run an instant query; returns the ``result`` list (vector) or value (scalar)."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", params)
        result: Result = data["result"]
        return result

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[Result], bool] = bool,
        timeout: float = 30.0,
        interval: float = 0.5,
    ) -> Result:
        """Poll ``promql`` until ``predicate(result)`` is true; return that result.

        The default predicate waits for a non-empty result.

        Raises:
            TimeoutError: with the query and the last result it saw.
        """
        deadline = time.monotonic() + timeout
        last: Result | str = "no answer yet"
        while True:
            try:
                result = self.query(promql)
                if predicate(result):
                    return result
                last = result
            except (PrometheusError, OSError) as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"after {timeout:.0f} s the query {promql!r} still did not satisfy the "
                    f"predicate; last result: {last}"
                )
            time.sleep(interval)

    def wait_for_target_up(self, job: str, timeout: float = 30.0) -> None:
        """Wait until every target of ``job`` has been scraped successfully."""
        self.wait_for(
            f'up{{job="{job}"}}',
            lambda r: bool(r) and all(float(s["value"][1]) == 1 for s in r),
            timeout,
        )

    def _get_status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            exc.close()
            return int(exc.code)


def values_by(result: Result, *labels: str) -> dict[tuple[str, ...], float]:
    """Turn an instant-vector result into ``{(label values...): float value}``.

    Example: ``values_by(r, "namespace", "model")[("team-a", "gpt-4o")] == 1500.0``.
    """
    out: dict[tuple[str, ...], float] = {}
    for sample in result:
        key = tuple(sample["metric"].get(label, "") for label in labels)
        out[key] = float(sample["value"][1])
    return out


@contextlib.contextmanager
def backfilled(workdir: Path, openmetrics: str, retention: str) -> Iterator[Prometheus]:
    """A Prometheus started over ``openmetrics`` history (``promtool`` blocks), closed after."""
    prom = Prometheus(workdir=workdir, retention=retention)
    prom.backfill(openmetrics)
    prom.start()
    try:
        yield prom
    finally:
        prom.close()
