"""The webhook's own CA and serving certificate, kept in a Secret and rotated before expiry.

The API server only calls a webhook over TLS it can verify, so the operator runs
a tiny CA of its own (the cert-manager chart option replaces all of this):

* on start, every replica reads the Secret; when it is missing, unreadable, or
  its serving certificate expires within ``renew_before``, one replica writes a
  new one (a create or an update guarded by resourceVersion: a race has one
  winner, the loser re-reads);
* the CA lives five years, the serving certificate ninety days;
* the files kopf's webhook server reads are rewritten when the Secret changes
  (kopf re-reads them), and the webhook configurations' ``caBundle`` follows.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from token_budget.errors import Conflict, TargetNotFound
from token_budget.kube import Kube, Resource

SECRETS = Resource("Secret", "v1", "secrets")
CA_LIFETIME = dt.timedelta(days=5 * 365)
CERT_LIFETIME = dt.timedelta(days=90)
RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True)
class Bundle:
    ca_crt: bytes
    ca_key: bytes
    tls_crt: bytes
    tls_key: bytes

    def not_after(self) -> dt.datetime:
        return x509.load_pem_x509_certificate(self.tls_crt).not_valid_after_utc

    def sans(self) -> set[str]:
        cert = x509.load_pem_x509_certificate(self.tls_crt)
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return {str(n) for n in ext.get_values_for_type(x509.DNSName)} | \
            {str(i) for i in ext.get_values_for_type(x509.IPAddress)}


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _builder(subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey,
             now: dt.datetime, lifetime: dt.timedelta) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + lifetime)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False))


def issue(hosts: Sequence[str], now: dt.datetime, ca: tuple[bytes, bytes] | None = None) -> Bundle:
    """A serving certificate for ``hosts`` (DNS names or IPs), and a CA when none is given."""
    if ca is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token-budget-operator-ca")])
        ca_cert = (_builder(name, name, ca_key.public_key(), now, CA_LIFETIME)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(True, False, False, False, False, True, True,
                                                False, False), critical=True)
                   .sign(ca_key, hashes.SHA256()))
        ca_pem = (ca_cert.public_bytes(serialization.Encoding.PEM), _key_pem(ca_key))
    else:
        ca_pem = ca
    ca_cert = x509.load_pem_x509_certificate(ca_pem[0])
    ca_key_obj = serialization.load_pem_private_key(ca_pem[1], None)
    assert isinstance(ca_key_obj, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    cert = (_builder(subject, ca_cert.subject, key.public_key(), now, CERT_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key_obj.public_key()), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(ca_key_obj, hashes.SHA256()))
    return Bundle(ca_pem[0], ca_pem[1], cert.public_bytes(serialization.Encoding.PEM),
                  _key_pem(key))


def _from_secret(secret: dict[str, object]) -> Bundle | None:
    data = secret.get("data") or {}
    assert isinstance(data, dict)
    try:
        return Bundle(*(base64.b64decode(data[k]) for k in ("ca.crt", "ca.key", "tls.crt",
                                                             "tls.key")))
    except (KeyError, ValueError):
        return None


def _secret_body(namespace: str, name: str, b: Bundle) -> dict[str, object]:
    enc = {k: base64.b64encode(v).decode() for k, v in
           (("ca.crt", b.ca_crt), ("ca.key", b.ca_key), ("tls.crt", b.tls_crt),
            ("tls.key", b.tls_key))}
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"app.kubernetes.io/managed-by": "token-budget-operator"}},
            "data": enc}


def ensure(kube: Kube, namespace: str, name: str, hosts: Sequence[str], now: dt.datetime,
           renew_before: dt.timedelta = RENEW_BEFORE) -> Bundle:
    """The current bundle from the Secret, issuing or renewing it when needed."""
    for _ in range(3):
        try:
            secret = kube.get(SECRETS, namespace, name)
        except TargetNotFound:
            bundle = issue(hosts, now)
            try:
                kube.create(SECRETS, namespace, _secret_body(namespace, name, bundle))
                return bundle
            except Conflict:
                continue  # another replica won: read theirs
        bundle_or_none = _from_secret(secret)
        if bundle_or_none is not None and bundle_or_none.not_after() - now > renew_before \
                and set(hosts) <= bundle_or_none.sans():
            return bundle_or_none
        ca = (bundle_or_none.ca_crt, bundle_or_none.ca_key) if bundle_or_none else None
        fresh = issue(hosts, now, ca)
        body = _secret_body(namespace, name, fresh)
        body["metadata"]["resourceVersion"] = secret["metadata"]["resourceVersion"]  # type: ignore[index]
        try:
            kube.replace(SECRETS, namespace, name, body)
            return fresh
        except Conflict:
            continue
    raise Conflict(f"could not settle the webhook certificate in Secret {namespace}/{name}")


def write_files(bundle: Bundle, directory: Path) -> tuple[Path, Path]:
    """Write tls.crt/tls.key for the webhook server (kopf re-reads changed files)."""
    directory.mkdir(parents=True, exist_ok=True)
    crt, key = directory / "tls.crt", directory / "tls.key"
    if not crt.exists() or crt.read_bytes() != bundle.tls_crt:
        key.write_bytes(bundle.tls_key)
        key.chmod(0o600)
        crt.write_bytes(bundle.tls_crt)
    return crt, key
