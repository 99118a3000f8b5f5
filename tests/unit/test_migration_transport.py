"""Checking a transport key's certification, on bytes: TPM structures built with tpm2-pytss, signed in software.

Each refusal is exercised by certifying, with a genuine-looking AK signature,
exactly the thing that must be refused; the real TPM side is in
tests/integration/test_tpm_transport.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from tpm2_pytss.constants import TPM2_ALG, TPM2_GENERATED, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_ECC_PARAMETER,
    TPM2B_NAME,
    TPM2B_PUBLIC,
    TPMS_ATTEST,
    TPMS_CERTIFY_INFO,
    TPMS_CLOCK_INFO,
    TPMS_QUOTE_INFO,
    TPMS_SIGNATURE_ECC,
    TPMT_SIGNATURE,
    TPMU_ATTEST,
    TPMU_SIGNATURE,
)

from tvorch.core.migration.transport import (
    TRANSPORT_ATTRIBUTES,
    TRANSPORT_LABEL,
    check_transport_public,
    verify_key_certification,
    wrap_for_transport,
)
from tvorch.errors import EvidenceError, InputError, TrustError

NONCE = bytes(range(32))
_QUALIFIED = TPM2B_NAME(b"\x00\x0b" + bytes(32))  # not checked: a TPM's qualified name of the key
_AK_ATTRIBUTES = (TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM
                  | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH)


@dataclass(frozen=True)
class Ak:
    key: ec.EllipticCurvePrivateKey
    public: bytes  # TPM2B_PUBLIC


@cache
def ak(which: int = 0) -> Ak:
    key = ec.generate_private_key(ec.SECP256R1())
    public = TPM2B_PUBLIC.from_pem(_pem(key.public_key()), objectAttributes=_AK_ATTRIBUTES, nameAlg=TPM2_ALG.SHA256)
    return Ak(key, public.marshal())


@cache
def rsa_key(bits: int = 2048, which: int = 0) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def transport_public(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = None,
    attributes: TPMA_OBJECT = TRANSPORT_ATTRIBUTES,
    scheme: int = TPM2_ALG.OAEP,
    scheme_hash: int = TPM2_ALG.SHA256,
    name_alg: int = TPM2_ALG.SHA256,
) -> bytes:
    """A TPM2B_PUBLIC as the destination's TPM would present its transport key (or something else)."""
    key = key or rsa_key()
    public = TPM2B_PUBLIC.from_pem(_pem(key.public_key()), objectAttributes=attributes, nameAlg=name_alg)
    if isinstance(key, rsa.RSAPrivateKey):
        public.publicArea.parameters.rsaDetail.scheme.scheme = scheme
        public.publicArea.parameters.rsaDetail.scheme.details.anySig.hashAlg = scheme_hash
    return public.marshal()


def certify(
    certified: bytes,
    signer: Ak | None = None,
    nonce: bytes = NONCE,
    magic: int = TPM2_GENERATED.VALUE,
    kind: int = TPM2_ST.ATTEST_CERTIFY,
    attested: TPMU_ATTEST | None = None,
) -> tuple[bytes, bytes]:
    """What TPM2_Certify returns for the key CERTIFIED, signed by SIGNER: (TPMS_ATTEST, TPMT_SIGNATURE)."""
    signer = signer or ak()
    name = TPM2B_PUBLIC.unmarshal(certified)[0].get_name()
    attest = TPMS_ATTEST(
        magic=magic,
        type=kind,
        qualifiedSigner=TPM2B_PUBLIC.unmarshal(signer.public)[0].get_name(),
        extraData=nonce,
        clockInfo=TPMS_CLOCK_INFO(clock=1000, resetCount=1, restartCount=0, safe=1),
        firmwareVersion=0x20191023,
        attested=attested or TPMU_ATTEST(certify=TPMS_CERTIFY_INFO(name=name, qualifiedName=_QUALIFIED)),
    ).marshal()
    r, s = decode_dss_signature(signer.key.sign(attest, ec.ECDSA(hashes.SHA256())))
    signature = TPMT_SIGNATURE(sigAlg=TPM2_ALG.ECDSA, signature=TPMU_SIGNATURE(ecdsa=TPMS_SIGNATURE_ECC(
        hash=TPM2_ALG.SHA256,
        signatureR=TPM2B_ECC_PARAMETER(r.to_bytes(32, "big")),
        signatureS=TPM2B_ECC_PARAMETER(s.to_bytes(32, "big")),
    ))).marshal()
    return attest, signature


def verify(public: bytes, attest: bytes, signature: bytes, ak_public: bytes | None = None) -> rsa.RSAPublicKey:
    return verify_key_certification(ak_public or ak().public, public, attest, signature, NONCE)


def _pem(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_a_certified_transport_key_verifies_and_a_wrapped_secret_opens_with_its_private_key() -> None:
    public = transport_public()
    key = verify(public, *certify(public))
    assert key.public_numbers() == rsa_key().public_key().public_numbers()
    secret = bytes(range(32))
    wrapped = wrap_for_transport(key, secret)
    assert len(wrapped) == 256 and secret not in wrapped
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=TRANSPORT_LABEL)
    assert rsa_key().decrypt(wrapped, oaep) == secret
    assert wrap_for_transport(key, secret) != wrapped  # OAEP is randomized


def test_a_certification_over_another_nonce_is_refused() -> None:
    public = transport_public()
    with pytest.raises(TrustError, match="another nonce"):
        verify(public, *certify(public, nonce=b"yesterday's nonce"))


def test_a_certification_of_key_a_does_not_vouch_for_key_b() -> None:
    a, b = transport_public(), transport_public(rsa_key(which=1))
    with pytest.raises(TrustError, match="names another key than the transport key presented"):
        verify(b, *certify(a))


def test_a_certification_signed_by_another_key_is_refused() -> None:
    public = transport_public()
    with pytest.raises(TrustError, match="key certification signature does not verify with the AK"):
        verify(public, *certify(public, signer=ak(which=1)))


def test_a_signer_that_is_no_restricted_tpm_key_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    loose = Ak(key, TPM2B_PUBLIC.from_pem(_pem(key.public_key()), objectAttributes=TPMA_OBJECT.SIGN_ENCRYPT,
                                          nameAlg=TPM2_ALG.SHA256).marshal())
    public = transport_public()
    with pytest.raises(TrustError, match="AK is not a restricted, fixedTPM signing key"):
        verify(public, *certify(public, signer=loose), ak_public=loose.public)


@pytest.mark.parametrize(("attributes", "refusal"), [
    (TRANSPORT_ATTRIBUTES | TPMA_OBJECT.SIGN_ENCRYPT, "is also sign: it must only decrypt"),
    (TRANSPORT_ATTRIBUTES | TPMA_OBJECT.RESTRICTED, "is also restricted: it must only decrypt"),
    (TRANSPORT_ATTRIBUTES & ~TPMA_OBJECT.FIXEDTPM, "lacks fixedTPM"),
    (TRANSPORT_ATTRIBUTES & ~TPMA_OBJECT.FIXEDPARENT, "lacks fixedParent"),
    (TRANSPORT_ATTRIBUTES & ~TPMA_OBJECT.SENSITIVEDATAORIGIN, "lacks sensitiveDataOrigin"),
    (TRANSPORT_ATTRIBUTES & ~TPMA_OBJECT.DECRYPT, "lacks decrypt"),
    (TRANSPORT_ATTRIBUTES & ~(TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT), "lacks fixedTPM, fixedParent"),
])
def test_a_certified_key_with_the_wrong_attributes_is_refused(attributes: TPMA_OBJECT, refusal: str) -> None:
    public = transport_public(attributes=attributes)
    with pytest.raises(TrustError, match=refusal):
        verify(public, *certify(public))


@pytest.mark.parametrize(("scheme", "scheme_hash"), [
    (TPM2_ALG.NULL, TPM2_ALG.NULL),  # the caller could pick PKCS#1 v1.5 or raw RSA
    (TPM2_ALG.RSAES, TPM2_ALG.NULL),
    (TPM2_ALG.OAEP, TPM2_ALG.SHA1),
    (TPM2_ALG.OAEP, TPM2_ALG.SHA384),
])
def test_a_certified_key_whose_scheme_is_not_oaep_sha256_is_refused(scheme: int, scheme_hash: int) -> None:
    public = transport_public(scheme=scheme, scheme_hash=scheme_hash)
    with pytest.raises(TrustError, match="not RSAES-OAEP with SHA-256"):
        verify(public, *certify(public))


def test_a_1024_bit_key_is_refused() -> None:
    public = transport_public(rsa_key(bits=1024))
    with pytest.raises(TrustError, match="1024 bits, fewer than 2048"):
        verify(public, *certify(public))
    with pytest.raises(TrustError, match="2048 bits or more"):
        wrap_for_transport(rsa_key(bits=1024).public_key(), b"secret")


def test_an_ecc_key_or_a_sha1_name_is_refused() -> None:
    ecc = transport_public(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(TrustError, match="not RSA"):
        verify(ecc, *certify(ecc))
    sha1 = transport_public(name_alg=TPM2_ALG.SHA1)
    with pytest.raises(TrustError, match="name algorithm 0x4 is not SHA-256"):
        verify(sha1, *certify(sha1))


def test_an_attest_not_made_by_a_tpm_or_not_a_certification_is_refused() -> None:
    public = transport_public()
    with pytest.raises(TrustError, match="lacks TPM_GENERATED_VALUE"):
        verify(public, *certify(public, magic=0x12345678))
    with pytest.raises(TrustError, match="of type 0x8018, not a certification"):  # a quote's type
        verify(public, *certify(public, kind=TPM2_ST.ATTEST_QUOTE, attested=TPMU_ATTEST(quote=TPMS_QUOTE_INFO())))


def _garbled() -> list[tuple[str, Callable[[bytes], bytes]]]:
    return [
        ("empty", lambda b: b""),
        ("truncated", lambda b: b[: len(b) // 2]),
        ("trailing bytes", lambda b: b + b"\x00"),
        ("noise", lambda b: b"\xff" * 7),
    ]


@pytest.mark.parametrize("field", ["ak_public", "transport_public", "attest", "signature"])
@pytest.mark.parametrize(("how", "garble"), _garbled())
def test_garbage_bytes_are_one_line_refusals(field: str, how: str, garble: Callable[[bytes], bytes]) -> None:
    public = transport_public()
    attest, signature = certify(public)
    args = {"ak_public": ak().public, "transport_public": public, "attest": attest, "signature": signature}
    args[field] = garble(args[field])
    with pytest.raises((EvidenceError, TrustError)) as err:
        verify_key_certification(**args, qualifying=NONCE)
    assert "\n" not in str(err.value)


def test_check_transport_public_refuses_bytes_that_are_no_public_area() -> None:
    with pytest.raises(EvidenceError, match="transport key public"):
        check_transport_public(b"\x00\x01\x02")


def test_wrap_refuses_an_empty_or_oversized_secret() -> None:
    key = rsa_key().public_key()
    with pytest.raises(InputError, match="1 to 190 bytes"):
        wrap_for_transport(key, b"")
    with pytest.raises(InputError, match="1 to 190 bytes for this transport key, not 191"):
        wrap_for_transport(key, bytes(191))
    assert len(wrap_for_transport(key, bytes(190))) == 256


def test_the_label_is_nul_terminated_as_the_tpm_requires() -> None:
    assert TRANSPORT_LABEL.endswith(b"\0") and b"\0" not in TRANSPORT_LABEL[:-1]
