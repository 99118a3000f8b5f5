"""The sealed key file and the PolicyPCR digest, on bytes (the TPM side is tests/integration/test_tpm_seal.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import struct

import pytest

from tvorch.core.vtpm.sealed import SealedKey, pcr_selection_bytes, policy_pcr_digest
from tvorch.errors import ExitCode, InputError

DIGEST = hashlib.sha256(b"policy").digest()
KEY = SealedKey(bank="sha256", pcrs=(0, 2, 4, 7), public=b"\x00\x4epublic", private=b"\x00\x9eprivate",
                policy_digest=DIGEST)


def selection(bank_alg: int, pcrs: list[int]) -> bytes:
    """TPML_PCR_SELECTION by hand: count, then hash (u16), sizeofSelect (u8) and a 3-byte bitmap."""
    bitmap = bytearray(3)
    for i in pcrs:
        bitmap[i // 8] |= 1 << (i % 8)
    return struct.pack(">IHB", 1, bank_alg, 3) + bytes(bitmap)


def expected_policy(bank: str, bank_alg: int, values: dict[int, bytes]) -> bytes:
    """TPM 2.0 Part 3, TPM2_PolicyPCR, written out independently with hashlib."""
    pcr_digest = hashlib.sha256(b"".join(values[i] for i in sorted(values))).digest()
    return hashlib.sha256(
        bytes(32) + bytes.fromhex("0000017f") + selection(bank_alg, sorted(values)) + pcr_digest
    ).digest()


def edited(**changes: object) -> bytes:
    obj = json.loads(KEY.to_bytes())
    obj.update(changes)
    return json.dumps(obj).encode()


# --- the policy digest -----------------------------------------------------------------


def test_policy_digest_of_zero_pcrs_is_the_value_swtpm_computes() -> None:
    # A trial PolicyPCR session on a fresh swtpm (PCRs 0, 2, 4, 7 all zeros) gives this digest.
    zeros = {i: bytes(32) for i in (0, 2, 4, 7)}
    known = bytes.fromhex("4f04c837291ac05d8c8fceb5d03ac530d3189c1dd24dc744f2145cf71eaa9cf6")
    assert policy_pcr_digest(zeros) == known == expected_policy("sha256", 0x000B, zeros)


@pytest.mark.parametrize(
    ("bank", "alg", "pcrs"),
    [("sha256", 0x000B, [7]), ("sha256", 0x000B, [0, 1, 2, 3, 4, 5, 6, 7, 23]), ("sha1", 0x0004, [0, 9, 16]),
     ("sha384", 0x000C, [4, 11]), ("sha512", 0x000D, [8])],
)
def test_policy_digest_matches_an_independent_computation(bank: str, alg: int, pcrs: list[int]) -> None:
    size = hashlib.new(bank).digest_size
    values = {i: hashlib.new(bank, f"pcr {i}".encode()).digest() for i in pcrs}
    assert len(next(iter(values.values()))) == size
    assert pcr_selection_bytes(pcrs, bank) == selection(alg, pcrs)
    assert policy_pcr_digest(values, bank) == expected_policy(bank, alg, values)


def test_policy_digest_follows_values_and_selection_not_dict_order() -> None:
    values = {7: hashlib.sha256(b"a").digest(), 0: hashlib.sha256(b"b").digest()}
    assert policy_pcr_digest(values) == policy_pcr_digest(dict(sorted(values.items())))
    assert policy_pcr_digest(values) != policy_pcr_digest({**values, 7: hashlib.sha256(b"c").digest()})
    # The same concatenated values under another selection are another policy.
    assert policy_pcr_digest({0: values[0], 7: values[7]}) != policy_pcr_digest({0: values[0], 1: values[7]})


def test_policy_digest_refuses_what_is_not_a_pcr_set() -> None:
    with pytest.raises(InputError, match="not sha256 digests"):
        policy_pcr_digest({0: bytes(20)})
    with pytest.raises(InputError, match="out of range"):
        policy_pcr_digest({24: bytes(32)})
    with pytest.raises(InputError, match="no PCRs"):
        policy_pcr_digest({})
    with pytest.raises(InputError, match="unknown PCR bank 'md5'"):
        policy_pcr_digest({0: bytes(16)}, "md5")


# --- the sealed key file ----------------------------------------------------------------


def test_round_trip_is_canonical_and_keeps_the_private_blob_out_of_repr() -> None:
    data = KEY.to_bytes()
    assert SealedKey.from_bytes(data) == KEY
    assert SealedKey.from_bytes(data).to_bytes() == data
    assert data.startswith(b'{"bank":"sha256","pcrs":[0,2,4,7],"policy_digest":')
    assert data.endswith(b',"version":1}')
    assert json.loads(data)["private"] == base64.b64encode(KEY.private).decode()
    assert "private" not in repr(KEY)
    # Whitespace and key order are not part of the meaning.
    assert SealedKey.from_bytes(json.dumps(json.loads(data), indent=2).encode()) == KEY


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe\x00", "not UTF-8"),
        (b"[]", "not a JSON object"),
        (b'{"version":1,"version":1}', "duplicate key 'version'"),
        (edited(extra=1), r"unknown \['extra'\]"),
        (json.dumps({"version": 1}).encode(), "missing"),
        (edited(version=2), "version 2 is not 1"),
        (edited(version="1"), "version '1' is not 1"),
        (edited(version=True), "version True is not 1"),
        (edited(bank=1), "'bank' is not a string"),
        (edited(bank="md5"), "unknown PCR bank 'md5'"),
        (edited(pcrs=[]), "selects no PCRs"),
        (edited(pcrs="0,2"), "not a list of integers"),
        (edited(pcrs=[0, "2"]), "not a list of integers"),
        (edited(pcrs=[0, True]), "not a list of integers"),
        (edited(pcrs=[0, 24]), r"out of range 0-23: \[24\]"),
        (edited(pcrs=[-1]), "out of range"),
        (edited(pcrs=[4, 2]), "not strictly ascending"),
        (edited(pcrs=[2, 2]), "not strictly ascending"),
        (edited(public="not base64!"), "'public' is not valid base64"),
        (edited(private=5), "'private' is not a base64 string"),
        (edited(private=""), "empty public or private"),
        (edited(policy_digest="AAA="), "policy digest has 2 bytes, not 32"),
        (edited(policy_digest="AAAA\n"), "'policy_digest' is not valid base64"),
        (edited(policy_digest=float("nan")), "NaN"),
    ],
)
def test_malformed_sealed_keys_are_refused_in_one_line(data: bytes, message: str) -> None:
    with pytest.raises(InputError, match=message) as err:
        SealedKey.from_bytes(data)
    assert "\n" not in str(err.value) and err.value.exit_code == ExitCode.INVALID_INPUT
