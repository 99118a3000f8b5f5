"""A secret sealed to the host TPM under a PCR policy, and that policy's digest.

Pure: bytes in, dataclasses out; no TPM session. ``tvorch.adapters.tpm``
seals and unseals (``Tpm.seal``/``Tpm.unseal``); this module holds what they
exchange and the arithmetic that lets tvorch predict a policy without a TPM.

The sealed object is a KEYEDHASH object under the host's storage root key
whose ``authPolicy`` is a single TPM2_PolicyPCR (nameAlg and policy hash
SHA-256, PCR values from any bank)::

    policy_digest = SHA256(zeros(32) || TPM_CC_PolicyPCR (0x0000017F, 4 bytes BE)
                           || TPML_PCR_SELECTION (marshaled, one bank, 3-byte bitmap)
                           || SHA256(value of each selected PCR, in ascending index order))

(TPM 2.0 Library Part 3, TPM2_PolicyPCR). ``policy_pcr_digest`` computes it
from PCR values, so a policy can be predicted for expected boot measurements,
and a failed unseal explained by comparing the stored digest with the one the
current values give. tpm2-pytss is used here only to marshal the selection
(the TSS's own code, and the same bytes the adapter sends to the TPM).

The sealed key file (``SealedKey.to_bytes``): canonical JSON (keys sorted, no
spaces, ASCII), one object::

    {
      "bank": "sha256",                 # sha1 | sha256 | sha384 | sha512: the PCR bank
      "pcrs": [0, 2, 4, 7],             # the selected PCRs, ascending, 0-23
      "policy_digest": "<base64>",      # SHA-256 PolicyPCR digest, the object's authPolicy
      "private": "<base64>",            # TPM2B_PRIVATE, marshaled (wrapped by the host's SRK)
      "public": "<base64>",             # TPM2B_PUBLIC, marshaled
      "version": 1
    }

The private blob is encrypted and integrity-protected by the TPM's storage
seed: it loads only under the storage root key of the TPM that made it, and
unseals only through the policy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tpm2_pytss.types import TPML_PCR_SELECTION

from tvorch.core.codec import b64decode, b64encode, canonical_json, key_mismatch, parse_json
from tvorch.core.attestation.quote import BANKS, MAX_PCR, pcr_indices
from tvorch.errors import InputError

SEALED_FORMAT_VERSION = 1
# MAX_SYM_DATA: the most a KEYEDHASH sealed data object can hold.
MAX_SECRET_SIZE = 128
POLICY_HASH = "sha256"  # the sealed object's nameAlg, so its policy digest's hash
TPM_CC_POLICY_PCR = 0x0000017F

_KEYS = frozenset({"version", "bank", "pcrs", "public", "private", "policy_digest"})


@dataclass(frozen=True)
class SealedKey:
    """A secret sealed to one TPM's storage root key under PolicyPCR over PCRS of BANK."""

    bank: str
    pcrs: tuple[int, ...]  # ascending
    public: bytes  # marshaled TPM2B_PUBLIC of the sealed object
    private: bytes = field(repr=False)  # marshaled TPM2B_PRIVATE, wrapped by the SRK
    policy_digest: bytes  # SHA-256 PolicyPCR digest, the object's authPolicy

    def __post_init__(self) -> None:
        _check_bank(self.bank)
        if not self.pcrs:
            raise InputError("sealed key selects no PCRs")
        if any(type(i) is not int for i in self.pcrs):
            raise InputError("sealed key PCR indices are not integers")
        bad = [i for i in self.pcrs if not 0 <= i <= MAX_PCR]
        if bad:
            raise InputError(f"sealed key PCR indices out of range 0-{MAX_PCR}: {bad}")
        if list(self.pcrs) != sorted(set(self.pcrs)):
            raise InputError(f"sealed key PCRs {list(self.pcrs)} are not strictly ascending")
        if not self.public or not self.private:
            raise InputError("sealed key has an empty public or private blob")
        size = hashlib.new(POLICY_HASH).digest_size
        if len(self.policy_digest) != size:
            raise InputError(f"sealed key policy digest has {len(self.policy_digest)} bytes, not {size}")

    def to_bytes(self) -> bytes:
        """The canonical JSON form (see the module docstring)."""
        obj = {
            "version": SEALED_FORMAT_VERSION,
            "bank": self.bank,
            "pcrs": list(self.pcrs),
            "public": b64encode(self.public),
            "private": b64encode(self.private),
            "policy_digest": b64encode(self.policy_digest),
        }
        return canonical_json(obj, ensure_ascii=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> SealedKey:
        """Parse what ``to_bytes`` wrote; InputError naming the first thing wrong."""
        obj = parse_json(data, "sealed key", InputError)
        if (wrong := key_mismatch(obj, _KEYS)) is not None:
            raise InputError(f"sealed key keys wrong: {wrong}")
        if type(obj["version"]) is not int or obj["version"] != SEALED_FORMAT_VERSION:
            raise InputError(f"sealed key version {obj['version']!r} is not {SEALED_FORMAT_VERSION}")
        bank = obj["bank"]
        if not isinstance(bank, str):
            raise InputError("sealed key 'bank' is not a string")
        pcrs = obj["pcrs"]
        if not isinstance(pcrs, list) or any(type(i) is not int for i in pcrs):
            raise InputError("sealed key 'pcrs' is not a list of integers")
        return cls(
            bank=bank,
            pcrs=tuple(pcrs),
            public=b64decode(obj["public"], "sealed key 'public'"),
            private=b64decode(obj["private"], "sealed key 'private'"),
            policy_digest=b64decode(obj["policy_digest"], "sealed key 'policy_digest'"),
        )


def pcr_selection_bytes(pcrs: Sequence[int], bank: str) -> bytes:
    """The marshaled TPML_PCR_SELECTION of PCRS in BANK, as TPM2_PolicyPCR and TPM2_PCR_Read send it."""
    _check_bank(bank)
    wanted = pcr_indices(pcrs)
    return bytes(TPML_PCR_SELECTION.parse(f"{bank}:{','.join(map(str, wanted))}").marshal())


def policy_pcr_digest(pcr_values: Mapping[int, bytes], bank: str = "sha256") -> bytes:
    """The SHA-256 policy digest of one TPM2_PolicyPCR over PCR_VALUES (index -> value) of BANK.

    This is the ``authPolicy`` a sealed object gets for these values, and what
    the policy session's digest is after TPM2_PolicyPCR while the PCRs hold them.
    """
    _check_bank(bank)
    size = hashlib.new(bank).digest_size
    short = sorted(i for i, value in pcr_values.items() if len(value) != size)
    if short:
        raise InputError(f"PCR values {short} are not {bank} digests ({size} bytes)")
    selection = pcr_selection_bytes(list(pcr_values), bank)
    values = hashlib.new(POLICY_HASH, b"".join(pcr_values[i] for i in sorted(pcr_values))).digest()
    h = hashlib.new(POLICY_HASH)
    h.update(bytes(h.digest_size))  # the policy digest a fresh session starts from
    h.update(TPM_CC_POLICY_PCR.to_bytes(4, "big"))
    h.update(selection)
    h.update(values)
    return h.digest()


def _check_bank(bank: str) -> None:
    if bank not in BANKS:
        raise InputError(f"unknown PCR bank {bank!r} (known: {', '.join(BANKS)})")
