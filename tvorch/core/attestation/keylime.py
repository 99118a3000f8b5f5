"""tvorch's evidence and policies in Keylime's formats (Keylime 7.14's verifier, `POST /v2.x/verify/evidence`).

Pure: bytes and dicts in, Keylime's JSON shapes out, and Keylime's answer
parsed back into a ``KeylimeVerdict``.

Two weaknesses of that endpoint decide what tvorch sends (docs/keylime.md):
it does not tie the AK to an EK (any AK is accepted), and it reports a quote
whose signature is bad as valid when the tpm_policy names no PCR. So
``evidence_payload`` is only ever called on evidence tvorch has verified
itself, and its tpm_policy always names every quoted PCR (refused otherwise).

Formats, from Keylime's source: the quote is
"r" + b64(TPMS_ATTEST) + ":" + b64(TPMT_SIGNATURE) + ":" + b64(PCR blob), the
blob being the in-memory TPML_PCR_SELECTION and TPML_DIGEST array tpm2_quote
-o writes (keylime/tpm/tpm_util.py); the nonce is compared with the quote's
extraData raw or base64-decoded, so it goes base64; a tpm_policy maps PCR
index to allowed hex values plus a "mask"; a measured-boot reference state has
the keys `keylime-policy create measured-boot` writes
(keylime/policy/create_mb_policy.py); a runtime policy is
keylime/ima/ima.py's RUNTIME_POLICY_SCHEMA, its excludes regular expressions.
"""

from __future__ import annotations

import fnmatch
import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import ConfigError, EvidenceError
from ..codec import b64encode
from .eventlog import EventLog
from .hostpolicy import DEFAULT_EXCLUDES, HostPolicy

KIND_TPM, KIND_MB, KIND_RUNTIME = "tpm", "mb", "runtime"
POLICY_KINDS = (KIND_TPM, KIND_MB, KIND_RUNTIME)
EVIDENCE_PATH = "/v2.4/verify/evidence"

_TPM_ALG = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}
_SELECTIONS = 16  # TPML_PCR_SELECTION.pcrSelections[HASH_COUNT] as tpm2-tools lays it out
_DIGESTS_PER_LIST = 8  # TPML_DIGEST.digests[8]
_TPMU_HA = 64  # bytes reserved per digest (sha512's size)
_HEX = re.compile(r"[0-9a-f]{40,128}")
# The Keylime runtime policy generator numbers (keylime/ima/ima.py RUNTIME_POLICY_GENERATOR).
_GENERATOR_COMPATIBLE = 2


# --- evidence -------------------------------------------------------------------------


def pcr_blob(bank: str, pcrs: Mapping[int, bytes]) -> bytes:
    """The PCR values as tpm2_quote -o writes them (little endian, unmarshalled structs)."""
    if bank not in _TPM_ALG:
        raise EvidenceError(f"Keylime takes banks {', '.join(_TPM_ALG)}, not {bank!r}")
    mask = 0
    for index in pcrs:
        mask |= 1 << index
    out = bytearray(struct.pack("<I", 1))
    out += struct.pack("<HB3s2x", _TPM_ALG[bank], 3, mask.to_bytes(3, "little"))
    out += bytes(8) * (_SELECTIONS - 1)
    values = [pcrs[i] for i in sorted(pcrs)]
    lists = [values[i:i + _DIGESTS_PER_LIST] for i in range(0, len(values), _DIGESTS_PER_LIST)]
    out += struct.pack("<I", len(lists))
    for chunk in lists:
        out += struct.pack("<I", len(chunk))
        for slot in range(_DIGESTS_PER_LIST):
            value = chunk[slot] if slot < len(chunk) else b""
            out += struct.pack("<H", len(value)) + value.ljust(_TPMU_HA, b"\0")
    return bytes(out)


def quote_string(attest: bytes, signature: bytes, bank: str, pcrs: Mapping[int, bytes]) -> str:
    return "r" + ":".join(b64encode(x) for x in (attest, signature, pcr_blob(bank, pcrs)))


def tpm_policy(expected: Mapping[int, Sequence[str]]) -> dict[str, Any]:
    """PCR -> allowed hex values, and the mask Keylime's tenant adds."""
    mask = 0
    for index in expected:
        mask |= 1 << index
    doc: dict[str, Any] = {"mask": hex(mask)}
    for index in sorted(expected):
        doc[str(index)] = sorted({v.lower() for v in expected[index]})
    return doc


def expected_pcrs(quoted: Sequence[int], baseline: Mapping[int, str],
                  predicted: Mapping[int, str] | None = None) -> dict[int, list[str]]:
    """Each quoted PCR's expected value: the signed prediction's where it covers the PCR, else the baseline's.
    A quoted PCR neither knows is refused: Keylime would leave it unchecked."""
    out: dict[int, list[str]] = {}
    for index in quoted:
        if predicted is not None and index in predicted:
            out[index] = [predicted[index]]
        elif index in baseline:
            out[index] = [baseline[index]]
        else:
            raise EvidenceError(f"no expected value for quoted PCR {index}: a tpm_policy must name every quoted PCR")
    return out


def manifest_prediction(manifest: Mapping[str, Any]) -> dict[int, str] | None:
    """The PCR values a signed launch manifest's boot prediction (``boot_prediction``, status "predicted")
    covers, or None when it carries none."""
    record = manifest.get("boot_prediction")
    if not isinstance(record, dict) or record.get("status") != "predicted" or record.get("bank") != "sha256":
        return None
    pcrs = record.get("pcrs")
    if not isinstance(pcrs, dict):
        return None
    return {int(k): v for k, v in pcrs.items() if k.isdigit() and isinstance(v, str) and _HEX.fullmatch(v)}


@dataclass(frozen=True)
class Evidence:
    """What one submission carries, tvorch-side: a quote tvorch has verified, and the logs it covers."""

    nonce: bytes
    bank: str
    pcrs: Mapping[int, bytes]
    attest: bytes
    signature: bytes
    ak_public: bytes  # TPM2B_PUBLIC
    ek: bytes  # the EK's public key (PEM); Keylime requires it but does not tie the AK to it
    eventlog: bytes | None = None
    ima_ascii: str | None = None


def evidence_payload(ev: Evidence, policy: Mapping[str, Any], mb_refstate: Mapping[str, Any] | None = None,
                     runtime: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON body of `POST /v2.x/verify/evidence` (type tpm)."""
    named = {int(k) for k in policy if k != "mask"}
    if not ev.pcrs or named != set(ev.pcrs):
        missing = sorted(set(ev.pcrs) - named)
        raise EvidenceError(f"refused to submit to Keylime: the tpm_policy leaves quoted PCRs {missing} unnamed")
    data: dict[str, Any] = {
        "quote": quote_string(ev.attest, ev.signature, ev.bank, ev.pcrs),
        "nonce": b64encode(ev.nonce), "hash_alg": ev.bank, "tpm_ak": b64encode(ev.ak_public), "tpm_ek": b64encode(ev.ek),
        "tpm_policy": json.dumps(dict(policy)),
    }
    if mb_refstate is not None and ev.eventlog is not None:
        data["mb_log"] = b64encode(ev.eventlog)
        data["mb_policy"] = json.dumps(dict(mb_refstate))
    if runtime is not None and ev.ima_ascii is not None:
        data["ima_measurement_list"] = ev.ima_ascii
        data["runtime_policy"] = json.dumps(dict(runtime))
    return {"type": "tpm", "data": data}


@dataclass(frozen=True)
class KeylimeVerdict:
    """Keylime's answer: valid or not, and each failure as "type: context"."""

    valid: bool
    failures: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {"valid": self.valid, "failures": list(self.failures)}


def parse_answer(status: int, body: bytes) -> KeylimeVerdict:
    """Keylime answers 200 with results.valid and results.failures (400 for a request it cannot use)."""
    try:
        doc = json.loads(body)
        results = doc["results"]
        valid, failures = results["valid"], results["failures"]
    except (ValueError, KeyError, TypeError):
        raise EvidenceError(f"Keylime answered HTTP {status} without a verdict: {body[:200]!r}") from None
    if status not in (200, 400) or not isinstance(valid, bool) or not isinstance(failures, list):
        raise EvidenceError(f"Keylime answered HTTP {status}: {str(doc.get('status', ''))[:200]}")
    shown = tuple(f"{f.get('type', '?')}: {json.dumps(f.get('context'), sort_keys=True)}"[:1000]
                  if isinstance(f, dict) else str(f)[:1000] for f in failures)
    return KeylimeVerdict(valid and status == 200, shown)


# --- policies -------------------------------------------------------------------------


def mb_refstate(log: EventLog) -> dict[str, Any]:
    """The measured-boot reference state `keylime-policy create measured-boot` makes from LOG, sha256 digests."""
    events = log.events

    def sha(e: Any) -> dict[str, str]:
        return {"sha256": "0x" + e.digests["sha256"]} if "sha256" in e.digests else {}

    secure = False
    for e in events:
        if e.type_name == "EV_EFI_VARIABLE_DRIVER_CONFIG" and _var_name(e) == "SecureBoot":
            secure = e.data[-1:] == b"\x01"
    scrtm = next((sha(e) for e in events if e.type_name == "EV_S_CRTM_VERSION"), {})
    blobs = [sha(e) for e in events if e.type_name in ("EV_EFI_PLATFORM_FIRMWARE_BLOB",
                                                       "EV_EFI_PLATFORM_FIRMWARE_BLOB2")]
    apps = [sha(e)["sha256"] for e in events if e.type_name == "EV_EFI_BOOT_SERVICES_APPLICATION" and sha(e)]
    kernel: dict[str, str] = {}
    names = ("shim_authcode_sha256", "grub_authcode_sha256", "kernel_authcode_sha256")
    for name, digest in zip(names, apps):
        kernel[name] = digest
    return {
        "has_secureboot": secure,
        "scrtm_and_bios": [{"scrtm": scrtm, "platform_firmware": blobs}],
        "pk": [], "kek": [], "db": [], "dbx": [], "vendor_db": [], "mokdig": [], "mokxdig": [],
        "kernels": [kernel],
    }


def _var_name(event: Any) -> str:
    return str((event.decoded or {}).get("name", ""))


def runtime_policy(policy: HostPolicy) -> dict[str, Any]:
    """The host policy's IMA allowlist and excludes as a Keylime runtime policy (excludes as regexes)."""
    return {
        "meta": {"version": 1, "generator": _GENERATOR_COMPATIBLE},
        "release": 0,
        "digests": {p: sorted(d) for p, d in sorted(policy.ima_allowlist.items())},
        "excludes": [fnmatch.translate(g) for g in (*policy.ima_excludes, "boot_aggregate")],
        "keyrings": {},
        "ima": {"ignored_keyrings": [], "log_hash_alg": "sha1", "dm_policy": None},
        "ima-buf": {},
        "verification-keys": "",
    }


def import_runtime_policy(data: bytes, current: HostPolicy, source: str) -> HostPolicy:
    """A Keylime runtime policy back into tvorch's host policy: its digests become the IMA allowlist, its
    excludes (only those tvorch wrote: translated globs) the excludes; PCRs and required paths stay CURRENT's,
    for Keylime's runtime policy has neither. Anything tvorch cannot represent is refused by name."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ConfigError(f"{source} is not JSON: {err}") from None
    if isinstance(doc, dict) and "payload" in doc:
        raise ConfigError(f"{source} is a signed (DSSE) runtime policy: import the policy inside it")
    required = ("meta", "digests", "excludes", "keyrings", "ima-buf")
    if not isinstance(doc, dict) or any(k not in doc for k in required):
        raise ConfigError(f"{source} is not a Keylime runtime policy: it needs the keys {', '.join(required)}")
    digests = doc["digests"]
    if not isinstance(digests, dict) or not all(
            isinstance(p, str) and isinstance(v, list) and v and all(isinstance(d, str) and _HEX.fullmatch(d)
                                                                     for d in v) for p, v in digests.items()):
        raise ConfigError(f"{source}: 'digests' must map paths to lists of lowercase hex digests")
    for key in ("keyrings", "ima-buf"):
        if doc[key]:
            raise ConfigError(f"{source}: '{key}' entries have no place in tvorch's host policy; remove them")
    globs = {fnmatch.translate(g): g for g in (*current.ima_excludes, *DEFAULT_EXCLUDES)}
    excludes = []
    for regex in doc["excludes"] if isinstance(doc["excludes"], list) else [None]:
        if regex == fnmatch.translate("boot_aggregate"):
            continue
        if not isinstance(regex, str) or regex not in globs:
            raise ConfigError(f"{source}: exclude {str(regex)[:80]!r} is not a glob tvorch wrote; "
                              "tvorch's host policy excludes by glob")
        excludes.append(globs[regex])
    return HostPolicy(bank=current.bank, pcrs=current.pcrs,
                      ima_allowlist={p: frozenset(v) for p, v in digests.items()},
                      ima_required=current.ima_required, ima_excludes=tuple(excludes))
