"""Keys and certificates for a test deployment: a CA, the SuperLink's TLS certificate, and one
SuperNode authentication key pair per node (P-384, OpenSSH format, as Flower expects).

For production, use your organization's CA; this helper is for trying TLS and node
authentication end to end. Uses `cryptography` (already required by Flower).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedit.files import atomic_bytes


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_pki(folder: Path, nodes: int, hosts: Sequence[str] = ("127.0.0.1", "localhost"),
             days: int = 365) -> dict[str, Path]:  # fmt: skip
    """ca.crt, server.crt/.key (valid for `hosts`), node-<i> / node-<i>.pub for i < nodes."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedit test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {
        "ca": folder / "ca.crt",
        "ca_key": folder / "ca.key",
        "cert": folder / "server.crt",
        "key": folder / "server.key",
    }
    atomic_bytes(paths["ca"], ca.public_bytes(serialization.Encoding.PEM))
    atomic_bytes(paths["ca_key"], _pem_key(ca_key), private=True)
    atomic_bytes(paths["cert"], server.public_bytes(serialization.Encoding.PEM))
    atomic_bytes(paths["key"], _pem_key(server_key), private=True)
    for i in range(nodes):
        paths.update(make_node_key(folder, f"node-{i}"))
    return paths


def make_node_key(folder: Path, name: str) -> dict[str, Path]:
    """A SuperNode authentication key pair: `name` (private) and `name.pub`."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    atomic_bytes(folder / name, private, private=True)
    atomic_bytes(folder / f"{name}.pub", public + b"\n")
    return {name: folder / name, f"{name}.pub": folder / f"{name}.pub"}
