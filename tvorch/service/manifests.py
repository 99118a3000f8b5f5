"""Launch manifests: issue one signed by the node key, show and verify them."""

from __future__ import annotations

import socket
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509

from ..adapters.node_keys import NodeIdentity, load_or_create
from ..adapters.store import utc_now
from ..config import Config
from ..core.canonical import config_digest
from ..core.domain_xml import render_domain_xml
from ..core.manifest import LaunchManifest, sign_manifest, verify_manifest
from ..core.spec import DomainSpec
from ..errors import InputError, NotFoundError
from .node import Node
from .measure import Measured


def node_identity(cfg: Config) -> NodeIdentity:
    return load_or_create(Path(cfg.state_dir), socket.gethostname())


def issue_manifest(cfg: Config, spec: DomainSpec, measured: Measured) -> bytes:
    """Sign what was measured, with the digest of the configuration SPEC renders to."""
    identity = node_identity(cfg)
    manifest = LaunchManifest(
        instance_id=spec.instance_id,
        uuid=spec.uuid,
        name=spec.name,
        node=socket.gethostname(),
        created_at=utc_now(),
        measurements=measured.measurements,
        config_digest=config_digest(render_domain_xml(spec)),
        policy_digest=measured.policy_digest,
    )
    return sign_manifest(manifest, identity.signing_key, identity.signing_cert)


def manifest_of(node: Node, name: str) -> bytes:
    record = node.store.get_live(name)
    body = node.store.manifest(record.id)
    if body is None:
        raise NotFoundError(f"instance '{name}' has no launch manifest")
    return body


def verify_file(path: str, ca_path: str) -> LaunchManifest:
    try:
        body = Path(path).read_bytes()
        ca_pem = Path(ca_path).read_bytes()
    except OSError as err:
        raise InputError(f"cannot read {err.filename}: {err.strerror}") from None
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise InputError(f"{ca_path} is not a PEM certificate") from None
    return verify_manifest(body, ca, datetime.now(timezone.utc))
