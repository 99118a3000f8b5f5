"""Certifying a guest's attestation key (AK) against the vTPM's EK, and the node's statement of it.

Pure: bytes in, dataclasses out; tpm2-pytss is used for (un)marshalling and
its software MakeCredential, never for a TPM session.

Why credential activation: a quote is only worth the key that signed it. The
node CA issued the vTPM's EK certificate, so the EK is known; the AK is
whatever the guest agent reports. The node encrypts a random secret to that
EK, bound to the AK's name (``make_credential``); only the TPM holding the EK
releases it, and only while the named key is loaded in it
(TPM2_ActivateCredential). A guest that returns the secret has proved the AK
lives in that vTPM. Before that, ``check_ak_public`` refuses a key whose
attributes would let a quote be forged (not restricted, or able to leave the
TPM), and ``ek_matches_certificate`` that the EK public key is the one the
node certified: a credential to any other EK proves nothing.

The node then records the result as a statement signed with its signing key
(``sign_ak_certification``): a JSON object, every value a string::

    {
      "format": "tvorch-ak-certification", "version": 1,
      "instance_id": "i-...", "uuid": "<libvirt UUID>",
      "ek_fingerprint": "<hex sha256 of the EK's SubjectPublicKeyInfo>",
      "ek_cert_sha256": "<hex sha256 of the EK certificate, DER>",
      "ak_public": "<base64 of the AK's TPM2B_PUBLIC>",
      "ak_name": "<hex of the AK's TPM name>",
      "method": "credential-activation",
      "certified_at": "2025-03-01T12:00:00.000+00:00",
      "signature": "<base64 DER ECDSA-P256-SHA256 over the canonical JSON of all other fields>"
    }

"format" keeps the node key's signatures on different documents apart.

The host's AK is certified the same way at ``tvorch host init``: a
credential made for the host TPM's EK (as the TPM derives it from its EK
template) and the AK's name, activated by that TPM; the node then signs a
``tvorch-host-ak-certification`` (``sign_host_ak_certification``)::

    {
      "format": "tvorch-host-ak-certification", "version": 1,
      "hostname": "compute-7",
      "ek_public": "<base64 of the host EK's TPM2B_PUBLIC>",   # for a check against its maker's EK certificate
      "ak_public": "<base64 of the host AK's TPM2B_PUBLIC>", "ak_name": "<hex>",
      "method": "credential-activation", "certified_at": "<UTC>", "signature": "<base64 ...>"
    }

A verifier then knows the host quote's AK is the one the node found in the
TPM whose EK is named, not a key the node made up afterwards.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_NAME, TPM2B_PUBLIC
from tpm2_pytss.utils import make_credential as _tss_make_credential

from tvorch.core.codec import b64decode, b64encode, canonical_json, key_mismatch
from tvorch.core.vtpm.ekcert import ek_fingerprint
from tvorch.core.attestation.quote import ak_key, ak_name, crypto_key, parse_public
from tvorch.core.timestamps import parse_utc
from tvorch.errors import EvidenceError, InputError, TrustError, TvorchError

AK_CERT_FORMAT = "tvorch-ak-certification"
AK_CERT_VERSION = 1
METHOD = "credential-activation"

# Each attribute and what its absence would allow.
_AK_ATTRIBUTES = (
    (TPMA_OBJECT.RESTRICTED, "restricted"),  # signs outside data posing as a quote
    (TPMA_OBJECT.SIGN_ENCRYPT, "sign"),  # is no signing key at all
    (TPMA_OBJECT.FIXEDTPM, "fixedTPM"),  # may be duplicated to another TPM
    (TPMA_OBJECT.FIXEDPARENT, "fixedParent"),  # may be moved under another parent
    (TPMA_OBJECT.SENSITIVEDATAORIGIN, "sensitiveDataOrigin"),  # private key imported: known outside
)
_EK_REQUIRED = TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT | TPMA_OBJECT.FIXEDTPM
# Digest sizes of the name algorithms a credential may bind (SHA-1 names are refused).
_NAME_ALGORITHMS = {TPM2_ALG.SHA256: 32, TPM2_ALG.SHA384: 48, TPM2_ALG.SHA512: 64}
_FIELDS = ("format", "version", "instance_id", "uuid", "ek_fingerprint", "ek_cert_sha256", "ak_public",
           "ak_name", "method", "certified_at", "signature")
HOST_AK_CERT_FORMAT = "tvorch-host-ak-certification"
_HOST_FIELDS = ("format", "version", "hostname", "ek_public", "ak_public", "ak_name", "method", "certified_at",
                "signature")


def check_ak_public(ak_public: bytes) -> None:
    """TrustError unless AK_PUBLIC is a restricted, fixedTPM, fixedParent, TPM-generated signing key."""
    public = parse_public(ak_public, "AK public")
    attrs = int(public.objectAttributes)
    lacking = [name for flag, name in _AK_ATTRIBUTES if not attrs & flag]
    if lacking:
        raise TrustError(f"AK public key lacks {', '.join(lacking)} (attributes {public.objectAttributes})")
    if attrs & TPMA_OBJECT.DECRYPT:
        raise TrustError("AK public key is also a decryption key: an AK only signs")
    if public.nameAlg not in _NAME_ALGORITHMS:
        raise TrustError(f"AK name algorithm 0x{int(public.nameAlg):x} is not SHA-256/384/512")
    ak_key(ak_public)  # RSA or ECC, and usable by cryptography


def ek_matches_certificate(ek_public: bytes, cert: x509.Certificate) -> bool:
    """Whether the EK in EK_PUBLIC (TPM2B_PUBLIC) is the key CERT certifies; EvidenceError for bad bytes."""
    public = parse_public(ek_public, "EK public")
    try:
        key = serialization.load_der_public_key(public.to_der())
        certified = cert.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise EvidenceError(f"EK public key cannot be used: {err}") from None
    # Public keys compare by value (RSA modulus and exponent, EC curve and point).
    return bool(type(key) is type(certified) and key == certified)


def make_credential(ek_public: bytes, ak_name: bytes, secret: bytes) -> tuple[bytes, bytes]:
    """SECRET encrypted to the EK and bound to the AK named AK_NAME, in software.

    Returns the marshaled TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET that
    TPM2_ActivateCredential takes. The caller must first check that EK_PUBLIC
    is the certified EK (``ek_matches_certificate``).
    """
    public = parse_public(ek_public, "EK public")
    if int(public.objectAttributes) & _EK_REQUIRED != _EK_REQUIRED:
        raise TrustError(f"EK public key is not a restricted decryption key (attributes {public.objectAttributes})")
    size = _NAME_ALGORITHMS.get(public.nameAlg)
    if size is None:
        raise TrustError(f"EK name algorithm 0x{int(public.nameAlg):x} is not SHA-256/384/512")
    if not 0 < len(secret) <= size:
        raise InputError(f"credential secret is {len(secret)} bytes; the EK takes 1 to {size}")
    _check_name(ak_name)
    try:
        blob, encrypted = _tss_make_credential(TPM2B_PUBLIC(publicArea=public), secret, TPM2B_NAME(ak_name))
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise EvidenceError(f"cannot make a credential for this EK: {err}") from None
    return blob.marshal(), encrypted.marshal()


@dataclass(frozen=True, kw_only=True)
class AkCertification:
    """The node's word that this AK lives in this instance's vTPM (see the module docstring)."""

    instance_id: str
    uuid: str
    ek_fingerprint: str  # hex, tvorch.core.vtpm.ekcert.ek_fingerprint
    ek_cert_sha256: str  # hex sha256 of the EK certificate's DER
    ak_public: bytes  # TPM2B_PUBLIC, marshaled
    ak_name: bytes  # TPM name of ak_public
    method: str = METHOD
    certified_at: str  # UTC ISO-8601

    def to_fields(self) -> dict[str, Any]:
        """The signed fields, JSON-ready."""
        return {
            "format": AK_CERT_FORMAT, "version": AK_CERT_VERSION,
            "instance_id": self.instance_id, "uuid": self.uuid,
            "ek_fingerprint": self.ek_fingerprint, "ek_cert_sha256": self.ek_cert_sha256,
            "ak_public": b64encode(self.ak_public), "ak_name": self.ak_name.hex(),
            "method": self.method, "certified_at": self.certified_at,
        }


@dataclass(frozen=True, kw_only=True)
class HostAkCertification:
    """The node's word that this AK lives in the host TPM whose EK is EK_PUBLIC (see the module docstring)."""

    hostname: str
    ek_public: bytes  # the host EK's TPM2B_PUBLIC, marshaled
    ak_public: bytes  # TPM2B_PUBLIC, marshaled
    ak_name: bytes  # TPM name of ak_public
    method: str = METHOD
    certified_at: str  # UTC ISO-8601

    @property
    def ek_fingerprint(self) -> str:
        """Hex sha256 of the EK's SubjectPublicKeyInfo (tvorch.core.vtpm.ekcert.ek_fingerprint)."""
        return ek_fingerprint(_ek_key(self.ek_public))

    def to_fields(self) -> dict[str, Any]:
        return {
            "format": HOST_AK_CERT_FORMAT, "version": AK_CERT_VERSION, "hostname": self.hostname,
            "ek_public": b64encode(self.ek_public),
            "ak_public": b64encode(self.ak_public), "ak_name": self.ak_name.hex(),
            "method": self.method, "certified_at": self.certified_at,
        }


def sign_ak_certification(cert: AkCertification, key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    """CERT as its JSON object, signed with the node's signing KEY; refuses a statement that would not verify."""
    _check_content(cert)
    return _signed(cert.to_fields(), key)


def sign_host_ak_certification(cert: HostAkCertification, key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    """The host AK's statement, signed with the node's signing KEY; refuses one that would not verify."""
    _check_host_content(cert)
    return _signed(cert.to_fields(), key)


def verify_ak_certification(obj: object, signer_public_key: ec.EllipticCurvePublicKey) -> AkCertification:
    """The statement in OBJ if SIGNER_PUBLIC_KEY signed exactly it; TrustError on any change or malformation."""
    fields = _verified(obj, _FIELDS, AK_CERT_FORMAT, "AK certification", signer_public_key)
    cert = AkCertification(
        instance_id=fields["instance_id"], uuid=fields["uuid"], ek_fingerprint=fields["ek_fingerprint"],
        ek_cert_sha256=fields["ek_cert_sha256"], ak_public=_b64(fields["ak_public"], "ak_public"),
        ak_name=_unhex_name(fields["ak_name"], "AK certification"), certified_at=fields["certified_at"],
        method=fields["method"],
    )
    _check_content(cert)
    return cert


def verify_host_ak_certification(obj: object, signer_public_key: ec.EllipticCurvePublicKey) -> HostAkCertification:
    """The host AK statement in OBJ if SIGNER_PUBLIC_KEY signed exactly it; TrustError otherwise."""
    what = "host AK certification"
    fields = _verified(obj, _HOST_FIELDS, HOST_AK_CERT_FORMAT, what, signer_public_key)
    cert = HostAkCertification(
        hostname=fields["hostname"], ek_public=_b64(fields["ek_public"], "ek_public", what),
        ak_public=_b64(fields["ak_public"], "ak_public", what), ak_name=_unhex_name(fields["ak_name"], what),
        certified_at=fields["certified_at"], method=fields["method"],
    )
    _check_host_content(cert)
    return cert


def _signed(fields: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    signature = key.sign(canonical_json(fields), ec.ECDSA(hashes.SHA256()))
    return {**fields, "signature": b64encode(signature)}


def _verified(obj: object, names: tuple[str, ...], fmt: str, what: str,
              signer_public_key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    """OBJ's fields if it has exactly NAMES, is FMT, and SIGNER_PUBLIC_KEY signed it; TrustError naming WHAT."""
    if not isinstance(obj, dict):
        raise TrustError(f"{what} is not a JSON object")
    if (wrong := key_mismatch(obj, names)) is not None:
        raise TrustError(f"{what} fields wrong: {wrong}")
    if obj["format"] != fmt or obj["version"] != AK_CERT_VERSION or type(obj["version"]) is not int:
        raise TrustError(f"{what} is not a {fmt} version {AK_CERT_VERSION}")
    for name in names[2:]:
        if not isinstance(obj[name], str) or not obj[name]:
            raise TrustError(f"{what} field {name!r} is not a non-empty string")
    signature = _b64(obj["signature"], "signature", what)
    fields = {k: v for k, v in obj.items() if k != "signature"}
    if not isinstance(signer_public_key, ec.EllipticCurvePublicKey):
        raise TrustError("the node signing key is not an ECDSA key")
    try:
        signer_public_key.verify(signature, canonical_json(fields), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise TrustError(f"{what} signature does not verify with the node signing key") from None
    return fields


def _unhex_name(value: str, what: str) -> bytes:
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise TrustError(f"{what} field 'ak_name' is not hex") from None


def ek_cert_sha256(cert: x509.Certificate) -> str:
    """Hex sha256 of the certificate's DER: what the manifest's vtpm-ek measurement holds."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _check_content(cert: AkCertification) -> None:
    """What must hold of a statement whoever signed it; TrustError naming the first thing wrong."""
    for name in ("ek_fingerprint", "ek_cert_sha256"):
        value = getattr(cert, name)
        if len(value) != 64 or value.strip("0123456789abcdef"):
            raise TrustError(f"AK certification field {name!r} is not a sha256 hex digest")
    _check_ak("AK certification", cert.method, cert.certified_at, cert.ak_public, cert.ak_name)


def _check_host_content(cert: HostAkCertification) -> None:
    what = "host AK certification"
    if not cert.hostname:
        raise TrustError(f"{what} names no host")
    public = parse_public(cert.ek_public, "host EK public")
    if int(public.objectAttributes) & _EK_REQUIRED != _EK_REQUIRED:
        raise TrustError(f"{what}: the EK is not a restricted decryption key (attributes {public.objectAttributes})")
    _ek_key(cert.ek_public)
    _check_ak(what, cert.method, cert.certified_at, cert.ak_public, cert.ak_name)


def _check_ak(what: str, method: str, certified_at: str, public: bytes, name: bytes) -> None:
    """The method, time and AK of a statement, guest's or host's."""
    if method != METHOD:
        raise TrustError(f"{what} method {method!r} is not {METHOD!r}")
    if parse_utc(certified_at) is None:
        raise TrustError(f"{what} time {certified_at!r} is not a UTC ISO-8601 time")
    try:
        check_ak_public(public)
        actual = ak_name(public)
    except TvorchError as err:
        raise TrustError(f"{what} names an unusable AK: {err}") from None
    if actual != name:
        raise TrustError(f"{what}'s ak_name is not the name of its ak_public")


def _ek_key(ek_public: bytes) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    """The EK's public key for cryptography; EvidenceError when it cannot be one."""
    return crypto_key(parse_public(ek_public, "EK public"), "EK")


def _check_name(name: bytes) -> None:
    if len(name) < 2 or _NAME_ALGORITHMS.get(int.from_bytes(name[:2], "big")) != len(name) - 2:
        raise InputError("AK name is not a SHA-256/384/512 TPM name (2-byte algorithm id, then the digest)")


def _b64(value: str, field: str, what: str = "AK certification") -> bytes:
    return b64decode(value, f"{what} field {field!r}", TrustError)
