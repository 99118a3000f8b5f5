"""Strict JSON and base64: the one reader and writer every tvorch file format uses.

Manifests, evidence bundles, AK certifications, host quotes, sealed keys and
vTPM backup headers are JSON objects that are signed, hashed or handed to a
verifier on another machine. So they are read strictly, the same way
everywhere: UTF-8 only, a key given twice refused (two readers could take
different values), no NaN or Infinity, no floats (integers only, none beyond
2**53-1: many JSON readers lose precision there, RFC 7493), the top-level
type checked; and written in one canonical form (sorted keys, no spaces), the
bytes that are signed and hashed. Base64 is decoded strictly too: only the
standard alphabet, correct padding, and only the one canonical encoding of
the bytes, so no second spelling of a signed value verifies.

A refusal is the caller's error class (a TvorchError subclass, for its exit
code), one line naming WHAT was read and why.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Collection, Mapping
from typing import Any

from tvorch.errors import InputError, TvorchError

MAX_JSON_INT = 2**53 - 1

_TYPE_NAMES = {dict: "a JSON object", list: "a JSON array", str: "a JSON string", int: "a JSON integer"}


def canonical_json(obj: object, *, ensure_ascii: bool = False) -> bytes:
    """The one serialisation that is signed and hashed: UTF-8, sorted keys, no spaces, no floats.

    ENSURE_ASCII escapes non-ASCII characters (``\\uXXXX``), as the vTPM backup
    header and the ledger always have; signed manifests, bundles and AK
    certifications keep them as UTF-8. Raises ValueError for anything JSON
    cannot carry exactly: floats, integers beyond 2**53-1, non-string keys,
    strings that are not valid Unicode (a bug in the caller, or a parsed value
    that has no canonical form).
    """
    _check_json_value(obj, "$")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=ensure_ascii,
                      allow_nan=False).encode("utf-8")


def parse_json(data: bytes | str, what: str, error: type[TvorchError] = InputError,
               top: type | None = dict) -> Any:
    """DATA as JSON, read strictly (see the module docstring); ERROR naming WHAT for anything else.

    TOP is the type the document must be (dict, list ...), None for any.
    """
    try:
        text = data if isinstance(data, str) else bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{what} is not UTF-8") from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_float=_refuse_float,
                         parse_constant=_refuse_constant, parse_int=_bounded_int)
    except RecursionError:
        raise error(f"{what} is nested too deeply") from None
    except ValueError as err:  # json.JSONDecodeError is one; so are the refusals above
        raise error(f"{what} is not valid JSON: {err}") from None
    if top is not None and not isinstance(doc, top):
        raise error(f"{what} is not {_TYPE_NAMES.get(top, top.__name__)}")
    return doc


def b64encode(data: bytes) -> str:
    """Standard base64 with padding, as text: how every format carries bytes."""
    return base64.b64encode(data).decode("ascii")


def b64decode(value: object, what: str, error: type[TvorchError] = InputError) -> bytes:
    """The bytes VALUE encodes, if it is a string in canonical standard base64; ERROR naming WHAT otherwise.

    Refused: a value that is not a string, characters outside the alphabet
    (whitespace and newlines too), wrong padding, and non-zero unused bits
    (``AB==`` for what ``AA==`` encodes), so each byte string has one encoding.
    """
    if not isinstance(value, str):
        raise error(f"{what} is not a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise error(f"{what} is not valid base64") from None
    if base64.b64encode(raw).decode("ascii") != value:
        raise error(f"{what} is not valid base64 (not its canonical encoding)")
    return raw


def key_mismatch(obj: Mapping[str, object], names: Collection[str], optional: Collection[str] = ()) -> str | None:
    """None when OBJ has every key in NAMES and no other (OPTIONAL ones aside); else what is wrong,
    "missing [...], unknown [...]", for the caller's one-line refusal."""
    keys = set(obj)
    missing, unknown = sorted(set(names) - keys), sorted(keys - set(names) - set(optional))
    return f"missing {missing}, unknown {unknown}" if missing or unknown else None


def _check_json_value(value: object, where: str) -> None:
    if value is None or isinstance(value, (bool, str)):
        if isinstance(value, str):
            value.encode("utf-8")  # lone surrogates: UnicodeEncodeError, a ValueError
        return
    if isinstance(value, int):
        if abs(value) > MAX_JSON_INT:
            raise ValueError(f"{where}: integer {value} is beyond 2**53-1")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_json_value(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: key {key!r} is not a string")
            key.encode("utf-8")
            _check_json_value(item, f"{where}.{key}")
        return
    raise ValueError(f"{where}: {type(value).__name__} has no canonical JSON form")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {_shown(key)}")
        result[key] = value
    return result


def _shown(key: str) -> str:
    """KEY for an error line: a 5000-character key is cut, not printed whole."""
    text = repr(key)
    return text if len(text) <= 40 else f"{text[:32]}... ({len(key)} characters)"


def _refuse_float(text: str) -> None:
    raise ValueError(f"number {text[:40]} is not an integer")


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _bounded_int(text: str) -> int:
    # Python refuses integers of over 4300 digits itself (a ValueError); anything past 2**53-1 is refused here.
    value = int(text)
    if abs(value) > MAX_JSON_INT:
        raise ValueError(f"integer {text[:40]}{'...' if len(text) > 40 else ''} is beyond 2**53-1")
    return value
