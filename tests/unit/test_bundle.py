"""Evidence bundles: a complete bundle from real pieces verifies, and every way to lie is named.

The pieces are real: a node CA and signing certificate (core.signing), an EK
certificate the CA issued for a swtpm's RSA EK, a signed launch manifest that
names it, the node's AK certification, and real swtpm quotes of the guest (its
PCRs extended from the captured event log) and of the host
(tests/data/attestation/README.txt). Checks are looked up by name; a change
that keeps the bundle's signature valid is made by re-signing with the node
key, so each inner check is seen failing on its own.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tpm2_pytss.types import TPM2B_PUBLIC

from tvorch.core.attestation.akcert import (
    AkCertification,
    HostAkCertification,
    ek_cert_sha256,
    sign_ak_certification,
    sign_host_ak_certification,
)
from tvorch.core.attestation.bundle import (
    BundleReport,
    GuestEvidence,
    build_bundle,
    replay_problems,
    verify_bundle,
)
from tvorch.core.vtpm.ekcert import ek_fingerprint, issue_ek_certificate
from tvorch.core.attestation.eventlog import parse_event_log
from tvorch.core.attestation.hostverdict import HostVerdict
from tvorch.core.attestation.ima import boot_aggregate_entry, parse_ima_list, replay_ima, to_binary
from tvorch.core.launch.manifest import (
    BootPredictionRecord,
    LaunchManifest,
    Measurement,
    canonical_json,
    sign_manifest,
)
from tvorch.core.boot.prediction import PredictedEvent, Prediction
from tvorch.core.attestation.quote import HostQuote, ak_name
from tvorch.core.signing import generate_key, issue_signing_cert, make_ca
from tvorch.errors import EvidenceError, InputError

DATA = Path(__file__).resolve().parent.parent / "data"
FIXTURE = json.loads((DATA / "attestation" / "evidence.json").read_text())
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
INSTANCE = ("i-0123456789ab", "vm1", "0f8fad5b-d9cb-469f-a165-70867728950e")
OTHER_INSTANCE = ("i-ba9876543210", "vm2", "11111111-2222-3333-4444-555555555555")
CHECKS = ["format", "node certificate", "bundle signature", "bundle age", "launch manifest", "live configuration",
          "vTPM EK certificate", "AK certification", "guest quote", "guest event log", "baseline", "prediction", "host"]
MAX_HOST_AGE = 900  # host.verdict_max_age's default, what `tvorch verify` uses unless told


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def rsa_key(tpm2b_public: bytes) -> rsa.RSAPublicKey:
    area, _ = TPM2B_PUBLIC.unmarshal(tpm2b_public)
    key = serialization.load_der_public_key(area.publicArea.to_der())
    assert isinstance(key, rsa.RSAPublicKey)
    return key


def node_identity(hostname: str = "node1"):
    ca_key, ca_cert = make_ca(f"tvorch node CA {hostname}", NOW)
    key = generate_key()
    return ca_key, ca_cert, key, issue_signing_cert(ca_key, ca_cert, key.public_key(), f"tvorch node {hostname}", NOW)


def ek_certificate(ca_key, ca_cert, key) -> x509.Certificate:
    return issue_ek_certificate(ca_key, ca_cert, key, "id:00001014", "swtpm", "id:20191023", None, NOW)


@dataclass
class Pieces:
    """Everything build_bundle takes, made from one node identity and the fixture's quotes."""

    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate
    signing_key: ec.EllipticCurvePrivateKey
    signing_cert: x509.Certificate
    nonce: bytes
    guest: GuestEvidence
    ek_cert: x509.Certificate
    host_quote: HostQuote
    host_verdict: HostVerdict
    baseline: bytes | None
    host_ek_public: bytes

    def host_ak_certification(self, ak_public: bytes | None = None, hostname: str = "node1") -> dict[str, Any]:
        """The node's statement of the host AK (what `tvorch host init` signs after credential activation)."""
        ak_public = ak_public or self.host_quote.ak_public
        return sign_host_ak_certification(HostAkCertification(
            hostname=hostname, ek_public=self.host_ek_public, ak_public=ak_public, ak_name=ak_name(ak_public),
            certified_at="2025-03-01T11:00:00.000+00:00"), self.signing_key)

    def manifest(self, instance=INSTANCE, ek_cert: x509.Certificate | None = None,
                 boot_prediction: BootPredictionRecord | None = None) -> bytes:
        ek_cert = ek_cert or self.ek_cert
        return sign_manifest(LaunchManifest(
            instance_id=instance[0], name=instance[1], uuid=instance[2], node="node1",
            created_at="2025-03-01T11:58:00.000+00:00",
            measurements=(
                Measurement(kind="image-layer", path="/var/lib/libvirt/images/guest.qcow2", digest="a" * 64,
                            size=4096, details={"format": "qcow2", "layer": 0}),
                Measurement(kind="vtpm-ek", digest=ek_cert_sha256(ek_cert),
                            details={"ek_fingerprint": ek_fingerprint(ek_cert.public_key()), "encrypted": True,
                                     "swtpm_version": "0.7.1"}),
            ),
            config_digest="c" * 64, policy_digest="d" * 64, boot_prediction=boot_prediction,
        ), self.signing_key, self.signing_cert)

    def ak_certification(self, instance=INSTANCE, ak_public: bytes | None = None,
                         ek_cert: x509.Certificate | None = None) -> dict[str, Any]:
        ak_public = ak_public or self.guest.ak_public
        ek_cert = ek_cert or self.ek_cert
        return sign_ak_certification(AkCertification(
            instance_id=instance[0], uuid=instance[2], ek_fingerprint=ek_fingerprint(ek_cert.public_key()),
            ek_cert_sha256=ek_cert_sha256(ek_cert), ak_public=ak_public, ak_name=ak_name(ak_public),
            certified_at="2025-03-01T11:59:00.000+00:00",
        ), self.signing_key)

    def bundle(self, **changes: Any) -> bytes:
        args: dict[str, Any] = {
            "nonce": self.nonce, "instance_id": INSTANCE[0], "name": INSTANCE[1], "uuid": INSTANCE[2],
            "hostname": "node1", "signing_key": self.signing_key, "signing_cert": self.signing_cert,
            "ca_cert": self.ca_cert, "manifest": self.manifest(), "ek_cert": self.ek_cert,
            "ak_certification": self.ak_certification(), "guest": self.guest, "baseline_eventlog": self.baseline,
            "host_verdict": self.host_verdict, "host_quote": self.host_quote, "created_at": NOW,
            "host_ak_certification": self.host_ak_certification(),
            "live_config_digest": "c" * 64,  # the manifest's: the VM runs as launched
        }
        args.update(changes)
        return build_bundle(**args)

    def verify(self, data: bytes, ca: x509.Certificate | None = None, nonce: bytes | None = None,
               at: datetime = NOW, **options: Any) -> BundleReport:
        options.setdefault("max_host_age", MAX_HOST_AGE)
        return verify_bundle(data, ca or self.ca_cert, self.nonce if nonce is None else nonce, at, **options)

    def resign(self, doc: dict[str, Any]) -> bytes:
        """DOC signed again with the node key, as a node that lies would."""
        body = {k: v for k, v in doc.items() if k != "signature"}
        signature = self.signing_key.sign(canonical_json(body), ec.ECDSA(hashes.SHA256()))
        return canonical_json({**body, "signature": b64(signature)})


def make_pieces(fixture: dict[str, Any]) -> Pieces:
    guest = fixture["guest"]
    ca_key, ca_cert, key, cert = node_identity()
    ek_public = base64.b64decode(guest["ek_public"])
    eventlog = (DATA / guest["eventlog"]).read_bytes()
    return Pieces(
        ca_key=ca_key, ca_cert=ca_cert, signing_key=key, signing_cert=cert,
        nonce=bytes.fromhex(fixture["nonce"]),
        guest=GuestEvidence(
            bank=guest["bank"], pcrs={int(i): bytes.fromhex(v) for i, v in guest["pcrs"].items()},
            attest=base64.b64decode(guest["attest"]), signature=base64.b64decode(guest["signature"]),
            ak_public=base64.b64decode(guest["ak_public"]), eventlog=eventlog,
        ),
        ek_cert=ek_certificate(ca_key, ca_cert, rsa_key(ek_public)),
        host_quote=HostQuote.from_json(fixture["host_quote"]),
        # Judged on a quote of the same host state (the daemon's, over a nonce of its own).
        host_verdict=HostVerdict(at="2025-03-01T11:55:00.000+00:00", at_epoch=NOW.timestamp() - 300, passed=True,
                                 failures=(), policy_digest="e" * 64,
                                 quote_json=json.dumps({**fixture["host_quote"], "nonce": "ab" * 32})),
        baseline=(DATA / "eventlogs" / "uefi-tis.bin").read_bytes(),  # the first boot: the same events
        host_ek_public=base64.b64decode(fixture["host_ek_public"]),
    )


@pytest.fixture(scope="module")
def pieces() -> Pieces:
    return make_pieces(FIXTURE)


@pytest.fixture(scope="module")
def valid(pieces: Pieces) -> bytes:
    return pieces.bundle()


def failing(report: BundleReport) -> dict[str, str]:
    return {c.name: c.detail for c in report.failures()}


def doc_of(data: bytes) -> dict[str, Any]:
    return json.loads(data)


# --- the valid bundle ---------------------------------------------------------------

def test_a_complete_bundle_passes_every_check(pieces: Pieces, valid: bytes) -> None:
    report = pieces.verify(valid)
    assert report.passed, report.table()
    assert [c.name for c in report.checks] == CHECKS
    assert (report.instance_id, report.uuid, report.hostname) == (INSTANCE[0], INSTANCE[2], "node1")
    details = {c.name: c.detail for c in report.checks}
    assert details["guest quote"].startswith("sha256 PCRs 0,1,2,3,4,5,6,7,8,9,10,11 quoted over the nonce")
    assert details["guest event log"] == "37 events replay to quoted PCRs 0,1,2,3,4,5,6,7,9,11"
    assert details["baseline"] == "boot matches the baseline event by event (sha256, every PCR)"
    assert report.to_json()["passed"] is True


def test_the_bundle_is_canonical_json_in_the_documented_shape(pieces: Pieces, valid: bytes) -> None:
    doc = doc_of(valid)
    assert canonical_json(doc) == valid
    assert list(doc) == sorted(["format", "version", "created_at", "nonce", "instance", "node", "manifest", "vtpm",
                                "ak_certification", "guest", "baseline", "host", "live", "signature"])
    assert (doc["format"], doc["version"], doc["nonce"]) == ("tvorch-evidence", 3, pieces.nonce.hex())
    assert doc["live"] == {"config_digest": "c" * 64}
    assert doc["created_at"] == "2025-03-01T12:00:00.000+00:00"
    assert doc["instance"] == {"id": INSTANCE[0], "name": INSTANCE[1], "uuid": INSTANCE[2]}
    assert set(doc["guest"]) == {"bank", "pcrs", "attest", "signature", "ak_public", "eventlog", "ima"}
    assert doc["guest"]["ima"] is None and doc["baseline"]["verdict"]["matches"] is True
    assert doc["host"]["verdict"] == {"passed": True, "failures": [], "at": "2025-03-01T11:55:00.000+00:00",
                                      "policy_digest": "e" * 64, "bank": "sha256",
                                      "pcrs": FIXTURE["host_quote"]["pcrs"]}
    assert HostQuote.from_json(doc["host"]["quote"]) == pieces.host_quote


def test_the_table_aligns_check_result_and_detail(pieces: Pieces, valid: bytes) -> None:
    lines = pieces.verify(valid).table().splitlines()
    assert lines[0].split() == ["check", "result", "detail"]
    assert len(lines) == 1 + len(CHECKS)
    result_column = lines[0].index("result")
    detail_column = lines[0].index("detail")
    for line, name in zip(lines[1:], CHECKS):
        assert line.startswith(name) and line[result_column:result_column + 4] == "PASS"
        assert line[detail_column - 1] == " " and line[detail_column] != " "


# --- every top-level field altered --------------------------------------------------

def flip_b64(value: str, at: int = 40) -> str:
    raw = bytearray(base64.b64decode(value))
    raw[at % len(raw)] ^= 0x01
    return b64(bytes(raw))


def other_node_cert(_: Pieces) -> str:
    _, _, _, cert = node_identity("node2")
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def other_ek_cert(p: Pieces) -> str:
    cert = ek_certificate(p.ca_key, p.ca_cert, rsa.generate_private_key(65537, 2048).public_key())
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def changed_boot_app(p: Pieces) -> str:
    """The baseline log with the boot application's digest changed (a different BOOTX64.EFI first boot)."""
    raw = p.baseline or b""
    log = parse_event_log(raw)
    app = next(e for e in log.events if e.type_name == "EV_EFI_BOOT_SERVICES_APPLICATION")
    digest = bytes.fromhex(app.digests["sha256"])
    assert raw.count(digest) == 1
    return b64(raw.replace(digest, hashlib.sha256(b"old BOOTX64.EFI").digest()))


Mutation = Callable[[dict[str, Any], Pieces], None]

# (what, change to the parsed bundle, the checks that then fail although the bundle is signed again)
ALTERATIONS: list[tuple[str, Mutation, set[str]]] = [
    ("created_at", lambda d, p: d.update(created_at="2025-03-01T11:58:00.000+00:00"), set()),
    ("created_at in the future", lambda d, p: d.update(created_at="2025-03-02T12:00:00.000+00:00"),
     {"bundle age", "host"}),
    ("nonce", lambda d, p: d.update(nonce="00" * 32), {"guest quote"}),
    ("instance", lambda d, p: d["instance"].update(uuid=OTHER_INSTANCE[2]),
     {"launch manifest", "live configuration", "vTPM EK certificate", "AK certification", "prediction"}),
    ("node hostname", lambda d, p: d["node"].update(hostname="node2"), {"host"}),  # the host AK is node1's
    ("node ca_pem", lambda d, p: d["node"].update(ca_pem=other_node_cert(p)), set()),
    ("node signing cert", lambda d, p: d["node"].update(signing_cert_pem=other_node_cert(p)),
     {"node certificate", "bundle signature", "AK certification", "host"}),
    ("manifest", lambda d, p: d.update(manifest=flip_b64(d["manifest"])),
     {"launch manifest", "live configuration", "vTPM EK certificate", "prediction"}),
    ("vtpm", lambda d, p: d["vtpm"].update(ek_cert_pem=other_ek_cert(p)), {"vTPM EK certificate", "AK certification"}),
    ("ak_certification", lambda d, p: d["ak_certification"].update(certified_at="2025-03-01T11:59:59.000+00:00"),
     {"AK certification"}),
    ("guest attest", lambda d, p: d["guest"].update(attest=flip_b64(d["guest"]["attest"], 50)), {"guest quote"}),
    ("guest pcrs", lambda d, p: d["guest"]["pcrs"].update({"4": "ab" * 32}), {"guest quote", "guest event log"}),
    ("guest ak_public", lambda d, p: d["guest"].update(ak_public=FIXTURE["host_quote"]["ak_public"]),
     {"AK certification", "guest quote"}),
    ("guest eventlog",
     lambda d, p: d["guest"].update(eventlog=b64((DATA / "eventlogs" / "seabios-direct.bin").read_bytes())),
     {"guest event log", "baseline"}),
    ("baseline", lambda d, p: d["baseline"].update(eventlog=changed_boot_app(p)), {"baseline"}),
    ("host verdict", lambda d, p: d["host"]["verdict"].update(passed=False, failures=["PCR 7 differs"]), {"host"}),
    ("host quote", lambda d, p: d["host"]["quote"].update(attest=flip_b64(d["host"]["quote"]["attest"], 50)),
     {"host"}),
    ("live configuration", lambda d, p: d["live"].update(config_digest="e" * 64), {"live configuration"}),
]


@pytest.mark.parametrize(("what", "mutate", "expected"), ALTERATIONS, ids=[a[0] for a in ALTERATIONS])
def test_every_altered_field_breaks_the_signature_and_its_own_check(
    pieces: Pieces, valid: bytes, what: str, mutate: Mutation, expected: set[str]
) -> None:
    doc = doc_of(valid)
    mutate(doc, pieces)
    tampered = pieces.verify(canonical_json(doc))
    assert not tampered.passed
    assert "bundle signature" in failing(tampered)
    resigned = pieces.verify(pieces.resign(doc))
    assert set(failing(resigned)) == expected, resigned.table()
    assert resigned.passed is (not expected)


def test_a_vm_changed_while_running_fails_the_live_configuration_check(pieces: Pieces) -> None:
    """Issue #13: a disk hot-plugged (or memory, vCPUs set) on the running VM; the manifest is still the launch's."""
    report = pieces.verify(pieces.bundle(live_config_digest="e" * 64))
    assert set(failing(report)) == {"live configuration"}
    assert "it was changed while running" in failing(report)["live configuration"]
    unverified = pieces.verify(pieces.bundle(manifest=b"not a manifest"))
    assert failing(unverified)["live configuration"] == "not checked: the launch manifest does not verify"


def test_a_changed_signature_fails_the_signature_check_only(pieces: Pieces, valid: bytes) -> None:
    doc = doc_of(valid)
    doc["signature"] = flip_b64(doc["signature"], 10)
    assert failing(pieces.verify(canonical_json(doc))) == {
        "bundle signature": "bundle signature does not verify with the node signing key: the bundle was changed"}


def test_a_reindented_bundle_still_verifies(pieces: Pieces, valid: bytes) -> None:
    assert pieces.verify(json.dumps(doc_of(valid), indent=2).encode()).passed


# --- the specific lies --------------------------------------------------------------

def test_a_wrong_nonce_fails_the_guest_quote_and_the_host(pieces: Pieces, valid: bytes) -> None:
    report = pieces.verify(valid, nonce=hashlib.sha256(b"another nonce").digest())
    assert set(failing(report)) == {"guest quote", "host"}
    assert "not the nonce given" in failing(report)["guest quote"]
    assert "nonce" in failing(report)["host"]


def test_a_replayed_quote_under_the_new_nonce_fails_the_quote(pieces: Pieces) -> None:
    fresh = hashlib.sha256(b"fresh nonce").digest()
    report = pieces.verify(pieces.bundle(nonce=fresh), nonce=fresh)
    assert set(failing(report)) == {"guest quote", "host"}
    assert "nonce does not match" in failing(report)["guest quote"]


def test_the_manifest_or_ak_certification_of_another_vm_fails(pieces: Pieces) -> None:
    report = pieces.verify(pieces.bundle(manifest=pieces.manifest(OTHER_INSTANCE)))
    assert failing(report) == {"launch manifest": f"launch manifest is of instance {OTHER_INSTANCE[0]} "
                                                  f"({OTHER_INSTANCE[2]}), not {INSTANCE[0]} ({INSTANCE[2]})",
                               "live configuration": "not checked: the launch manifest does not verify",
                               "vTPM EK certificate": failing(report)["vTPM EK certificate"],
                               "prediction": "not checked: the launch manifest does not verify"}
    assert "without a verified launch manifest" in failing(report)["vTPM EK certificate"]
    report = pieces.verify(pieces.bundle(ak_certification=pieces.ak_certification(OTHER_INSTANCE)))
    assert set(failing(report)) == {"AK certification"}
    assert f"of instance {OTHER_INSTANCE[0]}" in failing(report)["AK certification"]


def test_an_ak_certification_of_another_ak_or_ek_fails(pieces: Pieces) -> None:
    host_ak = base64.b64decode(FIXTURE["host_quote"]["ak_public"])
    report = pieces.verify(pieces.bundle(ak_certification=pieces.ak_certification(ak_public=host_ak)))
    assert failing(report) == {
        "AK certification": "AK certification certifies another AK than the one that signed the guest quote"}
    other_ek = ek_certificate(pieces.ca_key, pieces.ca_cert, rsa.generate_private_key(65537, 2048).public_key())
    report = pieces.verify(pieces.bundle(ak_certification=pieces.ak_certification(ek_cert=other_ek)))
    assert set(failing(report)) == {"AK certification"} and "names EK" in failing(report)["AK certification"]


def test_a_ca_that_issued_neither_the_node_cert_nor_the_ek_fails_everything_it_anchors(pieces: Pieces,
                                                                                      valid: bytes) -> None:
    _, stranger, _, _ = node_identity("stranger")
    report = pieces.verify(valid, ca=stranger)
    assert set(failing(report)) == {"node certificate", "bundle signature", "launch manifest", "live configuration",
                                    "vTPM EK certificate",
                                    "AK certification", "prediction", "host"}
    assert "not by the CA" in failing(report)["node certificate"]
    assert failing(report)["bundle signature"].startswith("not checked: the node signing certificate")


def test_an_ek_certificate_from_another_ca_fails(pieces: Pieces) -> None:
    other_ca_key, other_ca, _, _ = node_identity("node2")
    foreign = ek_certificate(other_ca_key, other_ca, pieces.ek_cert.public_key())  # same EK, other issuer
    report = pieces.verify(pieces.bundle(ek_cert=foreign, manifest=pieces.manifest(ek_cert=foreign),
                                         ak_certification=pieces.ak_certification(ek_cert=foreign)))
    assert set(failing(report)) == {"vTPM EK certificate", "AK certification"}
    assert "EK certificate was issued by" in failing(report)["vTPM EK certificate"]
    assert failing(report)["AK certification"] == "not checked: the EK certificate does not chain to the CA"


def test_a_guest_event_log_that_does_not_replay_names_the_pcr(pieces: Pieces) -> None:
    raw = pieces.guest.eventlog
    tag = next(e for e in parse_event_log(raw).events if e.pcr == 9)
    digest = bytes.fromhex(tag.digests["sha256"])
    assert raw.count(digest) == 1
    forged = raw.replace(digest, hashlib.sha256(b"another command line").digest())
    report = pieces.verify(pieces.bundle(guest=dataclasses.replace(pieces.guest, eventlog=forged)))
    assert failing(report)["guest event log"] == "PCR 9 does not match the event log's replay"
    assert failing(report)["baseline"].startswith("PCR9: EV_EVENT_TAG digest changed (expected cd773142…")


def test_a_log_pcr_left_out_of_the_quote_is_named(pieces: Pieces, valid: bytes) -> None:
    doc = doc_of(valid)
    del doc["guest"]["pcrs"]["11"]
    report = pieces.verify(pieces.resign(doc))
    assert failing(report)["guest event log"] == "PCR 11 is in the event log but not quoted"
    assert "selects sha256:0,1,2,3,4,5,6,7,8,9,10,11, not" in failing(report)["guest quote"]


def test_replay_problems_judges_every_pcr_the_log_extends_and_only_those(pieces: Pieces) -> None:
    guest = pieces.guest
    assert replay_problems(guest.eventlog, "sha256", guest.pcrs) == ()
    pcrs = {**guest.pcrs, 4: bytes(32), 10: b"\x11" * 32}  # 10: IMA's, which the log never touches
    del pcrs[11]
    assert replay_problems(guest.eventlog, "sha256", pcrs) == (
        "PCR 4 does not match the event log's replay", "PCR 11 is in the event log but not quoted")
    with pytest.raises(EvidenceError, match="event log has no sha1 bank"):
        replay_problems(guest.eventlog, "sha1", guest.pcrs)


def test_a_boot_that_differs_from_the_baseline_lists_each_difference(pieces: Pieces) -> None:
    log = parse_event_log(pieces.guest.eventlog)
    app = [e for e in log.events if e.type_name == "EV_EFI_BOOT_SERVICES_APPLICATION"][0]
    digest = bytes.fromhex(app.digests["sha256"])
    old = pieces.guest.eventlog.replace(digest, hashlib.sha256(b"old loader").digest())
    bundle = pieces.bundle(baseline_eventlog=old)
    assert doc_of(bundle)["baseline"]["verdict"]["matches"] is False  # the node says so too
    report = pieces.verify(bundle)
    assert failing(report) == {"baseline": f"PCR4: EV_EFI_BOOT_SERVICES_APPLICATION digest changed "
                                           f"(expected {hashlib.sha256(b'old loader').hexdigest()[:8]}…, "
                                           f"found {app.digests['sha256'][:8]}…)"}


def test_the_baseline_is_recomputed_not_taken_from_the_node(pieces: Pieces, valid: bytes) -> None:
    doc = doc_of(valid)
    doc["baseline"]["eventlog"] = changed_boot_app(pieces)  # a node claiming a changed boot matches
    assert doc["baseline"]["verdict"]["matches"] is True
    assert failing(pieces.verify(pieces.resign(doc)))["baseline"].startswith(
        "PCR4: EV_EFI_BOOT_SERVICES_APPLICATION digest changed")
    doc = doc_of(valid)
    doc["baseline"]["verdict"]["matches"] = False  # a verdict the logs do not bear out
    assert failing(pieces.verify(pieces.resign(doc))) == {
        "baseline": "the node's baseline verdict is not what its event logs say"}


def test_the_pcrs_the_node_compared_are_shown(pieces: Pieces) -> None:
    report = pieces.verify(pieces.bundle(baseline_pcrs=range(8)))
    assert report.passed
    assert {c.name: c.detail for c in report.checks}["baseline"] == (
        "boot matches the baseline event by event (sha256, PCRs 0,1,2,3,4,5,6,7)")


def test_without_a_baseline_the_baseline_check_says_so(pieces: Pieces) -> None:
    report = pieces.verify(pieces.bundle(baseline_eventlog=None))
    assert report.passed
    assert {c.name: c.detail for c in report.checks}["baseline"] == "no baseline event log (nothing to compare with)"


def predicted_from(eventlog: bytes, pcrs: set[int], change: int | None = None) -> BootPredictionRecord:
    """A prediction of PCRS that is what EVENTLOG measured (with the CHANGE-th event's digest changed)."""
    events = [PredictedEvent(e.pcr, e.type_name, e.digests["sha256"], f"event {e.index}")
              for e in parse_event_log(eventlog).events if e.pcr in pcrs and e.type_name != "EV_NO_ACTION"]
    if change is not None:
        events[change] = dataclasses.replace(events[change], digest=hashlib.sha256(b"tampered").hexdigest())
    return BootPredictionRecord("predicted", Prediction(tuple(events), frozenset(pcrs)))


def test_a_boot_the_manifest_predicted_passes_the_prediction_check(pieces: Pieces) -> None:
    record = predicted_from(pieces.guest.eventlog, {4, 5, 7})
    report = pieces.verify(pieces.bundle(manifest=pieces.manifest(boot_prediction=record)))
    assert report.passed, report.table()
    assert {c.name: c.detail for c in report.checks}["prediction"] == \
        "quoted PCRs 4,5,7 are the launch manifest's prediction"
    # A predicted PCR the node did not quote is named, not passed silently as judged.
    record = predicted_from(pieces.guest.eventlog, {4, 14})
    detail = {c.name: c.detail for c in pieces.verify(pieces.bundle(
        manifest=pieces.manifest(boot_prediction=record))).checks}["prediction"]
    assert detail == "quoted PCRs 4 are the launch manifest's prediction (predicted but not quoted: 14)"


def test_a_boot_other_than_predicted_fails_naming_the_pcr_and_event(pieces: Pieces) -> None:
    log = parse_event_log(pieces.guest.eventlog)
    record = predicted_from(pieces.guest.eventlog, {4, 5})
    app = next(i for i, e in enumerate(record.prediction.events) if e.type_name == "EV_EFI_BOOT_SERVICES_APPLICATION")
    record = predicted_from(pieces.guest.eventlog, {4, 5}, change=app)
    report = pieces.verify(pieces.bundle(manifest=pieces.manifest(boot_prediction=record)))
    assert set(failing(report)) == {"prediction"}
    tampered = record.prediction.events[app]
    found = next(e for e in log.events if e.type_name == "EV_EFI_BOOT_SERVICES_APPLICATION").digests["sha256"]
    assert failing(report)["prediction"] == (
        "quoted PCRs 4 are not the launch manifest's prediction: PCR4: EV_EFI_BOOT_SERVICES_APPLICATION: "
        f"predicted {tampered.digest[:8]}… ({tampered.what}), found {found[:8]}…")
    # --skip-check prediction: still run, not counted.
    skipped = pieces.verify(pieces.bundle(manifest=pieces.manifest(boot_prediction=record)), skip=["prediction"])
    assert skipped.passed and {c.name: c for c in skipped.checks}["prediction"].skipped


def test_without_a_prediction_the_prediction_check_says_it_did_not_judge(pieces: Pieces, valid: bytes) -> None:
    details = {c.name: c.detail for c in pieces.verify(valid).checks}
    assert details["prediction"] == "not judged: the launch manifest carries no boot prediction"
    unavailable = BootPredictionRecord("unavailable", reason="no EFI system partition in the image")
    report = pieces.verify(pieces.bundle(manifest=pieces.manifest(boot_prediction=unavailable)))
    assert report.passed and {c.name: c.detail for c in report.checks}["prediction"] == (
        "not judged: the launch manifest's boot prediction was unavailable at launch "
        "(no EFI system partition in the image)")


def test_a_bundle_without_host_evidence_fails_the_host_check(pieces: Pieces) -> None:
    report = pieces.verify(pieces.bundle(host_verdict=None, host_quote=None))
    assert failing(report) == {"host": "no host evidence"}
    assert failing(pieces.verify(pieces.bundle(host_quote=None))) == {"host": "no host quote"}


def test_a_failed_host_verdict_lists_its_failures(pieces: Pieces) -> None:
    verdict = dataclasses.replace(pieces.host_verdict, passed=False,
                                  failures=("PCR 7 differs", "/usr/bin/qemu not measured"))
    assert failing(pieces.verify(pieces.bundle(host_verdict=verdict))) == {
        "host": "host attestation failed at 2025-03-01T11:55:00.000+00:00: PCR 7 differs; /usr/bin/qemu not measured"}


def test_expired_certificates_fail_at_the_verifiers_time(pieces: Pieces, valid: bytes) -> None:
    later = pieces.verify(valid, at=NOW + timedelta(days=365 * 6))
    assert "expired" in {c.name: c.detail for c in later.checks}["node certificate"]
    assert not later.passed


# --- malformed input: one failing "format" check, never an exception ------------------

def swap(path: list[str], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return change


MALFORMED: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("not JSON", lambda b: b[:-1], "not valid JSON"),
    ("not UTF-8", lambda b: b"\xff" + b, "not UTF-8"),
    ("a list", lambda b: b"[" + b + b"]", "not a JSON object"),
    ("duplicate key", lambda b: b[:-1] + b',"nonce":"00"}', "duplicate key 'nonce'"),
    ("a float", lambda b: b.replace(b'"version":1', b'"version":1.0'), "not an integer"),
]
MALFORMED_FIELDS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("format", swap(["format"], "tvorch-vtpm-backup"), "not a tvorch-evidence bundle"),
    ("version", swap(["version"], 1), "bundle version 1 is not 3"),
    ("boolean version", swap(["version"], True), "bundle version True is not 3"),
    ("live digest", swap(["live", "config_digest"], "C" * 64), "live.config_digest is not a sha256 digest"),
    ("missing field", swap(["host"], KeyError), "missing ['host']"),
    ("unknown field", swap(["extra"], 1), "unknown ['extra']"),
    ("bad base64", swap(["guest", "attest"], "not base64!"), "'guest.attest' is not valid base64"),
    ("bad hex", swap(["nonce"], "xyz"), "'nonce' is not valid hex"),
    ("number for string", swap(["instance", "id"], 7), "'instance.id' is not a non-empty string"),
    ("pcr index", swap(["guest", "pcrs", "24"], "00" * 32), "'guest.pcrs': PCR index '24' is not a number 0-23"),
    ("pcr size", swap(["guest", "pcrs", "4"], "00" * 20), "'guest.pcrs': PCR 4 is not a sha256 digest"),
    ("pcr hex", swap(["guest", "pcrs", "4"], "zz" * 32), "'guest.pcrs': PCR 4 is not a sha256 digest"),
    ("unknown bank", swap(["guest", "bank"], "md5"), "unknown PCR bank 'md5'"),
    ("verdict type", swap(["host", "verdict", "passed"], "yes"), "'host.verdict.passed' is not a boolean"),
    ("created_at", swap(["created_at"], "2025-03-01T13:00:00+01:00"), "'created_at' is not a UTC ISO-8601 time"),
    ("verdict time", swap(["host", "verdict", "at"], "yesterday"), "'host.verdict.at' is not a UTC ISO-8601 time"),
    ("ak certification type", swap(["ak_certification"], []), "'ak_certification' is not a JSON object"),
    ("ima", swap(["guest", "ima"], "%%"), "'guest.ima' is not valid base64"),
]


@pytest.mark.parametrize(("what", "garble", "detail"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_bytes_that_are_no_bundle_fail_the_format_check(pieces: Pieces, valid: bytes, what: str,
                                                        garble: Callable[[bytes], bytes], detail: str) -> None:
    report = pieces.verify(garble(valid))
    assert not report.passed and len(report.checks) == 1
    (check,) = report.checks
    assert check.name == "format" and not check.passed and detail in check.detail and "\n" not in check.detail


@pytest.mark.parametrize(("what", "change", "detail"), MALFORMED_FIELDS, ids=[m[0] for m in MALFORMED_FIELDS])
def test_a_malformed_field_fails_the_format_check(pieces: Pieces, valid: bytes, what: str,
                                                  change: Callable[[dict[str, Any]], None], detail: str) -> None:
    doc = doc_of(valid)
    change(doc)
    report = pieces.verify(pieces.resign(doc))
    assert [(c.name, c.passed) for c in report.checks] == [("format", False)]
    assert detail in report.checks[0].detail, report.checks[0].detail
    assert "format  FAIL" in report.table()


def test_malformed_inner_evidence_fails_its_own_check_in_one_line(pieces: Pieces, valid: bytes) -> None:
    doc = doc_of(valid)
    doc["guest"]["attest"] = b64(b"\x00\x01")
    doc["vtpm"]["ek_cert_pem"] = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    doc["host"]["quote"]["version"] = 9
    doc["guest"]["eventlog"] = b64(b"\x00" * 10)
    report = pieces.verify(pieces.resign(doc))
    details = failing(report)
    assert {"guest quote", "vTPM EK certificate", "host", "guest event log"} <= set(details)
    assert "quote attest is not a valid TPMS_ATTEST" in details["guest quote"]
    assert details["vTPM EK certificate"] == "EK certificate is not a PEM certificate"
    assert "host quote version 9" in details["host"]
    assert details["guest event log"].startswith("event log: event 0")
    assert all("\n" not in d for d in details.values())


# --- skipped checks (`tvorch verify --skip-check NAME`) ------------------------------

def test_a_skipped_check_is_shown_as_skipped_never_as_passed(pieces: Pieces) -> None:
    data = pieces.bundle(host_verdict=None, host_quote=None)  # a node without measured boot
    assert not pieces.verify(data).passed
    report = pieces.verify(data, skip=["host"])
    assert report.passed and report.failures() == ()
    host = {c.name: c for c in report.checks}["host"]
    assert (host.result, host.passed, host.skipped) == ("skipped", False, True)
    assert host.detail == "not counted (skipped by the verifier); it fails: no host evidence"
    assert "host                 SKIPPED  not counted" in report.table()
    doc = report.to_json()
    assert doc["passed"] is True and doc["skipped"] == ["host"]
    assert {"name": "host", "result": "skipped", "passed": False, "detail": host.detail} in doc["checks"]
    # A skipped check that would pass is still not shown as passed.
    host = {c.name: c for c in pieces.verify(pieces.bundle(), skip=["host"]).checks}["host"]
    assert (host.result, host.passed) == ("skipped", False) and "it passes: host verdict passed" in host.detail


def test_skipping_one_check_does_not_excuse_another(pieces: Pieces) -> None:
    data = pieces.bundle(host_verdict=None, host_quote=None)
    report = pieces.verify(data, nonce=hashlib.sha256(b"another nonce").digest(), skip=["host"])
    assert not report.passed and set(failing(report)) == {"guest quote"}


def test_an_unknown_check_name_is_refused_naming_the_valid_ones(pieces: Pieces, valid: bytes) -> None:
    with pytest.raises(InputError) as err:
        pieces.verify(valid, skip=["host", "hots"])
    message = str(err.value)
    assert message.startswith("no check named 'hots': the checks are 'node certificate', 'bundle signature'")
    assert all(f"'{name}'" in message for name in CHECKS[1:]) and "'format'" not in message
    with pytest.raises(InputError):
        pieces.verify(b"not even JSON", skip=["format"])  # refused before the bundle is read


# --- the bundle's age and the host verdict's ------------------------------------------

def test_the_bundle_age_is_shown_and_bounded_by_max_age(pieces: Pieces, valid: bytes) -> None:
    later = NOW + timedelta(hours=2)
    report = pieces.verify(valid, at=later)  # any age without a maximum, but shown
    assert report.passed and report.created_at == "2025-03-01T12:00:00.000+00:00"
    assert {c.name: c.detail for c in report.checks}["bundle age"] == (
        "made at 2025-03-01T12:00:00.000+00:00, 7200 s before the verifier's time (no maximum age given)")
    assert report.to_json()["created_at"] == "2025-03-01T12:00:00.000+00:00"
    assert failing(pieces.verify(valid, at=later, max_age=3600)) == {"bundle age": (
        "made at 2025-03-01T12:00:00.000+00:00, 7200 s before the verifier's time: older than the maximum age "
        "of 3600 s")}
    assert pieces.verify(valid, at=later, max_age=7200).passed


def test_a_bundle_made_after_the_verifiers_time_fails_its_age(pieces: Pieces) -> None:
    ahead = pieces.bundle(created_at=NOW + timedelta(seconds=200))
    assert pieces.verify(ahead, max_age=10).passed  # two clocks differ a little
    ahead = pieces.bundle(created_at=NOW + timedelta(hours=1))
    report = pieces.verify(ahead, max_host_age=7200)
    assert failing(report) == {"bundle age": "made at 2025-03-01T13:00:00.000+00:00, 3600 s after the verifier's "
                                             "time (more than the 300 s two clocks may differ by)"}


def test_the_host_verdict_age_is_bounded(pieces: Pieces, valid: bytes) -> None:
    # The fixture's verdict is 300 s older than the bundle.
    assert failing(pieces.verify(valid, max_host_age=299)) == {"host": (
        "the host verdict (2025-03-01T11:55:00.000+00:00) is 300 s older than the bundle, more than the maximum "
        "host verdict age of 300 s".replace("of 300 s", "of 299 s"))}
    assert pieces.verify(valid, max_host_age=300).passed
    later = dataclasses.replace(pieces.host_verdict, at="2025-03-01T12:00:01.000+00:00")
    assert failing(pieces.verify(pieces.bundle(host_verdict=later))) == {"host": (
        "the host verdict (2025-03-01T12:00:01.000+00:00) is dated after the bundle "
        "(2025-03-01T12:00:00.000+00:00)")}


# --- the host verdict is bound to the host quote's PCR values ------------------------

def verdict_over(pieces: Pieces, **pcrs: str) -> HostVerdict:
    """The fixture's passing verdict, but judged on a quote whose PCRs (by number) had other values."""
    judged = {**FIXTURE["host_quote"], "pcrs": {**FIXTURE["host_quote"]["pcrs"], **{k[1:]: v for k, v in pcrs.items()}}}
    return dataclasses.replace(pieces.host_verdict, quote_json=json.dumps(judged))


def test_a_verdict_made_over_other_pcr_values_is_refused(pieces: Pieces) -> None:
    """A passing verdict from before a boot change, bundled with a fresh quote of the changed host."""
    report = pieces.verify(pieces.bundle(host_verdict=verdict_over(pieces, p4="ab" * 32)))
    quoted = FIXTURE["host_quote"]["pcrs"]["4"]
    assert failing(report) == {"host": "the host verdict was made over other PCR values than the host quote's: "
                                       f"PCR 4 (verdict abababababababab..., quote {quoted[:16]}...)"}


def test_a_verdict_over_other_pcrs_or_another_bank_is_refused(pieces: Pieces) -> None:
    judged = json.loads(pieces.host_verdict.quote_json)
    del judged["pcrs"]["8"], judged["pcrs"]["9"]
    verdict = dataclasses.replace(pieces.host_verdict, quote_json=json.dumps(judged))
    assert failing(pieces.verify(pieces.bundle(host_verdict=verdict))) == {"host": (
        "the host verdict was judged on PCRs 0,1,2,3,4,5,6,7,10, the host quote covers 0,1,2,3,4,5,6,7,8,9,10")}
    doc = doc_of(pieces.bundle())
    doc["host"]["verdict"].update(bank="sha1", pcrs={"0": "00" * 20})
    assert failing(pieces.verify(pieces.resign(doc))) == {
        "host": "the host verdict was judged on the sha1 bank, the host quote is of sha256"}


def test_a_verdict_on_an_earlier_ima_list_of_the_same_boot_passes(pieces: Pieces) -> None:
    """IMA's PCR 10 grows after the verdict: the fresh quote's list must pass through the verdict's value."""
    entries = parse_ima_list(pieces.host_quote.ima_log or b"")
    earlier = replay_ima(entries[:2]).hex()
    report = pieces.verify(pieces.bundle(host_verdict=verdict_over(pieces, p10=earlier)))
    assert report.passed, report.table()
    report = pieces.verify(pieces.bundle(host_verdict=verdict_over(pieces, p10="cd" * 32)))
    assert failing(report) == {
        "host": "the host verdict was made over a PCR 10 the host quote's IMA list never reached"}


def test_the_host_ima_list_must_replay_and_start_with_the_quoted_boot_aggregate(pieces: Pieces) -> None:
    detail = {c.name: c.detail for c in pieces.verify(pieces.bundle()).checks}["host"]
    assert detail.endswith("; 4 IMA measurements replay to PCR 10, boot_aggregate is the quoted PCRs 0-9")
    entries = list(parse_ima_list(pieces.host_quote.ima_log or b""))
    forged = dataclasses.replace(pieces.host_quote, ima_log=to_binary([boot_aggregate_entry(bytes(32)), *entries[1:]]))
    assert failing(pieces.verify(pieces.bundle(host_quote=forged))) == {
        "host": "the host's IMA list does not replay to the quoted PCR 10"}


# --- PCR keys that are no PCR: one line, "malformed" (exit 13), never an exception ---------------

@pytest.mark.parametrize("key", ["²", "٣", "1" * 5000, "07", " 7", "-1", "24", ""])
def test_a_pcr_key_that_is_no_pcr_is_malformed(pieces: Pieces, valid: bytes, key: str) -> None:
    doc = doc_of(valid)
    doc["guest"]["pcrs"][key] = "00" * 32
    report = pieces.verify(pieces.resign(doc))
    assert [(c.name, c.passed) for c in report.checks] == [("format", False)] and report.malformed
    assert "'guest.pcrs': PCR index" in report.checks[0].detail and len(report.checks[0].detail) < 200
    doc = doc_of(valid)
    doc["host"]["verdict"]["pcrs"][key] = "00" * 32
    assert "'host.verdict.pcrs': PCR index" in pieces.verify(pieces.resign(doc)).checks[0].detail
    doc = doc_of(valid)
    doc["host"]["quote"]["pcrs"][key] = "00" * 32
    report = pieces.verify(pieces.resign(doc))
    assert set(failing(report)) == {"host"} and report.malformed
    assert "host quote: PCR index" in failing(report)["host"] and len(failing(report)["host"]) < 200


def test_a_failed_check_on_good_evidence_is_not_malformed(pieces: Pieces, valid: bytes) -> None:
    assert not pieces.verify(valid, nonce=hashlib.sha256(b"another nonce").digest()).malformed


# --- the host AK, certified by credential activation at `tvorch host init` ---------------

def test_the_host_quote_must_be_by_the_host_ak_the_node_certified(pieces: Pieces) -> None:
    detail = {c.name: c.detail for c in pieces.verify(pieces.bundle()).checks}["host"]
    fingerprint = HostAkCertification(hostname="node1", ek_public=pieces.host_ek_public,
                                      ak_public=pieces.host_quote.ak_public, ak_name=ak_name(pieces.host_quote.ak_public),
                                      certified_at="2025-03-01T11:00:00.000+00:00").ek_fingerprint
    assert f"by the host AK certified at 2025-03-01T11:00:00.000+00:00 under EK {fingerprint}" in detail
    # Before: any AK the node put in the host quote passed. A node without its host AK certified fails.
    report = pieces.verify(pieces.bundle(host_ak_certification=None))
    assert failing(report) == {"host": "the host AK is not certified by the node (an AK from before tvorch "
                                       "certified them: run `tvorch host init` on the node)"}
    # The guest's AK (a real TPM key, but not the host's): certified for another AK than the quote's.
    report = pieces.verify(pieces.bundle(host_ak_certification=pieces.host_ak_certification(pieces.guest.ak_public)))
    assert failing(report) == {
        "host": "the host AK certification certifies another AK than the one that signed the host quote"}
    report = pieces.verify(pieces.bundle(host_ak_certification=pieces.host_ak_certification(hostname="node2")))
    assert failing(report) == {"host": "the host AK certification is of host 'node2', not 'node1'"}


def test_a_host_ak_certification_not_signed_by_the_node_fails(pieces: Pieces) -> None:
    _, _, other_key, _ = node_identity("node2")
    forged = sign_host_ak_certification(HostAkCertification(
        hostname="node1", ek_public=pieces.host_ek_public, ak_public=pieces.host_quote.ak_public,
        ak_name=ak_name(pieces.host_quote.ak_public), certified_at="2025-03-01T11:00:00.000+00:00"), other_key)
    assert failing(pieces.verify(pieces.bundle(host_ak_certification=forged))) == {
        "host": "host AK certification signature does not verify with the node signing key"}
    doc = doc_of(pieces.bundle())
    doc["host"]["ak_certification"]["certified_at"] = "2025-03-01T11:00:01.000+00:00"
    assert failing(pieces.verify(pieces.resign(doc))) == {
        "host": "host AK certification signature does not verify with the node signing key"}
    doc["host"]["ak_certification"] = {"format": "tvorch-ak-certification"}
    assert "host AK certification fields wrong" in failing(pieces.verify(pieces.resign(doc)))["host"]


# --- the optional Keylime section ---------------------------------------------------

def test_keylime_verdicts_are_carried_signed_as_information_never_counted(pieces: Pieces, valid: bytes) -> None:
    assert "keylime" not in doc_of(valid)  # a node that does not submit makes the same bundle as before
    section = {"guest": {"submitted": True, "valid": False, "failures": ["pcr_validation.invalid_pcr_4: {}"]},
               "host": {"submitted": False, "queued": "Keylime verifier unreachable"}}
    data = pieces.bundle(keylime=section)
    report = pieces.verify(data)
    assert report.passed, report.table()  # Keylime's word is information: tvorch's own checks decide
    info = report.checks[-1]
    assert (info.name, info.result) == ("keylime", "info")
    assert "guest INVALID: pcr_validation.invalid_pcr_4" in info.detail and "host not judged" in info.detail
    assert "INFO" in report.table()
    doc = doc_of(data)
    doc["keylime"]["guest"]["valid"] = True  # a verdict changed after signing
    assert "bundle signature" in failing(pieces.verify(json.dumps(doc).encode()))
    doc["keylime"] = {"guest": {"submitted": True, "valid": "yes", "failures": []}}
    assert list(failing(pieces.verify(pieces.resign(doc)))) == ["format"]
    doc["keylime"] = {"tenant": {"submitted": False, "queued": "x"}}
    assert "unknown key" in failing(pieces.verify(pieces.resign(doc)))["format"]
