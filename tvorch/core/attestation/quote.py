"""TPM quotes: checking one against an attestation key, and the host quote file.

Pure: bytes in, dataclasses out. It imports tpm2-pytss for its unmarshalling
of TPM structures (the TSS's own code, not a second parser), which costs an
import of 0.1-0.3 s: keep this module off the hook's path.

``verify_quote`` is the whole check of a quote; every refusal is a
``TrustError`` with a one-line reason, and bytes that are not TPM structures
are an ``EvidenceError``. The PCR values that come with a quote are read by a
separate TPM2_PCR_Read, so they may be later than the quote: the quote's PCR
digest is authoritative, and values that do not hash to it are refused.

The host quote file (``HostQuote.to_json``, what ``tvorch host quote``
writes), a JSON object::

    {
      "version": 1,
      "nonce": "<hex>",                 # the verifier's nonce, the quote's extraData
      "bank": "sha256",                 # sha1 | sha256 | sha384 | sha512
      "pcrs": {"0": "<hex>", ...},      # the quoted PCRs (decimal index 0-23) and values
      "attest": "<base64>",             # TPMS_ATTEST, marshaled (TPM2B_ATTEST's contents;
                                        #   tpm2_quote -m writes the same bytes)
      "signature": "<base64>",          # TPMT_SIGNATURE, marshaled (tpm2_quote -s, "tss" format)
      "ak_public": "<base64>",          # the AK's TPM2B_PUBLIC, marshaled (tpm2_createak -u)
      "ak_pem": "-----BEGIN PUBLIC KEY-----...",  # the same key as SubjectPublicKeyInfo PEM
      "eventlog": "<base64>" | null,    # the UEFI event log as the kernel exposes it:
                                        #   /sys/kernel/security/tpm0/binary_bios_measurements
      "ima_log": "<base64>" | null      # IMA's measurement list as the kernel exposes it:
                                        #   /sys/kernel/security/ima/ascii_runtime_measurements
    }

Both logs are the files' bytes exactly as read, so a verifier replays what the
kernel said, not tvorch's reading of it. ``ak_pem`` must be the key in
``ak_public``; ``from_json`` checks that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import TPM2_ALG, TPM2_GENERATED, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPM_OBJECT,
    TPML_PCR_SELECTION,
    TPMS_ATTEST,
    TPMT_PUBLIC,
    TPMT_SIGNATURE,
)

from tvorch.core.codec import b64decode, b64encode, key_mismatch
from tvorch.errors import EvidenceError, InputError, TrustError

_T = TypeVar("_T", bound=TPM_OBJECT)

QUOTE_FORMAT_VERSION = 1
MAX_PCR = 23  # PC Client TPMs have PCRs 0-23


def pcr_index(key: object) -> int | None:
    """The PCR a JSON key names ("0".."23", plain ASCII decimal without leading zeros), or None.

    str.isdigit alone lets through "²" and 5000-digit strings, on which int() raises.
    """
    if not isinstance(key, str) or not 0 < len(key) <= 2 or not key.isascii() or not key.isdecimal():
        return None
    index = int(key)
    return index if str(index) == key and index <= MAX_PCR else None


def pcr_values(raw: Mapping[str, object], bank: str, what: str) -> dict[int, bytes]:
    """PCR index -> value of BANK from a JSON object of decimal keys and hex values (a quote file's or a
    bundle's "pcrs"); EvidenceError saying WHAT held the first key or value that is no PCR or digest."""
    size = digest_size(bank)
    pcrs: dict[int, bytes] = {}
    for key, value in raw.items():
        index = pcr_index(key)
        if index is None:
            raise EvidenceError(f"{what}: PCR index {_shown_key(key)} is not a number 0-{MAX_PCR}")
        try:
            digest = bytes.fromhex(value) if isinstance(value, str) else None
        except ValueError:
            digest = None
        if digest is None or len(digest) != size:
            raise EvidenceError(f"{what}: PCR {key} is not a {bank} digest in hex")
        pcrs[index] = digest
    return pcrs


def pcr_indices(pcrs: Sequence[int]) -> list[int]:
    """PCRS sorted and without repeats; InputError when empty or out of range."""
    wanted = sorted(set(pcrs))
    if not wanted:
        raise InputError("no PCRs selected")
    bad = [i for i in wanted if not 0 <= i <= MAX_PCR]
    if bad:
        raise InputError(f"PCR indices out of range 0-{MAX_PCR}: {bad}")
    return wanted

# PCR bank name -> TPM algorithm id; the digest size comes from hashlib.
BANKS: dict[str, int] = {
    "sha1": TPM2_ALG.SHA1,
    "sha256": TPM2_ALG.SHA256,
    "sha384": TPM2_ALG.SHA384,
    "sha512": TPM2_ALG.SHA512,
}
_BANK_NAMES = {alg: name for name, alg in BANKS.items()}

# Hashes a quote signature may use; SHA-1 signatures are refused.
_SIGNATURE_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    TPM2_ALG.SHA256: hashes.SHA256,
    TPM2_ALG.SHA384: hashes.SHA384,
    TPM2_ALG.SHA512: hashes.SHA512,
}

# Only a restricted signing key refuses to sign outside data that starts with
# TPM_GENERATED_VALUE, and only a fixedTPM key cannot have left the TPM: the
# signature of any other key proves nothing about where the quote came from.
_AK_REQUIRED = TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM


@dataclass(frozen=True)
class QuoteInfo:
    """What a verified quote says, beyond the PCR values the caller already has."""

    clock: int  # ms the TPM has been powered since its clock was last set
    reset_count: int  # TPM resets (reboots) since the storage hierarchy was cleared
    restart_count: int  # resumes/restarts since the last reset
    safe: bool  # the clock has not gone backwards
    firmware_version: int
    pcr_selection: tuple[int, ...]
    bank: str
    pcr_digest: str  # hex
    qualified_signer: str  # hex, the AK's qualified name


def digest_size(bank: str) -> int:
    """Bytes in one PCR value of BANK; EvidenceError for a bank tvorch does not know."""
    if bank not in BANKS:
        raise EvidenceError(f"unknown PCR bank {bank!r} (known: {', '.join(BANKS)})")
    return hashlib.new(bank).digest_size


def pcr_composite_digest(pcr_values: Mapping[int, bytes], hash_name: str) -> bytes:
    """The quote's pcrDigest for these values: HASH over the values in ascending PCR order."""
    h = hashlib.new(hash_name)
    for index in sorted(pcr_values):
        h.update(pcr_values[index])
    return h.digest()


def parse_attest(attest: bytes, what: str = "quote attest") -> TPMS_ATTEST:
    """Unmarshal a TPMS_ATTEST, refusing trailing bytes; WHAT names it in the error."""
    return _unmarshal(TPMS_ATTEST, attest, what)


def parse_public(public: bytes, what: str = "public area") -> TPMT_PUBLIC:
    """Unmarshal a TPM2B_PUBLIC (what tpm2_createak/tpm2_createek -u write), refusing trailing bytes."""
    return _unmarshal(TPM2B_PUBLIC, public, what).publicArea


def selected_pcrs(selection: TPML_PCR_SELECTION) -> dict[str, tuple[int, ...]]:
    """A PCR selection as bank name -> ascending PCR indices (banks with no PCR left out)."""
    banks: dict[str, tuple[int, ...]] = {}
    for sel in selection:
        bitmap = bytes(sel.pcrSelect)[: sel.sizeofSelect]
        pcrs = tuple(i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1)
        if not pcrs:
            continue
        name = _BANK_NAMES.get(sel.hash)
        if name is None:
            raise TrustError(f"PCR selection names an unknown bank (algorithm 0x{int(sel.hash):x})")
        if name in banks:
            raise TrustError(f"PCR selection names bank {name} twice")
        banks[name] = pcrs
    return banks


def signature_hash_name(signature: bytes) -> str:
    """The hash the signature (and so the quote's PCR digest) uses, as a hashlib name."""
    return _signature_hash(_unmarshal(TPMT_SIGNATURE, signature, "quote signature"), "quote")


def verify_quote(
    attest: bytes,
    signature: bytes,
    ak_public: bytes,
    nonce: bytes,
    pcr_values: Mapping[int, bytes],
    bank: str,
) -> QuoteInfo:
    """Check that the AK signed this quote over NONCE and exactly PCR_VALUES of BANK."""
    size = digest_size(bank)
    for index, value in pcr_values.items():
        if not 0 <= index <= MAX_PCR:
            raise EvidenceError(f"PCR index {index} out of range 0-{MAX_PCR}")
        if len(value) != size:
            raise EvidenceError(f"PCR {index} value is {len(value)} bytes, a {bank} PCR has {size}")
    key = ak_key(ak_public)
    info = parse_attest(attest)

    if info.magic != TPM2_GENERATED.VALUE:
        raise TrustError("quote attest lacks TPM_GENERATED_VALUE: not produced by a TPM")
    if info.type != TPM2_ST.ATTEST_QUOTE:
        raise TrustError(f"attest is of type 0x{int(info.type):x}, not a quote")
    hash_name = check_attest_signature(key, attest, signature, "quote")
    if bytes(info.extraData) != nonce:
        raise TrustError("quote nonce does not match the nonce asked for (replayed or stale quote)")

    selected = selected_pcrs(info.attested.quote.pcrSelect)
    wanted = tuple(sorted(pcr_values))
    if selected != {bank: wanted}:
        shown = "; ".join(f"{b}:{','.join(map(str, p))}" for b, p in selected.items()) or "nothing"
        raise TrustError(f"quote selects {shown}, not {bank}:{','.join(map(str, wanted))}")
    quoted_digest = bytes(info.attested.quote.pcrDigest)
    if pcr_composite_digest(pcr_values, hash_name) != quoted_digest:
        raise TrustError("PCR digest in the quote does not match the PCR values given with it")

    clock = info.clockInfo
    return QuoteInfo(
        clock=int(clock.clock),
        reset_count=int(clock.resetCount),
        restart_count=int(clock.restartCount),
        safe=bool(clock.safe),
        firmware_version=int(info.firmwareVersion),
        pcr_selection=wanted,
        bank=bank,
        pcr_digest=quoted_digest.hex(),
        qualified_signer=bytes(info.qualifiedSigner).hex(),
    )


def check_attest_signature(
    key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey, attest: bytes, signature: bytes, what: str
) -> str:
    """Check that KEY (an AK, from ``ak_key``) made SIGNATURE (a marshaled TPMT_SIGNATURE) over ATTEST.

    Returns the signature's hash as a hashlib name. WHAT ("key certification")
    starts each error line: EvidenceError for bytes that are no signature,
    TrustError for a scheme or hash tvorch refuses or a signature that does
    not verify."""
    sig = _unmarshal(TPMT_SIGNATURE, signature, f"{what} signature")
    hash_name = _signature_hash(sig, what)
    _check_signature(key, sig, attest, hash_name, what)
    return hash_name


def ak_key(ak_public: bytes) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """The AK's public key for cryptography, refusing any key that is not a TPM-bound restricted signer."""
    public = _unmarshal(TPM2B_PUBLIC, ak_public, "AK public").publicArea
    attrs = int(public.objectAttributes)
    if attrs & _AK_REQUIRED != _AK_REQUIRED or attrs & TPMA_OBJECT.DECRYPT:
        raise TrustError(
            f"AK is not a restricted, fixedTPM signing key (attributes {public.objectAttributes})"
        )
    return crypto_key(public, "AK")


def crypto_key(public: Any, what: str) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """A TPMT_PUBLIC as a key cryptography can verify or encrypt with; EvidenceError when it cannot be one."""
    try:
        key = serialization.load_der_public_key(public.to_der())
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise EvidenceError(f"{what} public key cannot be used: {err}") from None
    if not isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise EvidenceError(f"{what} public key is a {type(key).__name__}, not ECC or RSA")
    return key


def ak_name(ak_public: bytes) -> bytes:
    """The TPM name of the AK (nameAlg || H(TPMT_PUBLIC)): what credential activation binds."""
    return bytes(_unmarshal(TPM2B_PUBLIC, ak_public, "AK public").get_name())


def ak_pem(ak_public: bytes) -> bytes:
    """The AK's public key as SubjectPublicKeyInfo PEM (what tpm2_checkquote -u takes)."""
    return ak_key(ak_public).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def ak_fingerprint(ak_public: bytes) -> str:
    """'sha256:' + hex of the SubjectPublicKeyInfo DER: a stable id for registering the AK."""
    der = ak_key(ak_public).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _unmarshal(cls: type[_T], data: bytes, what: str) -> _T:
    try:
        obj, used = cls.unmarshal(bytes(data))
    except (TSS2_Exception, TypeError, ValueError) as err:
        raise EvidenceError(f"{what} is not a valid {cls.__name__}: {err}") from None
    if used != len(data):
        raise EvidenceError(f"{what} has {len(data) - used} bytes after its {cls.__name__}")
    return obj


def _signature_hash(sig: TPMT_SIGNATURE, what: str) -> str:
    if sig.sigAlg == TPM2_ALG.ECDSA:
        alg = sig.signature.ecdsa.hash
    elif sig.sigAlg == TPM2_ALG.RSASSA:
        alg = sig.signature.rsassa.hash
    else:
        raise TrustError(f"{what} signature scheme 0x{int(sig.sigAlg):x} is not ECDSA or RSASSA")
    if alg not in _SIGNATURE_HASHES:
        raise TrustError(f"{what} signature uses hash algorithm 0x{int(alg):x}, not SHA-256/384/512")
    return _BANK_NAMES[alg]


def _check_signature(
    key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    sig: TPMT_SIGNATURE,
    message: bytes,
    hash_name: str,
    what: str,
) -> None:
    algorithm = _SIGNATURE_HASHES[BANKS[hash_name]]()
    try:
        if sig.sigAlg == TPM2_ALG.ECDSA and isinstance(key, ec.EllipticCurvePublicKey):
            r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
            s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
            key.verify(encode_dss_signature(r, s), message, ec.ECDSA(algorithm))
        elif sig.sigAlg == TPM2_ALG.RSASSA and isinstance(key, rsa.RSAPublicKey):
            key.verify(bytes(sig.signature.rsassa.sig), message, padding.PKCS1v15(), algorithm)
        else:
            raise TrustError(f"{what} signature algorithm does not match the AK's key type")
    except InvalidSignature:
        raise TrustError(f"{what} signature does not verify with the AK") from None


@dataclass(frozen=True)
class HostQuote:
    """A host TPM quote with everything a verifier needs to judge it (see the module docstring)."""

    nonce: bytes
    bank: str
    pcrs: Mapping[int, bytes]
    attest: bytes
    signature: bytes
    ak_public: bytes
    ak_pem: str
    eventlog: bytes | None = None
    ima_log: bytes | None = None

    def verify(self, nonce: bytes) -> QuoteInfo:
        """verify_quote on this file's contents against the verifier's own NONCE."""
        return verify_quote(self.attest, self.signature, self.ak_public, nonce, self.pcrs, self.bank)

    def to_json(self) -> dict[str, object]:
        return {
            "version": QUOTE_FORMAT_VERSION,
            "nonce": self.nonce.hex(),
            "bank": self.bank,
            "pcrs": {str(i): self.pcrs[i].hex() for i in sorted(self.pcrs)},
            "attest": b64encode(self.attest),
            "signature": b64encode(self.signature),
            "ak_public": b64encode(self.ak_public),
            "ak_pem": self.ak_pem,
            "eventlog": None if self.eventlog is None else b64encode(self.eventlog),
            "ima_log": None if self.ima_log is None else b64encode(self.ima_log),
        }

    @classmethod
    def from_json(cls, obj: object) -> HostQuote:
        """Parse a host quote file's JSON; EvidenceError naming the first thing wrong."""
        if not isinstance(obj, dict):
            raise EvidenceError("host quote is not a JSON object")
        expected = {"version", "nonce", "bank", "pcrs", "attest", "signature", "ak_public", "ak_pem",
                    "eventlog", "ima_log"}
        if (wrong := key_mismatch(obj, expected)) is not None:
            raise EvidenceError(f"host quote keys wrong: {wrong}")
        if type(obj["version"]) is not int or obj["version"] != QUOTE_FORMAT_VERSION:
            raise EvidenceError(f"host quote version {obj['version']!r} is not {QUOTE_FORMAT_VERSION}")
        bank = _text(obj, "bank")
        raw_pcrs = obj["pcrs"]
        if not isinstance(raw_pcrs, dict) or not raw_pcrs:
            raise EvidenceError("host quote 'pcrs' is not a non-empty object")
        pcrs = pcr_values(raw_pcrs, bank, "host quote")
        quote = cls(
            nonce=_hex(obj["nonce"], "nonce"),
            bank=bank,
            pcrs=pcrs,
            attest=_unb64(obj["attest"], "attest"),
            signature=_unb64(obj["signature"], "signature"),
            ak_public=_unb64(obj["ak_public"], "ak_public"),
            ak_pem=_text(obj, "ak_pem"),
            eventlog=None if obj["eventlog"] is None else _unb64(obj["eventlog"], "eventlog"),
            ima_log=None if obj["ima_log"] is None else _unb64(obj["ima_log"], "ima_log"),
        )
        if ak_pem(quote.ak_public).decode("ascii").strip() != quote.ak_pem.strip():
            raise EvidenceError("host quote 'ak_pem' is not the key in 'ak_public'")
        return quote


def _shown_key(key: object) -> str:
    """KEY for an error line: a 5000-digit key is cut, not printed whole."""
    text = repr(key)
    return text if len(text) <= 40 else f"{text[:32]}... ({len(text)} characters)"


def _text(obj: Mapping[str, object], key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise EvidenceError(f"host quote {key!r} is not a string")
    return value


def _hex(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise EvidenceError(f"host quote {what!r} is not a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise EvidenceError(f"host quote {what!r} is not valid hex") from None


def _unb64(value: object, what: str) -> bytes:
    return b64decode(value, f"host quote {what!r}", EvidenceError)
