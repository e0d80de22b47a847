"""Test secrets: ``splitglm.credentials.make_secrets`` (what ``splitglm secrets`` writes), plus an unrelated CA.

``make_test_secrets(out)`` is the deployment's folder: ca.crt, cloud/server.*,
edge/server.*, edge/client.* (SAN localhost, 127.0.0.1 and the service's
name) and api-key; ``other_ca(out)`` adds a CA of its own with a client
certificate it signed, under ``out/other``, for the handshakes that must fail.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization

from splitglm.credentials import make_ca, make_leaf, make_secrets


def make_test_secrets(out: Path) -> Path:
    return make_secrets(out)


def api_key(secrets: Path) -> str:
    """The first key of the folder's api-key file."""
    return (Path(secrets) / "api-key").read_text().split()[0]


def _write(folder: Path, stem: str, cert, key) -> None:
    (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{stem}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def other_ca(out: Path) -> Path:
    """An unrelated CA and a client certificate it signed: out/other/ca.crt, out/other/client.crt and .key."""
    folder = Path(out) / "other"
    folder.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = make_ca()
    _write(folder, "ca", ca_cert, ca_key)
    _write(folder, "client", *make_leaf("edge", None, ca_cert, ca_key, client=True))
    return folder
