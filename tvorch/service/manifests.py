"""Launch manifests: issue one signed by the node key, show and verify them."""

from __future__ import annotations

import socket
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509

from ..adapters.files import read_bounded
from ..adapters.node_keys import NodeIdentity, load_or_create
from ..config import Config
from ..core.launch.manifest import BootPredictionRecord, LaunchManifest, sign_manifest, verify_manifest
from ..core.launch.spec import DomainSpec
from ..core.timestamps import utc_now
from ..errors import InputError, NotFoundError
from .node import Node
from .measure import Measured


def node_identity(cfg: Config) -> NodeIdentity:
    return load_or_create(Path(cfg.state_dir), socket.gethostname())


def issue_manifest(cfg: Config, spec: DomainSpec, measured: Measured, launched_config: str,
                   boot_prediction: BootPredictionRecord | None = None) -> bytes:
    """Sign what was measured, with LAUNCHED_CONFIG (the canonical digest of the XML SPEC renders to) and the
    boot prediction."""
    identity = node_identity(cfg)
    manifest = LaunchManifest(
        instance_id=spec.instance_id,
        uuid=spec.uuid,
        name=spec.name,
        node=socket.gethostname(),
        created_at=utc_now(),
        measurements=measured.measurements,
        config_digest=launched_config,
        policy_digest=measured.policy_digest,
        boot_prediction=boot_prediction,
    )
    return sign_manifest(manifest, identity.signing_key, identity.signing_cert, identity.carried_chain())


def manifest_of(node: Node, name: str) -> bytes:
    record = node.store.get_live(name)
    body = node.store.manifest(record.id)
    if body is None:
        raise NotFoundError(f"instance '{name}' has no launch manifest")
    return body


def read_with_ca(path: str, ca_path: str, limit: int) -> tuple[bytes, x509.Certificate]:
    """A document to verify (at most LIMIT bytes) and the CA certificate (PEM) to verify it with."""
    try:
        body = read_bounded(path, limit)
        ca_pem = read_bounded(ca_path, 1024 * 1024)
    except OSError as err:
        raise InputError(f"cannot read {err.filename}: {err.strerror or err}") from None
    try:
        return body, x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise InputError(f"{ca_path} is not a PEM certificate") from None


def read_chain(chain_path: str | None) -> tuple[x509.Certificate, ...]:
    """The intermediates a verifier adds (`--chain`, e.g. `tvorch ca show --chain --pem` of the node)."""
    if chain_path is None:
        return ()
    try:
        data = read_bounded(chain_path, 1024 * 1024)
    except OSError as err:
        raise InputError(f"cannot read {chain_path}: {err.strerror or err}") from None
    try:
        return tuple(x509.load_pem_x509_certificates(data))
    except ValueError:
        raise InputError(f"{chain_path} is not PEM certificates") from None


def verify_file(path: str, ca_path: str, chain_path: str | None = None) -> LaunchManifest:
    body, ca = read_with_ca(path, ca_path, 16 * 1024 * 1024)
    return verify_manifest(body, ca, datetime.now(timezone.utc), read_chain(chain_path))
