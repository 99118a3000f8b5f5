"""Guest attestation and evidence: certify the vTPM's AK, verify a quote, watch boots against a baseline, bundle.

The chain a tenant can check: the node CA issued the vTPM's EK certificate
(at manufacture); the AK the guest agent quotes with is certified against
that EK by credential activation, once per AK, and the node signs that
statement; each quote is checked with that AK, its event log replayed to the
quoted PCRs and compared event by event with the instance's baseline (its
first verified boot's log, or one an operator accepted since). Every verified
boot is recorded with its verdict, so an operator sees which boots matched.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import os
import secrets
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography import x509

from ..adapters.guest_channel import GuestAgentError, GuestChannel, socket_path
from ..config import Config
from ..core.attestation.agent_protocol import Response, parse_pcr_values, pcr_list
from ..core.attestation.akcert import (
    AkCertification,
    check_ak_public,
    ek_cert_sha256,
    ek_matches_certificate,
    make_credential,
    sign_ak_certification,
)
from ..core.attestation.bundle import (
    BundleReport,
    Check,
    GuestEvidence,
    build_bundle,
    check_names,
    replay_problems,
    verify_bundle,
)
from ..core.launch.canonical import autoselection_hint, config_digest
from ..core.codec import b64encode, parse_json
from ..core.attestation.eventlog import parse_event_log
from ..core.attestation.guest_baseline import BaselineVerdict, compare, compare_prediction
from ..core.launch.instance import InstanceRecord, InstanceState, validate_name
from ..core.launch.manifest_format import stored_manifest
from ..core.boot.prediction import Prediction
from ..core.attestation.quote import QuoteInfo, ak_name, verify_quote
from ..core.timestamps import utc_now
from ..errors import ConflictError, EvidenceError, InputError, NotFoundError, StoreError, TrustError, TvorchError
from ..logs import get_logger
from .manifests import node_identity, read_chain, read_with_ca
from .node import Node

log = get_logger(__name__)

NONCE_MIN, NONCE_MAX = 8, 64  # bytes; TPM2_Quote's qualifyingData takes at most a digest's size (sha256: 32)


@dataclass(frozen=True)
class GuestAttestation:
    """One verified quote of a guest and what tvorch concluded from it."""

    record: InstanceRecord
    evidence: GuestEvidence
    quote: QuoteInfo
    baseline: BaselineVerdict | None  # None when this boot became the baseline
    learned: bool
    ak_certification: dict[str, Any]
    keylime: dict[str, Any] | None = None  # Keylime's verdicts beside tvorch's (service.keylime), when submitted
    against: str | None = "baseline"  # "prediction": a first boot judged against the launch prediction
    live_config: str | None = None  # why the running configuration is not the manifest's (a live change)

    def summary(self) -> dict[str, Any]:
        return {**({} if self.keylime is None else {"keylime": self.keylime}),
            "name": self.record.name, "instance_id": self.record.id, "reset_count": self.quote.reset_count,
            "pcrs": {str(i): v.hex() for i, v in sorted(self.evidence.pcrs.items())},
            "judged_against": self.against,
            "baseline": "learned from this boot" if self.learned else (
                "matches" if self.baseline is not None and self.baseline.matches else "differs"),
            "differences": [] if self.baseline is None else [d.describe() for d in self.baseline.differences],
            "live_configuration": "matches" if self.live_config is None else "differs",
            **({} if self.live_config is None else {"live_configuration_detail": self.live_config}),
        }


def parse_nonce(text: str) -> bytes:
    try:
        nonce = bytes.fromhex(text)
    except ValueError:
        raise InputError(f"refused nonce {text[:80]!r}: not hex") from None
    if not NONCE_MIN <= len(nonce) <= NONCE_MAX:
        raise InputError(f"refused nonce: {len(nonce)} bytes; give {NONCE_MIN} to {NONCE_MAX} bytes as hex")
    return nonce


def channel_path(cfg: Config, record: InstanceRecord) -> Path:
    return socket_path(Path(cfg.guest.channel_dir), record.id, record.domain_xml)


def attest_guest(node: Node, name: str, nonce: bytes, timeout: float | None = None) -> GuestAttestation:
    """Ask the guest agent for a quote over NONCE and verify it; certify its AK first when it is new."""
    cfg = node.cfg
    record = node.store.get_live(validate_name(name))
    # libvirt's word, not written back: this may run beside a start or stop that holds the name's lock.
    hv = node.hypervisor
    live = hv.state(name) if hv.domain_uuid(name) == record.uuid else None
    if record.state is InstanceState.LAUNCHING or live is not InstanceState.RUNNING:
        shown = record.state.value if record.state is InstanceState.LAUNCHING else (
            live.value if live else "not defined in libvirt")
        raise ConflictError(f"refused attestation of '{name}': it is {shown}, not running")
    vtpm = node.store.vtpm(record.id)
    if vtpm is None:
        raise NotFoundError(f"instance '{name}' has no vTPM record (launched before tvorch manufactured vTPMs)")
    ek_cert = x509.load_der_x509_certificate(vtpm.ek_cert)
    wait = float(cfg.guest.agent_timeout if timeout is None else timeout)
    with GuestChannel(channel_path(cfg, record), wait) as channel:
        quick = _quote_by_certified_ak(node, record, channel, nonce)
        if quick is not None:
            certification, evidence, info = quick
        else:
            hello = channel.hello()
            certification = _certified_ak(node, record, ek_cert, vtpm.ek_fingerprint, hello, channel)
            answer = channel.call("quote", nonce=nonce.hex(), pcrs=pcr_list(cfg.guest.bank, cfg.guest.pcrs))
            evidence, info = _verified_quote(cfg, answer, hello.data("ak_public"), nonce)
    problems = replay_problems(evidence.eventlog, evidence.bank, evidence.pcrs)
    if problems:
        node.store.add_event(record.id, "guest-evidence-refused", "; ".join(problems))
        raise TrustError(f"the guest's event log does not hold together with its quote: {'; '.join(problems)}")
    verdict, learned, against = _judge_boot(node, record, evidence, info)
    return GuestAttestation(record, evidence, info, verdict, learned, certification, against=against)


def _quote_by_certified_ak(node: Node, record: InstanceRecord, channel: GuestChannel, nonce: bytes
                           ) -> tuple[dict[str, Any], GuestEvidence, QuoteInfo] | None:
    """The quote, asked without a hello, when the AK certified earlier signed it; else None.

    A quote that verifies under the certified AK comes from the same vTPM
    (the AK is fixedTPM, under the EK the node certified it against), so the
    hello would add nothing, and it costs the agent more than the quote (it
    remakes the EK). None when no AK is certified yet, the agent refuses (a
    vTPM without the AK), or the quote does not verify under it (a new AK):
    the caller then says hello and certifies the AK the agent reports.
    """
    stored = node.store.guest_ak(record.id)
    if stored is None:
        return None
    try:
        answer = channel.resend("quote", nonce=nonce.hex(), pcrs=pcr_list(node.cfg.guest.bank, node.cfg.guest.pcrs))
        evidence, info = _verified_quote(node.cfg, answer, stored[0], nonce)
    except (GuestAgentError, EvidenceError, TrustError) as err:
        log.info("certified_ak_quote_refused", name=record.name, reason=str(err))
        return None
    return parse_json(stored[2], "the stored AK certification", StoreError), evidence, info


def _verified_quote(cfg: Config, answer: Response, ak_public: bytes, nonce: bytes) -> tuple[GuestEvidence, QuoteInfo]:
    """The agent's quote answer as evidence, once AK_PUBLIC's signature over NONCE and the asked PCRs checks."""
    bank, pcr_values = parse_pcr_values(answer.text("pcrs"))
    if bank != cfg.guest.bank or sorted(pcr_values) != sorted(set(cfg.guest.pcrs)):
        raise EvidenceError(f"the guest agent quoted {pcr_list(bank, tuple(pcr_values))}, not the "
                            f"{pcr_list(cfg.guest.bank, tuple(cfg.guest.pcrs))} asked for")
    evidence = GuestEvidence(bank=bank, pcrs=pcr_values, attest=answer.data("attest"),
                             signature=answer.data("signature"), ak_public=ak_public,
                             eventlog=answer.data("eventlog"), ima=answer.b64("ima", optional=True))
    return evidence, verify_quote(evidence.attest, evidence.signature, ak_public, nonce, pcr_values, bank)


def _certified_ak(node: Node, record: InstanceRecord, ek_cert: x509.Certificate, ek_fingerprint: str,
                  hello: Response, channel: GuestChannel) -> dict[str, Any]:
    """The node's signed statement for the agent's AK: the recorded one, or a new one after credential activation."""
    ak_public, name = hello.data("ak_public"), hello.hex("ak_name")
    stored = node.store.guest_ak(record.id)
    if stored is not None and stored[0] == ak_public:
        return parse_json(stored[2], "the stored AK certification", StoreError)
    ek_public = hello.data("ek_public")
    if not ek_matches_certificate(ek_public, ek_cert):
        raise TrustError(f"the guest agent of '{record.name}' reports an EK that is not its vTPM's "
                         "(the one whose certificate the node CA issued)")
    check_ak_public(ak_public)
    if ak_name(ak_public) != name:
        raise TrustError("the guest agent's AK name does not match its AK public area")
    secret = secrets.token_bytes(32)
    id_object, encrypted_secret = make_credential(ek_public, name, secret)
    answer = channel.call("activate", id_object=b64encode(id_object), encrypted_secret=b64encode(encrypted_secret))
    if not hmac.compare_digest(answer.data("secret"), secret):
        raise TrustError("the guest's vTPM did not activate the credential: its AK is not under its EK")
    identity = node_identity(node.cfg)
    now = utc_now()
    statement = sign_ak_certification(AkCertification(
        instance_id=record.id, uuid=record.uuid, ek_fingerprint=ek_fingerprint, ek_cert_sha256=ek_cert_sha256(ek_cert),
        ak_public=ak_public, ak_name=name, certified_at=now), identity.signing_key)
    node.store.save_guest_ak(record.id, ak_public, name, json.dumps(statement, sort_keys=True), now)
    log.info("ak_certified", name=record.name, ak_name=name.hex())
    return statement


def _judge_boot(node: Node, record: InstanceRecord, evidence: GuestEvidence,
                info: QuoteInfo) -> tuple[BaselineVerdict | None, bool, str | None]:
    """Compare with the baseline, or judge this first verified boot (policy.first_boot), and record the boot once.

    (verdict, learned, against): AGAINST is "prediction" when a first boot was judged against the launch
    manifest's signed prediction, "baseline" otherwise, None when this boot was learned unjudged.
    A first boot that differs from the prediction is refused and never becomes the baseline.
    """
    baseline = node.store.guest_baseline(record.id)
    verdict: BaselineVerdict | None = None
    against: str | None = "baseline"
    learned, note = False, ""
    if baseline is not None:
        verdict = compare(parse_event_log(baseline[0]), parse_event_log(evidence.eventlog), evidence.bank)
        if not verdict.matches:
            verdict, against = _judge_next_boot(node, record, evidence, verdict)
    else:
        prediction, why_not = first_boot_prediction(node.cfg, node.store.manifest(record.id))
        if prediction is not None:
            against = "prediction"
            verdict = compare_prediction(prediction, parse_event_log(evidence.eventlog))
            if verdict.matches:
                node.store.set_guest_baseline(
                    record.id, evidence.eventlog, "first verified boot, matching the launch prediction (PCRs "
                    f"{', '.join(map(str, sorted(prediction.covered)))})", "baseline-predicted", "predicted")
        else:
            learned, against, note = True, None, why_not
            node.store.set_guest_baseline(record.id, evidence.eventlog, "first verified boot" + (
                f" ({why_not})" if why_not else ""), "baseline-learned", "learned")
    boots = node.store.guest_boots(record.id, limit=1)
    if not boots or boots[-1]["reset_count"] != info.reset_count:
        matches = verdict is None or verdict.matches
        shown: dict[str, Any] = {
            "baseline": "learned" if learned else ("matches" if matches else "differs"),
            "differences": [] if verdict is None else [d.to_json() for d in verdict.differences]}
        if against == "prediction" or note:
            shown["first_boot"] = note or "judged against the launch prediction"
        elif against == "next-boot prediction":
            shown["judged_against"] = "the expected next boot (tvorch predict --instance)"
        node.store.add_guest_boot(record.id, info.reset_count, matches, json.dumps(shown), evidence.eventlog)
        if not matches:
            assert verdict is not None
            kind = "boot-differs" if against == "baseline" else "boot-differs-from-prediction"
            node.store.add_event(record.id, kind, "; ".join(d.describe() for d in verdict.differences)[:2000])
            log.warning("guest_boot_differs", name=record.name, against=against,
                        differences=[d.describe() for d in verdict.differences])
    return verdict, learned, against


def _judge_next_boot(node: Node, record: InstanceRecord, evidence: GuestEvidence,
                     vs_baseline: BaselineVerdict) -> tuple[BaselineVerdict, str]:
    """A boot that differs from the baseline, judged against the expected next boot when one is kept
    (`tvorch predict --instance`): on the PCRs it covers against it, elsewhere against the baseline.
    A match becomes the baseline (source "predicted") and the expectation is used up."""
    from .next_boot import expected_next_boot, forget_next_boot

    expected = expected_next_boot(node.cfg, record.id) if evidence.bank == "sha256" else None
    if expected is None:
        return vs_baseline, "baseline"
    prediction, boot_file = expected
    differences = compare_prediction(prediction, parse_event_log(evidence.eventlog)).differences + tuple(
        d for d in vs_baseline.differences if d.pcr not in prediction.covered)
    verdict = BaselineVerdict(evidence.bank, None, tuple(sorted(differences, key=lambda d: d.pcr)))
    if verdict.matches:
        node.store.set_guest_baseline(record.id, evidence.eventlog, f"verified boot matching the prediction of "
                                      f"{boot_file} (tvorch predict --instance)", "baseline-predicted", "predicted")
        forget_next_boot(node.cfg, record.id)
    return verdict, "next-boot prediction"


def first_boot_prediction(cfg: Config, manifest: bytes | None) -> tuple[Prediction | None, str]:
    """The prediction a first boot is judged against, or None and why it is learned instead ("" under "learn")."""
    if cfg.policy.first_boot == "learn":
        return None, ""
    if manifest is None:
        return None, "policy.first_boot is predicted, but the instance has no launch manifest: learned"
    record = stored_manifest(manifest).boot_prediction
    if record is None:
        return None, "policy.first_boot is predicted, but the launch manifest has no boot prediction: learned"
    if record.prediction is None:
        return None, (f"policy.first_boot is predicted, but the launch manifest's boot prediction is unavailable "
                      f"({record.reason}): learned")
    return record.prediction, ""


# -- evidence bundle -----------------------------------------------------------


def attest(node: Node, name: str, nonce: bytes, timeout: float | None = None) -> tuple[bytes, GuestAttestation]:
    """One bundle for NAME over NONCE: guest quote and logs, vTPM EK and AK certification, manifest, host."""
    from . import host

    guest = attest_guest(node, name, nonce, timeout)
    record = guest.record
    vtpm = node.store.vtpm(record.id)
    manifest = node.store.manifest(record.id)
    if vtpm is None or manifest is None:
        raise NotFoundError(f"instance '{name}' lacks its vTPM record or launch manifest")
    try:
        host_quote = host.quote(node.cfg, nonce)
        host_ak = host.ak_certification(node.cfg)  # None: an AK from before tvorch certified them
    except TvorchError as err:  # a node without host attestation: the bundle says so, verify fails it
        log.warning("no_host_quote", reason=str(err))
        host_quote, host_ak = None, None
    live_digest, live_differs = _live_config_digest(node, record, manifest)
    guest = dataclasses.replace(guest, live_config=live_differs)
    guest = _submit_to_keylime(node, guest, nonce, host_quote)
    baseline = node.store.guest_baseline(record.id)
    identity = node_identity(node.cfg)
    verdict = node.store.latest_host_verdict()
    if verdict is not None and time.time() - verdict.at_epoch > node.cfg.host.verdict_max_age:
        log.warning("stale_host_verdict", at=verdict.at, max_age=node.cfg.host.verdict_max_age)
        verdict = None  # the bundle says there is none fresh; verify fails its host check
    bundle = build_bundle(
        nonce=nonce, instance_id=record.id, name=record.name, uuid=record.uuid, hostname=socket.gethostname(),
        signing_key=identity.signing_key, signing_cert=identity.signing_cert, ca_cert=identity.ca_cert,
        ca_chain=identity.chain,
        manifest=manifest, ek_cert=x509.load_der_x509_certificate(vtpm.ek_cert),
        ak_certification=guest.ak_certification, guest=guest.evidence,
        baseline_eventlog=baseline[0] if baseline else None, host_verdict=verdict,
        host_quote=host_quote, host_ak_certification=host_ak, created_at=datetime.now(timezone.utc),
        live_config_digest=live_digest, keylime=guest.keylime,
        migrations=[statement for _, statement in sorted(node.store.handoffs(record.id).items())],
    )
    return bundle, guest


def _submit_to_keylime(node: Node, guest: GuestAttestation, nonce: bytes, host_quote: Any) -> GuestAttestation:
    """With keylime.verifier_url set: the verified boot (and the host quote) to Keylime, its verdicts kept."""
    from . import keylime

    if not keylime.enabled(node.cfg):
        return guest
    shown: dict[str, Any] = {}
    for what, done in (("guest", keylime.submit_guest(node, guest, nonce)),
                       ("host", None if host_quote is None else keylime.submit_host(node, host_quote))):
        if done is not None:
            shown[what] = done.to_json()
    return dataclasses.replace(guest, keylime=shown)


def _live_config_digest(node: Node, record: InstanceRecord, manifest: bytes) -> tuple[str, str | None]:
    """The canonical configuration digest of the domain as it runs now; a live change (a hot-plugged
    device, memory or vCPUs set) that makes it differ from the manifest's is recorded, and the bundle
    carries it for verify's "live configuration" check."""
    recorded = stored_manifest(manifest)
    live = config_digest(node.hypervisor.domain_xml(record.name),
                         autoselection_hint(record.domain_xml, recorded.measurements))
    launched = recorded.config_digest
    if live != launched:
        detail = f"running configuration sha256:{live[:16]}... is not the manifest's sha256:{launched[:16]}..."
        node.store.add_event(record.id, "live-config-differs", detail)
        log.info("live_config_differs", name=record.name, live=live, manifest=launched)  # attest fails, saying it
        return live, detail
    return live, None


def verify_file(path: str, ca_path: str, nonce: bytes, uuid: str | None = None, *, max_host_age: float,
                max_age: float | None = None, skip: Iterable[str] = (),
                chain_path: str | None = None) -> BundleReport:
    """The bundle's report; with UUID, one more check: that the bundle is about that VM."""
    skip = check_names(skip)  # an unknown name is refused before anything is read
    data, ca = read_with_ca(path, ca_path, 256 * 1024 * 1024)
    report = verify_bundle(data, ca, nonce, datetime.now(timezone.utc), max_host_age=max_host_age,
                           max_age=max_age, skip=skip, untrusted=read_chain(chain_path))
    if uuid is None:
        return report
    about = Check("instance", report.uuid == uuid.lower(),
                  f"the bundle is about VM {report.uuid} ({report.instance_id})"
                  + ("" if report.uuid == uuid.lower() else f", not {uuid}"))
    return dataclasses.replace(report, checks=(*report.checks, about))


# -- baseline -------------------------------------------------------------------


def baseline_show(node: Node, name: str) -> dict[str, Any]:
    record = node.store.get_live(validate_name(name))
    baseline = node.store.guest_baseline(record.id)
    events: dict[str, int] = {}
    if baseline is not None:
        for event in parse_event_log(baseline[0]).events:
            events[str(event.pcr)] = events.get(str(event.pcr), 0) + 1
    return {
        "name": record.name, "instance_id": record.id,
        "baseline": None if baseline is None else {"learned_at": baseline[1], "reason": baseline[2],
                                                   "source": node.store.guest_baseline_source(record.id),
                                                   "events_by_pcr": events},
        "boots": node.store.guest_boots(record.id),
    }


def baseline_accept(node: Node, name: str, reason: str) -> dict[str, Any]:
    """Make the last verified boot's event log the baseline (after an intended change), recorded with REASON."""
    record = node.store.get_live(validate_name(name))
    last = node.store.last_guest_boot_log(record.id)
    if last is None:
        raise NotFoundError(f"no verified boot of '{name}' to accept: run `tvorch attest {name}` first")
    who = os.environ.get("SUDO_USER") or os.environ.get("USER") or "unknown"
    node.store.set_guest_baseline(record.id, last, f"accepted by {who}: {reason}", "baseline-accepted", "accepted")
    return baseline_show(node, name)
