"""The evidence bundle: everything a tenant needs to check a VM offline with the node CA and a nonce.

Why one bundle: the guest's quote is only as good as its AK, the AK as the
EK it was certified against, the EK as the CA that issued its certificate and
the launch manifest that names it, and the whole VM as the host it runs on.
The bundle carries each link, the node signs the whole, and ``verify_bundle``
checks every link with nothing but the CA certificate, the verifier's own
nonce and a time. Like Keylime, it runs every check and reports each one
instead of stopping at the first failure.

The file is one JSON object in canonical form (``codec.canonical_json``)::

    {
      "format": "tvorch-evidence",
      "version": 3,
      "created_at": "2025-03-01T12:00:00.000+00:00",      # UTC, when the node made it
      "nonce": "<hex>",                                    # the verifier's nonce, quoted by guest and host
      "instance": {"id": "i-...", "name": "vm1", "uuid": "<libvirt UUID>"},
      "node": {"hostname": "compute-7",
               "signing_cert_pem": "<PEM of the node signing certificate>",
               "ca_pem": "<PEM of the node CA>"},           # then, in a fleet, the chain above it (docs/evidence-bundle.md)
      "manifest": "<base64 of the signed launch manifest file>",
      "vtpm": {"ek_cert_pem": "<PEM of the vTPM's RSA EK certificate>"},
      "ak_certification": {...},                           # core.attestation.akcert's signed object
      "guest": {"bank": "sha256",
                "pcrs": {"0": "<hex>", ...},               # the quoted PCRs and their values
                "attest": "<base64 TPMS_ATTEST>",
                "signature": "<base64 TPMT_SIGNATURE>",
                "ak_public": "<base64 TPM2B_PUBLIC of the AK>",
                "eventlog": "<base64 of binary_bios_measurements>",
                "ima": "<base64 of the IMA list>" | null},   # carried, not yet checked
      "baseline": {"eventlog": "<base64 of the first boot's event log>" | null,
                   "verdict": <core.attestation.guest_baseline BaselineVerdict.to_json()> | null},
      "host": {"verdict": {"passed": true, "failures": [...], "at": "<UTC>", "policy_digest": "<hex>",
                           "bank": "sha256", "pcrs": {"0": "<hex>", ...}} | null,   # of the quote it judged
               "quote": <core.attestation.quote HostQuote.to_json(), over the same nonce> | null,
               "ak_certification": <core.attestation.akcert's signed host AK statement> | null},
      "live": {"config_digest": "<hex>"},                  # canonical configuration of the running domain
      "keylime": {"guest": {"submitted": true, "valid": true, "failures": [...]}   # only when the node
                           | {"submitted": false, "queued": "<why>"},            # submits to Keylime
                  "host": {...}},                                                # (optional section)
      "signature": "<base64 DER ECDSA-P256-SHA256 by the node signing key over the canonical JSON
                    of every other field>"
    }

The node writes it canonical; a verifier also takes it re-indented (the
signature is over the canonical form of what it parses to), but refuses
duplicate keys, floats, and any missing, unknown or ill-typed field.

Checks, in order (``Check.name``), each PASS or FAIL with a one-line detail:

- "format": JSON object, format "tvorch-evidence", version 1, every field
  present and of its type and encoding. If this fails, it is the only check.
- "node certificate": the signing certificate chains to the verifier's CA
  (ECDSA P-256, digitalSignature, documentSigning), valid at the time given:
  issued by it, or (a fleet root) by a node CA that ``node.ca_pem`` and the
  verifier's extra intermediates lead up to it (``core.chain``). That node CA
  is the CA the manifest and the EK certificate are then checked against.
- "bundle signature": the node signing key signed everything else.
- "bundle age": shows created_at; fails when it is more than CLOCK_SKEW after
  the verifier's time, or older than the verifier's maximum age if given.
- "launch manifest": verifies with the CA and names this instance (id, uuid).
- "live configuration": the canonical configuration (core.launch.canonical) of the
  domain as it ran when the node made the bundle is the manifest's: a device
  attached, memory or vCPUs changed on the running VM fail it, though the
  next start would be refused by the hook anyway.
- "vTPM EK certificate": an EK certificate the CA issued, whose sha256 (and
  EK fingerprint) is the manifest's ``vtpm-ek`` measurement.
- "AK certification": signed by the node key, names this instance, this EK
  (fingerprint and certificate sha256) and the AK that signed the guest quote.
- "guest quote": over the verifier's nonce, of exactly the PCRs given, by that AK.
- "guest event log": replays to the quoted value of every PCR it extends (and
  each such PCR is quoted), naming each PCR that does not.
- "baseline": with a baseline event log, the boot matches it event by event
  (recomputed; each difference described) and the node's verdict says the same.
- "prediction": the quoted guest PCRs the launch manifest's signed boot
  prediction covers equal its predicted values; each difference is named by
  event from the guest event log. A manifest with no prediction, or one
  unavailable at launch, passes saying "not judged" and why (the manifest
  signs the policy's digest, not its first_boot setting, so a verifier cannot
  tell whether the node required one); a quote in another bank than the
  prediction's sha256 fails.
- "host": a passing host verdict at most the verifier's maximum host age
  older than the bundle; a host quote over the same nonce, by the host AK the
  node certified by credential activation against its TPM's EK (signed by the
  node key, naming this host); the verdict judged
  on the same bank, PCRs and values as that quote (PCR 10 aside, whose IMA
  list must pass through the verdict's value); the quote's IMA list replays
  to its PCR 10 and starts with the boot_aggregate of its PCRs 0-9.

Information, not a check (shown as INFO, never counted, only when the
bundle carries it): "keylime", the verdicts of the Keylime verifier the node
submitted the guest boot and host quote to, as the node recorded them. A
verifier that trusts that Keylime may act on them; they are not evidence
itself (docs/keylime.md).

A check whose premise did not verify (say, the AK certification when the node
certificate does not chain to the CA) fails saying "not checked: ..." rather
than trusting it.
A verifier may skip checks by name: they still run, are reported as skipped
with what they found, and do not count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tvorch.core.attestation.akcert import ek_cert_sha256, verify_ak_certification, verify_host_ak_certification
from tvorch.core.chain import issuer_under
from tvorch.core.vtpm.ekcert import ek_fingerprint, verify_ek_certificate
from tvorch.core.attestation.eventlog import parse_event_log, replay
from tvorch.core.attestation.guest_baseline import compare, compare_prediction
from tvorch.core.attestation.hostverdict import HostVerdict
from tvorch.core.attestation.ima import (
    IMA_PCR,
    ImaReplay,
    boot_aggregate_pcrs,
    boot_aggregate_problem,
    parse_ima_list,
    replay_until,
)
from tvorch.core.codec import b64decode, b64encode, canonical_json, key_mismatch, parse_json
from tvorch.core.launch.manifest import LaunchManifest, manifest_digest, verify_manifest, verify_manifest_under
from tvorch.core.migration.handoff import HandoffEvent, verify_handoff
from tvorch.core.signed import key_fingerprint
from tvorch.core.boot.prediction import BANK as PREDICTION_BANK
from tvorch.core.boot.prediction import Prediction
from tvorch.core.attestation.quote import (
    HostQuote,
    ak_fingerprint,
    digest_size,
    pcr_values,
    verify_quote,
)
from tvorch.core.signing import DOCUMENT_SIGNING, verify_chain
from tvorch.core.timestamps import format_utc, parse_utc
from tvorch.errors import EvidenceError, InputError, TrustError, TvorchError

BUNDLE_FORMAT = "tvorch-evidence"
BUNDLE_VERSION = 3  # 2: the host verdict names the bank and PCR values it was judged on; 3: "live"
# How far the node's clock may run ahead of the verifier's before a bundle "made in the future" is refused.
CLOCK_SKEW = 300

_TOP = ("format", "version", "created_at", "nonce", "instance", "node", "manifest", "vtpm", "ak_certification",
        "guest", "baseline", "host", "live", "signature")
_INSTANCE = ("id", "name", "uuid")
_NODE = ("hostname", "signing_cert_pem", "ca_pem")
MAX_MIGRATIONS = 1000  # a bound on a hostile list, far above any VM's life
_GUEST = ("bank", "pcrs", "attest", "signature", "ak_public", "eventlog", "ima")
_BASELINE = ("eventlog", "verdict")
_HOST = ("verdict", "quote", "ak_certification")
_HOST_VERDICT = ("passed", "failures", "at", "policy_digest", "bank", "pcrs")


@dataclass(frozen=True)
class GuestEvidence:
    """What the guest agent answered: a quote of its vTPM and its firmware event log."""

    bank: str
    pcrs: Mapping[int, bytes]
    attest: bytes  # TPMS_ATTEST, marshaled
    signature: bytes  # TPMT_SIGNATURE, marshaled
    ak_public: bytes  # TPM2B_PUBLIC, marshaled
    eventlog: bytes  # binary_bios_measurements, as read
    ima: bytes | None = None


@dataclass(frozen=True)
class Check:
    """One check's result. A skipped check (the verifier's --skip-check) never counts as passed:
    ``passed`` is False and ``detail`` says what the check found all the same."""

    name: str
    passed: bool
    detail: str
    skipped: bool = False
    malformed: bool = False  # failed because evidence did not parse (exit 13 rather than 12)
    info: bool = False  # information the bundle carries, not a check: never counted

    @property
    def result(self) -> str:
        return "info" if self.info else "skipped" if self.skipped else "pass" if self.passed else "fail"


@dataclass(frozen=True)
class BundleReport:
    """Every check's result; the bundle is good only if every check not skipped passed."""

    checks: tuple[Check, ...]
    instance_id: str | None = None  # as the bundle names it (None when it is malformed)
    uuid: str | None = None
    hostname: str | None = None
    created_at: str | None = None  # the node's time of making it, as the bundle says

    @property
    def passed(self) -> bool:
        counted = [c for c in self.checks if not c.skipped and not c.info]
        return bool(counted) and all(c.passed for c in counted)

    @property
    def malformed(self) -> bool:
        """Some failing check failed on evidence that does not parse (the bundle itself, a quote, a log)."""
        return any(c.malformed for c in self.failures())

    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed and not c.skipped and not c.info)

    def table(self) -> str:
        """Aligned columns: check, PASS/FAIL/SKIPPED, detail."""
        rows = [("check", "result", "detail")] + [(c.name, c.result.upper(), c.detail) for c in self.checks]
        width = max(len(r[0]) for r in rows)
        result_width = max(len(r[1]) for r in rows)
        return "\n".join(f"{name:<{width}}  {result:<{result_width}}  {detail}".rstrip()
                         for name, result, detail in rows)

    def to_json(self) -> dict[str, Any]:
        return {"passed": self.passed, "instance_id": self.instance_id, "uuid": self.uuid, "hostname": self.hostname,
                "created_at": self.created_at, "skipped": [c.name for c in self.checks if c.skipped],
                "checks": [{"name": c.name, "result": c.result, "passed": c.passed, "detail": c.detail}
                           for c in self.checks]}


# --- building -----------------------------------------------------------------------

def build_bundle(
    *,
    nonce: bytes,
    instance_id: str,
    name: str,
    uuid: str,
    hostname: str,
    signing_key: ec.EllipticCurvePrivateKey,
    signing_cert: x509.Certificate,
    ca_cert: x509.Certificate,
    ca_chain: Sequence[x509.Certificate] = (),
    manifest: bytes,
    ek_cert: x509.Certificate,
    ak_certification: Mapping[str, Any],
    guest: GuestEvidence,
    baseline_eventlog: bytes | None,
    host_verdict: HostVerdict | None,
    host_quote: HostQuote | None,
    created_at: datetime,
    baseline_pcrs: Iterable[int] | None = None,
    host_ak_certification: Mapping[str, Any] | None = None,
    live_config_digest: str,
    keylime: Mapping[str, Any] | None = None,
    migrations: Sequence[Mapping[str, Any]] = (),
) -> bytes:
    """The bundle's canonical JSON, signed with SIGNING_KEY (see the module docstring).

    The baseline verdict is computed here from BASELINE_EVENTLOG and the
    guest's event log (on BASELINE_PCRS, default all), so it always says what
    the logs say. HOST_QUOTE must be over NONCE. HOST_VERDICT carries the PCR
    values of the quote it was judged on, which ``verify_bundle`` holds
    against HOST_QUOTE's. LIVE_CONFIG_DIGEST is the running domain's canonical
    configuration digest, read by the node when it made the bundle.
    """
    if signing_cert.public_key() != signing_key.public_key():
        raise TrustError(f"the signing key does not match certificate '{signing_cert.subject.rfc4514_string()}'")
    if created_at.tzinfo is None:
        raise ValueError("a timezone-aware datetime is required")
    verdict = None
    if baseline_eventlog is not None:
        verdict = compare(parse_event_log(baseline_eventlog), parse_event_log(guest.eventlog), guest.bank,
                          baseline_pcrs).to_json()
    body: dict[str, Any] = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "created_at": format_utc(created_at),
        "nonce": nonce.hex(),
        "instance": {"id": instance_id, "name": name, "uuid": uuid},
        "node": {"hostname": hostname, "signing_cert_pem": _pem(signing_cert), "ca_pem": "".join(_pem(c) for c in (ca_cert, *ca_chain))},
        "manifest": b64encode(manifest),
        "vtpm": {"ek_cert_pem": _pem(ek_cert)},
        "ak_certification": dict(ak_certification),
        "guest": {
            "bank": guest.bank,
            "pcrs": {str(i): guest.pcrs[i].hex() for i in sorted(guest.pcrs)},
            "attest": b64encode(guest.attest),
            "signature": b64encode(guest.signature),
            "ak_public": b64encode(guest.ak_public),
            "eventlog": b64encode(guest.eventlog),
            "ima": None if guest.ima is None else b64encode(guest.ima),
        },
        "baseline": {"eventlog": None if baseline_eventlog is None else b64encode(baseline_eventlog), "verdict": verdict},
        "host": {
            "verdict": None if host_verdict is None else {
                "passed": host_verdict.passed, "failures": list(host_verdict.failures), "at": host_verdict.at,
                "policy_digest": host_verdict.policy_digest, **_judged_pcrs(host_verdict),
            },
            "quote": None if host_quote is None else host_quote.to_json(),
            "ak_certification": None if host_ak_certification is None else dict(host_ak_certification),
        },
        "live": {"config_digest": live_config_digest},
    }
    if migrations:  # launched on another node: the signed handoffs that brought it here, in order
        body["migrations"] = [dict(m) for m in migrations]
    if keylime is not None:  # additive: a node that does not submit to Keylime makes the same bundle as before
        body["keylime"] = _keylime_section(keylime, "keylime")
    signature = signing_key.sign(canonical_json(body), ec.ECDSA(hashes.SHA256()))
    return canonical_json({**body, "signature": b64encode(signature)})


def _judged_pcrs(verdict: HostVerdict) -> dict[str, Any]:
    """The bank and PCR values of the host quote VERDICT was judged on, as the bundle carries them."""
    try:
        doc = parse_json(verdict.quote_json, "host quote", EvidenceError, top=None)
    except EvidenceError:
        raise EvidenceError(f"the host verdict of {verdict.at} does not carry the quote it was judged on") from None
    judged = HostQuote.from_json(doc)
    return {"bank": judged.bank, "pcrs": {str(i): judged.pcrs[i].hex() for i in sorted(judged.pcrs)}}


# --- verifying ----------------------------------------------------------------------

class _Malformed(ValueError):
    """The bundle's structure is wrong: the "format" check fails with this message."""


@dataclass(frozen=True)
class _Bundle:
    """The bundle decoded: structure and encodings checked, nothing yet trusted."""

    body: dict[str, Any]  # every field but "signature", as parsed
    signature: bytes
    created_at: datetime
    nonce: bytes
    instance_id: str
    name: str
    uuid: str
    hostname: str
    signing_cert_pem: str
    manifest: bytes
    ek_cert_pem: str
    ak_certification: dict[str, Any]
    bank: str
    pcrs: dict[int, bytes]
    attest: bytes
    quote_signature: bytes
    ak_public: bytes
    eventlog: bytes
    baseline_eventlog: bytes | None
    baseline_verdict: dict[str, Any] | None
    host_verdict: dict[str, Any] | None  # as parsed; "pcrs" as dict[int, bytes], "at" as a datetime
    host_quote: dict[str, Any] | None
    host_ak_certification: dict[str, Any] | None
    live_config_digest: str
    keylime: dict[str, Any] | None = None  # the node's record of Keylime's verdicts (information)
    migrations: tuple[dict[str, Any], ...] = ()  # signed handoff statements, launch node first


@dataclass
class _Context:
    """What earlier checks established, for later ones; None where a check failed."""

    bundle: _Bundle
    ca: x509.Certificate
    nonce: bytes
    at: datetime
    max_age: float | None
    max_host_age: float
    node_cert: x509.Certificate | None = None
    manifest: LaunchManifest | None = None
    ek_cert: x509.Certificate | None = None
    untrusted: tuple[x509.Certificate, ...] = ()  # the verifier's extra intermediates
    node_ca: x509.Certificate | None = None  # the CA that issued the node certificate, once it chains
    launch_ca: x509.Certificate | None = None  # the node CA that signed the manifest (another node's if migrated)


def verify_bundle(data: bytes, ca: x509.Certificate, nonce: bytes, at: datetime, *, max_host_age: float,
                  max_age: float | None = None, skip: Iterable[str] = (),
                  untrusted: Sequence[x509.Certificate] = ()) -> BundleReport:
    """Run every check of the bundle in DATA against CA, NONCE and the time AT; never raises for bad DATA.

    MAX_AGE (seconds) bounds the bundle's age at AT (None: any age, shown);
    MAX_HOST_AGE how much older than the bundle its host verdict may be. The
    checks named in SKIP still run, but are reported as skipped and do not
    count; a name that is no check is an InputError naming the valid ones.
    UNTRUSTED are intermediates the verifier adds to those the bundle carries.
    """
    if at.tzinfo is None:
        raise ValueError("a timezone-aware datetime is required")
    skipped = check_names(skip)
    try:
        bundle = _parse(data)
    except (_Malformed, TvorchError) as err:
        return BundleReport((Check("format", False, _one_line(err), malformed=True),))
    ctx = _Context(bundle, ca, nonce, at, max_age, max_host_age, untrusted=tuple(untrusted))
    checks = [Check("format", True, f"{BUNDLE_FORMAT} version {BUNDLE_VERSION}")]
    for name, check in _CHECKS:
        try:
            result = Check(name, True, check(ctx))
        except (TvorchError, ValueError, TypeError, UnsupportedAlgorithm) as err:
            result = Check(name, False, _one_line(err), malformed=isinstance(err, EvidenceError))
        if name in skipped:
            found = "it passes" if result.passed else "it fails"
            result = Check(name, False, f"not counted (skipped by the verifier); {found}: {result.detail}", True)
        checks.append(result)
    if bundle.keylime is not None:
        checks.append(Check("keylime", True, _keylime_detail(bundle.keylime), info=True))
    return BundleReport(tuple(checks), bundle.instance_id, bundle.uuid, bundle.hostname,
                        bundle.body["created_at"])


def check_names(names: Iterable[str]) -> frozenset[str]:
    """NAMES as a set of check names; InputError naming the valid ones when one is no check."""
    wanted = frozenset(names)
    unknown = sorted(wanted - set(CHECK_NAMES))
    if unknown:
        raise InputError(f"no check named {', '.join(map(repr, unknown))}: the checks are "
                         f"{', '.join(map(repr, CHECK_NAMES))}")
    return wanted


def _check_node_certificate(ctx: _Context) -> str:
    cert = _certificate(ctx.bundle.signing_cert_pem, "node signing certificate")
    pool = () if cert.issuer == ctx.ca.subject else (*_carried(ctx), *ctx.untrusted)
    issuer = issuer_under(cert, ctx.ca, pool, ctx.at)
    verify_chain(cert, issuer, ctx.at, purpose=DOCUMENT_SIGNING)
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
        raise TrustError("node signing certificate does not hold a P-256 key")
    ctx.node_cert, ctx.node_ca = cert, issuer
    under = "" if issuer is ctx.ca else f", under the root '{ctx.ca.subject.rfc4514_string()}'"
    return f"'{cert.subject.rfc4514_string()}' issued by '{issuer.subject.rfc4514_string()}'{under}"


def _carried(ctx: _Context) -> tuple[x509.Certificate, ...]:
    """The node CA and the chain above it that the bundle carries (``node.ca_pem``)."""
    try:
        return tuple(x509.load_pem_x509_certificates(ctx.bundle.body["node"]["ca_pem"].encode("utf-8")))
    except ValueError:
        raise TrustError("bundle field 'node.ca_pem' is not PEM certificates") from None


def _check_signature(ctx: _Context) -> str:
    public = _node_key(ctx)
    try:
        public.verify(ctx.bundle.signature, canonical_json(ctx.bundle.body), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise TrustError("bundle signature does not verify with the node signing key: the bundle was changed") from None
    return "signed by the node signing key"


def _check_age(ctx: _Context) -> str:
    made = ctx.bundle.body["created_at"]
    age = (ctx.at - ctx.bundle.created_at).total_seconds()
    if age < -CLOCK_SKEW:
        raise TrustError(f"made at {made}, {-age:.0f} s after the verifier's time (more than the "
                         f"{CLOCK_SKEW} s two clocks may differ by)")
    shown = f"made at {made}, {max(age, 0):.0f} s before the verifier's time"
    if ctx.max_age is None:
        return f"{shown} (no maximum age given)"
    if age > ctx.max_age:
        raise TrustError(f"{shown}: older than the maximum age of {ctx.max_age:.0f} s")
    return f"{shown} (maximum age {ctx.max_age:.0f} s)"


def _check_manifest(ctx: _Context) -> str:
    b = ctx.bundle
    if not b.migrations:
        manifest = verify_manifest(b.manifest, ctx.node_ca or ctx.ca, ctx.at)  # the same node CA as the bundle's
        moved = ""
        ctx.launch_ca = ctx.node_ca or ctx.ca
    else:
        # Launched on another node of the fleet: the manifest is that node's, and the signed handoffs must
        # lead from it to this bundle's node.
        manifest, launch_ca = verify_manifest_under(b.manifest, ctx.ca, ctx.at, ctx.untrusted)
        if ctx.node_ca is None:
            raise TrustError("not checked: the node signing certificate does not chain to the CA")
        moved = "; " + _migration_path(ctx, launch_ca)
        ctx.launch_ca = launch_ca
    _same_instance("launch manifest", manifest.instance_id, manifest.uuid, b)
    ctx.manifest = manifest
    return f"names {manifest.instance_id} ({manifest.uuid}); sha256 {manifest_digest(b.manifest)}{moved}"


def _migration_path(ctx: _Context, launch_ca: x509.Certificate) -> str:
    """Each migration a migrated-out by the node that had the vTPM and the migrated-in of the node it named,
    from the node that launched it to the one that made this bundle."""
    b = ctx.bundle
    handoffs = [verify_handoff(doc, ctx.ca, ctx.at, ctx.untrusted) for doc in b.migrations]
    if len(handoffs) % 2:
        raise TrustError("bundle migrations are not pairs of migrated-out and migrated-in statements")
    here = key_fingerprint(launch_ca)
    last_seq = -1
    for out, inn in zip(handoffs[::2], handoffs[1::2]):
        for h in (out, inn):
            if (h.entry.instance_id, h.uuid) != (b.instance_id, b.uuid) or h.entry.seq <= last_seq:
                raise TrustError(f"bundle migration statement {h.entry.seq} is not of this instance, in order")
            last_seq = h.entry.seq
        if (out.event, inn.event) != (HandoffEvent.OUT, HandoffEvent.IN) or out.node != here \
                or inn.node != out.peer or inn.peer != out.node or inn.session != out.session \
                or inn.entry.prev_hash != out.entry.entry_hash:
            raise TrustError(f"bundle migration at ledger entry {out.entry.seq} does not continue from the node "
                             f"that had the vTPM ({here[:16]})")
        here = inn.node
    if here != key_fingerprint(ctx.node_ca):  # type: ignore[arg-type]
        raise TrustError("the bundle's migrations do not lead to the node that made it")
    return f"launched by node {key_fingerprint(launch_ca)[:16]}, migrated {len(handoffs) // 2} time(s) to this node"


def _check_live(ctx: _Context) -> str:
    live = ctx.bundle.live_config_digest
    if ctx.manifest is None:
        raise TrustError("not checked: the launch manifest does not verify")
    if live != ctx.manifest.config_digest:
        raise TrustError(f"the running domain's configuration (sha256 {live[:16]}...) is not the launch "
                         f"manifest's ({ctx.manifest.config_digest[:16]}...): it was changed while running "
                         "(a device attached or detached, memory or vCPUs set)")
    return f"the running domain's configuration is the manifest's (sha256 {live[:16]}...)"


def _check_ek(ctx: _Context) -> str:
    cert = _certificate(ctx.bundle.ek_cert_pem, "EK certificate")
    verify_ek_certificate(cert, ctx.launch_ca or ctx.node_ca or ctx.ca, ctx.at)  # issued by the launch node
    ctx.ek_cert = cert
    if ctx.manifest is None:
        raise TrustError("EK certificate chains to the CA, but without a verified launch manifest it is not "
                         "known to be this instance's")
    entries = [m for m in ctx.manifest.measurements if m.kind == "vtpm-ek"]
    if len(entries) != 1:
        raise TrustError(f"launch manifest has {len(entries)} vtpm-ek measurements, not 1")
    digest = ek_cert_sha256(cert)
    if entries[0].digest != digest:
        raise TrustError(f"EK certificate sha256 {digest} is not the manifest's vtpm-ek {entries[0].digest}")
    fingerprint = _ek_fingerprint(cert)
    named = entries[0].details.get("ek_fingerprint")
    if named is not None and named != fingerprint:
        raise TrustError(f"EK fingerprint {fingerprint} is not the manifest's {named}")
    return f"EK {fingerprint} chains to the CA and is the manifest's vtpm-ek"


def _check_ak_certification(ctx: _Context) -> str:
    b = ctx.bundle
    public = _node_key(ctx)
    if ctx.ek_cert is None:
        raise TrustError("not checked: the EK certificate does not chain to the CA")
    cert = verify_ak_certification(b.ak_certification, public)
    _same_instance("AK certification", cert.instance_id, cert.uuid, b)
    fingerprint = _ek_fingerprint(ctx.ek_cert)
    if cert.ek_fingerprint != fingerprint or cert.ek_cert_sha256 != ek_cert_sha256(ctx.ek_cert):
        raise TrustError(f"AK certification names EK {cert.ek_fingerprint}, not this bundle's EK {fingerprint}")
    if cert.ak_public != b.ak_public:
        raise TrustError("AK certification certifies another AK than the one that signed the guest quote")
    return f"AK {ak_fingerprint(b.ak_public)} certified by {cert.method} at {cert.certified_at}"


def _check_guest_quote(ctx: _Context) -> str:
    b = ctx.bundle
    if b.nonce != ctx.nonce:
        raise TrustError(f"bundle was made for nonce {b.nonce.hex()}, not the nonce given")
    info = verify_quote(b.attest, b.quote_signature, b.ak_public, ctx.nonce, b.pcrs, b.bank)
    return f"{b.bank} PCRs {_pcr_list(info.pcr_selection)} quoted over the nonce (reset count {info.reset_count})"


def replay_problems(eventlog: bytes, bank: str, pcrs: Mapping[int, bytes]) -> tuple[str, ...]:
    """What keeps EVENTLOG from holding together with quoted PCRS of BANK: empty when it replays to them.

    Every PCR the log extends must be quoted and equal the log's replay; a
    quoted PCR the log never extends must still hold its reset value (else
    something was measured that the log does not show), except IMA's PCR 10,
    whose list is carried apart. EvidenceError for a log that does not parse.
    """
    replayed = replay(parse_event_log(eventlog), bank)
    problems = [f"PCR {pcr} does not match the event log's replay"
                for pcr in replayed if pcr in pcrs and pcrs[pcr].hex() != replayed[pcr]]
    problems += [f"PCR {pcr} is in the event log but not quoted" for pcr in replayed if pcr not in pcrs]
    problems += [f"PCR {pcr} was extended but the event log has no event for it"
                 for pcr, value in sorted(pcrs.items())
                 if pcr not in replayed and pcr != IMA_PCR and value != _reset_value(pcr, len(value))]
    return tuple(problems)


def _reset_value(pcr: int, size: int) -> bytes:
    """A PCR's value after TPM2_Startup(CLEAR): all ones for the DRTM PCRs 17-22, zeros otherwise."""
    return (b"\xff" if 17 <= pcr <= 22 else b"\x00") * size


def _check_eventlog(ctx: _Context) -> str:
    b = ctx.bundle
    problems = replay_problems(b.eventlog, b.bank, b.pcrs)
    if problems:
        raise TrustError("; ".join(problems))
    log = parse_event_log(b.eventlog)
    return f"{len(log.events)} events replay to quoted PCRs {_pcr_list(replay(log, b.bank))}"


def _check_baseline(ctx: _Context) -> str:
    b = ctx.bundle
    if b.baseline_eventlog is None:
        if b.baseline_verdict is not None:
            raise TrustError("a baseline verdict without the baseline event log")
        return "no baseline event log (nothing to compare with)"
    node_verdict = b.baseline_verdict
    if node_verdict is None:
        raise TrustError("a baseline event log without the node's verdict")
    pcrs = node_verdict.get("pcrs")
    if pcrs is not None and not (isinstance(pcrs, list) and all(type(p) is int for p in pcrs)):
        raise TrustError("the node's baseline verdict has no valid 'pcrs'")
    verdict = compare(parse_event_log(b.baseline_eventlog), parse_event_log(b.eventlog), b.bank, pcrs)
    if not verdict.matches:
        raise TrustError("; ".join(d.describe() for d in verdict.differences))
    if verdict.to_json() != node_verdict:
        raise TrustError("the node's baseline verdict is not what its event logs say")
    shown = "every PCR" if verdict.pcrs is None else f"PCRs {_pcr_list(verdict.pcrs)}"
    return f"boot matches the baseline event by event ({b.bank}, {shown})"


def _check_prediction(ctx: _Context) -> str:
    b = ctx.bundle
    if ctx.manifest is None:
        raise TrustError("not checked: the launch manifest does not verify")
    record = ctx.manifest.boot_prediction
    if record is None:
        return "not judged: the launch manifest carries no boot prediction"
    if record.prediction is None:
        return f"not judged: the launch manifest's boot prediction was unavailable at launch ({record.reason})"
    return judge_prediction(record.prediction, b.bank, b.pcrs, b.eventlog)


def judge_prediction(prediction: Prediction, bank: str, pcrs: Mapping[int, bytes], eventlog: bytes) -> str:
    """What the "prediction" check says of quoted PCRS: TrustError naming each PCR (and event) that differs."""
    if bank != PREDICTION_BANK:
        raise TrustError(f"the guest quote is of the {bank} bank; the boot prediction is {PREDICTION_BANK}")
    judged = sorted(p for p in prediction.covered if p in pcrs)
    unquoted = sorted(prediction.covered - set(pcrs))
    if not judged:
        raise TrustError(f"none of the predicted PCRs {_pcr_list(prediction.covered)} is quoted")
    wrong = [p for p in judged if pcrs[p].hex() != prediction.pcrs[p]]
    if wrong:
        try:
            events = [d.describe() for d in compare_prediction(prediction, parse_event_log(eventlog)).differences
                      if d.pcr in wrong]
        except TvorchError:  # the event log's own check names why it does not parse
            events = []
        raise TrustError(f"quoted PCRs {_pcr_list(wrong)} are not the launch manifest's prediction"
                         + (": " + "; ".join(events) if events else ""))
    return (f"quoted PCRs {_pcr_list(judged)} are the launch manifest's prediction"
            + (f" (predicted but not quoted: {_pcr_list(unquoted)})" if unquoted else ""))


def _check_host(ctx: _Context) -> str:
    b = ctx.bundle
    if b.host_verdict is None and b.host_quote is None:
        raise TrustError("no host evidence")
    if b.host_verdict is None or b.host_quote is None:
        raise TrustError(f"no host {'verdict' if b.host_verdict is None else 'quote'}")
    verdict = b.host_verdict
    at = b.body["host"]["verdict"]["at"]  # as the node wrote it
    if not verdict["passed"]:
        failures = verdict["failures"]
        shown = "; ".join(failures[:3]) + (" ..." if len(failures) > 3 else "")
        raise TrustError(f"host attestation failed at {at}: {shown or 'no failure named'}")
    quote = HostQuote.from_json(b.host_quote)
    info = quote.verify(ctx.nonce)
    certified = _host_ak(ctx, quote)
    age = (b.created_at - verdict["at"]).total_seconds()
    if age < 0:
        raise TrustError(f"the host verdict ({at}) is dated after the bundle ({b.body['created_at']})")
    if age > ctx.max_host_age:
        raise TrustError(f"the host verdict ({at}) is {age:.0f} s older than the bundle, more than the "
                         f"maximum host verdict age of {ctx.max_host_age:.0f} s")
    ima_problems, ima_shown = _host_ima(quote)
    problems = _verdict_binding(verdict, quote) + ima_problems
    if problems:
        raise TrustError("; ".join(problems))
    return (f"host verdict passed at {at}, {age:.0f} s before the bundle (maximum {ctx.max_host_age:.0f} s; "
            f"policy {verdict['policy_digest']}), judged on the quoted PCR values; host quote of {info.bank} "
            f"PCRs {_pcr_list(info.pcr_selection)} over the nonce verifies, {certified}{ima_shown}")


def _host_ak(ctx: _Context, quote: HostQuote) -> str:
    """That the node certified the host quote's AK (credential activation against its TPM's EK), shown."""
    statement = ctx.bundle.host_ak_certification
    if statement is None:
        raise TrustError("the host AK is not certified by the node (an AK from before tvorch certified them: "
                         "run `tvorch host init` on the node)")
    cert = verify_host_ak_certification(statement, _node_key(ctx))
    if cert.ak_public != quote.ak_public:
        raise TrustError("the host AK certification certifies another AK than the one that signed the host quote")
    if cert.hostname != ctx.bundle.hostname:
        raise TrustError(f"the host AK certification is of host {cert.hostname!r}, not {ctx.bundle.hostname!r}")
    return f"by the host AK certified at {cert.certified_at} under EK {cert.ek_fingerprint}"


def _host_ima(quote: HostQuote) -> tuple[list[str], str]:
    """Problems of the host quote's IMA list against its quoted PCRs, and what was shown to hold.

    The list counts only as far as it replays to the quoted PCR 10; its first
    entry, boot_aggregate, must be the digest of the quoted boot PCRs."""
    if quote.ima_log is None:
        return [], "; no IMA list"
    if IMA_PCR not in quote.pcrs:
        return ["the host quote carries an IMA list but does not cover PCR 10"], ""
    entries = parse_ima_list(quote.ima_log)
    reached = replay_until(entries, quote.pcrs[IMA_PCR], ImaReplay.initial(quote.bank))
    if reached is None:
        return ["the host's IMA list does not replay to the quoted PCR 10"], ""
    problem = boot_aggregate_problem(entries[:reached.count], quote.bank, quote.pcrs)
    if problem is not None:
        return [problem], ""
    covered = boot_aggregate_pcrs(quote.bank)
    return [], (f"; {reached.count} IMA measurements replay to PCR 10, boot_aggregate is the quoted PCRs "
                f"{covered[0]}-{covered[-1]}")


def _verdict_binding(verdict: dict[str, Any], quote: HostQuote) -> list[str]:
    """Why the host verdict is not about the host state that QUOTE shows: empty when it is.

    A verdict is judged on a quote of its own; the boot PCRs must be the same
    values in the bundle's fresh quote. IMA's PCR 10 only grows: the fresh
    quote's IMA list must pass through the verdict's value (its measurements
    after that point were not judged, and are counted in the detail)."""
    judged: dict[int, bytes] = verdict["pcrs"]
    if verdict["bank"] != quote.bank:
        return [f"the host verdict was judged on the {verdict['bank']} bank, the host quote is of {quote.bank}"]
    if set(judged) != set(quote.pcrs):
        shown = f"PCRs {_pcr_list(judged)}, the host quote covers {_pcr_list(quote.pcrs)}"
        return [f"the host verdict was judged on {shown}"]
    differ = [i for i in sorted(judged) if i != IMA_PCR and judged[i] != quote.pcrs[i]]
    problems = [f"the host verdict was made over other PCR values than the host quote's: PCR {i} "
                f"(verdict {judged[i].hex()[:16]}..., quote {quote.pcrs[i].hex()[:16]}...)" for i in differ]
    if IMA_PCR in judged and judged[IMA_PCR] != quote.pcrs[IMA_PCR]:
        passes = quote.ima_log is not None and replay_until(
            parse_ima_list(quote.ima_log), judged[IMA_PCR], ImaReplay.initial(quote.bank)) is not None
        if not passes:
            problems.append("the host verdict was made over a PCR 10 the host quote's IMA list never reached")
    return problems


_CHECKS: tuple[tuple[str, Callable[[_Context], str]], ...] = (
    ("node certificate", _check_node_certificate),
    ("bundle signature", _check_signature),
    ("bundle age", _check_age),
    ("launch manifest", _check_manifest),
    ("live configuration", _check_live),
    ("vTPM EK certificate", _check_ek),
    ("AK certification", _check_ak_certification),
    ("guest quote", _check_guest_quote),
    ("guest event log", _check_eventlog),
    ("baseline", _check_baseline),
    ("prediction", _check_prediction),
    ("host", _check_host),
)
CHECK_NAMES = tuple(name for name, _ in _CHECKS)  # the checks a verifier may skip ("format" is not one)


def _node_key(ctx: _Context) -> ec.EllipticCurvePublicKey:
    if ctx.node_cert is None:
        raise TrustError("not checked: the node signing certificate does not chain to the CA")
    public = ctx.node_cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)  # _check_node_certificate made sure
    return public


def _ek_fingerprint(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise TrustError(f"EK certificate holds a {type(key).__name__}, not an RSA or ECC key")
    return ek_fingerprint(key)


def _same_instance(what: str, instance_id: str, uuid: str, b: _Bundle) -> None:
    if (instance_id, uuid) != (b.instance_id, b.uuid):
        raise TrustError(f"{what} is of instance {instance_id} ({uuid}), not {b.instance_id} ({b.uuid})")


# --- parsing ------------------------------------------------------------------------

def _parse(data: bytes) -> _Bundle:
    doc = parse_json(data, "bundle", EvidenceError)
    if doc.get("format") != BUNDLE_FORMAT:
        raise _Malformed(f"not a {BUNDLE_FORMAT} bundle (format {doc.get('format')!r})")
    if type(doc.get("version")) is not int or doc["version"] != BUNDLE_VERSION:
        raise _Malformed(f"bundle version {doc.get('version')!r} is not {BUNDLE_VERSION}")
    top = _object({k: v for k, v in doc.items() if k not in ("keylime", "migrations")}, "bundle", _TOP)
    instance = _object(top["instance"], "instance", _INSTANCE)
    node = _object(top["node"], "node", _NODE)
    vtpm = _object(top["vtpm"], "vtpm", ("ek_cert_pem",))
    guest = _object(top["guest"], "guest", _GUEST)
    baseline = _object(top["baseline"], "baseline", _BASELINE)
    host = _object(top["host"], "host", _HOST)
    live = _object(top["live"], "live", ("config_digest",))
    _text(node["ca_pem"], "node.ca_pem")
    bank = _text(guest["bank"], "guest.bank")
    digest_size(bank)  # EvidenceError for a bank tvorch does not know
    host_verdict = _optional(host["verdict"], _host_verdict)
    _optional(guest["ima"], lambda v: _unb64(v, "guest.ima"))  # carried, not yet checked: only its encoding
    return _Bundle(
        body={k: v for k, v in doc.items() if k != "signature"},
        signature=_unb64(top["signature"], "signature"),
        created_at=_utc(top["created_at"], "created_at"),
        nonce=_unhex(top["nonce"], "nonce"),
        instance_id=_text(instance["id"], "instance.id"),
        name=_text(instance["name"], "instance.name"),
        uuid=_text(instance["uuid"], "instance.uuid"),
        hostname=_text(node["hostname"], "node.hostname"),
        signing_cert_pem=_text(node["signing_cert_pem"], "node.signing_cert_pem"),
        manifest=_unb64(top["manifest"], "manifest"),
        ek_cert_pem=_text(vtpm["ek_cert_pem"], "vtpm.ek_cert_pem"),
        ak_certification=_object(top["ak_certification"], "ak_certification", None),
        bank=bank,
        pcrs=_pcrs(guest["pcrs"], bank, "guest.pcrs"),
        attest=_unb64(guest["attest"], "guest.attest"),
        quote_signature=_unb64(guest["signature"], "guest.signature"),
        ak_public=_unb64(guest["ak_public"], "guest.ak_public"),
        eventlog=_unb64(guest["eventlog"], "guest.eventlog"),
        baseline_eventlog=_optional(baseline["eventlog"], lambda v: _unb64(v, "baseline.eventlog")),
        baseline_verdict=_optional(baseline["verdict"], lambda v: _object(v, "baseline.verdict", None)),
        host_verdict=host_verdict,
        host_quote=_optional(host["quote"], lambda v: _object(v, "host.quote", None)),
        host_ak_certification=_optional(host["ak_certification"],
                                        lambda v: _object(v, "host.ak_certification", None)),
        live_config_digest=_digest_hex(live["config_digest"], "live.config_digest"),
        keylime=_optional(doc.get("keylime"), lambda v: _keylime_section(v, "keylime")),
        migrations=_migrations(doc.get("migrations", [])),
    )


def _migrations(value: object) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list) or len(value) > 2 * MAX_MIGRATIONS:
        raise _Malformed(f"bundle field 'migrations' is not a list of at most {2 * MAX_MIGRATIONS} statements")
    return tuple(_object(v, f"migrations[{i}]", ("handoff", "signature")) for i, v in enumerate(value))


def _keylime_section(value: object, where: str) -> dict[str, Any]:
    """{"guest"?: submission, "host"?: submission}, each as service.keylime.Submission.to_json() makes it."""
    section = _object(value, where, None)
    for what, sub in section.items():
        if what not in ("guest", "host"):
            raise _Malformed(f"bundle field '{where}' has an unknown key {what[:40]!r}")
        obj = _object(sub, f"{where}.{what}", None)
        if obj.get("submitted") is True:
            _object(obj, f"{where}.{what}", ("submitted", "valid", "failures"))
            if not isinstance(obj["valid"], bool) or not isinstance(obj["failures"], list) or not all(
                    isinstance(f, str) for f in obj["failures"]):
                raise _Malformed(f"bundle field '{where}.{what}' is not a Keylime verdict")
        else:
            _object(obj, f"{where}.{what}", ("submitted", "queued"))
            if obj["submitted"] is not False:
                raise _Malformed(f"bundle field '{where}.{what}.submitted' is not a boolean")
            _text(obj["queued"], f"{where}.{what}.queued")
    return dict(section)


def _keylime_detail(section: Mapping[str, Any]) -> str:
    parts = []
    for what in ("guest", "host"):
        sub = section.get(what)
        if sub is None:
            continue
        shown = ("valid" if sub["valid"] else "INVALID: " + "; ".join(sub["failures"])) if sub["submitted"] \
            else f"not judged ({sub['queued']})"
        parts.append(f"{what} {shown}")
    return "the node's Keylime verifier judged: " + (", ".join(parts) or "nothing") + " (information, not counted)"


def _object(value: object, where: str, names: tuple[str, ...] | None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Malformed(f"bundle field '{where}' is not a JSON object")
    if names is not None and (wrong := key_mismatch(value, names)) is not None:
        raise _Malformed(f"bundle field '{where}' has wrong keys: {wrong}")
    return value


def _text(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise _Malformed(f"bundle field '{where}' is not a non-empty string")
    return value


def _utc(value: object, where: str) -> datetime:
    moment = parse_utc(_text(value, where))
    if moment is None:
        raise _Malformed(f"bundle field '{where}' is not a UTC ISO-8601 time")
    return moment


def _unb64(value: object, where: str) -> bytes:
    return b64decode(_text(value, where), f"bundle field '{where}'", EvidenceError)


def _digest_hex(value: object, where: str) -> str:
    raw = _unhex(value, where)
    if len(raw) != 32 or raw.hex() != value:
        raise _Malformed(f"{where} is not a sha256 digest in lowercase hex")
    return raw.hex()


def _unhex(value: object, where: str) -> bytes:
    try:
        return bytes.fromhex(_text(value, where))
    except ValueError:
        raise _Malformed(f"bundle field '{where}' is not valid hex") from None


def _optional(value: object, read: Callable[[object], Any]) -> Any:
    return None if value is None else read(value)


def _pcrs(value: object, bank: str, where: str) -> dict[int, bytes]:
    raw = _object(value, where, None)
    if not raw:
        raise _Malformed(f"bundle field '{where}' is empty")
    return pcr_values(raw, bank, f"bundle field '{where}'")


def _host_verdict(value: object) -> dict[str, Any]:
    verdict = _object(value, "host.verdict", _HOST_VERDICT)
    if not isinstance(verdict["passed"], bool):
        raise _Malformed("bundle field 'host.verdict.passed' is not a boolean")
    failures = verdict["failures"]
    if not isinstance(failures, list) or not all(isinstance(f, str) for f in failures):
        raise _Malformed("bundle field 'host.verdict.failures' is not a list of strings")
    bank = _text(verdict["bank"], "host.verdict.bank")
    digest_size(bank)
    _text(verdict["policy_digest"], "host.verdict.policy_digest")
    return {**verdict, "at": _utc(verdict["at"], "host.verdict.at"),
            "pcrs": _pcrs(verdict["pcrs"], bank, "host.verdict.pcrs")}


def _certificate(pem: str, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode("utf-8"))
    except ValueError:
        raise TrustError(f"{what} is not a PEM certificate") from None


def _pcr_list(pcrs: Iterable[int]) -> str:
    return ",".join(str(p) for p in sorted(pcrs))


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())

