"""The transport key: how a vTPM state key goes from the source node's TPM to the destination's.

Pure: bytes in, keys and dataclasses out; tpm2-pytss only unmarshals. The
adapter (``tvorch.adapters.tpm``) makes and uses the key; this module says
what the source must see before it wraps a secret to it.

The destination creates an RSA 2048 decryption key under its storage root
key (``TRANSPORT_ATTRIBUTES``, scheme RSAES-OAEP-SHA256) and has its host AK
certify it (TPM2_Certify) over a nonce from the source. The source checks
(``verify_key_certification``):

- the attest is a TPM's (TPM_GENERATED_VALUE), a TPM_ST_ATTEST_CERTIFY over
  the source's nonce, signed by the destination's AK;
- the certified name is the TPM name (nameAlg || H(TPMT_PUBLIC)) of the
  public area presented, so its attributes are the ones the TPM holds;
- the key (``check_transport_public``) is RSA of at least 2048 bits, fixedTPM
  and fixedParent, sensitiveDataOrigin (the TPM made the private key), a
  decryption key that cannot sign and is not restricted, and its
  scheme is OAEP with SHA-256. A NULL scheme is refused: it would let
  whoever can use the key on the destination also decrypt with PKCS#1 v1.5
  or raw RSA, so one key would serve as a padding oracle; fixed to OAEP it
  can do exactly one thing.

Why fixedTPM in a certified public area is enough: the TPM creates a fixedTPM
key only under a fixedTPM parent, TPM2_Import and TPM2_LoadExternal with a
private part refuse one, and TPM2_LoadExternal of a public part alone (any
attributes) gives an object that no session can authorize, so TPM2_Certify
refuses it (TPM_RC_AUTH_UNAVAILABLE; a test checks this on swtpm).

That the AK is the destination's own (its host AK certification, signed by
its node key) is the caller's to check; this module takes the AK public as
given.

The source then wraps the secret in software (``wrap_for_transport``,
RSA-OAEP-SHA256, label ``TRANSPORT_LABEL``) and the destination's TPM
decrypts it (TPM2_RSA_Decrypt). The TPM refuses a non-empty label whose last
byte is not NUL (TPM_RC_VALUE) and hashes the label with its NUL into the
OAEP padding, so the label is NUL-terminated and software uses the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from tpm2_pytss.constants import TPM2_ALG, TPM2_GENERATED, TPM2_ST, TPMA_OBJECT

from tvorch.core.attestation.quote import ak_key, check_attest_signature, crypto_key, parse_attest, parse_public
from tvorch.errors import InputError, TrustError

# NUL-terminated: the TPM refuses any other non-empty label (see the module docstring).
TRANSPORT_LABEL = b"tvorch-vtpm-key\0"
MIN_RSA_BITS = 2048
TRANSPORT_RSA_BITS = 2048
# What the destination's TPM is asked to make; check_transport_public requires
# every attribute but userWithAuth and noDA, which only matter to the holder.
TRANSPORT_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.DECRYPT
    | TPMA_OBJECT.NODA
)
# Each attribute a transport key must have, and what its absence would allow.
_REQUIRED = (
    (TPMA_OBJECT.FIXEDTPM, "fixedTPM"),  # may be duplicated to another TPM, or made outside one
    (TPMA_OBJECT.FIXEDPARENT, "fixedParent"),  # may be moved under another parent
    (TPMA_OBJECT.SENSITIVEDATAORIGIN, "sensitiveDataOrigin"),  # private key imported: known outside
    (TPMA_OBJECT.DECRYPT, "decrypt"),  # cannot decrypt the wrapped secret at all
)
_FORBIDDEN = (
    (TPMA_OBJECT.SIGN_ENCRYPT, "sign"),  # one key, one use: a signing key may sign what it decrypted
    (TPMA_OBJECT.RESTRICTED, "restricted"),  # a storage parent, not a key that decrypts caller data
)
_NAME_HASHES = {TPM2_ALG.SHA256: "sha256", TPM2_ALG.SHA384: "sha384", TPM2_ALG.SHA512: "sha512"}


@dataclass(frozen=True)
class TransportKey:
    """A transport key as the destination's TPM made it: held in memory for one migration, never written."""

    public: bytes  # marshaled TPM2B_PUBLIC
    private: bytes = field(repr=False)  # marshaled TPM2B_PRIVATE, wrapped by the destination's SRK


def check_transport_public(public: bytes) -> rsa.RSAPublicKey:
    """The key in PUBLIC (a TPM2B_PUBLIC) if it is a TPM-bound, decrypt-only RSA-OAEP-SHA256 key of 2048+ bits.

    TrustError naming the first attribute that does not hold; EvidenceError
    for bytes that are no public area."""
    area = parse_public(public, "transport key public")
    if area.type != TPM2_ALG.RSA:
        raise TrustError(f"transport key is of type 0x{int(area.type):x}, not RSA")
    if area.nameAlg not in _NAME_HASHES:
        raise TrustError(f"transport key name algorithm 0x{int(area.nameAlg):x} is not SHA-256/384/512")
    attrs = int(area.objectAttributes)
    lacking = [name for flag, name in _REQUIRED if not attrs & flag]
    if lacking:
        raise TrustError(f"transport key lacks {', '.join(lacking)} (attributes {area.objectAttributes})")
    extra = [name for flag, name in _FORBIDDEN if attrs & flag]
    if extra:
        raise TrustError(f"transport key is also {', '.join(extra)}: it must only decrypt")
    detail = area.parameters.rsaDetail
    if detail.keyBits < MIN_RSA_BITS:
        raise TrustError(f"transport key has {int(detail.keyBits)} bits, fewer than {MIN_RSA_BITS}")
    scheme = detail.scheme
    if scheme.scheme != TPM2_ALG.OAEP or scheme.details.oaep.hashAlg != TPM2_ALG.SHA256:
        raise TrustError(
            f"transport key scheme is 0x{int(scheme.scheme):x} with hash 0x{int(scheme.details.anySig.hashAlg):x}, "
            "not RSAES-OAEP with SHA-256"
        )
    key = crypto_key(area, "transport key")
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < MIN_RSA_BITS:
        raise TrustError(f"transport key modulus is not an RSA key of {MIN_RSA_BITS} bits or more")
    return key


def verify_key_certification(
    ak_public: bytes, transport_public: bytes, attest: bytes, signature: bytes, qualifying: bytes
) -> rsa.RSAPublicKey:
    """The transport key, if the AK certified it over QUALIFYING and it is fit to carry a secret.

    ATTEST is the marshaled TPMS_ATTEST and SIGNATURE the marshaled
    TPMT_SIGNATURE, as ``Tpm.certify_key`` returns them. TrustError with one
    line saying what did not hold; EvidenceError for bytes that are no TPM
    structures."""
    key = ak_key(ak_public)
    info = parse_attest(attest, "key certification attest")
    if info.magic != TPM2_GENERATED.VALUE:
        raise TrustError("key certification attest lacks TPM_GENERATED_VALUE: not produced by a TPM")
    if info.type != TPM2_ST.ATTEST_CERTIFY:
        raise TrustError(f"key certification attest is of type 0x{int(info.type):x}, not a certification")
    check_attest_signature(key, attest, signature, "key certification")
    if bytes(info.extraData) != qualifying:
        raise TrustError("key certification is over another nonce than the one asked for (replayed or stale)")
    name = bytes(parse_public(transport_public, "transport key public").get_name())
    certified = info.attested.certify
    if bytes(certified.name) != name:
        raise TrustError("key certification names another key than the transport key presented")
    return check_transport_public(transport_public)


def wrap_for_transport(public_key: rsa.RSAPublicKey, secret: bytes) -> bytes:
    """SECRET encrypted to a verified transport key: RSA-OAEP, SHA-256 and MGF1-SHA-256, label TRANSPORT_LABEL."""
    if not isinstance(public_key, rsa.RSAPublicKey) or public_key.key_size < MIN_RSA_BITS:
        raise TrustError(f"a secret is wrapped only to an RSA transport key of {MIN_RSA_BITS} bits or more")
    limit = public_key.key_size // 8 - 2 * hashes.SHA256.digest_size - 2
    if not 0 < len(secret) <= limit:
        raise InputError(f"a wrapped secret is 1 to {limit} bytes for this transport key, not {len(secret)}")
    return public_key.encrypt(
        secret, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=TRANSPORT_LABEL)
    )

