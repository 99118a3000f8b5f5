"""verify_quote and the host quote file, on quotes a real swtpm made: every way a quote can lie is refused."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_ECC_PARAMETER,
    TPM2B_PUBLIC,
    TPMS_SIGNATURE_ECC,
    TPMT_SIGNATURE,
    TPMU_SIGNATURE,
)

from tests.tpm_fixtures import running_swtpm
from tvorch.adapters.tpm import AkInfo, RawQuote, open_tpm
from tvorch.core.attestation.quote import (
    HostQuote,
    QuoteInfo,
    parse_attest,
    pcr_composite_digest,
    verify_quote,
)
from tvorch.errors import EvidenceError, ExitCode, TrustError

NONCE = hashlib.sha256(b"verifier nonce").digest()
PCRS = [0, 1, 2, 3, 4, 5, 6, 7, 10, 16]


@dataclass(frozen=True)
class Quoted:
    ak: AkInfo
    other_ak: AkInfo  # an AK of another TPM
    quote: RawQuote


@pytest.fixture(scope="module")
def quoted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Quoted]:
    """One quote (PCR 16 extended first, so not all zeros) and a second TPM's AK."""
    base = tmp_path_factory.mktemp("quote")
    with running_swtpm(base / "tpm-a") as tcti, open_tpm(tcti) as tpm:
        ak = tpm.create_ak(base / "state-a")
        tpm.extend(16, {"sha256": hashlib.sha256(b"event").digest()})
        quote = tpm.quote(ak, NONCE, PCRS)
    with running_swtpm(base / "tpm-b") as tcti, open_tpm(tcti) as tpm:
        other = tpm.create_ak(base / "state-b")
    yield Quoted(ak, other, quote)


def verify(q: Quoted, **changes: object) -> QuoteInfo:
    args: dict[str, object] = {
        "attest": q.quote.attest, "signature": q.quote.signature, "ak_public": q.ak.public,
        "nonce": NONCE, "pcr_values": q.quote.pcr_values, "bank": "sha256",
    }
    args.update(changes)
    return verify_quote(**args)  # type: ignore[arg-type]


def test_a_genuine_quote_verifies_and_says_what_it_covers(quoted: Quoted) -> None:
    info = verify(quoted)
    assert info.pcr_selection == tuple(PCRS) and info.bank == "sha256"
    assert info.pcr_digest == pcr_composite_digest(quoted.quote.pcr_values, "sha256").hex()
    assert quoted.quote.pcr_values[16] == hashlib.sha256(bytes(32) + hashlib.sha256(b"event").digest()).digest()
    assert info.safe and info.reset_count >= 0 and info.clock > 0
    assert info.qualified_signer.startswith("000b")  # sha256 name algorithm
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.bank = "sha1"  # type: ignore[misc]


def test_a_wrong_nonce_is_refused(quoted: Quoted) -> None:
    with pytest.raises(TrustError, match="nonce") as err:
        verify(quoted, nonce=hashlib.sha256(b"another nonce").digest())
    assert err.value.exit_code == ExitCode.TRUST_REFUSED


def test_another_aks_public_key_does_not_verify_the_signature(quoted: Quoted) -> None:
    with pytest.raises(TrustError, match="signature does not verify"):
        verify(quoted, ak_public=quoted.other_ak.public)


def test_a_changed_pcr_value_breaks_the_pcr_digest(quoted: Quoted) -> None:
    values = dict(quoted.quote.pcr_values)
    values[7] = hashlib.sha256(b"a different boot").digest()
    with pytest.raises(TrustError, match="PCR digest"):
        verify(quoted, pcr_values=values)


def test_the_selection_must_cover_exactly_the_given_pcrs(quoted: Quoted) -> None:
    more = {**quoted.quote.pcr_values, 11: bytes(32)}
    with pytest.raises(TrustError, match="selects sha256:0,1,2,3,4,5,6,7,10,16, not sha256:0,1,2,3,4,5,6,7,10,11,16"):
        verify(quoted, pcr_values=more)
    fewer = {i: v for i, v in quoted.quote.pcr_values.items() if i != 10}
    with pytest.raises(TrustError, match="selects"):
        verify(quoted, pcr_values=fewer)
    sha1_values = {i: bytes(20) for i in PCRS}
    with pytest.raises(TrustError, match="not sha1:"):
        verify(quoted, pcr_values=sha1_values, bank="sha1")


@pytest.mark.parametrize("garble", [
    lambda b: b[:-5],  # truncated
    lambda b: b + b"\0",  # trailing bytes
    lambda b: b"\x00\x01",
    lambda b: b"",
])
def test_garbled_attest_bytes_are_evidence_errors(quoted: Quoted, garble) -> None:
    with pytest.raises(EvidenceError) as err:
        verify(quoted, attest=garble(quoted.quote.attest))
    assert err.value.exit_code == ExitCode.EVIDENCE


def test_a_flipped_byte_in_the_attest_breaks_the_signature(quoted: Quoted) -> None:
    attest = bytearray(quoted.quote.attest)
    attest[-40] ^= 0x01  # inside the PCR digest: still parses
    with pytest.raises(TrustError, match="signature"):
        verify(quoted, attest=bytes(attest))


def test_attest_that_is_not_from_a_tpm_is_refused(quoted: Quoted) -> None:
    attest = b"\xff\x54\x43\x48" + quoted.quote.attest[4:]  # magic is TPM_GENERATED_VALUE 0xff544347
    with pytest.raises(TrustError, match="TPM_GENERATED_VALUE"):
        verify(quoted, attest=attest)


def test_garbled_signature_and_ak_bytes_are_evidence_errors(quoted: Quoted) -> None:
    with pytest.raises(EvidenceError, match="signature"):
        verify(quoted, signature=quoted.quote.signature[:10])
    with pytest.raises(EvidenceError, match="AK public"):
        verify(quoted, ak_public=quoted.ak.public + b"x")


def test_pcr_values_of_the_wrong_size_or_bank_are_evidence_errors(quoted: Quoted) -> None:
    with pytest.raises(EvidenceError, match="32"):
        verify(quoted, pcr_values={**quoted.quote.pcr_values, 0: bytes(20)})
    with pytest.raises(EvidenceError, match="unknown PCR bank"):
        verify(quoted, bank="md5")


def test_a_software_key_signing_a_forged_quote_is_refused(quoted: Quoted) -> None:
    """A key that is not a restricted TPM key could sign anything: its quotes prove nothing."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    public = TPM2B_PUBLIC.from_pem(
        pem, objectAttributes=TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.USERWITHAUTH
    ).marshal()
    r, s = decode_dss_signature(key.sign(quoted.quote.attest, ec.ECDSA(hashes.SHA256())))
    signature = TPMT_SIGNATURE(sigAlg=TPM2_ALG.ECDSA, signature=TPMU_SIGNATURE(ecdsa=TPMS_SIGNATURE_ECC(
        hash=TPM2_ALG.SHA256,
        signatureR=TPM2B_ECC_PARAMETER(r.to_bytes(32, "big")),
        signatureS=TPM2B_ECC_PARAMETER(s.to_bytes(32, "big")),
    ))).marshal()
    with pytest.raises(TrustError, match="restricted"):
        verify(quoted, ak_public=public, signature=signature)


def host_quote(q: Quoted, **changes: object) -> HostQuote:
    base = HostQuote(
        nonce=NONCE, bank="sha256", pcrs=q.quote.pcr_values, attest=q.quote.attest,
        signature=q.quote.signature, ak_public=q.ak.public, ak_pem=q.ak.pem.decode(),
        eventlog=b"\x00\x01binary log", ima_log=None,
    )
    return dataclasses.replace(base, **changes)


def test_the_host_quote_file_round_trips_through_json_and_verifies(quoted: Quoted) -> None:
    hq = host_quote(quoted)
    text = json.dumps(hq.to_json())
    back = HostQuote.from_json(json.loads(text))
    assert back == hq
    assert back.verify(NONCE).pcr_selection == tuple(PCRS)
    obj = json.loads(text)
    assert obj["version"] == 1 and obj["ima_log"] is None and list(obj["pcrs"]) == [str(i) for i in PCRS]
    assert parse_attest(back.attest).extraData == NONCE
    with pytest.raises(TrustError, match="nonce"):
        back.verify(b"\0" * 32)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda o: o.update(version=2), "version"),
    (lambda o: o.update(version=True), "version"),
    (lambda o: o.update(extra=1), "unknown"),
    (lambda o: o.pop("ima_log"), "missing"),
    (lambda o: o.update(attest="not base64!"), "attest"),
    (lambda o: o.update(nonce="xyz"), "nonce"),
    (lambda o: o["pcrs"].update({"01": "00" * 32}), "PCR index"),
    (lambda o: o["pcrs"].update({"24": "00" * 32}), "PCR index"),
    (lambda o: o["pcrs"].update({"0": "00" * 20}), "sha256 digest"),
    (lambda o: o.update(bank="sha3"), "unknown PCR bank"),
    (lambda o: o.update(pcrs={}), "pcrs"),
])
def test_a_malformed_host_quote_file_is_refused(quoted: Quoted, edit, message: str) -> None:
    obj = json.loads(json.dumps(host_quote(quoted).to_json()))
    edit(obj)
    with pytest.raises(EvidenceError, match=message):
        HostQuote.from_json(obj)


def test_a_host_quote_whose_pem_is_another_key_is_refused(quoted: Quoted) -> None:
    obj = host_quote(quoted, ak_pem=quoted.other_ak.pem.decode()).to_json()
    with pytest.raises(EvidenceError, match="ak_pem"):
        HostQuote.from_json(obj)
    with pytest.raises(EvidenceError, match="not a JSON object"):
        HostQuote.from_json([obj])
