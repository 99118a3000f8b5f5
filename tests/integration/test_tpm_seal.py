"""Sealing a secret to the host TPM under a PCR policy, against a real swtpm as the host TPM.

The secret is what tvorch seals in practice: a vTPM state key, 64 ASCII hex
bytes. A small TCP recorder between tpm2-tss and swtpm checks that the secret
never crosses the "bus" in clear, at sealing or at unsealing.
"""

from __future__ import annotations

import hashlib
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_HC, TPM2_SE, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PRIVATE, TPM2B_PUBLIC, TPML_PCR_SELECTION, TPMT_SYM_DEF

from tests.tpm_fixtures import _free_port_pair, running_swtpm, swtpm_host_fixture  # noqa: F401
from tvorch.adapters.tpm import SealedKeyLocked, Tpm, open_tpm
from tvorch.core.vtpm.sealed import SealedKey, policy_pcr_digest
from tvorch.errors import ExitCode, InputError, TpmError

pytestmark = pytest.mark.integration

PCRS = [0, 2, 4, 7]


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def vtpm_key() -> bytes:
    return secrets.token_hex(32).encode("ascii")


def boot(tpm: Tpm, *measurements: tuple[int, bytes]) -> None:
    """Extend PCRs as a measuring firmware would, so the sealed values are not all zeros."""
    for pcr, data in measurements:
        tpm.extend(pcr, {"sha256": sha256(data), "sha1": hashlib.sha1(data).digest()})


def leftovers(tcti: str) -> tuple[list[int], list[int]]:
    """Transient objects and sessions still in the TPM (swtpm has no resource manager to clean up)."""
    esapi = ESAPI(tcti)
    try:
        _, objects = esapi.get_capability(TPM2_CAP.HANDLES, TPM2_HC.TRANSIENT_FIRST, 64)
        _, loaded = esapi.get_capability(TPM2_CAP.HANDLES, TPM2_HC.LOADED_SESSION_FIRST, 64)
        _, saved = esapi.get_capability(TPM2_CAP.HANDLES, TPM2_HC.ACTIVE_SESSION_FIRST, 64)
        return [int(h) for h in objects.data.handles], [int(h) for h in loaded.data.handles] + [
            int(h) for h in saved.data.handles
        ]
    finally:
        esapi.close()


@pytest.fixture
def booted(swtpm_host: str) -> str:
    with open_tpm(swtpm_host) as tpm:
        boot(tpm, (0, b"firmware"), (2, b"option roms"), (4, b"boot loader"), (7, b"secure boot db"), (9, b"initrd"))
    return swtpm_host


def test_seal_and_unseal_round_trip_leaving_nothing_in_the_tpm(booted: str) -> None:
    key = vtpm_key()
    with open_tpm(booted) as tpm:
        sealed = tpm.seal(key, PCRS)
        assert sealed.bank == "sha256" and sealed.pcrs == tuple(PCRS)
        assert key not in sealed.to_bytes() and key not in repr(sealed).encode()
        for _ in range(4):  # a leaked handle would fill one of swtpm's three object slots for good
            assert tpm.unseal(sealed) == key
    assert leftovers(booted) == ([], [])


def test_unseal_works_from_a_new_session_and_from_the_file_form(booted: str) -> None:
    key = vtpm_key()
    with open_tpm(booted) as tpm:
        blob = tpm.seal(key, PCRS).to_bytes()
    with open_tpm(booted) as tpm:  # nothing depends on the transient state of the first session
        restored = SealedKey.from_bytes(blob)
        assert restored.to_bytes() == blob
        assert tpm.unseal(restored) == key


def test_a_changed_sealed_pcr_locks_the_key_and_leaves_nothing_loaded(booted: str) -> None:
    key = vtpm_key()
    with open_tpm(booted) as tpm:
        sealed = tpm.seal(key, PCRS)
        boot(tpm, (4, b"another boot loader"))
        for _ in range(4):
            with pytest.raises(SealedKeyLocked) as err:
                tpm.unseal(sealed)
    message = str(err.value)
    assert message.startswith("the host's boot state changed since the key was sealed: sha256 PCRs 0,2,4,7 no longer match")
    assert "\n" not in message and key.decode() not in message
    assert isinstance(err.value, TpmError) and err.value.exit_code == ExitCode.TPM
    assert err.value.rc is not None and err.value.rc & 0xFF == 0x9D  # TPM_RC_POLICY_FAIL, session-numbered
    assert leftovers(booted) == ([], [])


def test_a_pcr_outside_the_selection_does_not_matter(booted: str) -> None:
    key = vtpm_key()
    with open_tpm(booted) as tpm:
        sealed = tpm.seal(key, PCRS)
        boot(tpm, (9, b"a new initrd"), (10, b"an IMA measurement"), (16, b"debug"))
        assert tpm.unseal(sealed) == key


def test_the_sha1_bank_can_be_sealed_to(booted: str) -> None:
    key = vtpm_key()
    with open_tpm(booted) as tpm:
        sealed = tpm.seal(key, [0, 7], bank="sha1")
        assert sealed.policy_digest == policy_pcr_digest(tpm.read_pcrs([0, 7], "sha1"), "sha1")
        assert tpm.unseal(sealed) == key
        tpm.extend(7, {"sha1": hashlib.sha1(b"dbx update").digest()})  # the sha256 bank is unchanged
        with pytest.raises(SealedKeyLocked, match="sha1 PCRs 0,7 no longer match"):
            tpm.unseal(sealed)


def test_the_object_is_policy_only_and_its_policy_is_the_pure_computation(booted: str) -> None:
    with open_tpm(booted) as tpm:
        values = tpm.read_pcrs(PCRS)
        sealed = tpm.seal(vtpm_key(), PCRS)
    public, _ = TPM2B_PUBLIC.unmarshal(sealed.public)
    area = public.publicArea
    assert bytes(area.authPolicy) == sealed.policy_digest == policy_pcr_digest(values)
    assert area.type == TPM2_ALG.KEYEDHASH and area.nameAlg == TPM2_ALG.SHA256
    assert area.objectAttributes == TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT  # no userWithAuth
    assert area.parameters.keyedHashDetail.scheme.scheme == TPM2_ALG.NULL


def test_a_policy_predicted_from_expected_measurements_is_the_one_the_tpm_uses(booted: str) -> None:
    with open_tpm(booted) as tpm:
        now = tpm.read_pcrs(PCRS)
        expected = {**now, 4: sha256(now[4] + sha256(b"the next kernel"))}
        predicted = policy_pcr_digest(expected)
        boot(tpm, (4, b"the next kernel"))
        assert tpm.seal(vtpm_key(), PCRS).policy_digest == predicted


@pytest.mark.parametrize(
    ("bank", "pcrs"),
    [("sha256", [0]), ("sha256", [0, 1, 2, 3, 4, 5, 6, 7]), ("sha256", [4, 9, 16, 23]), ("sha1", [0, 2, 4, 7, 17])],
)
def test_a_trial_policy_session_agrees_with_the_pure_computation(booted: str, bank: str, pcrs: list[int]) -> None:
    with open_tpm(booted) as tpm:
        values = tpm.read_pcrs(pcrs, bank)
    esapi = ESAPI(booted)
    try:
        trial = esapi.start_auth_session(
            ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.TRIAL, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256
        )
        esapi.policy_pcr(trial, b"", TPML_PCR_SELECTION.parse(f"{bank}:{','.join(map(str, pcrs))}"))
        digest = bytes(esapi.policy_get_digest(trial))
        esapi.flush_context(trial)
    finally:
        esapi.close()
    assert digest == policy_pcr_digest(values, bank)


def test_a_key_sealed_on_one_tpm_does_not_unseal_on_another(booted: str, tmp_path: Path) -> None:
    with open_tpm(booted) as tpm:
        sealed = tpm.seal(vtpm_key(), PCRS)
    with running_swtpm(tmp_path / "other-tpm") as other:
        with open_tpm(other) as tpm:
            boot(tpm, (0, b"firmware"), (2, b"option roms"), (4, b"boot loader"), (7, b"secure boot db"))
            assert tpm.read_pcrs(PCRS) == _pcrs_of(booted)  # same boot: only the TPM differs
            with pytest.raises(TpmError, match="^sealed on another TPM") as err:
                tpm.unseal(sealed)
        assert leftovers(other) == ([], [])
    assert not isinstance(err.value, SealedKeyLocked) and "\n" not in str(err.value)
    assert err.value.rc is not None and err.value.rc & 0x3F == 0x1F  # TPM_RC_INTEGRITY


def test_a_public_area_with_another_policy_does_not_load(booted: str) -> None:
    """The private blob's integrity covers the public area: an easier policy cannot be swapped in."""
    with open_tpm(booted) as tpm:
        sealed = tpm.seal(vtpm_key(), PCRS)
        easier = policy_pcr_digest(tpm.read_pcrs([16]))
        public, _ = TPM2B_PUBLIC.unmarshal(sealed.public)
        public.publicArea.authPolicy = easier
        forged = SealedKey(sealed.bank, (16,), public.marshal(), sealed.private, easier)
        with pytest.raises(TpmError, match="blob was altered"):
            tpm.unseal(forged)
        mismatched = SealedKey(sealed.bank, sealed.pcrs, sealed.public, sealed.private, easier)
        with pytest.raises(InputError, match="not the authPolicy"):
            tpm.unseal(mismatched)


def test_the_secret_size_is_checked(booted: str) -> None:
    with open_tpm(booted) as tpm:
        biggest = secrets.token_bytes(128)
        assert tpm.unseal(tpm.seal(biggest, [7])) == biggest
        with pytest.raises(InputError, match="at most 128 bytes, not 129"):
            tpm.seal(secrets.token_bytes(129), [7])
        with pytest.raises(InputError, match="empty"):
            tpm.seal(b"", [7])
        with pytest.raises(InputError, match="out of range"):
            tpm.seal(b"k", [24])
        with pytest.raises(InputError, match="no PCRs"):
            tpm.seal(b"k", [])


def test_an_owner_hierarchy_with_a_password_is_named(swtpm_host: str) -> None:
    esapi = ESAPI(swtpm_host)
    try:
        esapi.hierarchy_change_auth(ESYS_TR.OWNER, b"owner password")
    finally:
        esapi.close()
    with open_tpm(swtpm_host) as tpm:
        with pytest.raises(TpmError, match="owner hierarchy has an authorization value"):
            tpm.seal(vtpm_key(), PCRS)
    assert leftovers(swtpm_host) == ([], [])


# --- the secret on the wire ----------------------------------------------------------


class Recorder:
    """A TCP relay for both swtpm ports (command N, control N+1) that keeps every byte either way."""

    def __init__(self, tcti: str) -> None:
        self.upstream = int(tcti.rsplit("port=", 1)[1])
        self.traffic = bytearray()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.tcti = ""

    def start(self) -> None:
        ports = None
        while ports is None:
            ports = _free_port_pair()
        for offset, port in enumerate(ports):
            listener = socket.create_server(("127.0.0.1", port))
            self._sockets.append(listener)
            threading.Thread(target=self._accept, args=(listener, self.upstream + offset), daemon=True).start()
        self.tcti = f"swtpm:host=127.0.0.1,port={ports[0]}"

    def stop(self) -> None:
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener: socket.socket, upstream: int) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", upstream))
            self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                try:
                    sink.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            with self._lock:
                self.traffic += data
            sink.sendall(data)


@contextmanager
def recorded(tcti: str) -> Iterator[Recorder]:
    recorder = Recorder(tcti)
    recorder.start()
    try:
        yield recorder
    finally:
        recorder.stop()


def test_the_secret_never_crosses_the_bus_in_clear(booted: str) -> None:
    key = vtpm_key()
    with recorded(booted) as wire:
        with open_tpm(wire.tcti) as tpm:
            sealed = tpm.seal(key, PCRS)
            assert tpm.unseal(sealed) == key
        assert key[:16] not in wire.traffic
        # The recorder does see a secret that is sent in clear: an unseal without parameter encryption.
        esapi = ESAPI(wire.tcti)
        try:
            srk = _clear_srk(esapi)
            public, _ = TPM2B_PUBLIC.unmarshal(sealed.public)
            private, _ = TPM2B_PRIVATE.unmarshal(sealed.private)
            handle = esapi.load(srk, private, public)
            session = esapi.start_auth_session(
                ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256
            )
            esapi.policy_pcr(session, b"", TPML_PCR_SELECTION.parse("sha256:0,2,4,7"))
            assert bytes(esapi.unseal(handle, session1=session)) == key
            for h in (session, handle, srk):
                esapi.flush_context(h)
        finally:
            esapi.close()
        assert key in wire.traffic


def _clear_srk(esapi: ESAPI) -> ESYS_TR:
    """The same SRK tvorch derives, made with tpm2-pytss directly."""
    attrs = (TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
             | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA)
    template = TPM2B_PUBLIC.parse("ecc256:aes128cfb", objectAttributes=attrs, nameAlg="sha256")
    template.publicArea.unique.ecc.x = bytes(32)
    template.publicArea.unique.ecc.y = bytes(32)
    srk, *_ = esapi.create_primary(None, template, ESYS_TR.OWNER)
    return srk


def _pcrs_of(tcti: str) -> dict[int, bytes]:
    with open_tpm(tcti) as tpm:
        return tpm.read_pcrs(PCRS)
