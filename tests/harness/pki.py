"""Certificates and kubeconfigs for the test control plane, made with ``cryptography``.

What it issues:

- a self-signed CA (EC P-256);
- the kube-apiserver serving certificate (SANs 127.0.0.1, localhost and the in-cluster
  ``kubernetes.default.svc...`` names plus the first service IP);
- client certificates for any user and groups. The API server maps CN to the user name and
  each O to a group, so ``O=system:masters`` is a cluster admin and any other user goes
  through RBAC;
- serving certificates for any host list (for admission webhooks the API server calls);
- the RSA key pair the API server and the controller manager use for service account tokens;
- the front-proxy CA and client certificate of the aggregation layer;
- kubeconfig files that embed the CA and a client certificate.

Private keys are written with mode 0600. The certificates are only for tests: they are
valid for 30 days and never leave the temporary directory of a test session.

It does not run anything; :mod:`harness.controlplane` uses it.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import ipaddress
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: DNS names the API server answers to inside a cluster, plus the loopback ones we use.
APISERVER_DNS_NAMES: tuple[str, ...] = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
#: 10.0.0.1 is the first address of ``--service-cluster-ip-range=10.0.0.0/24``.
APISERVER_IPS: tuple[str, ...] = ("127.0.0.1", "10.0.0.1")

_VALIDITY = dt.timedelta(days=30)
_BACKDATE = dt.timedelta(minutes=5)


@dataclasses.dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, both PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Write ``<name>.crt`` and ``<name>.key`` (mode 0600) into ``directory``.

        Returns:
            The certificate path and the key path.
        """
        directory.mkdir(parents=True, exist_ok=True)
        crt = directory / f"{name}.crt"
        key = directory / f"{name}.key"
        crt.write_bytes(self.cert_pem)
        write_private(key, self.key_pem)
        return crt, key


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that only the owner can ever read it (mode 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)  # in case the file existed with a wider mode


def _key_usage(**on: bool) -> x509.KeyUsage:
    flags = {
        "digital_signature": False,
        "content_commitment": False,
        "key_encipherment": False,
        "data_encipherment": False,
        "key_agreement": False,
        "key_cert_sign": False,
        "crl_sign": False,
        "encipher_only": False,
        "decipher_only": False,
    }
    flags.update(on)
    return x509.KeyUsage(**flags)


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


@dataclasses.dataclass(frozen=True)
class CertificateAuthority:
    """A test CA that can issue serving and client certificates."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, common_name: str = "token-budget-test-ca") -> CertificateAuthority:
        """Make a new self-signed CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (
            _builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                _key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key=key, cert=cert)

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate, PEM-encoded (what a ``caBundle`` or ``--client-ca-file`` wants)."""
        return self.cert.public_bytes(ser.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """The CA private key, PEM-encoded (PKCS#8)."""
        return _pem_key(self.key)

    def write(self, directory: Path, name: str = "ca") -> tuple[Path, Path]:
        """Write ``<name>.crt`` and ``<name>.key`` (mode 0600) into ``directory``."""
        return KeyPair(self.cert_pem, self.key_pem).write(directory, name)

    def _issue(
        self,
        subject: x509.Name,
        usage: x509.ObjectIdentifier,
        hosts: Sequence[str] = (),
    ) -> KeyPair:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            _builder(subject, self.cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if hosts:
            builder = builder.add_extension(_san(hosts), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return KeyPair(cert.public_bytes(ser.Encoding.PEM), _pem_key(key))

    def issue_serving(self, hosts: Sequence[str], common_name: str | None = None) -> KeyPair:
        """Issue a TLS serving certificate valid for every host in ``hosts``.

        Args:
            hosts: DNS names and/or IP addresses; each becomes a SAN entry. For a webhook
                served on the test machine, ``["127.0.0.1", "localhost"]`` is what the API
                server checks against ``https://127.0.0.1:<port>``.
            common_name: the subject CN; defaults to the first host.

        Returns:
            The certificate and key.
        """
        if not hosts:
            raise ValueError("a serving certificate needs at least one host")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or hosts[0])])
        return self._issue(subject, ExtendedKeyUsageOID.SERVER_AUTH, hosts)

    def issue_client(self, user: str, groups: Sequence[str] = ()) -> KeyPair:
        """Issue a client certificate the API server maps to ``user`` in ``groups``.

        For a ServiceAccount-like identity pass
        ``user="system:serviceaccount:<ns>:<name>"`` and
        ``groups=["system:serviceaccounts", "system:serviceaccounts:<ns>"]``: RBAC bindings
        to that ServiceAccount then apply to this certificate.
        """
        # X.509 caps CN at 64 characters, but ServiceAccount user names are often longer
        # and the API server (Go's parser) accepts them; so skip cryptography's check.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            cn = x509.NameAttribute(NameOID.COMMON_NAME, user, _validate=len(user) <= 64)
        attrs = [cn]
        attrs += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
        return self._issue(x509.Name(attrs), ExtendedKeyUsageOID.CLIENT_AUTH)


def service_account_keypair() -> tuple[bytes, bytes]:
    """Make the RSA-2048 key pair that signs service account tokens.

    Returns:
        The private key (PKCS#8 ``PRIVATE KEY``) and public key (``PUBLIC KEY``), PEM.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    return _pem_key(key), public


def kubeconfig(
    server: str,
    ca_pem: bytes,
    client: KeyPair,
    user: str = "admin",
    cluster: str = "token-budget-test",
    namespace: str | None = None,
) -> str:
    """Render a kubeconfig with the CA and the client certificate embedded.

    JSON is valid YAML, so every kubeconfig reader (kubectl, helm, client-go, the Python
    client, kopf) accepts it.
    """

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    context: dict[str, str] = {"cluster": cluster, "user": user}
    if namespace:
        context["namespace"] = namespace
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "preferences": {},
        "current-context": cluster,
        "clusters": [
            {
                "name": cluster,
                "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": b64(client.cert_pem),
                    "client-key-data": b64(client.key_pem),
                },
            }
        ],
        "contexts": [{"name": cluster, "context": context}],
    }
    return json.dumps(doc, indent=2) + "\n"


@dataclasses.dataclass(frozen=True)
class ControlPlanePki:
    """Paths of every file the control plane processes read."""

    directory: Path
    ca: CertificateAuthority
    ca_crt: Path
    ca_key: Path
    apiserver_crt: Path
    apiserver_key: Path
    admin: KeyPair
    admin_crt: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path
    front_proxy_ca_crt: Path
    front_proxy_client_crt: Path
    front_proxy_client_key: Path


def generate_control_plane_pki(directory: Path) -> ControlPlanePki:
    """Write the CA, API server, admin and service account material into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca = CertificateAuthority.create()
    ca_crt, ca_key = ca.write(directory, "ca")
    serving = ca.issue_serving(
        [*APISERVER_IPS, *APISERVER_DNS_NAMES], common_name="kube-apiserver"
    )
    apiserver_crt, apiserver_key = serving.write(directory, "apiserver")
    admin = ca.issue_client("admin", ["system:masters"])
    admin_crt, admin_key = admin.write(directory, "admin")
    sa_private, sa_public = service_account_keypair()
    sa_key = directory / "sa.key"
    sa_pub = directory / "sa.pub"
    write_private(sa_key, sa_private)
    sa_pub.write_bytes(sa_public)
    # The aggregation layer ("front proxy"), as kubeadm sets it up: its own CA, and the
    # client certificate the API server presents to aggregated API servers. Without it
    # the controller manager keeps logging that requestheader-client-ca-file is missing.
    front_proxy_ca = CertificateAuthority.create("front-proxy-ca")
    front_proxy_ca_crt, _ = front_proxy_ca.write(directory, "front-proxy-ca")
    front_proxy_client_crt, front_proxy_client_key = front_proxy_ca.issue_client(
        "front-proxy-client"
    ).write(directory, "front-proxy-client")
    return ControlPlanePki(
        directory=directory,
        ca=ca,
        ca_crt=ca_crt,
        ca_key=ca_key,
        apiserver_crt=apiserver_crt,
        apiserver_key=apiserver_key,
        admin=admin,
        admin_crt=admin_crt,
        admin_key=admin_key,
        sa_key=sa_key,
        sa_pub=sa_pub,
        front_proxy_ca_crt=front_proxy_ca_crt,
        front_proxy_client_crt=front_proxy_client_crt,
        front_proxy_client_key=front_proxy_client_key,
    )
