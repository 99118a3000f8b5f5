"""Keylime: export tvorch's policies in Keylime's formats, and submit verified evidence to a Keylime verifier.

Only evidence tvorch has verified itself is submitted (a guest boot after
attest_guest verified its quote and replayed its log; a host quote after its
signature and nonce were checked here), each with a tpm_policy naming every
quoted PCR: Keylime's stateless endpoint neither ties the AK to an EK nor
fails a badly signed quote whose policy names no PCR (core.attestation.keylime).

Keylime's verdict is recorded beside tvorch's own (instance events
"keylime-valid" / "keylime-invalid"; the host's in state_dir/keylime/host.json)
and never replaces it. A verifier that cannot be reached leaves tvorch's
verdict standing: the submission goes to state_dir/keylime/pending/, which the
daemon retries with backoff and `tvorch status` counts.
"""

from __future__ import annotations

import json
import os
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..adapters.files import atomic_write, ensure_private_dir, read_bounded
from ..adapters.keylime import KeylimeClient
from ..adapters.retry import keylime_backoff, keylime_retry
from ..config import Config
from ..core.attestation.eventlog import parse_event_log, replay
from ..core.attestation.hostpolicy import HostPolicy, parse_policy, policy_to_json
from ..core.attestation.ima import IMA_PCR, parse_ima_list, to_ascii
from ..core.attestation.keylime import (
    KIND_RUNTIME,
    KIND_TPM,
    Evidence,
    KeylimeVerdict,
    evidence_payload,
    expected_pcrs,
    import_runtime_policy,
    manifest_prediction,
    mb_refstate,
    runtime_policy,
    tpm_policy,
)
from ..core.attestation.quote import HostQuote
from ..core.timestamps import utc_now
from ..errors import ConfigError, EvidenceError, InputError, KeylimeUnreachable, NotFoundError, TvorchError
from ..logs import get_logger
from .node import Node

log = get_logger(__name__)

KEYLIME_DIR = "keylime"
PENDING = "pending"
HOST_VERDICT = "host.json"
MAX_PENDING_BYTES = 64 * 1024 * 1024


def enabled(cfg: Config) -> bool:
    return bool(cfg.keylime.verifier_url)


def client(cfg: Config) -> KeylimeClient:
    k = cfg.keylime
    return KeylimeClient(k.verifier_url, k.ca_file, k.client_cert, k.client_key, float(k.timeout))


# --- policies ----------------------------------------------------------------------------


def instance_policy(node: Node, name: str, kind: str) -> dict[str, Any]:
    """NAME's expected boot in Keylime's format: KIND tpm (the PCRs tvorch quotes, from the baseline) or mb."""
    from ..core.launch.instance import validate_name

    record = node.store.get_live(validate_name(name))
    baseline = node.store.guest_baseline(record.id)
    if baseline is None:
        raise NotFoundError(f"instance '{name}' has no boot baseline yet: run `tvorch attest {name}` first")
    return _guest_policies(node.cfg, baseline[0], node.store.manifest(record.id))[0 if kind == KIND_TPM else 1]


def _guest_policies(cfg: Config, baseline_log: bytes,
                    manifest: bytes | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The tpm_policy and measured-boot reference state of a guest whose baseline event log is BASELINE_LOG:
    each quoted PCR as its signed launch manifest's boot prediction has it, else as the baseline replays."""
    log_ = parse_event_log(baseline_log)
    values = replay(log_, cfg.guest.bank, list(cfg.guest.pcrs))
    predicted = None
    if manifest is not None and cfg.guest.bank == "sha256":
        predicted = manifest_prediction(json.loads(manifest).get("manifest", {}))
    expected = expected_pcrs(cfg.guest.pcrs, values, predicted)
    return tpm_policy(expected), mb_refstate(log_)


def host_policy(cfg: Config, kind: str) -> dict[str, Any]:
    """The host policy (host.policy) in Keylime's format: its PCRs as a tpm_policy, or its IMA allowlist."""
    if kind == KIND_RUNTIME:
        return runtime_policy(_load_host_policy(cfg))
    if kind == KIND_TPM:
        return tpm_policy({i: [v] for i, v in _load_host_policy(cfg).pcrs.items()})
    raise InputError("refused --kind mb for the host: a measured-boot reference state is per instance "
                     "(tvorch keylime policy NAME --kind mb)")


def import_host_policy(cfg: Config, path: str) -> HostPolicy:
    """A Keylime runtime policy file into host.policy (written atomically); the PCRs and required paths stay."""
    current = _load_host_policy(cfg)
    try:
        data = read_bounded(path, MAX_PENDING_BYTES)
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None
    updated = import_runtime_policy(data, current, path)
    atomic_write(Path(cfg.host.policy), policy_to_json(updated), 0o600)
    return updated


def _load_host_policy(cfg: Config) -> HostPolicy:
    try:
        return parse_policy(Path(cfg.host.policy).read_bytes(), cfg.host.policy)
    except FileNotFoundError:
        raise ConfigError(f"no host policy at {cfg.host.policy}: review one made by `tvorch host baseline`") from None
    except OSError as err:
        raise ConfigError(f"cannot read host policy {cfg.host.policy}: {err.strerror}") from None


# --- evidence ------------------------------------------------------------------------------


def guest_payload(cfg: Config, attestation: Any, nonce: bytes, ek_cert_der: bytes,
                  baseline_log: bytes, manifest: bytes | None = None) -> dict[str, Any]:
    """The submission of a guest boot attest_guest verified (a service.attest.GuestAttestation)."""
    ev = attestation.evidence
    policy, refstate = _guest_policies(cfg, baseline_log, manifest)
    return evidence_payload(Evidence(
        nonce=nonce, bank=ev.bank, pcrs=ev.pcrs, attest=ev.attest, signature=ev.signature,
        ak_public=ev.ak_public, ek=_ek_pem(ek_cert_der), eventlog=ev.eventlog), policy, refstate)


def host_payload(cfg: Config, quote: HostQuote) -> dict[str, Any]:
    """The submission of a host quote, verified here first (signature, AK, nonce, PCR digest): an EvidenceError
    or TrustError means it is not submitted. PCR 10's expected value is the replay of the IMA log tvorch sends."""
    quote.verify(quote.nonce)
    policy = _load_host_policy(cfg)
    baseline = dict(policy.pcrs)
    ima_ascii = None
    if quote.ima_log is not None and IMA_PCR in quote.pcrs:
        ima_ascii = to_ascii(parse_ima_list(quote.ima_log))
        baseline[IMA_PCR] = quote.pcrs[IMA_PCR].hex()  # judged by Keylime's IMA replay, not by this value
    expected = expected_pcrs(sorted(quote.pcrs), baseline)
    return evidence_payload(Evidence(
        nonce=quote.nonce, bank=quote.bank, pcrs=quote.pcrs, attest=quote.attest, signature=quote.signature,
        ak_public=quote.ak_public, ek=quote.ak_pem.encode(), ima_ascii=ima_ascii),
        tpm_policy(expected), runtime=runtime_policy(policy) if ima_ascii is not None else None)


def _ek_pem(ek_cert_der: bytes) -> bytes:
    return x509.load_der_x509_certificate(ek_cert_der).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# --- submission ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Submission:
    """What became of one submission: Keylime's verdict, or None when it was queued for later."""

    verdict: KeylimeVerdict | None
    queued: str | None = None  # why it was queued

    def to_json(self) -> dict[str, object]:
        if self.verdict is None:
            return {"submitted": False, "queued": self.queued}
        return {"submitted": True, **self.verdict.to_json()}


def submit(node: Node, subject: str, payload: dict[str, Any]) -> Submission:
    """Send PAYLOAD (a guest's: SUBJECT is its instance id; the host's: "host"), record Keylime's verdict;
    when the verifier cannot be reached, queue it for the daemon and record that."""
    try:
        verdict = keylime_retry(client(node.cfg).verify)(payload)
    except KeylimeUnreachable as err:
        _queue(node.cfg, subject, payload, str(err))
        _record_gap(node, subject, str(err))
        return Submission(None, str(err))
    _record(node, subject, verdict)
    return Submission(verdict)


def _record(node: Node, subject: str, verdict: KeylimeVerdict) -> None:
    shown = "valid" if verdict.valid else "invalid: " + "; ".join(verdict.failures)
    if subject == "host":
        directory = Path(node.cfg.state_dir) / KEYLIME_DIR
        ensure_private_dir(directory)
        atomic_write(directory / HOST_VERDICT, json.dumps({"at": utc_now(), **verdict.to_json()}).encode())
    else:
        node.store.add_event(subject, "keylime-valid" if verdict.valid else "keylime-invalid", shown[:2000])
        _decision(node, subject, "valid" if verdict.valid else "invalid", verdict.failures)
    log.info("keylime_verdict", subject=subject, valid=verdict.valid, failures=list(verdict.failures))


def _record_gap(node: Node, subject: str, why: str) -> None:
    if subject != "host":
        node.store.add_event(subject, "keylime-queued", f"Keylime not reached, submission queued: {why}"[:2000])
        _decision(node, subject, "queued", (why,))
    log.warning("keylime_unreachable", subject=subject, error=why)


def _decision(node: Node, instance_id: str, verdict: str, reasons: tuple[str, ...]) -> None:
    """Keylime's verdict among the instance's decisions (`tvorch events`, operation "keylime")."""
    record = node.store.by_id(instance_id)
    node.store.add_hook_event(instance_id, record.name if record else instance_id, "keylime", verdict,
                              tuple(r[:1000] for r in reasons))


def host_verdict(cfg: Config) -> dict[str, Any] | None:
    try:
        return json.loads(read_bounded(str(Path(cfg.state_dir) / KEYLIME_DIR / HOST_VERDICT), 1024 * 1024))
    except (OSError, ValueError):
        return None


def _pending_dir(cfg: Config) -> Path:
    return Path(cfg.state_dir) / KEYLIME_DIR / PENDING


def _queue(cfg: Config, subject: str, payload: dict[str, Any], why: str) -> None:
    directory = _pending_dir(cfg)
    ensure_private_dir(directory.parent)
    ensure_private_dir(directory)
    item = {"subject": subject, "payload": payload, "queued_at": utc_now(), "attempts": 1,
            "next_at": time.time() + keylime_backoff(1), "last_error": why}
    atomic_write(directory / f"{time.time_ns()}-{uuidlib.uuid4().hex[:8]}.json", json.dumps(item).encode())


def pending(cfg: Config) -> dict[str, Any]:
    """For `tvorch status`: how many submissions wait, since when, the last error; Keylime's last host verdict."""
    items = []
    directory = _pending_dir(cfg)
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            items.append(json.loads(read_bounded(str(path), MAX_PENDING_BYTES)))
        except (OSError, ValueError):
            continue
    return {"enabled": enabled(cfg), "pending": len(items), "host": host_verdict(cfg),
            "oldest": items[0]["queued_at"] if items else None,
            "last_error": items[-1]["last_error"] if items else None}


def retry_pending(node: Node, now: float | None = None) -> int:
    """Submit the queued submissions whose time has come (the daemon's tick); returns how many went through."""
    now = time.time() if now is None else now
    directory, done = _pending_dir(node.cfg), 0
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            item = json.loads(read_bounded(str(path), MAX_PENDING_BYTES))
        except (OSError, ValueError):
            continue
        if item["next_at"] > now:
            continue
        try:
            verdict = client(node.cfg).verify(item["payload"])
        except KeylimeUnreachable as err:
            item.update(attempts=item["attempts"] + 1, last_error=str(err),
                        next_at=now + keylime_backoff(item["attempts"] + 1))
            atomic_write(path, json.dumps(item).encode())
            break  # the verifier is down: the rest waits too
        except TvorchError as err:  # an answer without a verdict: kept, for an operator to look at
            item.update(attempts=item["attempts"] + 1, last_error=str(err),
                        next_at=now + keylime_backoff(item["attempts"] + 1))
            atomic_write(path, json.dumps(item).encode())
            continue
        try:
            _record(node, item["subject"], verdict)
        except TvorchError as err:  # the instance is gone: its verdict has nowhere to go
            log.warning("keylime_verdict_unrecorded", subject=item["subject"], error=str(err))
        os.unlink(path)
        done += 1
    return done


def submit_guest(node: Node, attestation: Any, nonce: bytes) -> Submission | None:
    """After attest_guest verified a boot: submit it when keylime.verifier_url is set (else None)."""
    if not enabled(node.cfg):
        return None
    record = attestation.record
    vtpm = node.store.vtpm(record.id)
    baseline = node.store.guest_baseline(record.id)
    if vtpm is None or baseline is None:
        return None
    try:
        payload = guest_payload(node.cfg, attestation, nonce, vtpm.ek_cert, baseline[0],
                                node.store.manifest(record.id))
    except EvidenceError as err:
        node.store.add_event(record.id, "keylime-not-submitted", str(err)[:2000])
        return Submission(None, str(err))
    return submit(node, record.id, payload)


def submit_host(node: Node, quote: HostQuote) -> Submission | None:
    """A host quote to Keylime when keylime.verifier_url is set; one that does not verify here is not sent."""
    if not enabled(node.cfg):
        return None
    try:
        payload = host_payload(node.cfg, quote)
    except TvorchError as err:
        log.warning("keylime_host_not_submitted", reason=str(err))
        return Submission(None, f"not submitted: {err}")
    return submit(node, "host", payload)
