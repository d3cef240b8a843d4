"""The webhook certificate's renewal policy and its rotation loop, with an injected clock.

Covers: a missing or unreadable Secret issues everything; nothing is renewed
before a third of the validity remains; the serving certificate is renewed by
the same CA; a changed host list or a shortened lifetime re-issues at once; a
CA due is replaced while both CAs are trusted, the serving certificate switches
to the new CA only after the overlap and the old CA leaves the bundle when it
expires; over 15 simulated minutes of a 2-minute certificate and a 5-minute CA
the served certificate is always valid and signed by a CA trusted for at least
the overlap; the Secret round-trips (and one written before ``ca-bundle.crt``
existed still reads); :class:`rotation.Rotation` against a fake API: a renewal
is written guarded by resourceVersion, a lost race adopts the winner's bundle,
the files follow the Secret and the configurations are rewritten only when
their caBundle differs.
"""

from __future__ import annotations

import base64
import datetime as dt
import itertools
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from token_budget.errors import Conflict, TargetNotFound
from token_budget.webhooks import certificates, configuration, rotation
from token_budget.webhooks.certificates import Bundle, Lifetimes

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
HOSTS = ("svc.ns.svc", "127.0.0.1")
SHORT = Lifetimes(dt.timedelta(minutes=2), dt.timedelta(minutes=5))


def s(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def trusted(b: Bundle) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(b.trusted)


def signer(b: Bundle) -> x509.Certificate:
    served = cert(b.tls_crt)
    for ca in trusted(b):
        try:
            served.verify_directly_issued_by(ca)
            return ca
        except Exception:  # noqa: BLE001, S112 - not this one
            continue
    raise AssertionError("the serving certificate is signed by no trusted CA")


def renewed(b: Bundle | None, at: float, hosts: tuple[str, ...] = HOSTS,
            lifetimes: Lifetimes = SHORT) -> certificates.Renewal | None:
    return certificates.renewal(b, hosts, s(at), lifetimes)


@pytest.fixture(scope="module")
def first() -> Bundle:
    r = renewed(None, 0)
    assert r is not None
    return r.bundle


def test_no_secret_issues_a_ca_and_a_serving_certificate_it_trusts(first: Bundle) -> None:
    assert renewed(None, 0).reasons == ("Issued",)  # type: ignore[union-attr]
    assert first.trusted == first.ca_crt
    assert signer(first) == cert(first.ca_crt)
    assert first.sans() == set(HOSTS)
    assert first.not_after() == s(120)


def test_an_unreadable_bundle_is_issued_anew(first: Bundle) -> None:
    broken = Bundle(b"junk", first.ca_key, first.tls_crt, first.tls_key, first.trusted)
    assert renewed(broken, 10).reasons == ("Issued",)  # type: ignore[union-attr]


@pytest.mark.parametrize("at", [pytest.param(1, id="just issued"),
                                pytest.param(75, id="more than a third left")])
def test_nothing_is_renewed_while_more_than_a_third_of_the_validity_remains(
        first: Bundle, at: float) -> None:
    assert renewed(first, at) is None


def test_the_serving_certificate_is_renewed_by_the_same_ca_when_a_third_remains(
        first: Bundle) -> None:
    r = renewed(first, 80)
    assert r is not None and r.reasons == ("CertificateRenewed",)
    assert r.bundle.ca_crt == first.ca_crt and r.bundle.trusted == first.trusted
    assert r.bundle.not_after() == s(200)


@pytest.mark.parametrize("change", [
    pytest.param({"hosts": ("other.ns.svc",)}, id="a host was added"),
    pytest.param({"lifetimes": Lifetimes(dt.timedelta(seconds=30), SHORT.ca)},
                 id="the lifetime was shortened"),
])
def test_a_certificate_that_no_longer_fits_the_settings_is_reissued_at_once(
        first: Bundle, change: dict[str, Any]) -> None:
    r = renewed(first, 10, **change)
    assert r is not None
    assert r.bundle.tls_crt != first.tls_crt and r.bundle.ca_crt == first.ca_crt


def _at_ca_rotation(first: Bundle) -> tuple[Bundle, Bundle, int]:
    """The bundles before and after the CA renewal, and when it happened (190 s: a
    third of the CA's 330 s validity, backdate included, remains)."""
    b = first
    for at in range(5, 300, 5):
        r = renewed(b, at)
        if r is not None and "CARotated" in r.reasons:
            return b, r.bundle, at
        if r is not None:
            b = r.bundle
    raise AssertionError("the CA was never rotated")


def test_a_ca_due_is_replaced_and_both_cas_are_trusted_before_anything_switches(
        first: Bundle) -> None:
    before, after, at = _at_ca_rotation(first)
    assert at == 190
    assert after.ca_crt != before.ca_crt
    assert trusted(after) == [cert(after.ca_crt), cert(before.ca_crt)]
    # Not switched yet: the API server may not trust the new CA yet.
    assert after.tls_crt == before.tls_crt and signer(after) == cert(before.ca_crt)


def test_the_serving_certificate_switches_to_the_new_ca_after_the_overlap(
        first: Bundle) -> None:
    _, after, at = _at_ca_rotation(first)
    assert SHORT.overlap == dt.timedelta(seconds=15)
    assert renewed(after, at + 14) is None
    r = renewed(after, at + 15)
    assert r is not None and r.reasons == ("SignerRotated",)
    assert signer(r.bundle) == cert(after.ca_crt)
    assert len(trusted(r.bundle)) == 2  # the old CA: other replicas may still serve its


def test_the_old_ca_leaves_the_bundle_when_it_expires(first: Bundle) -> None:
    before, after, at = _at_ca_rotation(first)
    switched = renewed(after, at + 15)
    assert switched is not None
    assert cert(before.ca_crt).not_valid_after_utc == s(300)
    r = renewed(switched.bundle, 299)
    assert r is not None and "ExpiredCADropped" not in r.reasons  # a serving renewal
    r = renewed(r.bundle, 300)
    assert r is not None and r.reasons == ("ExpiredCADropped",)
    assert trusted(r.bundle) == [cert(after.ca_crt)]


def test_a_served_certificate_is_always_valid_and_signed_by_a_ca_trusted_long_enough(
        ) -> None:
    """15 simulated minutes, one check every 5 s, as one replica runs it."""
    b: Bundle | None = None
    trusted_since: dict[bytes, float] = {}
    served_renewals = ca_rotations = 0
    for at in range(0, 900, 5):
        r = renewed(b, at)
        if r is not None:
            if b is not None:
                served_renewals += r.bundle.tls_crt != b.tls_crt
                ca_rotations += "CARotated" in r.reasons
            b = r.bundle
        assert b is not None
        for ca in trusted(b):
            trusted_since.setdefault(ca.fingerprint(hashes.SHA256()), at)
        served, ca = cert(b.tls_crt), signer(b)
        assert served.not_valid_before_utc <= s(at) < served.not_valid_after_utc
        assert ca.not_valid_after_utc > s(at)
        since = trusted_since[ca.fingerprint(hashes.SHA256())]
        assert since == 0 or at - since >= SHORT.overlap.total_seconds(), at
    assert served_renewals >= 9 and ca_rotations >= 3


def test_lifetimes_the_ca_cannot_outlast_reject_themselves() -> None:
    with pytest.raises(ValueError, match="at least twice"):
        Lifetimes(dt.timedelta(minutes=2), dt.timedelta(minutes=3))
    with pytest.raises(ValueError, match="at least 30 seconds"):
        Lifetimes(dt.timedelta(seconds=10), dt.timedelta(minutes=3))
    assert Lifetimes().check_seconds == 30 and SHORT.check_seconds == 5


def test_the_secret_round_trips_and_an_older_one_without_a_bundle_trusts_its_ca(
        first: Bundle) -> None:
    body = certificates.secret_body("ns", "tls", first)
    assert certificates.from_secret(body) == first
    data = dict(body["data"])  # type: ignore[call-overload]
    del data[certificates.BUNDLE_KEY]
    old = certificates.from_secret({"data": data})
    assert old is not None and old.trusted == first.ca_crt
    assert certificates.from_secret({"data": {"ca.crt": "not base64!"}}) is None


# -- the loop, against a fake API ---------------------------------------------------------


class FakeKube:
    """Secrets and webhook configurations by (plural, name), with resourceVersions."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.versions = itertools.count(1)
        self.writes: list[str] = []
        self.race: dict[str, Any] | None = None  # written by "another replica" first

    def get(self, res: Any, namespace: str | None, name: str) -> dict[str, Any]:
        try:
            return self.objects[(res.plural, name)]
        except KeyError:
            raise TargetNotFound(name) from None

    def _store(self, res: Any, body: dict[str, Any]) -> None:
        body = {**body, "metadata": {**body["metadata"],
                                     "resourceVersion": str(next(self.versions))}}
        self.objects[(res.plural, body["metadata"]["name"])] = body
        self.writes.append(res.plural)

    def create(self, res: Any, namespace: str | None, body: dict[str, Any]) -> None:
        if (res.plural, body["metadata"]["name"]) in self.objects:
            raise Conflict("exists")
        self._store(res, body)

    def replace(self, res: Any, namespace: str | None, name: str,
                body: dict[str, Any]) -> None:
        if self.race is not None:
            race, self.race = self.race, None
            self._store(res, race)
        if body["metadata"].get("resourceVersion") != \
                self.objects[(res.plural, name)]["metadata"]["resourceVersion"]:
            raise Conflict("stale")
        self._store(res, body)


def _rotation(kube: FakeKube, tmp_path: Path, clock: list[float]) -> rotation.Rotation:
    def configurations(ca: bytes) -> tuple[dict[str, Any], ...]:
        return configuration.configurations({"url": "https://127.0.0.1:9443"}, ca, "ns")

    return rotation.Rotation(kube, "ns", "tls", HOSTS, tmp_path,  # type: ignore[arg-type]
                             SHORT, configurations, clock=lambda: s(clock[0]))


def test_the_loop_writes_renewals_follows_the_files_and_fixes_only_stale_configurations(
        tmp_path: Path) -> None:
    kube, clock = FakeKube(), [0.0]
    rot = _rotation(kube, tmp_path, clock)
    b = rot.sync()
    assert kube.writes == ["secrets"]
    crt, key = rot.files
    assert crt.read_bytes() == b.tls_crt and key.read_bytes() == b.tls_key
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert rot.publish(b) is True and rot.publish(b) is False
    clock[0] = 5
    assert rot.sync() == b and kube.writes.count("secrets") == 1  # nothing due: no write
    clock[0] = 85
    renewed_bundle = rot.sync()
    assert renewed_bundle.tls_crt != b.tls_crt and crt.read_bytes() == renewed_bundle.tls_crt
    assert rot.publish(renewed_bundle) is False  # same CA: the configurations are right
    hook = kube.objects[("validatingwebhookconfigurations", configuration.NAME)]["webhooks"][0]
    assert base64.b64decode(hook["clientConfig"]["caBundle"]) == b.trusted


def test_a_replica_that_loses_the_race_adopts_the_winners_bundle(tmp_path: Path) -> None:
    kube, clock = FakeKube(), [0.0]
    first = _rotation(kube, tmp_path / "a", clock).sync()
    clock[0] = 85
    winner = certificates.renewal(first, HOSTS, s(85), SHORT)
    assert winner is not None
    race = certificates.secret_body("ns", "tls", winner.bundle)
    kube.race = race
    got = _rotation(kube, tmp_path / "b", clock).sync()
    assert got == winner.bundle
    assert (tmp_path / "b" / "tls.crt").read_bytes() == winner.bundle.tls_crt
