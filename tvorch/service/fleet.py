"""Fleet PKI on a node: the node CA's request to the fleet's CA, the certificate it sends back, what is shown.

The node CA key never leaves the node: the fleet's CA signs a request for it
(`tvorch ca csr`) with the node CA's own subject, and `tvorch ca install`
puts the certificate it issued in place of the self-signed one. Everything
the node signed or issued before names the same subject and is signed by the
same key, so it verifies under the new certificate too.
"""

from __future__ import annotations

import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ..adapters import node_keys
from ..adapters.files import read_bounded
from ..config import Config
from ..core.chain import name_of, pem_list
from ..errors import InputError
from .manifests import node_identity, read_chain


def csr_pem(cfg: Config) -> bytes:
    return node_keys.request(Path(cfg.state_dir), socket.gethostname()).public_bytes(serialization.Encoding.PEM)


def install(cfg: Config, cert_path: str, chain_path: str) -> dict[str, Any]:
    """Check CERT_PATH against the node CA key and CHAIN_PATH, then install it (``node_keys.install_ca``)."""
    try:
        data = read_bounded(cert_path, 1024 * 1024)
    except OSError as err:
        raise InputError(f"cannot read {cert_path}: {err.strerror or err}") from None
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise InputError(f"{cert_path} is not a PEM certificate") from None
    chain = read_chain(chain_path)
    node_keys.install_ca(Path(cfg.state_dir), socket.gethostname(), cert, chain, datetime.now(timezone.utc))
    return ca_info(cfg)


def ca_info(cfg: Config) -> dict[str, Any]:
    """What `tvorch ca show` prints: the node CA, and the chain above it with each link's validity now."""
    identity = node_identity(cfg)
    cert, now = identity.ca_cert, datetime.now(timezone.utc)
    chain = [{"subject": name_of(c), "not_after": c.not_valid_after_utc.isoformat(),
              "valid_now": c.not_valid_before_utc <= now <= c.not_valid_after_utc} for c in identity.chain]
    return {
        "subject": name_of(cert),
        "issuer": cert.issuer.rfc4514_string(),
        "self_signed": not identity.chain,
        "sha256_fingerprint": cert.fingerprint(hashes.SHA256()).hex(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "pem": identity.ca_pem().decode(),
        "chain": chain,
        # The node CA and the chain above it: what `openssl verify -untrusted` and `tvorch verify --chain` take.
        "chain_pem": pem_list((cert, *identity.chain)).decode(),
    }
