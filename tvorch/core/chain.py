"""Certificate paths for a fleet: from a leaf's issuer up to one root, through carried intermediates.

Why: a fleet has one root over every node CA and every image signer. A
verifier keeps only that root; the evidence carries the rest (the node CA and
the intermediates above it), the way a TLS peer sends its chain. The path is
found by name and proved by signature, link by link, with the few RFC 5280
rules that matter here (the issuer is a CA allowed to sign certificates, valid
at the time, and its pathLenConstraint admits the CAs below it). Like
``tvorch.core.signing`` (whose docstring says why) it is checked by hand, and
every refusal names the link that broke: ``'child' <- 'issuer'``.

Also here, because it is the same knowledge: the request a node sends the
fleet's CA (``ca_request``) and what a certificate must be to replace the
node's self-signed CA (``check_node_ca``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tvorch.core.signing import _extension, key_usage
from tvorch.errors import TrustError

# More links than any fleet needs (root, one or two intermediates, node CA): a bound on a hostile chain.
MAX_PATH = 8


def name_of(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


def is_self_signed(cert: x509.Certificate) -> bool:
    """Issued by itself: the same name and a signature its own key verifies."""
    return cert.issuer == cert.subject and _signed_by(cert, cert)


def issuer_under(
    leaf: x509.Certificate, anchor: x509.Certificate, untrusted: Sequence[x509.Certificate], at: datetime
) -> x509.Certificate:
    """The certificate that issued LEAF, once the path from it up to ANCHOR is checked.

    ANCHOR is what the verifier trusts (the fleet root, or a node's own CA as
    before fleets). A LEAF that names ANCHOR as its issuer gets ANCHOR back
    unchecked, and so does one whose issuer UNTRUSTED does not hold or holds
    only self-signed (a node outside any fleet): the caller's own check of
    the leaf against ANCHOR (``signing.verify_chain``, ``ekcert``) then says
    what is wrong in the words it always has. Otherwise every link from the
    issuer in UNTRUSTED (carried by the evidence, or given by the verifier)
    up to ANCHOR must hold; TrustError names the first that does not.
    """
    try:
        issuers = [c for c in untrusted if c.subject == leaf.issuer]
        if leaf.issuer == anchor.subject or all(is_self_signed(c) for c in issuers):
            return anchor
    except ValueError as err:  # cryptography parses names lazily
        raise TrustError(f"a certificate is malformed: {err}") from None
    return ca_path(leaf, untrusted, at, anchor)[0]


def ca_path(
    leaf: x509.Certificate,
    untrusted: Sequence[x509.Certificate],
    at: datetime,
    anchor: x509.Certificate | None = None,
) -> tuple[x509.Certificate, ...]:
    """The CA certificates above LEAF, its issuer first, up to ANCHOR (or, without one, a self-signed root).

    Each is checked as an issuer at AT: CA, keyCertSign, valid, and a path
    length that admits the CAs below it. Without ANCHOR the path must end at
    a self-signed certificate of UNTRUSTED whose own signature verifies.
    """
    if at.tzinfo is None:
        raise ValueError("a timezone-aware datetime is required")
    try:
        return _ca_path(leaf, untrusted, at, anchor)
    except ValueError as err:  # cryptography parses names and extensions lazily
        raise TrustError(f"a certificate is malformed: {err}") from None


def _ca_path(
    leaf: x509.Certificate, untrusted: Sequence[x509.Certificate], at: datetime, anchor: x509.Certificate | None
) -> tuple[x509.Certificate, ...]:
    path: list[x509.Certificate] = []
    child = leaf
    for depth in range(MAX_PATH):
        if child is not leaf and is_self_signed(child):
            if anchor is None:
                return tuple(path)
            raise TrustError(f"certificate path link '{name_of(child)}': a self-signed root that is not the "
                             f"root given ('{name_of(anchor)}')")
        parent = _issuer_of(child, untrusted, anchor)
        _check_issuer(parent, child, depth, at)
        path.append(parent)
        if anchor is not None and _same(parent, anchor):
            return tuple(path)
        child = parent
    raise TrustError(f"certificate path from '{name_of(leaf)}' is longer than {MAX_PATH} certificates")


def _issuer_of(
    child: x509.Certificate, untrusted: Sequence[x509.Certificate], anchor: x509.Certificate | None
) -> x509.Certificate:
    issuer = child.issuer.rfc4514_string()
    named = [c for c in untrusted if c.subject == child.issuer and not _same(c, child)]
    # The anchor first; a self-signed certificate of the name last: with the same key as a fleet-issued
    # one (a node CA before and after `ca install`) it also verifies, but leads to no other root.
    named.sort(key=is_self_signed)
    if anchor is not None and anchor.subject == child.issuer and not _same(anchor, child):
        named.insert(0, anchor)
    for candidate in named:
        if _signed_by(child, candidate):
            return candidate
    link = f"certificate path link '{name_of(child)}' <- '{issuer}'"
    if named:
        raise TrustError(f"{link}: not signed by the key of the certificate of that name (a wrong intermediate)")
    if anchor is None:
        raise TrustError(f"{link}: the issuer is not in the chain")
    raise TrustError(f"{link}: the issuer is neither the root given ('{name_of(anchor)}') nor in the chain")


def _check_issuer(parent: x509.Certificate, child: x509.Certificate, depth: int, at: datetime) -> None:
    """That PARENT may have issued CHILD, with DEPTH CA certificates between CHILD and the leaf included."""
    link = f"certificate path link '{name_of(child)}' <- '{name_of(parent)}'"
    constraints = _extension(parent, x509.BasicConstraints)
    usage = _extension(parent, x509.KeyUsage)
    if constraints is None or not constraints.ca:
        raise TrustError(f"{link}: the issuer is not a CA (no BasicConstraints CA=true)")
    if usage is None or not usage.key_cert_sign:
        raise TrustError(f"{link}: the issuer may not sign certificates (no keyCertSign)")
    if at < parent.not_valid_before_utc:
        raise TrustError(f"{link}: the issuer is not valid before {parent.not_valid_before_utc.isoformat()}")
    if at > parent.not_valid_after_utc:
        raise TrustError(f"{link}: the issuer expired at {parent.not_valid_after_utc.isoformat()}")
    if constraints.path_length is not None and constraints.path_length < depth:
        raise TrustError(f"{link}: the issuer's pathlen {constraints.path_length} admits fewer CAs below it "
                         f"than the {depth} on this path")


def ca_request(ca_key: ec.EllipticCurvePrivateKey, subject: x509.Name) -> x509.CertificateSigningRequest:
    """A PKCS#10 request for the node CA key, as the node CA it is: CA with pathlen 0, keyCertSign and cRLSign.

    The subject is the node CA's own: every certificate the node issued names
    it as issuer, so the fleet's certificate must keep it.
    """
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def check_node_ca(
    cert: x509.Certificate, chain: Sequence[x509.Certificate], current: x509.Certificate, at: datetime
) -> tuple[x509.Certificate, ...]:
    """What CERT must be to replace the node CA CURRENT; the path above it through CHAIN, root last.

    Same key and subject as CURRENT (so every manifest, EK and platform
    certificate issued before still names and is signed by it), a CA with
    pathlen 0 allowed to sign certificates, valid at AT, a subject key
    identifier (if any) that is the key's (the authority key identifier of
    those certificates), and a path through CHAIN to a self-signed root.
    """
    what = f"certificate '{name_of(cert)}'"
    if cert.public_key() != current.public_key():
        raise TrustError(f"{what} is not for the node CA key (its public key is another)")
    if cert.subject != current.subject:
        raise TrustError(f"{what} does not keep the node CA's subject '{name_of(current)}' that the certificates "
                         f"it issued name as their issuer")
    if is_self_signed(cert):
        raise TrustError(f"{what} is self-signed: install the certificate the fleet's CA issued from the request")
    try:
        constraints = _extension(cert, x509.BasicConstraints)
        usage = _extension(cert, x509.KeyUsage)
        ski = _extension(cert, x509.SubjectKeyIdentifier)
    except ValueError as err:
        raise TrustError(f"{what} is malformed: {err}") from None
    if constraints is None or not constraints.ca or constraints.path_length != 0:
        shown = "none" if constraints is None else f"CA={constraints.ca}, pathlen {constraints.path_length}"
        raise TrustError(f"{what} is not a CA with pathlen 0 (BasicConstraints: {shown})")
    if usage is None or not usage.key_cert_sign:
        raise TrustError(f"{what} may not sign certificates (no keyCertSign)")
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise TrustError(f"{what} is not valid now (valid {cert.not_valid_before_utc.isoformat()} .. "
                         f"{cert.not_valid_after_utc.isoformat()})")
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)  # it is the node CA key
    if ski is not None and ski.digest != x509.SubjectKeyIdentifier.from_public_key(public).digest:
        raise TrustError(f"{what} has a subject key identifier other than the key's SHA-1 (RFC 5280 method 1) "
                         f"that the certificates it issued name")
    return ca_path(cert, chain, at)


def pem_list(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _signed_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(issuer)
    except (InvalidSignature, TypeError, ValueError):  # ValueError: names differ; TypeError: a key type that can't sign
        return False
    return True


def _same(a: x509.Certificate, b: x509.Certificate) -> bool:
    return a.public_bytes(serialization.Encoding.DER) == b.public_bytes(serialization.Encoding.DER)
