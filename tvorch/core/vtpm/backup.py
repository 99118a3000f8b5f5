"""vTPM backups: the state files and a header signed by the node key, in one tar.

The files are the state as swtpm wrote it, so a backup of an encrypted vTPM
is ciphertext and only this node's record of the instance holds its key. The
header names the instance, its EK and a digest of every file, so a restore
refuses a backup of another VM, of another vTPM, or with any byte changed.

The container is a PAX tar of regular members: the header file
(``HEADER_MEMBER``) and each state file under ``STATE_PREFIX``. Reading one
takes nothing else: no link, directory, device or sparse member, no name
twice, no path outside those names, nothing past ``MAX_BACKUP`` bytes.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from dataclasses import dataclass
from os import PathLike
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from tvorch.core.codec import b64decode, b64encode, canonical_json, parse_json
from tvorch.core.vtpm.ledger import state_digest_of
from tvorch.errors import InputError, TrustError

BACKUP_VERSION = 1
BACKUP_FORMAT = "tvorch-vtpm-backup"
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HEADER_MEMBER = "tvorch-vtpm-backup.json"
STATE_PREFIX = "state/"
MAX_BACKUP = 64 * 1024 * 1024  # the backup file, and what its members may hold together


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


def pack_backup(header_file: bytes, files: dict[str, bytes]) -> bytes:
    """The backup file: the signed header (sign_backup), then FILES by name, each 0600 with mtime 0."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add_member(tar, HEADER_MEMBER, header_file)
        for file_name, content in sorted(files.items()):
            _add_member(tar, STATE_PREFIX + file_name, content)
    return buf.getvalue()


def unpack_backup(data: bytes, source: str | PathLike[str]) -> tuple[bytes, dict[str, bytes]]:
    """The header file and state files of a backup; only regular members with the names a backup has.

    SOURCE names the backup in messages. Nothing here is trusted yet: the
    header and files are checked by verify_backup.
    """
    if len(data) > MAX_BACKUP:
        raise InputError(f"refused vTPM restore: {source} is larger than {MAX_BACKUP} bytes")
    header: bytes | None = None
    files: dict[str, bytes] = {}
    seen: set[str] = set()
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:  # one at a time: each is judged before the next is looked for
                if not member.isfile() or member.issparse():  # a sparse member's holes read as any size
                    raise TrustError(f"{source}: member {member.name!r} is not a regular file")
                if member.name in seen:
                    raise TrustError(f"{source}: member {member.name!r} appears twice")
                seen.add(member.name)
                total += member.size
                if total > MAX_BACKUP:
                    raise TrustError(f"{source}: member {member.name!r} takes the backup past {MAX_BACKUP} bytes")
                is_header = member.name == HEADER_MEMBER
                file_name = member.name[len(STATE_PREFIX):]
                if not is_header and not (member.name.startswith(STATE_PREFIX) and "/" not in file_name):
                    raise TrustError(f"{source}: unexpected member {member.name!r}")
                content = tar.extractfile(member)
                body = content.read() if content else b""
                if is_header:
                    header = body
                else:
                    files[file_name] = body
    except tarfile.TarError as err:
        raise InputError(f"refused vTPM restore: {source} is not a tvorch vTPM backup ({err})") from None
    if header is None:
        raise InputError(f"refused vTPM restore: {source} has no {HEADER_MEMBER}")
    return header, files


def _add_member(tar: tarfile.TarFile, name: str, content: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(content), 0o600, 0
    tar.addfile(info, io.BytesIO(content))
