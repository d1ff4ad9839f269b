"""Credentials for a secure deployment: a CA, a server certificate and SuperNode keys."""

from __future__ import annotations

import stat

import pytest

from fedpeat.cli.certs import make_credentials


def test_credentials_are_a_ca_a_server_certificate_and_node_keys(tmp_path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    creds = make_credentials(tmp_path, "edge-server.local", nodes=2, bits=2048)
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(creds.server_cert.read_bytes())
    assert server.issuer == ca.subject
    ca.public_key().verify(  # type: ignore[call-arg]
        server.signature,
        server.tbs_certificate_bytes,
        padding.PKCS1v15(),
        server.signature_hash_algorithm,
    )
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "edge-server.local" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    for key in creds.node_keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        serialization.load_ssh_private_key(key.read_bytes(), None)
        pub = serialization.load_ssh_public_key(key.with_suffix(".pub").read_bytes())
        assert pub.curve.name == "secp384r1"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="not a host name"):
        make_credentials(tmp_path, "two words", 0)
