"""Guest attestation end to end against real swtpms: AK certification by credential activation, a guest
quote whose PCRs the captured event log replays to, a host quote, and the evidence bundle built from them.

The guest's vTPM plays what the guest agent does with tpm2-tools: the RSA
2048 EK (``tpm2_createek -G rsa``), an ECC P-256 AK under it
(``tpm2_createak``), ``tpm2_activatecredential`` and ``tpm2_quote``; its PCRs
are extended with the digests of tests/data/eventlogs/uefi-crb.bin, as the
firmware did when that log was captured.

The same code writes tests/data/attestation/evidence.json, the real quotes
the unit tests (tests/unit/test_bundle.py, test_akcert.py) use without a TPM:
``.venv/bin/python -m tests.integration.test_bundle_quote`` regenerates it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMT_HA,
    TPMT_SYM_DEF,
    TPMU_HA,
)
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from tests.tpm_fixtures import running_swtpm
from tvorch.adapters.tpm import open_tpm
from tvorch.core.attestation.akcert import check_ak_public, make_credential
from tvorch.core.attestation.eventlog import EV_NO_ACTION, parse_event_log
from tvorch.core.attestation.ima import boot_aggregate_digest, boot_aggregate_entry, boot_aggregate_pcrs, ima_ng_entry, to_binary
from tvorch.core.attestation.quote import HostQuote, ak_name, verify_quote
from tvorch.errors import TpmError

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parent.parent / "data"
GUEST_LOG = DATA / "eventlogs" / "uefi-crb.bin"
HOST_LOG = DATA / "eventlogs" / "uefi-tis.bin"
FIXTURE = DATA / "attestation" / "evidence.json"
NONCE = hashlib.sha256(b"tenant nonce").digest()
GUEST_PCRS = list(range(12))  # every PCR the log touches (0-7, 9, 11) and untouched 8 and 10
HOST_PCRS = list(range(11))  # the boot PCRs, 8-9 (IMA's boot_aggregate covers 0-9) and IMA's 10
# What the host's IMA measured after boot_aggregate (the host's PCR 10 is extended with each, as the kernel does).
HOST_IMA_FILES = (("/usr/bin/qemu-system-x86_64", b"qemu"), ("/usr/bin/swtpm", b"swtpm"),
                  ("/usr/sbin/libvirtd", b"libvirtd"))
AK_ATTRIBUTES = (TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM
                 | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH)


def _no_nv(index: int) -> bytes:
    raise NoSuchIndex(index)


class GuestTpm:
    """The guest agent's side, on one ESAPI connection: EK, AK, activation, quote."""

    def __init__(self, esapi: ESAPI, stack: ExitStack) -> None:
        self.esapi = esapi
        _, template = create_ek_template("EK-RSA2048", _no_nv)
        self.ek, ek_public, *_ = esapi.create_primary(None, template, ESYS_TR.ENDORSEMENT)
        stack.callback(esapi.flush_context, self.ek)
        self.ek_public = ek_public.marshal()
        ak_template = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=AK_ATTRIBUTES, nameAlg="sha256")
        private, public, *_ = esapi.create(self.ek, None, ak_template, session1=self._ek_policy(stack))
        self.ak = esapi.load(self.ek, private, public, session1=self._ek_policy(stack))
        stack.callback(esapi.flush_context, self.ak)
        self.ak_public = public.marshal()
        self._stack = stack

    def _ek_policy(self, stack: ExitStack) -> ESYS_TR:
        session = self.esapi.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY,
                                                TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256)
        stack.callback(self._flush_quietly, session)
        self.esapi.policy_secret(ESYS_TR.ENDORSEMENT, session)
        return session

    def _flush_quietly(self, handle: ESYS_TR) -> None:
        try:
            self.esapi.flush_context(handle)
        except TSS2_Exception:
            pass  # a policy session is flushed by the TPM once used without continueSession

    def activate(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        blob, _ = TPM2B_ID_OBJECT.unmarshal(credential_blob)
        secret, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
        out = self.esapi.activate_credential(self.ak, self.ek, blob, secret,
                                             session2=self._ek_policy(self._stack))
        return bytes(out)

    def extend_from_log(self, raw_log: bytes) -> None:
        extend(self.esapi, raw_log)

    def quote(self, nonce: bytes, pcrs: list[int]) -> tuple[bytes, bytes, dict[int, bytes]]:
        selection = TPML_PCR_SELECTION.parse("sha256:" + ",".join(map(str, pcrs)))
        attest, signature = self.esapi.quote(self.ak, selection, nonce)
        values: dict[int, bytes] = {}
        for start in range(0, len(pcrs), 8):  # PCR_Read returns at most 8 values
            chunk = pcrs[start:start + 8]
            _, _, digests = self.esapi.pcr_read(TPML_PCR_SELECTION.parse("sha256:" + ",".join(map(str, chunk))))
            values.update(zip(chunk, (bytes(d) for d in digests)))
        return bytes(attest), signature.marshal(), values


def extend(esapi: ESAPI, raw_log: bytes) -> None:
    """Extend the sha256 PCRs with the log's digests, as the firmware that wrote it did."""
    for event in parse_event_log(raw_log).events:
        if event.event_type == EV_NO_ACTION:
            continue
        digest = TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=bytes.fromhex(event.digests["sha256"])))
        esapi.pcr_extend(ESYS_TR(ESYS_TR.PCR0 + event.pcr), TPML_DIGEST_VALUES([digest]))


@contextmanager
def guest_tpm(state_dir: Path) -> Iterator[GuestTpm]:
    with running_swtpm(state_dir) as tcti, ExitStack() as stack:
        esapi = ESAPI(tcti)
        stack.callback(esapi.close)
        yield GuestTpm(esapi, stack)


@dataclass(frozen=True)
class Evidence:
    ek_public: bytes
    ak_public: bytes
    attest: bytes
    signature: bytes
    pcrs: dict[int, bytes]
    host_quote: HostQuote
    activated: bool  # the guest's TPM released a credential bound to its AK
    host_ek_public: bytes
    host_activated: bool  # the host TPM released a credential bound to its AK (tvorch.adapters.tpm)


def make_evidence(base: Path, nonce: bytes = NONCE) -> Evidence:
    """A guest vTPM's EK, AK and quote (PCRs as uefi-crb.bin says), and a host quote, both over NONCE."""
    with guest_tpm(base / "guest") as guest:
        secret = secrets.token_bytes(32)
        blob, encrypted = make_credential(guest.ek_public, ak_name(guest.ak_public), secret)
        activated = guest.activate(blob, encrypted) == secret
        guest.extend_from_log(GUEST_LOG.read_bytes())
        attest, signature, pcrs = guest.quote(nonce, GUEST_PCRS)
        ek_public, ak_public = guest.ek_public, guest.ak_public
    with running_swtpm(base / "host-tpm") as tcti, open_tpm(tcti) as tpm:
        ak = tpm.create_ak(base / "host-state")
        host_ek_public = tpm.ek_public()
        blob, encrypted = make_credential(host_ek_public, ak.name, secret)
        host_activated = tpm.activate_credential(ak, blob, encrypted) == secret
        for event in parse_event_log(HOST_LOG.read_bytes()).events:
            if event.event_type != EV_NO_ACTION and event.pcr in HOST_PCRS:
                tpm.extend(event.pcr, {"sha256": bytes.fromhex(event.digests["sha256"])})
        ima = [boot_aggregate_entry(boot_aggregate_digest(tpm.read_pcrs(boot_aggregate_pcrs("sha256")), "sha256"))]
        ima += [ima_ng_entry(path, hashlib.sha256(data).digest()) for path, data in HOST_IMA_FILES]
        for entry in ima:
            tpm.extend(10, {"sha256": hashlib.sha256(entry.template_data).digest()})
        raw = tpm.quote(ak, nonce, HOST_PCRS)
    host = HostQuote(nonce=nonce, bank="sha256", pcrs=raw.pcr_values, attest=raw.attest, signature=raw.signature,
                     ak_public=ak.public, ak_pem=ak.pem.decode("ascii"), eventlog=HOST_LOG.read_bytes(),
                     ima_log=to_binary(ima))
    return Evidence(ek_public, ak_public, attest, signature, pcrs, host, activated, host_ek_public, host_activated)


def fixture_json(ev: Evidence, nonce: bytes = NONCE) -> dict[str, object]:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return {
        "nonce": nonce.hex(),
        "guest": {
            "eventlog": "eventlogs/" + GUEST_LOG.name, "bank": "sha256", "ek_public": b64(ev.ek_public),
            "ak_public": b64(ev.ak_public), "attest": b64(ev.attest), "signature": b64(ev.signature),
            "pcrs": {str(i): ev.pcrs[i].hex() for i in sorted(ev.pcrs)},
        },
        "host_quote": ev.host_quote.to_json(),
        "host_ek_public": b64(ev.host_ek_public),
    }


@pytest.fixture(scope="module")
def evidence(tmp_path_factory: pytest.TempPathFactory) -> Evidence:
    return make_evidence(tmp_path_factory.mktemp("bundle-quote"))


def test_the_guest_tpm_activates_a_credential_made_for_its_ek_and_ak(evidence: Evidence) -> None:
    assert evidence.activated
    check_ak_public(evidence.ak_public)


def test_the_host_tpm_activates_a_credential_made_for_its_ek_and_ak(evidence: Evidence) -> None:
    assert evidence.host_activated
    check_ak_public(evidence.host_quote.ak_public)


def test_the_host_tpm_refuses_a_credential_for_another_key_name(tmp_path: Path) -> None:
    with running_swtpm(tmp_path / "host-tpm") as tcti, open_tpm(tcti) as tpm:
        ak = tpm.create_ak(tmp_path / "host-state")
        other_name = b"\x00\x0b" + hashlib.sha256(b"a software key").digest()
        blob, encrypted = make_credential(tpm.ek_public(), other_name, b"s" * 32)
        with pytest.raises(TpmError, match="TPM2_ActivateCredential"):
            tpm.activate_credential(ak, blob, encrypted)


def test_a_credential_bound_to_another_key_name_does_not_activate(tmp_path: Path) -> None:
    with guest_tpm(tmp_path / "guest") as guest:
        other_name = b"\x00\x0b" + hashlib.sha256(b"another AK").digest()
        blob, encrypted = make_credential(guest.ek_public, other_name, b"s" * 32)
        with pytest.raises(TSS2_Exception):
            guest.activate(blob, encrypted)


def test_the_guest_quote_and_the_host_quote_verify_over_the_nonce(evidence: Evidence) -> None:
    info = verify_quote(evidence.attest, evidence.signature, evidence.ak_public, NONCE, evidence.pcrs, "sha256")
    assert info.pcr_selection == tuple(GUEST_PCRS)
    evidence.host_quote.verify(NONCE)


def test_a_bundle_of_live_evidence_verifies(evidence: Evidence) -> None:
    # Reuses the unit tests' bundle builder, fed with this run's quotes instead of the committed ones.
    from tests.unit.test_bundle import Pieces, make_pieces

    pieces: Pieces = make_pieces(fixture_json(evidence))
    report = pieces.verify(pieces.bundle())
    assert report.passed, report.table()


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        made = make_evidence(Path(tmp))
    assert made.activated and made.host_activated
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(fixture_json(made), indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE} at {datetime.now(timezone.utc).isoformat()}")
