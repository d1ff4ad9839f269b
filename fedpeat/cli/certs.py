"""Keys and certificates for a secure deployment: TLS for the SuperLink, keys for SuperNodes.

    python -m fedpeat.cli.certs --host server.example.org --nodes 3 --out keys/

writes a self-signed CA (`ca.crt`, `ca.key`), a server certificate for `--host` signed by it
(`server.crt`, `server.key`; its names also cover localhost and 127.0.0.1), and per SuperNode an
EC P-384 key pair in OpenSSH form (`node-<i>`, `node-<i>.pub`), the format
`flower-supernode --auth-supernode-private-key` and `flwr supernode register` read.

The SuperLink gets the server certificate, its key and the CA; each SuperNode gets `ca.crt`
(`--root-certificates`) and its own private key; the public keys are registered with the
SuperLink (`flwr supernode register node-<i>.pub`). Private keys are written with mode 0600.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Credentials:
    """Paths of what `make_credentials` wrote."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: list[Path]
    """Private keys (OpenSSH); the public key of each is the same path with `.pub`."""


def _write(path: Path, data: bytes, private: bool = False) -> None:
    # Create private files with 0600 from the start: no moment where others may read them.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _names(host: str) -> list[x509.GeneralName]:
    """Subject alternative names: the host (a DNS name or an IP address), localhost, loopback."""
    names: list[x509.GeneralName] = []
    for value in dict.fromkeys([host, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(value)))
        except ValueError:
            names.append(x509.DNSName(value))
    return names


def make_credentials(
    out: Path, host: str, nodes: int, days: int = 365, bits: int = 2048
) -> Credentials:
    """Write a CA, a server certificate for `host` and `nodes` SuperNode key pairs to `out`."""
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"--host {host!r} is not a host name or address")
    if nodes < 0:
        raise ValueError(f"--nodes must be >= 0, got {nodes}")
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpeat CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    server_key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(_names(host)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    creds = Credentials(out / "ca.crt", out / "server.crt", out / "server.key", [])
    _write(creds.ca_cert, ca_cert.public_bytes(pem))
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(creds.server_cert, server_cert.public_bytes(pem))
    _write(creds.server_key, _pem_key(server_key), private=True)
    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        path = out / f"node-{i}"
        _write(
            path,
            key.private_bytes(
                pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
            private=True,
        )
        _write(
            path.with_suffix(".pub"),
            key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            ),
        )
        creds.node_keys.append(path)
    return creds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", required=True, help="the SuperLink's host name or IP address")
    parser.add_argument("--nodes", type=int, default=0, help="SuperNode key pairs to make")
    parser.add_argument("--out", type=Path, default=Path("keys"), help="output directory")
    parser.add_argument("--days", type=int, default=365, help="certificate validity")
    args = parser.parse_args(argv)
    creds = make_credentials(args.out, args.host, args.nodes, args.days)
    print(f"CA {creds.ca_cert}\nserver {creds.server_cert} {creds.server_key}")
    for key in creds.node_keys:
        print(f"node {key} {key.with_suffix('.pub')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
