"""vTPM records on bytes and files: the key and its wrappings, backups, the store's record, the state directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tvorch.adapters import vtpm_state
from tvorch.adapters.store import Store
from tvorch.config import ConfigError, parse_config
from tvorch.core.launch.gate import start_refusals
from tvorch.core.launch.instance import InstanceRecord, InstanceState
from tvorch.core.vtpm.ledger import broken_link, state_digest_of
from tvorch.core.timestamps import utc_now
from tvorch.core.vtpm.records import KeyProtection, VtpmRecord, check_key, key_check_value, new_state_key
from tvorch.core.vtpm.backup import backup_header, sign_backup, verify_backup
from tvorch.core.vtpm.escrow import (
    escrow_unwrap,
    escrow_wrap,
    load_escrow_private_key,
    load_escrow_public_key,
    public_key_fingerprint,
)
from tvorch.errors import InputError, TrustError

from .test_gate import clean  # a StartEvidence where everything matches


@pytest.fixture(scope="module")
def escrow() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# -- the key ------------------------------------------------------------------


def test_state_key_is_64_hex_characters_and_fresh():
    keys = {new_state_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(len(k) == 64 and k.decode().isalnum() and k == k.lower() and b"\0" not in k for k in keys)


def test_key_check_recognises_only_its_key():
    key, other = new_state_key(), new_state_key()
    assert check_key(key, key_check_value(key), "test") == key
    with pytest.raises(TrustError, match="not this vTPM's state key"):
        check_key(other, key_check_value(key), "the escrow key")
    with pytest.raises(TrustError, match="not a tvorch vTPM state key"):
        check_key(b"short", None, "the host TPM")


def test_escrow_round_trip_and_refusals(escrow):
    public = escrow.public_key()
    key = new_state_key()
    blob = escrow_wrap(key, public)
    assert key not in blob
    assert escrow_unwrap(blob, escrow, public_key_fingerprint(public)) == key
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(TrustError, match="not the one the state key was wrapped to"):
        escrow_unwrap(blob, other, public_key_fingerprint(public))
    with pytest.raises(TrustError, match="cannot unwrap"):
        escrow_unwrap(blob, other, None)
    with pytest.raises(TrustError, match="cannot unwrap"):
        escrow_unwrap(blob[:-1] + bytes([blob[-1] ^ 1]), escrow, None)


def test_escrow_key_files_are_checked(escrow, tmp_path):
    pub_pem = escrow.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    assert load_escrow_public_key(pub_pem, "k").key_size == 2048
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    with pytest.raises(InputError, match="at least 2048"):
        load_escrow_public_key(small.public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo), "k")
    ec_pub = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(InputError, match="must be RSA"):
        load_escrow_public_key(ec_pub, "k")
    with pytest.raises(InputError, match="not a PEM public key"):
        load_escrow_public_key(b"garbage", "k")
    encrypted = escrow.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.BestAvailableEncryption(b"pw"))
    with pytest.raises(InputError, match="is encrypted"):
        load_escrow_private_key(encrypted, "k")
    with pytest.raises(InputError, match="not a PEM private key"):
        load_escrow_private_key(pub_pem, "k")


# -- backups ------------------------------------------------------------------

NODE_KEY = ec.generate_private_key(ec.SECP256R1())
FILES = {"tpm2-00.permall": b"\x01" * 300, "tpm2-00.volatilestate": b"\x02" * 40}


def _backup(files=FILES):
    header = backup_header("i-000000000001", "5c0a7e1d-8f3b-4a26-9d41-000000000001", "ab" * 32, files,
                           utc_now(), True)
    return header, sign_backup(header, NODE_KEY)


def test_backup_verifies_and_names_its_state():
    header, signed = _backup()
    got = verify_backup(signed, dict(FILES), NODE_KEY.public_key())
    assert got == header
    assert got.state_digest == state_digest_of(FILES)


@pytest.mark.parametrize("field", ["instance_id", "uuid", "ek_fingerprint", "state_digest", "created_at",
                                   "encrypted", "files"])
def test_backup_header_with_any_field_changed_is_refused(field):
    _, signed = _backup()
    outer = json.loads(signed)
    value = outer["header"][field]
    if isinstance(value, bool):
        outer["header"][field] = not value
    elif isinstance(value, dict):
        outer["header"][field] = {**value, "tpm2-00.permall": "00" * 32}
    else:
        outer["header"][field] = value[:-1] + ("0" if value[-1] != "0" else "1")
    with pytest.raises(TrustError):
        verify_backup(json.dumps(outer).encode(), dict(FILES), NODE_KEY.public_key())


def test_backup_with_a_changed_missing_or_extra_file_is_refused():
    _, signed = _backup()
    with pytest.raises(TrustError, match="does not match its header"):
        verify_backup(signed, {**FILES, "tpm2-00.permall": b"\x01" * 299 + b"\x00"}, NODE_KEY.public_key())
    with pytest.raises(TrustError, match="holds files"):
        verify_backup(signed, {"tpm2-00.permall": FILES["tpm2-00.permall"]}, NODE_KEY.public_key())
    with pytest.raises(TrustError, match="holds files"):
        verify_backup(signed, {**FILES, "extra": b""}, NODE_KEY.public_key())


def test_backup_signed_by_another_key_or_malformed_is_refused():
    _, signed = _backup()
    with pytest.raises(TrustError, match="not signed by this node's key"):
        verify_backup(signed, dict(FILES), ec.generate_private_key(ec.SECP256R1()).public_key())
    for junk in (b"", b"{}", b"[1]", b'{"header": {}, "signature": "!!"}'):
        with pytest.raises(TrustError):
            verify_backup(junk, dict(FILES), NODE_KEY.public_key())
    with pytest.raises(TrustError, match="plain file name"):
        _backup({"../escape": b"x"})


# -- the store ----------------------------------------------------------------


def _instance(store: Store, instance_id: str = "i-000000000001") -> InstanceRecord:
    now = utc_now()
    record = InstanceRecord(instance_id, "vm1", "5c0a7e1d-8f3b-4a26-9d41-000000000001", "/img", "/ovl", "/log",
                            InstanceState.STOPPED, "qemu", "<domain/>", now, now)
    store.create_instance(record)
    return record


def _vtpm(instance_id: str) -> VtpmRecord:
    now = utc_now()
    return VtpmRecord(
        instance_id=instance_id, state_dir="/var/lib/libvirt/swtpm/x", swtpm_version="0.7.1",
        ek_fingerprint="ab" * 32, ek_cert=b"\x30\x82der", ek_public_pem=b"PEM", key_protection=KeyProtection.HOST_TPM,
        secret_uuid="7d0e1c2b-3a4f-4b5c-8d6e-9f0a1b2c3d4e", sealed_key=b'{"sealed":1}', seal_pcrs=(0, 2, 4, 7),
        escrow_key=b"wrapped", escrow_fingerprint="cd" * 32, key_check="ef" * 32, created_at=now, updated_at=now,
    )


def test_store_keeps_the_vtpm_record_and_its_first_ledger_entry(tmp_path):
    store = Store(tmp_path / "tvorch.db")
    record = _instance(store)
    made = _vtpm(record.id)
    store.create_vtpm(made, "11" * 32)
    assert store.vtpm(record.id) == made  # every field round-trips
    ledger = store.ledger(record.id)
    assert [(e.event, e.state_digest) for e in ledger] == [("manufactured", "11" * 32)]

    store.reseal_vtpm(record.id, b"new", (7,), "test")
    assert store.vtpm(record.id).sealed_key == b"new" and store.vtpm(record.id).seal_pcrs == (7,)

    store.set_vtpm_pending(record.id, {"op": "restore", "from": "11" * 32, "to": "22" * 32, "source": "/b"})
    assert store.vtpm_pending(record.id)["to"] == "22" * 32
    store.complete_vtpm_change(record.id, "restored", "22" * 32, "from /b")
    assert store.vtpm_pending(record.id) is None
    ledger = store.ledger(record.id)
    assert [e.event for e in ledger] == ["manufactured", "restored"] and broken_link(ledger) is None

    store.purge_vtpm(record.id)
    purged = store.vtpm(record.id)
    assert purged.sealed_key is None and purged.escrow_key is None and purged.purged_at is not None
    store.close()


def test_a_failed_completion_changes_nothing(tmp_path):
    """Ledger entry and pending flag move together: a failing transaction leaves both as they were."""
    store = Store(tmp_path / "tvorch.db")
    record = _instance(store)
    store.create_vtpm(_vtpm(record.id), "11" * 32)
    store.set_vtpm_pending(record.id, {"op": "restore", "from": "11" * 32, "to": "22" * 32, "source": "/b"})
    store._db.execute("CREATE TRIGGER fail BEFORE INSERT ON instance_events BEGIN SELECT RAISE(ABORT, 'boom'); END")
    with pytest.raises(Exception):
        store.complete_vtpm_change(record.id, "restored", "22" * 32, "from /b")
    store._db.execute("DROP TRIGGER fail")
    assert store.vtpm_pending(record.id) is not None
    assert [e.event for e in store.ledger(record.id)] == ["manufactured"]
    store.close()


# -- the state directory --------------------------------------------------------


def _state(tmp_path: Path, files: dict[str, bytes]) -> Path:
    directory = tmp_path / "uuid"
    (directory / "tpm2").mkdir(parents=True)
    for name, content in files.items():
        (directory / "tpm2" / name).write_bytes(content)
    (directory / "tpm2" / ".lock").write_bytes(b"")
    return directory


def test_state_digest_ignores_the_lock_and_matches_the_pure_digest(tmp_path):
    directory = _state(tmp_path, FILES)
    assert vtpm_state.state_digest(directory) == state_digest_of(FILES)
    (directory / "tpm2" / ".lock").write_bytes(b"pid")
    assert vtpm_state.state_digest(directory) == state_digest_of(FILES)
    assert vtpm_state.state_digest(tmp_path / "none") is None


def test_exchange_swaps_whole_directories(tmp_path):
    directory = _state(tmp_path, FILES)
    new = {"tpm2-00.permall": b"new state"}
    staged = vtpm_state.stage_state(directory, new, "nobody-such-user", "t1")
    assert oct(staged.stat().st_mode & 0o777) == "0o700"
    assert oct((staged / "tpm2-00.permall").stat().st_mode & 0o777) == "0o600"
    vtpm_state.exchange(directory, staged)
    assert vtpm_state.state_digest(directory) == state_digest_of(new)
    assert sorted(p.name for p in staged.iterdir()) == sorted([*FILES, ".lock"])  # the old state, to sweep
    assert vtpm_state.sweep_staged(directory) == [staged]
    assert not staged.exists()
    assert sorted(os.listdir(directory)) == ["tpm2"]


def test_exchange_without_a_staged_directory_fails_and_changes_nothing(tmp_path):
    directory = _state(tmp_path, FILES)
    with pytest.raises(OSError):
        vtpm_state.exchange(directory, directory / "tpm2.staged-missing")
    assert vtpm_state.state_digest(directory) == state_digest_of(FILES)


# -- config and gate -------------------------------------------------------------


def test_vtpm_config_defaults_and_refusals():
    cfg = parse_config(b"")
    assert (cfg.vtpm.key_protection, cfg.vtpm.seal_pcrs, cfg.vtpm.seal_bank, cfg.vtpm.escrow_public_key) == (
        "host-tpm", (0, 2, 4, 7), "sha256", "")
    assert parse_config(b'[vtpm]\nkey_protection = "none"\n').vtpm.key_protection == "none"
    for text, words in ((b'[vtpm]\nkey_protection = "maybe"\n', "vtpm.key_protection"),
                        (b"[vtpm]\nseal_pcrs = [24]\n", "vtpm.seal_pcrs"),
                        (b"[vtpm]\nseal_pcrs = []\n", "vtpm.seal_pcrs"),
                        (b'[vtpm]\nescrow_public_key = "escrow.pem"\n', "absolute path"),
                        (b"[vtpm]\nescrow = 1\n", "vtpm.escrow")):
        with pytest.raises(ConfigError, match=words):
            parse_config(text)


def test_an_interrupted_restore_refuses_the_start():
    import dataclasses

    reasons = start_refusals(dataclasses.replace(clean(), vtpm_pending=True))
    assert reasons == ("a vTPM restore was interrupted and is not settled (`tvorch reconcile` settles it)",)


def test_state_is_never_read_through_a_link(tmp_path):
    """swtpm's user owns the directory: root must not follow a link planted there into the ledger or a backup."""
    secret = tmp_path / "secret.key"
    secret.write_bytes(b"root only")
    directory = _state(tmp_path, FILES)
    (directory / "tpm2" / "zz").symlink_to(secret)
    assert vtpm_state.read_state(directory) == FILES  # the link is not state
    # A state file swapped for a link to an older copy is missing from the digest: not the ledger's.
    old = tmp_path / "old-permall"
    old.write_bytes(FILES["tpm2-00.permall"])
    (directory / "tpm2" / "tpm2-00.permall").unlink()
    (directory / "tpm2" / "tpm2-00.permall").symlink_to(old)
    assert vtpm_state.state_digest(directory) != state_digest_of(FILES)


def test_create_new_never_replaces_a_file(tmp_path):
    from tvorch.adapters.files import create_new

    target = tmp_path / "backup.tar"
    create_new(target, b"first")
    assert target.read_bytes() == b"first" and oct(target.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(FileExistsError):
        create_new(target, b"second")
    assert target.read_bytes() == b"first"
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        create_new(tmp_path / "link", b"x")
    assert not (tmp_path / "elsewhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backup.tar", "link"]  # no temporary left


def test_a_pcr_extended_without_an_event_is_named():
    from pathlib import Path as P

    from tvorch.core.attestation.bundle import replay_problems
    from tvorch.core.attestation.eventlog import parse_event_log, replay

    raw = (P(__file__).resolve().parent.parent / "data" / "eventlogs" / "uefi-crb.bin").read_bytes()
    pcrs = {i: bytes.fromhex(v) for i, v in replay(parse_event_log(raw), "sha256").items()}
    pcrs[13] = b"\0" * 32  # quoted, untouched: its reset value
    pcrs[10] = b"\x01" * 32  # IMA's: judged against its own list, not here
    assert replay_problems(raw, "sha256", pcrs) == ()
    pcrs[13] = b"\x01" * 32
    assert replay_problems(raw, "sha256", pcrs) == ("PCR 13 was extended but the event log has no event for it",)
