"""Certificates for tests: trustme for the good ones, cryptography for the bad ones
trustme cannot make (SHA-1, tampered signatures, odd keys)."""

from __future__ import annotations

import datetime as dt
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.tools import require_tool

UTC = dt.UTC


@dataclass
class Cert:
    """A certificate and key as PEM, written to files on demand."""

    cert: x509.Certificate
    key: Any
    chain: list[x509.Certificate] = field(default_factory=list)  # intermediates after leaf

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def cert_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM)
                        for c in [self.cert, *self.chain])

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        c, k = directory / f"{name}.pem", directory / f"{name}.key"
        c.write_bytes(self.cert_pem())
        k.write_bytes(self.key_pem())
        return c, k


def make_cert(cn: str, issuer: Cert | None = None, *, key: Any = None, ca: bool = False,
              hash_alg: hashes.HashAlgorithm | None = None,
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
              eku: list[x509.ObjectIdentifier] | None = None, dns: tuple[str, ...] = (),
              uris: tuple[str, ...] = (), ocsp_url: str | None = None) -> Cert:
    """The cryptography helper: any key type, hash, validity, EKU and SANs."""
    now = dt.datetime.now(UTC)
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mtlsproxy tests"),
                         x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    b = (x509.CertificateBuilder()
         .subject_name(subject)
         .issuer_name(issuer.cert.subject if issuer else subject)
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(not_before or now - dt.timedelta(days=1))
         .not_valid_after(not_after or now + dt.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         # Key identifiers, as every real CA sets them: Python 3.13's default client
         # context (VERIFY_X509_STRICT) refuses a certificate without an AKI.
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                        critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
             (issuer.key if issuer else key).public_key()), critical=False))
    if ca:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                          False), critical=True)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage(eku or [ExtendedKeyUsageOID.CLIENT_AUTH]),
                            critical=False)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if ocsp_url:
        b = b.add_extension(x509.AuthorityInformationAccess([x509.AccessDescription(
            x509.oid.AuthorityInformationAccessOID.OCSP,
            x509.UniformResourceIdentifier(ocsp_url))]), critical=False)
    signer = issuer.key if issuer else key
    if isinstance(signer, ed25519.Ed25519PrivateKey):
        algo = None
    else:
        algo = hash_alg or hashes.SHA256()
    cert = b.sign(signer, algo)
    chain = [issuer.cert, *issuer.chain] if issuer else []
    # Roots are not sent by clients; keep only intermediates in the presented chain.
    chain = [c for c in chain if c.issuer != c.subject]
    return Cert(cert, key, chain)


def make_sha1_cert(cn: str, issuer: Cert, tmp: Path, ca: bool = False) -> Cert:
    """cryptography refuses to sign with SHA-1; the openssl binary still does."""
    require_tool("openssl", "openssl")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .sign(key, hashes.SHA256()))
    (tmp / "sha1.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    ca_cert, ca_key = issuer.write(tmp, "sha1-issuer")
    (tmp / "sha1.ext").write_text("basicConstraints=critical,CA:TRUE\n" if ca
                                  else "extendedKeyUsage=clientAuth\n")
    subprocess.run(["openssl", "x509", "-req", "-in", str(tmp / "sha1.csr"), "-CA", str(ca_cert),
                    "-CAkey", str(ca_key), "-CAcreateserial", "-sha1", "-days", "30",
                    "-extfile", str(tmp / "sha1.ext"), "-out", str(tmp / "sha1.pem")],
                   check=True, capture_output=True)
    cert = x509.load_pem_x509_certificate((tmp / "sha1.pem").read_bytes())
    return Cert(cert, key, [issuer.cert, *issuer.chain])


def make_sha1_root(cn: str, tmp: Path) -> x509.Certificate:
    """A self-signed CA signed with SHA-1 (the openssl binary, as make_sha1_cert)."""
    require_tool("openssl", "openssl")
    subprocess.run(["openssl", "req", "-x509", "-sha1", "-newkey", "ec",
                    "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(tmp / "sha1-root.key"), "-out", str(tmp / "sha1-root.pem"),
                    "-subj", f"/CN={cn}", "-days", "365",
                    "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
                   check=True, capture_output=True)
    return x509.load_pem_x509_certificate((tmp / "sha1-root.pem").read_bytes())


def tamper(cert: Cert) -> Cert:
    """Flip one byte inside the subject CN: the DER still parses, the signature fails."""
    der = bytearray(cert.der)
    cn = b"tamper-me"
    i = bytes(der).find(cn)
    assert i > 0
    der[i] = ord("T")
    return Cert(x509.load_der_x509_certificate(bytes(der)), cert.key, cert.chain)


@dataclass
class PKI:
    directory: Path
    root: Cert
    inter: Cert
    server_cert: Path
    server_key: Path
    truststore: Path
    client: Cert

    def client_files(self, cert: Cert | None = None, name: str = "client") -> tuple[Path, Path]:
        return (cert or self.client).write(self.directory, name)


def _trustme_to_cert(ca: trustme.CA) -> Cert:
    cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    return Cert(cert, key)


def make_pki(d: Path) -> PKI:
    """Root -> intermediate (trustme); server leaf for localhost; a good client leaf,
    written under ``d``."""
    root_ca = trustme.CA(organization_name="mtlsproxy tests root")
    inter_ca = root_ca.create_child_ca()
    server = inter_ca.issue_cert("localhost", "127.0.0.1", "api.example.test")
    server_cert, server_key = d / "server.pem", d / "server.key"
    server_cert.write_bytes(b"".join(b.bytes() for b in server.cert_chain_pems))
    server_key.write_bytes(server.private_key_pem.bytes())
    (d / "root.pem").write_bytes(root_ca.cert_pem.bytes())
    root = _trustme_to_cert(root_ca)
    inter = _trustme_to_cert(inter_ca)
    truststore = d / "truststore.pem"
    truststore.write_bytes(inter_ca.cert_pem.bytes() + root_ca.cert_pem.bytes())
    client = make_cert("good-client", inter, dns=("client.example.test",),
                       uris=("spiffe://prod.example.test/ns/payments/sa/api",))
    return PKI(d, root, inter, server_cert, server_key, truststore, client)
