"""A VM's vTPM as tvorch keeps it: the record and the state key.

Pure, and free of ``cryptography`` (the store, which the hook imports, uses
the record): escrow is ``core.vtpm.escrow``, backups ``core.vtpm.backup``.

The state key is 32 random bytes written as 64 ASCII hex characters, because it travels as a passphrase (swtpm derives the
AES key from it: ``swtpm_setup --pwdfile-fd``, libvirt's ``--key pwdfd=``)
and a passphrase read as a C string must not hold a NUL byte.

The key is kept in two wrappings, never in clear: sealed to the host TPM (the
everyday path, ``core.vtpm.sealed``) and, when the operator configured an escrow
key, encrypted to that RSA key with OAEP-SHA256 (the recovery path). A key
check value (a hash of the key under a fixed label) lets tvorch recognise the
right key after either unwrapping without keeping anything that reveals it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from enum import Enum
from typing import Any

from tvorch.errors import TrustError

KEY_HEX_CHARS = 64
_KEY_CHECK_LABEL = b"tvorch vtpm state key check v1\0"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class KeyProtection(str, Enum):
    HOST_TPM = "host-tpm"  # encrypted state, key sealed to the host TPM
    NONE = "none"  # state in clear (development nodes without a TPM)


class LedgerEvent(str, Enum):
    """Why a state digest entered the ledger; the hook's rollback check reads only the last one."""

    MANUFACTURED = "manufactured"
    STOPPED = "stopped"
    BACKUP = "backup"
    RESTORED = "restored"
    SAVED = "saved"  # a managed save through tvorch (its image's digest in the store's managed_saves)


@dataclass(frozen=True)
class VtpmRecord:
    """What tvorch keeps per instance about its vTPM (README, "vTPM state and records")."""

    instance_id: str
    state_dir: str  # libvirt's <swtpm_state_dir>/<uuid>
    swtpm_version: str
    ek_fingerprint: str  # sha256 of the RSA EK's SubjectPublicKeyInfo
    ek_cert: bytes  # DER, as in the vTPM's NV index 0x01c00002
    ek_public_pem: bytes
    key_protection: KeyProtection
    secret_uuid: str | None  # the libvirt `vtpm` secret the domain's <encryption> names
    sealed_key: bytes | None  # core.vtpm.sealed.SealedKey.to_bytes(); None without protection or after purge
    seal_pcrs: tuple[int, ...]
    escrow_key: bytes | None  # RSA-OAEP ciphertext of the key; None without escrow or after purge
    escrow_fingerprint: str | None  # sha256 of the escrow public key's SubjectPublicKeyInfo
    key_check: str | None  # key_check_value(key)
    created_at: str
    updated_at: str
    purged_at: str | None = None
    platform_cert: bytes | None = None  # DER, as in NV index 0x01c08000; None if recorded before tvorch kept it

    @property
    def encrypted(self) -> bool:
        return self.key_protection is KeyProtection.HOST_TPM

    def to_json(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "state_dir": self.state_dir,
            "swtpm_version": self.swtpm_version,
            "ek_fingerprint": self.ek_fingerprint,
            "key_protection": self.key_protection.value,
            "secret_uuid": self.secret_uuid,
            "sealed": self.sealed_key is not None,
            "seal_pcrs": list(self.seal_pcrs),
            "escrow": self.escrow_fingerprint,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "purged_at": self.purged_at,
        }


def new_state_key() -> bytes:
    """A fresh state key: 256 random bits as 64 lowercase hex characters."""
    return secrets.token_hex(KEY_HEX_CHARS // 2).encode("ascii")


def key_check_value(key: bytes) -> str:
    """Recognises the key after unwrapping; 256 random bits make it useless for guessing."""
    return hashlib.sha256(_KEY_CHECK_LABEL + key).hexdigest()


def check_key(key: bytes, expected: str | None, source: str) -> bytes:
    """KEY if it is well-formed and matches EXPECTED (the record's key check value)."""
    if not _HEX64.fullmatch(key.decode("ascii", "replace")):
        raise TrustError(f"the key from {source} is not a tvorch vTPM state key")
    if expected is not None and not secrets.compare_digest(key_check_value(key), expected):
        raise TrustError(f"the key from {source} is not this vTPM's state key")
    return key
