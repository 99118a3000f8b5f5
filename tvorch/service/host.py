"""Host attestation: quote the host TPM, replay its logs, judge against the host policy.

`init` makes the attestation key once; `quote` gathers evidence for a nonce;
`attest` quotes with a fresh nonce, verifies, judges and stores the verdict
the hook reads; `baseline` learns a policy file from the current evidence
for an operator to review (it is never applied by itself).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any

import tvorch

from ..adapters.files import read_bounded
from ..adapters.store import Store
from ..adapters.files import atomic_write
from ..adapters.tpm import HOST_DIR, AkInfo, Tpm, open_tpm, read_ak
from ..config import Config
from ..core.attestation.akcert import HostAkCertification, check_ak_public, make_credential, sign_host_ak_certification
from ..core.codec import b64encode, canonical_json, parse_json
from ..core.attestation.eventlog import parse_event_log, replay
from ..core.attestation.hostpolicy import (
    DEFAULT_EXCLUDES,
    HostEvidence,
    HostPolicy,
    judge_host,
    parse_policy,
)
from ..core.attestation.hostverdict import HostVerdict
from ..core.attestation.ima import (
    IMA_PCR,
    boot_aggregate_pcrs,
    exclude_matcher,
    judge_ima_list,
    parse_ima_list,
)
from ..core.attestation.quote import HostQuote
from ..core.timestamps import utc_now
from ..errors import ConfigError, EvidenceError, HostError, TrustError
from ..logs import get_logger
from .manifests import node_identity

log = get_logger(__name__)
AK_CERT = "ak-cert.json"  # beside ak.pub/ak.priv: the node's signed certification of the host AK
# Evidence files larger than this are refused rather than read into memory.
MAX_LOG_BYTES = 256 * 1024 * 1024


def must_measure(cfg: Config) -> tuple[str, ...]:
    """The binaries a trusted launch relies on, as IMA names them (real paths)."""
    return tuple(
        os.path.realpath(p)
        for p in (cfg.emulator, cfg.swtpm, "/usr/sbin/libvirtd", sys.executable, tvorch.__file__)
    )


def init(cfg: Config) -> tuple[AkInfo, dict[str, Any]]:
    """The host AK (made once) and the node's certification of it (made once per AK, see certify_ak)."""
    with open_tpm(cfg.host.tcti) as tpm:
        ak = tpm.create_ak(Path(cfg.state_dir))
        statement = ak_certification(cfg)
        if statement is None or statement.get("ak_public") != b64encode(ak.public):
            statement = certify_ak(cfg, tpm, ak)
    return ak, statement


def certify_ak(cfg: Config, tpm: Tpm, ak: AkInfo) -> dict[str, Any]:
    """Prove AK lives in this TPM by credential activation against its EK, and sign that as the node.

    The credential is made in software for the EK the TPM derives and the
    AK's name; only a TPM holding both releases its secret. The signed
    statement goes into every evidence bundle, so a verifier knows the host
    quote's AK is this TPM's, under this EK."""
    check_ak_public(ak.public)
    ek_public = tpm.ek_public()
    secret = secrets.token_bytes(32)
    id_object, encrypted_secret = make_credential(ek_public, ak.name, secret)
    if not hmac.compare_digest(tpm.activate_credential(ak, id_object, encrypted_secret), secret):
        raise TrustError("the host TPM did not activate the credential: its AK is not under its EK")
    statement = sign_host_ak_certification(HostAkCertification(
        hostname=socket.gethostname(), ek_public=ek_public, ak_public=ak.public, ak_name=ak.name,
        certified_at=utc_now()), node_identity(cfg).signing_key)
    atomic_write(Path(cfg.state_dir) / HOST_DIR / AK_CERT, _json_text(statement).encode())
    log.info("host_ak_certified", ak=ak.fingerprint)
    return statement


def ak_certification(cfg: Config) -> dict[str, Any] | None:
    """The node's stored certification of the host AK, as written (None before `tvorch host init` made one)."""
    try:
        doc = parse_json(read_bounded(str(Path(cfg.state_dir) / HOST_DIR / AK_CERT), 1024 * 1024),
                         "the file", HostError, top=None)
    except FileNotFoundError:
        return None
    except (OSError, HostError) as err:
        raise HostError(f"cannot read the host AK certification: {err}; run `tvorch host init` again") from None
    return doc if isinstance(doc, dict) else None


def _read_log(path: str) -> bytes | None:
    try:
        return read_bounded(path, MAX_LOG_BYTES)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise HostError(f"cannot read {path}: {err.strerror}") from None


def quoted_pcrs(cfg: Config) -> tuple[int, ...]:
    """host.pcrs, and with IMA's PCR 10 among them the PCRs its boot_aggregate covers (0-9 but in sha1),
    so that the first IMA entry can be checked against the quote."""
    pcrs = set(cfg.host.pcrs)
    if IMA_PCR in pcrs:
        pcrs.update(boot_aggregate_pcrs(cfg.host.bank))
    return tuple(sorted(pcrs))


def quote(cfg: Config, nonce: bytes) -> HostQuote:
    """A quote over the configured PCRs (quoted_pcrs) with NONCE, plus the logs it covers."""
    ak = read_ak(Path(cfg.state_dir))
    if ak is None:
        raise HostError("no host attestation key: run `tvorch host init` first")
    with open_tpm(cfg.host.tcti) as tpm:
        raw = tpm.quote(ak, nonce, quoted_pcrs(cfg), cfg.host.bank)
    return HostQuote(
        nonce=nonce, bank=raw.bank, pcrs=raw.pcr_values, attest=raw.attest, signature=raw.signature,
        ak_public=ak.public, ak_pem=ak.pem.decode(),
        eventlog=_read_log(cfg.host.eventlog), ima_log=_read_log(cfg.host.ima_log),
    )


def evidence(q: HostQuote, nonce: bytes, policy: HostPolicy | None = None) -> HostEvidence:
    """Verify the quote and replay both logs; every problem becomes part of the evidence."""
    quoted: dict[int, str] = {}
    quote_problem = None
    try:
        q.verify(nonce)
        quoted = {i: v.hex() for i, v in q.pcrs.items()}
    except (TrustError, EvidenceError) as err:
        quote_problem = str(err)
    eventlog_pcrs, eventlog_problem = None, None
    if q.eventlog is None:
        eventlog_problem = "no UEFI event log on this host"
    else:
        try:
            covered = [i for i in q.pcrs if i != IMA_PCR]
            eventlog_pcrs = replay(parse_event_log(q.eventlog), q.bank, covered)
        except EvidenceError as err:
            eventlog_problem = str(err)
    ima_pcr, ima_problems = None, []
    if q.ima_log is None:
        ima_problems.append("no IMA measurement list on this host")
    else:
        # IMA appends before it extends: only the entries the (verified) quote covers are judged.
        judged = judge_ima_list(q.ima_log, q.bank, q.pcrs if quoted else None,
                                policy.ima_allowlist if policy else None,
                                policy.ima_required if policy else (), policy.ima_excludes if policy else ())
        ima_pcr = judged.pcr_value.hex() if judged.pcr_value else None
        ima_problems += judged.problems
    return HostEvidence(quoted, quote_problem, eventlog_pcrs, eventlog_problem, ima_pcr, tuple(ima_problems))


def load_policy(cfg: Config) -> tuple[HostPolicy, str]:
    try:
        data = Path(cfg.host.policy).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"no host policy at {cfg.host.policy}: review one made by `tvorch host baseline`") from None
    except OSError as err:
        raise ConfigError(f"cannot read host policy {cfg.host.policy}: {err.strerror}") from None
    return parse_policy(data, cfg.host.policy), hashlib.sha256(data).hexdigest()


def attest(cfg: Config, store: Store, nonce: bytes | None = None) -> HostVerdict:
    """Quote with a fresh nonce (or a verifier's NONCE, a migration source's), judge against the host
    policy, store the verdict."""
    policy, policy_digest = load_policy(cfg)
    nonce = os.urandom(32) if nonce is None else nonce
    q = quote(cfg, nonce)
    failures = judge_host(policy, evidence(q, nonce, policy), must_measure(cfg))
    verdict = HostVerdict(utc_now(), time.time(), not failures, failures, policy_digest,
                          _json_text(q.to_json()))
    store.add_host_verdict(verdict)
    if failures:
        log.error("host_attestation_failed", failures=list(failures))
    return verdict


def baseline(cfg: Config) -> HostPolicy:
    """A policy that the current evidence satisfies, for review. Refused when the
    evidence does not hold together (a log that does not replay to the quote)."""
    nonce = os.urandom(32)
    q = quote(cfg, nonce)
    found = evidence(q, nonce)
    problems = [p for p in (found.quote_problem, found.eventlog_problem) if p] + list(found.ima_problems)
    problems += [f"PCR {i}: the event log does not replay to the quoted value"
                 for i, v in (found.eventlog_pcrs or {}).items() if found.quoted_pcrs.get(i) != v]
    if found.ima_pcr is not None and found.quoted_pcrs.get(IMA_PCR) != found.ima_pcr:
        problems.append("PCR 10: the IMA log does not replay to the quoted value")
    if problems:
        raise TrustError("no baseline from inconsistent evidence: " + "; ".join(problems))
    allowlist: dict[str, set[str]] = {}
    required = must_measure(cfg)
    excluded = exclude_matcher(DEFAULT_EXCLUDES)
    assert q.ima_log is not None
    for entry in parse_ima_list(q.ima_log):
        if entry.path == "boot_aggregate" or entry.invalidated:
            continue
        if entry.path in required or not excluded(entry.path):  # a required path is never excluded
            allowlist.setdefault(entry.path, set()).add(entry.file_digest.hex())
    missing = [p for p in required if p not in allowlist]
    if missing:
        raise TrustError(f"no baseline: IMA never measured {', '.join(missing)}, which trusted launch relies on")
    return HostPolicy(
        bank=q.bank,
        pcrs={i: v for i, v in found.quoted_pcrs.items() if i != IMA_PCR},
        ima_allowlist={p: frozenset(d) for p, d in allowlist.items()},
        ima_required=required,
        ima_excludes=DEFAULT_EXCLUDES,
    )


def _json_text(obj: object) -> str:
    return canonical_json(obj, ensure_ascii=True).decode("ascii")
