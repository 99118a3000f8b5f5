"""The node's CA and manifest-signing key on disk, in ``<state_dir>/pki/``.

Files (directory 0700): ``ca.key`` and ``node.key`` (PKCS#8 PEM, unencrypted,
0600: the file mode is their protection), ``ca.pem`` and ``node.pem`` (0644),
and in a fleet ``chain.pem`` (0644): the certificates above the node CA up to
the fleet's root, once ``install_ca`` replaced the self-signed ``ca.pem`` with
the one the fleet's CA issued for the same key and subject.
They are made on first use under an exclusive lock on ``pki/.lock``, in the
order ca.key, ca.pem, node.key, node.pem, each written atomically, so a crash
leaves a prefix of that list. A missing node key or certificate is reissued
by the CA; a CA with a file missing is refused and never replaced, because
vTPM EK certificates and every signed manifest chain to it.
"""

from __future__ import annotations

import fcntl
import os
import stat
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tvorch.adapters.files import atomic_write, ensure_private_dir
from tvorch.core.chain import ca_path, ca_request, check_node_ca, is_self_signed, pem_list
from tvorch.core.signing import DOCUMENT_SIGNING, generate_key, issue_signing_cert, make_ca, verify_chain
from tvorch.errors import TrustError

PKI_DIR = "pki"
CA_KEY = "ca.key"
CA_CERT = "ca.pem"
NODE_KEY = "node.key"
NODE_CERT = "node.pem"
CHAIN = "chain.pem"
_LOCK = ".lock"
_KEY_MODE = 0o600
_CERT_MODE = 0o644


@dataclass(frozen=True)
class NodeIdentity:
    """The node CA and the key that signs launch manifests, checked to belong together."""

    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey = field(repr=False)  # issues the vTPMs' EK certificates
    signing_key: ec.EllipticCurvePrivateKey = field(repr=False)
    signing_cert: x509.Certificate
    # Above the node CA up to the fleet's root, issuer first; empty for a self-signed node CA.
    chain: tuple[x509.Certificate, ...] = ()

    def ca_pem(self) -> bytes:
        """The CA certificate as PEM: all a verifier needs to check this node's evidence, without a fleet root."""
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)

    def carried_chain(self) -> tuple[x509.Certificate, ...]:
        """What manifests and bundles carry so a verifier needs only the fleet's root: the node CA and the
        chain above it; nothing for a self-signed node CA (its own certificate is the verifier's anchor)."""
        return (self.ca_cert, *self.chain) if self.chain else ()


def load_or_create(state_dir: Path, hostname: str) -> NodeIdentity:
    """The node identity in STATE_DIR/pki, made on first use; TrustError if it is broken."""
    ensure_private_dir(state_dir)
    pki = state_dir / PKI_DIR
    ensure_private_dir(pki)
    if all((pki / name).exists() for name in (CA_KEY, CA_CERT, NODE_KEY, NODE_CERT)):
        return _load(pki)
    fd = os.open(pki / _LOCK, os.O_RDWR | os.O_CREAT, _KEY_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # Another process may have finished (or started) the work while we waited.
        _create_missing(pki, hostname)
        return _load(pki)
    finally:
        os.close(fd)  # releases the lock


def _create_missing(pki: Path, hostname: str) -> None:
    now = datetime.now(timezone.utc)
    has = {name: (pki / name).exists() for name in (CA_KEY, CA_CERT, NODE_KEY, NODE_CERT)}
    if has[CA_KEY] != has[CA_CERT]:
        missing, present = (CA_CERT, CA_KEY) if has[CA_KEY] else (CA_KEY, CA_CERT)
        raise TrustError(
            f"node CA incomplete: {pki / missing} is missing but {present} exists; "
            f"restore it from a backup (tvorch never replaces a CA)"
        )
    if not has[CA_KEY]:
        if has[NODE_KEY] or has[NODE_CERT]:
            raise TrustError(
                f"node CA missing: {pki / CA_KEY} and {CA_CERT} are gone but the node key remains; "
                f"restore them from a backup (tvorch never replaces a CA)"
            )
        ca_key, ca_cert = make_ca(f"tvorch node CA {hostname}", now)
        atomic_write(pki / CA_KEY, _key_pem(ca_key), _KEY_MODE)
        atomic_write(pki / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), _CERT_MODE)
    if has[NODE_KEY] and has[NODE_CERT]:
        return
    ca_key = _read_key(pki / CA_KEY)
    ca_cert = _read_cert(pki / CA_CERT)
    # Remove the old certificate first so a reader without the lock never sees
    # the new key beside a certificate for the old one.
    (pki / NODE_CERT).unlink(missing_ok=True)
    signing_key = generate_key()
    cert = issue_signing_cert(ca_key, ca_cert, signing_key.public_key(), f"tvorch node signing {hostname}", now)
    atomic_write(pki / NODE_KEY, _key_pem(signing_key), _KEY_MODE)
    atomic_write(pki / NODE_CERT, cert.public_bytes(serialization.Encoding.PEM), _CERT_MODE)


def _load(pki: Path) -> NodeIdentity:
    ca_cert = _read_cert(pki / CA_CERT)
    identity = NodeIdentity(
        ca_cert=ca_cert,
        ca_key=_read_key(pki / CA_KEY),
        signing_key=_read_key(pki / NODE_KEY),
        signing_cert=_read_cert(pki / NODE_CERT),
        chain=_read_chain(pki, ca_cert),
    )
    if identity.ca_key.public_key() != identity.ca_cert.public_key():
        raise TrustError(f"{pki / CA_KEY} does not match {pki / CA_CERT}")
    if identity.signing_key.public_key() != identity.signing_cert.public_key():
        raise TrustError(f"{pki / NODE_KEY} does not match {pki / NODE_CERT}")
    verify_chain(identity.signing_cert, identity.ca_cert, datetime.now(timezone.utc), purpose=DOCUMENT_SIGNING)
    return identity


def _read_chain(pki: Path, ca_cert: x509.Certificate) -> tuple[x509.Certificate, ...]:
    """The chain above CA_CERT from chain.pem; none for a self-signed CA.

    ``install_ca`` writes chain.pem before ca.pem: a chain beside a
    self-signed ca.pem is what a crash between the two leaves, and is not
    used; a chain that does not lead from an installed ca.pem is refused.
    It is checked at the latest start of its certificates' validity, not now:
    an intermediate that expires later makes the node's evidence fail to
    verify (and `tvorch ca show` says so), but does not stop the node.
    """
    path = pki / CHAIN
    if is_self_signed(ca_cert) or not path.exists():
        return ()
    try:
        certs = tuple(x509.load_pem_x509_certificates(path.read_bytes()))
    except ValueError as err:
        raise TrustError(f"{path} is not PEM certificates: {err}") from None
    try:
        if ca_path(ca_cert, certs, max(c.not_valid_before_utc for c in (ca_cert, *certs))) != certs:
            raise TrustError("it holds certificates off the path")
    except TrustError as err:
        raise TrustError(f"{path} does not lead from {pki / CA_CERT} to a root ({err}); "
                         f"run `tvorch ca install` again") from None
    return certs


def request(state_dir: Path, hostname: str) -> x509.CertificateSigningRequest:
    """A PKCS#10 request for the node CA key (``core.chain.ca_request``), for the fleet's CA to sign."""
    identity = load_or_create(state_dir, hostname)
    return ca_request(identity.ca_key, identity.ca_cert.subject)


def install_ca(state_dir: Path, hostname: str, cert: x509.Certificate,
               chain: tuple[x509.Certificate, ...], at: datetime) -> NodeIdentity:
    """Replace the node CA certificate with CERT, issued by the fleet through CHAIN; the identity after.

    Checked by ``core.chain.check_node_ca`` before anything is written; then
    chain.pem (the path above CERT, root last) and ca.pem are each replaced
    atomically, under the lock that guards their making. Installing the same
    certificate again is a no-op that succeeds.
    """
    identity = load_or_create(state_dir, hostname)
    pki = state_dir / PKI_DIR
    fd = os.open(pki / _LOCK, os.O_RDWR | os.O_CREAT, _KEY_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = check_node_ca(cert, chain, identity.ca_cert, at)
        atomic_write(pki / CHAIN, pem_list(path), _CERT_MODE)
        atomic_write(pki / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), _CERT_MODE)
        return _load(pki)
    finally:
        os.close(fd)


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise TrustError(f"{path} is readable by others (mode {mode:04o}); it must be 0600")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise TrustError(f"{path} is not an unencrypted PEM private key: {err}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TrustError(f"{path} is not an ECDSA key")
    return key


def _read_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise TrustError(f"{path} is not a PEM certificate: {err}") from None


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
