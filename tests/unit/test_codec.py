"""tvorch.core.codec: the strict JSON reader, the canonical writer and base64, on bytes."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

from tvorch.core.codec import MAX_JSON_INT, b64decode, b64encode, canonical_json, key_mismatch, parse_json
from tvorch.errors import EvidenceError, InputError, TrustError


# --- canonical JSON: the bytes that are signed --------------------------------------------------

def test_canonical_bytes_of_a_known_dict() -> None:
    doc = {"z": [3, True, None, {"b": "é\n", "a": -1}], "a": "", "m": {"k": 2**53 - 1}}
    out = canonical_json(doc)
    assert out == '{"a":"","m":{"k":9007199254740991},"z":[3,true,null,{"a":-1,"b":"é\\n"}]}'.encode()
    # The digest pins the form: a change to it breaks every signature and golden file made before.
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(
        b'{"a":"","m":{"k":9007199254740991},"z":[3,true,null,{"a":-1,"b":"\xc3\xa9\\n"}]}').hexdigest()


def test_ascii_canonical_form_escapes_what_the_backup_header_and_ledger_always_escaped() -> None:
    doc = {"b": "é", "a": [1, "x"]}
    assert canonical_json(doc, ensure_ascii=True) == b'{"a":[1,"x"],"b":"\\u00e9"}'
    assert canonical_json(doc, ensure_ascii=True) == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize("bad", [1.5, float("nan"), float("inf"), {1: "x"}, 2**53, -(2**53), "\ud800",
                                 {"s": {1}}, [b"bytes"]])
def test_what_has_no_canonical_form_is_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        canonical_json({"v": bad})


def test_canonical_output_reads_back_to_the_same_value() -> None:
    doc = {"k": ["é", 0, MAX_JSON_INT, -MAX_JSON_INT, False, None, {}]}
    assert parse_json(canonical_json(doc), "doc") == doc


# --- the strict reader --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "data, message",
    [
        (b'{"a":1,"a":1}', "duplicate key 'a'"),
        (b'{"a":{"b":[{"c":1,"d":2,"c":1}]}}', "duplicate key 'c'"),  # at depth
        (b'[{"x":{"y":0,"y":0}}]', "duplicate key 'y'"),
        (b'{"a":NaN}', "NaN is not a JSON number"),
        (b'{"a":[Infinity]}', "Infinity is not a JSON number"),
        (b'{"a":-Infinity}', "-Infinity is not a JSON number"),
        (b'{"a":1.0}', "number 1.0 is not an integer"),
        (b'{"a":1e3}', "number 1e3 is not an integer"),
        (b'{"a":9007199254740992}', "beyond 2\\*\\*53-1"),
        (b'{"a":-9007199254740992}', "beyond 2\\*\\*53-1"),
        (b'{"a":1', "is not valid JSON"),
        (b"", "is not valid JSON"),
        (b'{"a":1} x', "is not valid JSON"),
        (b'{"a":"\xff"}', "is not UTF-8"),
        (b'\xff\xfe{\x00}\x00', "is not UTF-8"),  # UTF-16 is not taken for JSON here
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply|is not valid JSON"),
    ],
)
def test_strict_reader_refuses_in_one_line_with_the_callers_error(data: bytes, message: str) -> None:
    with pytest.raises(TrustError, match=message) as err:
        parse_json(data, "the test file", TrustError, top=None)
    text = str(err.value)
    assert text.startswith("the test file ") and "\n" not in text


def test_a_long_duplicate_key_is_cut_in_the_message() -> None:
    key = "k" * 5000
    with pytest.raises(InputError, match=r"duplicate key 'kkk.*\.\.\. \(5000 characters\)") as err:
        parse_json(json.dumps({key: 1})[:-1].encode() + b',"' + key.encode() + b'":2}', "doc")
    assert len(str(err.value)) < 200


def test_top_level_type_is_checked() -> None:
    assert parse_json(b'{"a":[1]}', "doc") == {"a": [1]}
    assert parse_json(b"[1]", "doc", top=list) == [1]
    assert parse_json("7", "doc", top=None) == 7  # text is taken as it is
    with pytest.raises(EvidenceError, match="^doc is not a JSON object$"):
        parse_json(b"[1]", "doc", EvidenceError)
    with pytest.raises(InputError, match="^doc is not a JSON array$"):
        parse_json(b"{}", "doc", top=list)


def test_the_default_error_is_input_error() -> None:
    with pytest.raises(InputError):
        parse_json(b"{", "doc")


# --- base64 -------------------------------------------------------------------------------------

def test_base64_round_trip() -> None:
    for data in (b"", b"\x00", b"ab", b"abc", bytes(range(256))):
        text = b64encode(data)
        assert text == base64.b64encode(data).decode("ascii")
        assert b64decode(text, "blob") == data


@pytest.mark.parametrize(
    "value, message",
    [
        ("not base64!", "is not valid base64"),
        ("AAAA\n", "is not valid base64"),  # no whitespace
        ("AA AA", "is not valid base64"),
        ("AAA", "is not valid base64"),  # missing padding
        ("AA=A", "is not valid base64"),
        ("-_-_", "is not valid base64"),  # URL-safe alphabet
        ("AB==", "not its canonical encoding"),  # unused bits set: a second spelling of b"\x00"
        ("AAB=", "not its canonical encoding"),
        (5, "is not a base64 string"),
        (None, "is not a base64 string"),
        (b"AAAA", "is not a base64 string"),
    ],
)
def test_strict_base64_refuses(value: object, message: str) -> None:
    with pytest.raises(EvidenceError, match=message) as err:
        b64decode(value, "field 'x'", EvidenceError)
    assert str(err.value).startswith("field 'x' is not")


# --- key checks ---------------------------------------------------------------------------------

def test_key_mismatch_names_what_is_missing_and_unknown() -> None:
    assert key_mismatch({"a": 1, "b": 2}, ("a", "b")) is None
    assert key_mismatch({"a": 1, "c": 3}, ("a", "b"), optional=("c",)) == "missing ['b'], unknown []"
    assert key_mismatch({"a": 1, "b": 2, "z": 0, "y": 0}, ("a", "b")) == "missing [], unknown ['y', 'z']"
    assert key_mismatch({}, {"b", "a"}) == "missing ['a', 'b'], unknown []"
