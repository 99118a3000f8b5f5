"""Reference values: what the operator trusts (`tvorch image ...`, `tvorch reference ...`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509

from ..adapters import imagefiles
from ..core.launch.image_signature import decode_signature, verify_image_signature
from ..core.launch.images import UNSAFE_IMAGE_POLICIES, layer_writers
from ..core.launch.references import REFERENCE_KINDS, ReferenceValue
from ..core.timestamps import utc_now
from ..errors import InputError, NotFoundError, TrustError
from .manifests import read_chain
from .node import Node
from .measure import file_measurement


@dataclass(frozen=True)
class Trusted:
    reference: ReferenceValue
    added: bool  # False when it was trusted already
    # Who besides root can change the layer (core.launch.images.layer_writers): said, not refused, here.
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {**self.reference.to_json(), "added": self.added, "warnings": list(self.warnings)}


def _read_cert(path: str, what: str) -> x509.Certificate:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise InputError(f"cannot read {what} {path}: {err.strerror}") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        try:
            return x509.load_der_x509_certificate(data)
        except ValueError:
            raise InputError(f"{what} {path} is not a PEM or DER X.509 certificate") from None


def trust_image(
    node: Node, image: str, label: str | None, signature: str | None, cert: str | None, rehash: bool,
    intermediates_path: str | None = None,
) -> list[Trusted]:
    """Trust every layer of IMAGE's backing chain (base first).

    With a detached signature the image must be a single file: a signature
    over the top layer says nothing about the layers below it. INTERMEDIATES_PATH
    (a PEM file, `--chain`) holds the certificates between the signer and the
    image signing CA.
    """
    if (signature is None) != (cert is None):
        raise InputError("refused: --signature and --cert go together")
    if intermediates_path is not None and signature is None:
        raise InputError("refused: --chain goes with --signature and --cert")
    chain = imagefiles.inspect_image(image, node.cfg.max_backing_depth)
    signer: str | None = None
    if signature is not None and cert is not None:
        if len(chain.layers) > 1:
            raise InputError(f"refused --signature for {image}: it has backing files; sign a flattened image")
        if not node.cfg.policy.image_signing_ca:
            raise TrustError("refused --signature: no image signing CA configured (policy.image_signing_ca)")
        ca = _read_cert(node.cfg.policy.image_signing_ca, "image signing CA")
        intermediates = read_chain(intermediates_path)
        try:
            sig = decode_signature(Path(signature).read_bytes())
        except OSError as err:
            raise InputError(f"cannot read signature {signature}: {err.strerror}") from None
    out: list[Trusted] = []
    layers = [file_measurement(node.store, "image-layer", layer.path, rehash) for layer in chain.layers]
    if signature is not None and cert is not None:
        signer = verify_image_signature(layers[0].digest, sig, _read_cert(cert, "certificate"), ca,
                                        datetime.now(timezone.utc), intermediates)
    for layer, measured in zip(chain.layers, layers):
        ref = ReferenceValue(
            kind="image", digest=measured.digest, label=label or os.path.basename(measured.path or ""),
            path=measured.path or "", size=measured.size or 0, signer=signer, added_at=utc_now(),
        )
        refused = UNSAFE_IMAGE_POLICIES[node.cfg.policy.unsafe_image_files]
        warnings = tuple(f"{text}: launch {'refuses' if kind in refused else 'warns about'} it "
                         "(policy.unsafe_image_files)" for kind, text in layer_writers(layer))
        out.append(dataclasses.replace(_record(node, ref), warnings=warnings))
    return out


def _record(node: Node, ref: ReferenceValue) -> Trusted:
    """Store REF; when its digest is trusted already, report what is stored (label, signer) instead."""
    if node.store.add_reference(ref):
        return Trusted(ref, True)
    stored = next(r for r in node.store.references(ref.kind) if r.digest == ref.digest)
    return Trusted(stored, False)


def add_reference(node: Node, kind: str, path: str, label: str | None, rehash: bool) -> Trusted:
    if kind not in REFERENCE_KINDS:
        raise InputError(f"refused kind {kind!r}: one of {', '.join(REFERENCE_KINDS)}")
    if kind == "image":
        raise InputError("refused kind 'image': use `tvorch image trust`, which checks the backing chain")
    if not Path(path).is_file():
        raise InputError(f"refused {path}: not a regular file")
    m = file_measurement(node.store, kind, path, rehash)
    ref = ReferenceValue(kind=kind, digest=m.digest, label=label or os.path.basename(m.path or ""),
                         path=m.path or "", size=m.size or 0, signer=None, added_at=utc_now())
    return _record(node, ref)


@dataclass(frozen=True)
class Removed:
    reference: ReferenceValue
    removed_at: str | None  # None: removed by this call; else when an earlier removal took it away

    def to_json(self) -> dict[str, object]:
        return {**self.reference.to_json(), "removed": self.removed_at is None,
                "already_removed_at": self.removed_at}


def remove_reference(node: Node, kind: str, digest_or_path: str) -> Removed:
    """Forget one trusted digest, named by its hex or by a file that has it.

    Idempotent for a controller that retries: a digest removed before (the
    store keeps a tombstone of each removal) is reported as already gone; a
    digest this store never trusted is not found.
    """
    digest = digest_or_path.lower().removeprefix("sha256:")  # the form tvorch prints
    if not (len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        if not Path(digest_or_path).is_file():
            raise InputError(f"refused {digest_or_path!r}: neither a SHA-256 hex digest nor a file")
        digest = file_measurement(node.store, kind, digest_or_path, rehash=False).digest
    match = [r for r in node.store.references(kind) if r.digest == digest]
    if match and node.store.remove_reference(kind, digest):
        return Removed(match[0], None)
    gone = node.store.removed_reference(kind, digest)  # a concurrent removal is a retry too
    if gone is None:
        raise NotFoundError(f"no trusted {kind} with digest {digest}")
    return Removed(*gone)
