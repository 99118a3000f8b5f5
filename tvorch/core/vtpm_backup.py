"""vTPM backups: the state files and a header signed by the node key.

The files are the state as swtpm wrote it, so a backup of an encrypted vTPM
is ciphertext and only this node's record of the instance holds its key. The
header names the instance, its EK and a digest of every file, so a restore
refuses a backup of another VM, of another vTPM, or with any byte changed.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from tvorch.core.codec import b64decode, b64encode, canonical_json, parse_json
from tvorch.core.ledger import state_digest_of
from tvorch.errors import TrustError

BACKUP_VERSION = 1
BACKUP_FORMAT = "tvorch-vtpm-backup"
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class BackupHeader:
    instance_id: str
    uuid: str
    ek_fingerprint: str
    state_digest: str
    files: dict[str, str]  # name -> sha256 of its content
    created_at: str
    encrypted: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": BACKUP_FORMAT, "version": BACKUP_VERSION, "instance_id": self.instance_id, "uuid": self.uuid,
            "ek_fingerprint": self.ek_fingerprint, "state_digest": self.state_digest, "files": dict(self.files),
            "created_at": self.created_at, "encrypted": self.encrypted,
        }


def backup_header(instance_id: str, uuid: str, ek_fingerprint: str, files: dict[str, bytes], created_at: str,
                  encrypted: bool) -> BackupHeader:
    for name in files:
        _file_name(name)
    return BackupHeader(instance_id, uuid, ek_fingerprint, state_digest_of(files),
                        {n: hashlib.sha256(c).hexdigest() for n, c in sorted(files.items())}, created_at, encrypted)


def sign_backup(header: BackupHeader, key: ec.EllipticCurvePrivateKey) -> bytes:
    """The header file: canonical JSON of the header and an ECDSA signature over it by the node key."""
    body = _canonical(header.to_dict())
    signature = key.sign(body, ec.ECDSA(hashes.SHA256()))
    return _canonical({"header": header.to_dict(), "signature": b64encode(signature)})


def verify_backup(header_file: bytes, files: dict[str, bytes], signer: ec.EllipticCurvePublicKey) -> BackupHeader:
    """The header, if the node key signed it and FILES are exactly the files it names; TrustError otherwise."""
    try:
        outer = parse_json(header_file, "the backup's header", TrustError)
        data, signature = outer["header"], b64decode(outer["signature"], "the backup's header signature", TrustError)
        if data.get("format") != BACKUP_FORMAT or data.get("version") != BACKUP_VERSION:
            raise TrustError(f"not a {BACKUP_FORMAT} version {BACKUP_VERSION}")
        header = BackupHeader(
            instance_id=_str(data["instance_id"]), uuid=_str(data["uuid"]),
            ek_fingerprint=_str(data["ek_fingerprint"]), state_digest=_str(data["state_digest"]),
            files={_file_name(n): _str(d) for n, d in dict(data["files"]).items()},
            created_at=_str(data["created_at"]), encrypted=bool(data["encrypted"]),
        )
    except TrustError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError):
        raise TrustError("the backup's header is malformed") from None
    try:
        signer.verify(signature, _canonical(header.to_dict()), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise TrustError("the backup's header is not signed by this node's key") from None
    if sorted(files) != sorted(header.files):
        raise TrustError(f"the backup holds files {sorted(files)}, its header names {sorted(header.files)}")
    for name, content in files.items():
        if hashlib.sha256(content).hexdigest() != header.files[name]:
            raise TrustError(f"the backup's {name} does not match its header")
    if state_digest_of(files) != header.state_digest:
        raise TrustError("the backup's state digest does not match its files")
    return header


def _canonical(obj: object) -> bytes:
    return canonical_json(obj, ensure_ascii=True)


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError
    return value


def _file_name(name: object) -> str:
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name):
        raise TrustError(f"the backup names a file {name!r} that is not a plain file name")
    return name
