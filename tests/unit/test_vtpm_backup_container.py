"""The vTPM backup container (tvorch.core.vtpm.backup: pack_backup, unpack_backup), on bytes.

What a restore reads from a file an operator hands it: only the header and
state files come out, and any other member (a link, a directory, a sparse
file, a name twice, a path elsewhere, more than the size limit) is refused
before anything is checked or written.
"""

from __future__ import annotations

import io
import tarfile

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tvorch.core.vtpm.backup import (
    HEADER_MEMBER,
    MAX_BACKUP,
    STATE_PREFIX,
    backup_header,
    pack_backup,
    sign_backup,
    unpack_backup,
    verify_backup,
)
from tvorch.errors import InputError, TrustError

SRC = "/tmp/backup.tar"
FILES = {"tpm2-00.permall": b"\x01" * 300, "tpm2-00.volatilestate": b"\x02" * 40}
HEADER = b'{"header": {}, "signature": ""}'


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, content in members:
            tar.addfile(info, io.BytesIO(content) if info.isfile() else None)
    return buf.getvalue()


def _file(name: str, content: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    return info, content


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, b""


def test_round_trip_and_the_members_a_backup_has() -> None:
    data = pack_backup(HEADER, FILES)
    assert unpack_backup(data, SRC) == (HEADER, FILES)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [HEADER_MEMBER] + [STATE_PREFIX + n for n in sorted(FILES)]
    assert {(m.mode, m.mtime, m.type) for m in members} == {(0o600, 0, tarfile.REGTYPE)}
    assert pack_backup(HEADER, dict(reversed(FILES.items()))) == data  # the same bytes whatever the order


def test_a_signed_backup_survives_the_container() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    header = backup_header("i-000000000001", "u", "ek", FILES, "2026-01-01T00:00:00Z", True)
    header_file, files = unpack_backup(pack_backup(sign_backup(header, key), FILES), SRC)
    assert verify_backup(header_file, files, key.public_key()) == header


def test_a_backup_without_its_header_is_refused() -> None:
    with pytest.raises(InputError) as err:
        unpack_backup(_tar(_file(STATE_PREFIX + "tpm2-00.permall", b"x")), SRC)
    assert str(err.value) == f"refused vTPM restore: {SRC} has no {HEADER_MEMBER}"


def test_what_is_not_a_tar_is_refused() -> None:
    with pytest.raises(InputError) as err:
        unpack_backup(b"not a tar file" * 10, SRC)
    assert str(err.value).startswith(f"refused vTPM restore: {SRC} is not a tvorch vTPM backup (")


@pytest.mark.parametrize("name", [
    "tvorch-vtpm-backup.json.bak", "./tvorch-vtpm-backup.json", "state", "state/sub/tpm2-00.permall",
    "state/../../etc/cron.d/x", "../state/tpm2-00.permall", "/var/lib/libvirt/swtpm/x", "other/tpm2-00.permall",
])
def test_a_member_named_otherwise_is_refused(name: str) -> None:
    with pytest.raises(TrustError) as err:
        unpack_backup(_tar(_file(HEADER_MEMBER, HEADER), _file(name, b"x")), SRC)
    assert str(err.value) == f"{SRC}: unexpected member {name!r}"


@pytest.mark.parametrize("member", [
    _link(STATE_PREFIX + "tpm2-00.permall", "/etc/shadow"),
    _link(STATE_PREFIX + "tpm2-00.permall", HEADER_MEMBER, tarfile.LNKTYPE),
    _link(HEADER_MEMBER, "/etc/passwd"),
    _link(STATE_PREFIX + "tpm2-00.permall", "", tarfile.DIRTYPE),
    _link(STATE_PREFIX + "tpm2-00.permall", "", tarfile.FIFOTYPE),
], ids=["symlink", "hard link", "header symlink", "directory", "fifo"])
def test_a_member_that_is_not_a_regular_file_is_refused(member: tuple[tarfile.TarInfo, bytes]) -> None:
    with pytest.raises(TrustError) as err:
        unpack_backup(_tar(_file(HEADER_MEMBER, HEADER), member), SRC)
    assert str(err.value) == f"{SRC}: member {member[0].name!r} is not a regular file"


def test_a_sparse_member_is_refused() -> None:
    """A few bytes of PAX header make a member whose holes read as any size (here 1 TB)."""
    info = tarfile.TarInfo(STATE_PREFIX + "tpm2-00.permall")
    info.pax_headers = {"GNU.sparse.size": str(10**12), "GNU.sparse.map": "0,0",
                        "GNU.sparse.name": STATE_PREFIX + "tpm2-00.permall"}
    data = _tar(_file(HEADER_MEMBER, HEADER), (info, b""))
    assert len(data) <= 10240  # one tar record
    with pytest.raises(TrustError) as err:
        unpack_backup(data, SRC)
    assert str(err.value) == f"{SRC}: member {STATE_PREFIX + 'tpm2-00.permall'!r} is not a regular file"


@pytest.mark.parametrize("twice", [HEADER_MEMBER, STATE_PREFIX + "tpm2-00.permall"])
def test_a_member_given_twice_is_refused(twice: str) -> None:
    """Readers differ on which copy counts (tar keeps the last): a backup names each file once."""
    members = [_file(HEADER_MEMBER, HEADER), _file(STATE_PREFIX + "tpm2-00.permall", b"a"), _file(twice, b"b")]
    with pytest.raises(TrustError) as err:
        unpack_backup(_tar(*members), SRC)
    assert str(err.value) == f"{SRC}: member {twice!r} appears twice"


def test_members_past_the_size_limit_are_refused() -> None:
    """A member claiming more than the limit is refused before it is read (its bytes need not be there)."""
    big = tarfile.TarInfo(STATE_PREFIX + "tpm2-00.permall")
    big.size = MAX_BACKUP + 1
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(*(lambda i, c: (i, io.BytesIO(c)))(*_file(HEADER_MEMBER, HEADER)))
        tar.fileobj.write(big.tobuf(tarfile.PAX_FORMAT, tar.encoding, tar.errors))  # the header alone
    with pytest.raises(TrustError) as err:
        unpack_backup(buf.getvalue(), SRC)
    assert str(err.value) == f"{SRC}: member {big.name!r} takes the backup past {MAX_BACKUP} bytes"


def test_a_file_past_the_size_limit_is_refused() -> None:
    with pytest.raises(InputError) as err:
        unpack_backup(b"\0" * (MAX_BACKUP + 1), SRC)
    assert str(err.value) == f"refused vTPM restore: {SRC} is larger than {MAX_BACKUP} bytes"
