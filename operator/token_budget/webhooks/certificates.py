"""The webhook's own CA and serving certificate: issuing them and deciding when to renew.

The API server only calls a webhook over TLS it can verify, so the operator runs
a tiny CA of its own (the cert-manager chart option replaces all of this). Its
state is one Secret, read by every replica (:mod:`token_budget.webhooks.rotation`
reads and writes it; this module does no I/O)::

    ca.crt, ca.key    the CA that signs new serving certificates
    ca-bundle.crt     every CA the webhook configurations trust (their caBundle)
    tls.crt, tls.key  the serving certificate

:func:`renewal` is the whole policy, a pure function of the Secret's contents,
the hosts, the lifetimes and ``now``, so every replica reaches the same verdict
and its tests need no clock. Renewals happen when a third of a certificate's
validity remains (cert-manager's default ``renewBefore``), so a pod that lives
for months never serves an expired certificate. CA rotation keeps an overlap,
as kube-admission-webhook does::

    t0  CA due: a new CA signs nothing yet; ca-bundle = new CA + old CA
        (the replicas write that bundle into the webhook configurations)
    t0 + overlap   the serving certificate is re-issued by the new CA
    old CA's expiry    the old CA leaves ca-bundle

so at every instant the certificate a replica serves, old or new, is signed by
a CA the API server already trusts. The overlap is three checks of the Secret
(:attr:`Lifetimes.check_seconds`): time for every replica to publish the new
bundle and for the API server's informer to pick it up.

Why home-made: the libraries that do this job (Gatekeeper's cert-controller,
OpenShift's library-go certrotation, kube-admission-webhook) are Go; nothing
kept on PyPI rotates a webhook CA kept in a Secret. kopf's own webhook server
makes a self-signed certificate per start, never renewed and never shared
between replicas. The X.509 work itself is ``cryptography``'s.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from token_budget.kube import Resource

SECRETS = Resource("Secret", "v1", "secrets")
CA_LIFETIME = dt.timedelta(days=5 * 365)
CERT_LIFETIME = dt.timedelta(days=90)
# Certificates start this much before they were issued, so that an API server whose clock
# is behind the operator's does not find them "not yet valid"; a tenth of the lifetime for
# short ones (a 2-minute test certificate).
MAX_BACKDATE = dt.timedelta(minutes=5)
# Renew when this share of the validity remains: cert-manager's default renewBefore.
RENEW_WHEN_REMAINING = 1 / 3
_KEYS = ("ca.crt", "ca.key", "tls.crt", "tls.key")
BUNDLE_KEY = "ca-bundle.crt"


@dataclass(frozen=True)
class Lifetimes:
    """How long the CA and the serving certificate live; how often the Secret is read."""

    certificate: dt.timedelta = CERT_LIFETIME
    ca: dt.timedelta = CA_LIFETIME

    def __post_init__(self) -> None:
        if self.certificate < dt.timedelta(seconds=30):
            raise ValueError("the webhook certificate lifetime must be at least 30 seconds")
        if self.ca < 2 * self.certificate:
            raise ValueError("the webhook CA lifetime must be at least twice the "
                             "certificate lifetime")

    @property
    def check_seconds(self) -> float:
        """How often each replica reads the Secret and its files: 1/24 of the
        certificate's lifetime, between 1 and 30 seconds (5 s for a 2-minute one)."""
        return min(30.0, max(1.0, self.certificate.total_seconds() / 24))

    @property
    def overlap(self) -> dt.timedelta:
        """How long a new CA is trusted before it signs the serving certificate."""
        return dt.timedelta(seconds=3 * self.check_seconds)


@dataclass(frozen=True)
class Bundle:
    """The Secret's contents (PEM)."""

    ca_crt: bytes
    ca_key: bytes
    tls_crt: bytes
    tls_key: bytes
    trusted: bytes  # ca-bundle.crt: the caBundle of the webhook configurations

    def not_after(self) -> dt.datetime:
        return x509.load_pem_x509_certificate(self.tls_crt).not_valid_after_utc

    def sans(self) -> set[str]:
        return _sans(x509.load_pem_x509_certificate(self.tls_crt))


@dataclass(frozen=True)
class Renewal:
    """What :func:`renewal` decided: the new contents and why (CamelCase reasons)."""

    bundle: Bundle
    reasons: tuple[str, ...]


def _sans(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n) for n in ext.get_values_for_type(x509.DNSName)} | \
        {str(i) for i in ext.get_values_for_type(x509.IPAddress)}


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _backdate(lifetime: dt.timedelta) -> dt.timedelta:
    return min(MAX_BACKDATE, lifetime / 10)


def _builder(subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey,
             now: dt.datetime, not_after: dt.datetime) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - _backdate(not_after - now)).not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False))


def issue_ca(now: dt.datetime, lifetime: dt.timedelta = CA_LIFETIME) -> tuple[bytes, bytes]:
    """A new CA: (certificate PEM, key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token-budget-operator-ca")])
    cert = (_builder(name, name, key.public_key(), now, now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True,
                                         False, False), critical=True)
            .sign(key, hashes.SHA256()))
    return _pem(cert), _key_pem(key)


def issue_serving(hosts: Sequence[str], now: dt.datetime, ca: tuple[bytes, bytes],
                  lifetime: dt.timedelta = CERT_LIFETIME) -> tuple[bytes, bytes]:
    """A serving certificate for ``hosts`` (DNS names or IPs) signed by ``ca``, ending
    no later than the CA: (certificate PEM, key PEM)."""
    ca_cert = x509.load_pem_x509_certificate(ca[0])
    ca_key = serialization.load_pem_private_key(ca[1], None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the webhook CA key must be an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    not_after = min(now + lifetime, ca_cert.not_valid_after_utc)
    cert = (_builder(subject, ca_cert.subject, key.public_key(), now, not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return _pem(cert), _key_pem(key)


def issue(hosts: Sequence[str], now: dt.datetime, lifetimes: Lifetimes = Lifetimes()) -> Bundle:
    """A new CA and a serving certificate for ``hosts`` signed by it."""
    ca = issue_ca(now, lifetimes.ca)
    tls = issue_serving(hosts, now, ca, lifetimes.certificate)
    return Bundle(ca[0], ca[1], tls[0], tls[1], ca[0])


# ---------------------------------------------------------------------------
# the renewal policy: pure
# ---------------------------------------------------------------------------


def _due(cert: x509.Certificate, now: dt.datetime, lifetime: dt.timedelta) -> bool:
    """Expired, a third or less of its validity left, or longer-lived than configured
    (the lifetime was shortened)."""
    window = cert.not_valid_after_utc - cert.not_valid_before_utc
    remaining = cert.not_valid_after_utc - now
    # The backdate's slack keeps two replicas whose clocks differ a little from re-issuing
    # each other's certificates as "longer-lived than configured".
    return remaining <= window * RENEW_WHEN_REMAINING or remaining > lifetime + _backdate(lifetime)


def _issued(cert: x509.Certificate) -> dt.datetime:
    """When it was issued: its start plus the backdate (:func:`_builder`)."""
    window = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_before_utc + min(MAX_BACKDATE, window / 11)


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def renewal(current: Bundle | None, hosts: Sequence[str], now: dt.datetime,
            lifetimes: Lifetimes) -> Renewal | None:
    """What the Secret must hold instead of ``current``; None while it is fine.

    In order: no usable bundle issues everything anew; a CA due for renewal is
    replaced and both CAs are trusted; the serving certificate is re-issued when
    it is due, lacks a host, or was signed by the old CA once the new one has been
    trusted for :attr:`Lifetimes.overlap` (sooner only when it can no longer be
    served at all); CAs that expired leave the trusted bundle.
    """
    try:
        if current is None:
            raise ValueError("no bundle")
        ca = x509.load_pem_x509_certificate(current.ca_crt)
        serving = x509.load_pem_x509_certificate(current.tls_crt)
        trusted = x509.load_pem_x509_certificates(current.trusted)
    except ValueError:
        return Renewal(issue(hosts, now, lifetimes), ("Issued",))
    reasons: list[str] = []
    ca_pem = (current.ca_crt, current.ca_key)
    if _due(ca, now, lifetimes.ca):
        ca_pem = issue_ca(now, lifetimes.ca)
        ca = x509.load_pem_x509_certificate(ca_pem[0])
        reasons.append("CARotated")
    # The signing CA first, then the others still valid (the one being replaced).
    keep = [c for c in trusted if c.not_valid_after_utc > now and c != ca]
    if any(c.not_valid_after_utc <= now for c in trusted):
        reasons.append("ExpiredCADropped")
    trusted_pem = ca_pem[0] + b"".join(_pem(c) for c in keep)
    tls = (current.tls_crt, current.tls_key)
    switched = not _signed_by(serving, ca)
    unusable = serving.not_valid_after_utc <= now or not set(hosts) <= _sans(serving) or \
        not any(_signed_by(serving, c) for c in [ca, *keep])
    settled = now - _issued(ca) >= lifetimes.overlap
    if unusable or (settled and (switched or _due(serving, now, lifetimes.certificate))):
        tls = issue_serving(hosts, now, ca_pem, lifetimes.certificate)
        reasons.append("CertificateUnusable" if unusable else
                       "SignerRotated" if switched else "CertificateRenewed")
    fresh = Bundle(ca_pem[0], ca_pem[1], tls[0], tls[1], trusted_pem)
    if fresh == current:
        return None
    return Renewal(fresh, tuple(reasons) or ("TrustUpdated",))


# ---------------------------------------------------------------------------
# the Secret
# ---------------------------------------------------------------------------


def from_secret(secret: Mapping[str, object]) -> Bundle | None:
    """The bundle in a Secret; None when a key is missing or not base64."""
    data = secret.get("data") or {}
    if not isinstance(data, Mapping):
        return None
    try:
        parts = [base64.b64decode(str(data[k]), validate=True) for k in _KEYS]
        trusted = base64.b64decode(str(data[BUNDLE_KEY]), validate=True) \
            if BUNDLE_KEY in data else parts[0]  # written before CA rotation existed
    except (KeyError, ValueError):
        return None
    return Bundle(parts[0], parts[1], parts[2], parts[3], trusted)


def secret_body(namespace: str, name: str, b: Bundle) -> dict[str, object]:
    enc = {k: base64.b64encode(v).decode() for k, v in
           (("ca.crt", b.ca_crt), ("ca.key", b.ca_key), ("tls.crt", b.tls_crt),
            ("tls.key", b.tls_key), (BUNDLE_KEY, b.trusted))}
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"app.kubernetes.io/managed-by": "token-budget-operator"}},
            "data": enc}
