"""The guest attestation protocol, `tvorch-attest/1`, spoken over the virtio-serial port org.tvorch.attest.0.

One request line from the host, one response line from the guest agent, both
ASCII and ending in ``\\n``, so an agent can be a shell script around
tpm2-tools as well as a Python program::

    tvorch-attest/1 <id> <op> [key=value ...]
    tvorch-attest/1 <id> ok [key=value ...]
    tvorch-attest/1 <id> error <one line of text>

``id`` is the host's token for the exchange (letters and digits), echoed in
the answer: a line with another id is an answer to an earlier request that
timed out, and is skipped. Values are base64 (standard alphabet, no line
breaks), lowercase hex, decimal, or ``-`` for "none". The operations:

``hello``
    ``ok agent=<name/version> ek_public=<b64> ak_public=<b64> ak_name=<hex>``:
    the RSA EK's and the attestation key's TPM2B_PUBLIC (as ``tpm2_createek
    -u`` and ``tpm2_createak -u`` write them) and the AK's name. The agent
    makes the AK on first use (under the EK) and keeps it for the VM's life
    (the reference agents keep it at persistent handle 0x81010002).
``activate id_object=<b64> encrypted_secret=<b64>``
    ``ok secret=<b64>``: TPM2_ActivateCredential of the host's MakeCredential
    blob (TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET) with the AK and the EK; only
    a TPM holding both can answer, which binds the AK to the EK.
``quote nonce=<hex> pcrs=<bank>:<i,j,...>``
    ``ok attest=<b64> signature=<b64> pcrs=<bank>:<i>=<hex>,... eventlog=<b64|->
    ima=<b64|->``: TPMS_ATTEST and TPMT_SIGNATURE of a TPM2_Quote by the AK
    over the nonce, the PCR values read after it, the firmware event log
    (/sys/kernel/security/tpm0/binary_bios_measurements) and the IMA list
    (binary_runtime_measurements) when the guest has them. The reference
    agents take the PCR values from tpm2_quote's own read right after the quote
    (the quote's digest decides anyway).

An agent answers a request whose id it cannot read with id ``0``, ignores
fields an operation does not use, refuses a repeated field, and skips blank
lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tvorch.core.codec import b64decode
from tvorch.errors import EvidenceError

VERSION = "tvorch-attest/1"
MAX_LINE = 32 * 1024 * 1024
_TOKEN = re.compile(r"[A-Za-z0-9]{1,32}")
_KEY = re.compile(r"[a-z][a-z0-9_]{0,31}")
_VALUE = re.compile(r"[A-Za-z0-9+/=:,._-]*")
OPERATIONS = ("hello", "activate", "quote")


@dataclass(frozen=True)
class Response:
    request_id: str
    ok: bool
    fields: dict[str, str]
    error: str | None = None

    def text(self, key: str) -> str:
        value = self.fields.get(key)
        if value is None:
            raise EvidenceError(f"the guest agent's answer lacks '{key}'")
        return value

    def b64(self, key: str, optional: bool = False) -> bytes | None:
        value = self.text(key) if not optional else self.fields.get(key, "-")
        if value == "-":
            if optional:
                return None
            raise EvidenceError(f"the guest agent's answer has no '{key}'")
        return b64decode(value, f"the guest agent's '{key}'", EvidenceError)

    def data(self, key: str) -> bytes:
        value = self.b64(key)
        assert value is not None
        return value

    def hex(self, key: str) -> bytes:
        try:
            return bytes.fromhex(self.text(key))
        except ValueError:
            raise EvidenceError(f"the guest agent's '{key}' is not hex") from None


def request_line(request_id: str, op: str, **fields: str) -> bytes:
    """One request, encoded; refuses what the protocol cannot carry."""
    if not _TOKEN.fullmatch(request_id) or op not in OPERATIONS:
        raise ValueError(f"bad request id or operation: {request_id!r} {op!r}")
    parts = [VERSION, request_id, op]
    for key, value in fields.items():
        if not _KEY.fullmatch(key) or not _VALUE.fullmatch(value):
            raise ValueError(f"field {key!r} cannot be sent as is")
        parts.append(f"{key}={value}")
    return (" ".join(parts) + "\n").encode("ascii")


def parse_response(line: bytes) -> Response:
    """One answer line (without or with its newline)."""
    try:
        text = line.decode("ascii").rstrip("\r\n")
    except UnicodeDecodeError:
        raise EvidenceError("the guest agent answered with bytes that are not ASCII") from None
    words = text.split(" ")
    if len(words) < 3 or words[0] != VERSION or not _TOKEN.fullmatch(words[1]):
        raise EvidenceError(f"the guest agent's answer is not {VERSION}: {text[:80]!r}")
    request_id, status = words[1], words[2]
    if status == "error":
        return Response(request_id, False, {}, " ".join(words[3:])[:500] or "unspecified error")
    if status != "ok":
        raise EvidenceError(f"the guest agent's answer has status {status[:20]!r}, not ok or error")
    fields: dict[str, str] = {}
    for word in words[3:]:
        key, sep, value = word.partition("=")
        if not sep or not _KEY.fullmatch(key) or not _VALUE.fullmatch(value) or key in fields:
            raise EvidenceError(f"the guest agent's answer has a malformed field {word[:40]!r}")
        fields[key] = value
    return Response(request_id, True, fields)


def pcr_list(bank: str, pcrs: tuple[int, ...]) -> str:
    return f"{bank}:{','.join(str(i) for i in sorted(pcrs))}"


def parse_pcr_values(value: str) -> tuple[str, dict[int, bytes]]:
    """``sha256:0=<hex>,1=<hex>`` → (bank, {index: value})."""
    bank, sep, rest = value.partition(":")
    if not sep or not bank:
        raise EvidenceError("the guest agent's pcrs is not <bank>:<i>=<hex>,...")
    values: dict[int, bytes] = {}
    for item in rest.split(","):
        index, sep, digest = item.partition("=")
        try:
            if not sep or int(index) in values:
                raise ValueError
            values[int(index)] = bytes.fromhex(digest)
        except ValueError:
            raise EvidenceError(f"the guest agent's PCR value {item[:40]!r} is malformed") from None
    return bank, values
