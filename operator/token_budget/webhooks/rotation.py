"""Keeping the webhook certificate current while the operator runs (self-managed mode).

Every replica, every :attr:`~certificates.Lifetimes.check_seconds`::

    read the Secret ─► certificates.renewal(...) ─► None: keep it
                              │
                              └─► a renewal: replace the Secret, guarded by its
                                  resourceVersion (a race has one winner; the
                                  loser reads the winner's and goes on with it)
    then: write tls.crt/tls.key when they differ (the admission Server reloads
          them for new connections), and rewrite the webhook configurations when
          their caBundle is not the Secret's ca-bundle.crt

So a replica follows a renewal made by another within one check, and a
configuration overwritten by a replica that read an older Secret is put right at
the next check. The renewal policy is :func:`certificates.renewal`; this module
only reads and writes. With ``--webhook-cert-dir`` (cert-manager) none of this
runs: the Server reloads the mounted files itself.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from token_budget.errors import Conflict, TargetNotFound
from token_budget.kube import Kube
from token_budget.webhooks import certificates, configuration
from token_budget.webhooks.certificates import SECRETS, Bundle, Lifetimes

log = logging.getLogger(__name__)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class Rotation:
    """The Secret ``namespace/name``, the files in ``directory``, the configurations.

    ``configurations`` builds the configurations for a caBundle; None when the
    operator does not write them.
    """

    kube: Kube
    namespace: str
    name: str
    hosts: Sequence[str]
    directory: Path
    lifetimes: Lifetimes = field(default_factory=Lifetimes)
    configurations: Callable[[bytes], Sequence[dict[str, Any]]] | None = None
    clock: Callable[[], dt.datetime] = _now  # injected by tests

    @property
    def files(self) -> tuple[Path, Path]:
        return self.directory / "tls.crt", self.directory / "tls.key"

    def sync(self) -> Bundle:
        """The Secret's bundle after renewing what is due; the files written to match.

        Raises:
            Conflict: three guarded writes in a row lost to other writers.
            EnforcementError: the API server refused or failed to answer.
        """
        for _ in range(3):
            now = self.clock()
            try:
                secret: dict[str, Any] | None = self.kube.get(SECRETS, self.namespace,
                                                              self.name)
            except TargetNotFound:
                secret = None
            current = certificates.from_secret(secret) if secret is not None else None
            plan = certificates.renewal(current, self.hosts, now, self.lifetimes)
            if plan is None:
                assert current is not None
                bundle = current
                break
            body = certificates.secret_body(self.namespace, self.name, plan.bundle)
            try:
                if secret is None:
                    self.kube.create(SECRETS, self.namespace, body)
                else:
                    body["metadata"]["resourceVersion"] = (  # type: ignore[index]
                        secret["metadata"]["resourceVersion"])
                    self.kube.replace(SECRETS, self.namespace, self.name, body)
            except Conflict:
                continue  # another replica wrote first: judge theirs
            bundle = plan.bundle
            log.info("webhook certificate Secret %s/%s written (%s); serving certificate "
                     "valid until %s", self.namespace, self.name, ", ".join(plan.reasons),
                     bundle.not_after().isoformat())
            break
        else:
            raise Conflict(f"could not settle the webhook certificate in Secret "
                           f"{self.namespace}/{self.name}")
        self._write_files(bundle)
        return bundle

    def publish(self, bundle: Bundle) -> bool:
        """Rewrite the configurations unless they already trust ``bundle``; whether written."""
        if self.configurations is None or configuration.trusts(self.kube, bundle.trusted):
            return False
        configuration.apply(self.kube, self.configurations(bundle.trusted))
        log.info("webhook configurations now trust %d CA(s)",
                 bundle.trusted.count(b"-----BEGIN CERTIFICATE-----"))
        return True

    async def run(self) -> None:
        """:meth:`sync` and :meth:`publish` every check, forever; failures wait for the next."""
        while True:
            await asyncio.sleep(self.lifetimes.check_seconds)
            try:
                bundle = await asyncio.to_thread(self.sync)
                await asyncio.to_thread(self.publish, bundle)
            except Exception as exc:  # noqa: BLE001 - the next check tries again
                log.warning("webhook certificate check failed (retried in %.0f s): %s",
                            self.lifetimes.check_seconds, exc)

    def _write_files(self, bundle: Bundle) -> None:
        """tls.key then tls.crt, each replaced whole (a reader never sees half a file).

        Between the two renames the pair does not match; the Server refuses such a pair
        and keeps serving the old one until its next check.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        crt, key = self.files
        if crt.exists() and crt.read_bytes() == bundle.tls_crt and key.exists():
            return
        for path, data in ((key, bundle.tls_key), (crt, bundle.tls_crt)):
            tmp = path.with_name(f".{path.name}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
