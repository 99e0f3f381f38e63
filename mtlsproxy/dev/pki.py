"""A small development PKI built with ``cryptography``: for ``demo`` and ``dev-pki``.

Keys are ECDSA P-256 (accepted by the default security policy); nothing here is meant
for production certificates.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: PrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mtlsproxy dev"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_ca(cn: str, issuer: Issued | None = None, days: int = 3650) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (x509.CertificateBuilder()
               .subject_name(_name(cn))
               .issuer_name(issuer.cert.subject if issuer else _name(cn))
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(hours=1))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                            crl_sign=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False))
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False)
    signer = issuer.key if issuer else key
    return Issued(builder.sign(signer, hashes.SHA256()), key)


def make_leaf(issuer: Issued, cn: str, *, server: bool, dns: tuple[str, ...] = (),
              ips: tuple[str, ...] = (), uris: tuple[str, ...] = (), days: int = 825) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder()
               .subject_name(_name(cn))
               .issuer_name(issuer.cert.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(hours=1))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
               .add_extension(
                   x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
                   critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(builder.sign(issuer.key, hashes.SHA256()), key)


@dataclass(frozen=True)
class DevPKI:
    """Paths of a written development PKI."""

    directory: Path

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.directory / "client.key"

    @property
    def truststore(self) -> Path:
        return self.directory / "truststore.pem"

    @property
    def root_cert(self) -> Path:
        return self.directory / "root-ca.pem"


def write_dev_pki(directory: Path) -> DevPKI:
    """Root CA -> intermediate CA -> server (localhost, 127.0.0.1) and client leaves.

    ``server.pem`` and ``client.pem`` hold the leaf then the intermediate, so either side
    can complete the chain; ``truststore.pem`` holds intermediate + root (the model: the
    truststore carries the whole chain).
    """
    directory.mkdir(parents=True, exist_ok=True)
    root = make_ca("mtlsproxy dev root CA")
    inter = make_ca("mtlsproxy dev intermediate CA", issuer=root)
    server = make_leaf(inter, "localhost", server=True, dns=("localhost",), ips=("127.0.0.1",))
    client = make_leaf(inter, "dev-client", server=False, dns=("dev-client.local",),
                       uris=("spiffe://dev.local/client",))
    files = {
        "root-ca.pem": root.cert_pem,
        "intermediate-ca.pem": inter.cert_pem,
        "truststore.pem": inter.cert_pem + root.cert_pem,
        "server.pem": server.cert_pem + inter.cert_pem,
        "server.key": server.key_pem,
        "client.pem": client.cert_pem + inter.cert_pem,
        "client.key": client.key_pem,
    }
    for name, data in files.items():
        target = directory / name
        target.write_bytes(data)
        if name.endswith(".key"):
            target.chmod(0o600)
    return DevPKI(directory)
