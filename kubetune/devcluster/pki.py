"""Certificates and keys for the dev cluster: a CA, the apiserver's serving cert, client certs and
the service-account signing key. Generated once per cluster folder with `cryptography`."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = dt.timedelta(days=365)


@dataclass(frozen=True)
class Pki:
    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.dir / "apiserver.crt"

    @property
    def server_key(self) -> Path:
        return self.dir / "apiserver.key"

    @property
    def admin_cert(self) -> Path:
        return self.dir / "admin.crt"

    @property
    def admin_key(self) -> Path:
        return self.dir / "admin.key"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"


def _write_key(key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _cert(subject: x509.Name, key, issuer_name: x509.Name, issuer_key, *, ca: bool,
          usages: list | None = None, sans: list | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False), critical=True)
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def generate(directory: Path, host_ip: str = "127.0.0.1") -> Pki:
    """Create every certificate the cluster needs (idempotent: existing files are kept).
    ``host_ip``: the address the apiserver serves on, besides loopback."""
    pki = Pki(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if pki.sa_pub.exists():
        return pki
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("kubetune-dev-ca")
    ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    _write_key(ca_key, pki.ca_key)
    _write_cert(ca, pki.ca_cert)

    server_key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(n) for n in ("localhost", "kubernetes", "kubernetes.default",
                                      "kubernetes.default.svc",
                                      "kubernetes.default.svc.cluster.local")]
    sans += [x509.IPAddress(ipaddress.ip_address(ip))
             for ip in sorted({"127.0.0.1", "10.96.0.1", host_ip})]
    server = _cert(_name("kube-apiserver"), server_key, ca_name, ca_key, ca=False,
                   usages=[ExtendedKeyUsageOID.SERVER_AUTH], sans=sans)
    _write_key(server_key, pki.server_key)
    _write_cert(server, pki.server_cert)

    admin_key = ec.generate_private_key(ec.SECP256R1())
    admin = _cert(_name("kubetune-admin", "system:masters"), admin_key, ca_name, ca_key,
                  ca=False, usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    _write_key(admin_key, pki.admin_key)
    _write_cert(admin, pki.admin_cert)

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(sa_key, pki.sa_key)
    pki.sa_pub.write_bytes(sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return pki


def issue(pki: Pki, name: str, cn: str, org: str | None = None, *, server_ips: tuple = (),
          client: bool = True) -> tuple[Path, Path]:
    """A certificate signed by the cluster's CA (a node's or a component's identity), written
    as ``<name>.crt``/``<name>.key``; kept if it exists."""
    cert_path, key_path = pki.dir / f"{name}.crt", pki.dir / f"{name}.key"
    if cert_path.exists():
        return cert_path, key_path
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    ca_name = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()).subject
    key = ec.generate_private_key(ec.SECP256R1())
    usages = ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else []) + \
        ([ExtendedKeyUsageOID.SERVER_AUTH] if server_ips else [])
    sans = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips] or None
    cert = _cert(_name(cn, org), key, ca_name, ca_key, ca=False, usages=usages, sans=sans)
    _write_key(key, key_path)
    _write_cert(cert, cert_path)
    return cert_path, key_path


def write_kubeconfig(path: Path, server: str, pki: Pki, cert: Path, key: Path,
                     user: str = "kubetune-admin") -> Path:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "kubetune-dev",
        "clusters": [{"name": "kubetune-dev", "cluster": {
            "server": server, "certificate-authority": str(pki.ca_cert)}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert),
                                          "client-key": str(key)}}],
        "contexts": [{"name": "kubetune-dev", "context": {"cluster": "kubetune-dev",
                                                          "user": user}}],
    }, indent=2))
    path.chmod(0o600)
    return path
