"""core.launch.manifest_format: the manifest's one reader, which the hook uses without cryptography."""

import ast
import dataclasses
import hashlib
import subprocess
import sys
import uuid

import pytest

from tvorch.core.launch import manifest_format
from tvorch.core.launch.canonical import autoselection_hint
from tvorch.core.launch.manifest import sign_manifest, verify_manifest
from tvorch.core.launch.manifest_format import (
    Measurement,
    manifest_digest,
    manifest_to_dict,
    stored_manifest,
)
from tvorch.errors import TrustError

from .test_manifest import MANIFEST, NOW, identity

EFI_XML = ("<domain type='qemu'><os firmware='efi'><type>hvm</type>"
           "<firmware><feature enabled='no' name='secure-boot'/></firmware></os></domain>")


@pytest.fixture(scope="module")
def node():
    return identity()


@pytest.fixture(scope="module")
def signed(node) -> bytes:
    _, _, key, cert = node
    return sign_manifest(MANIFEST, key, cert)


def test_stored_manifest_reads_what_a_verifier_reads(node, signed: bytes) -> None:
    _, ca_cert, _, _ = node
    assert stored_manifest(signed) == MANIFEST
    assert verify_manifest(signed, ca_cert, NOW) == MANIFEST
    assert manifest_digest(signed) == hashlib.sha256(signed).hexdigest()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda b: b.replace(b'{"manifest":', b'{"manifest":1,"manifest":', 1), "duplicate key 'manifest'"),
        (lambda b: b.replace(b'"size":4096', b'"size":4096.0'), "not an integer"),
        (lambda b: b"[" + b + b"]", "not a JSON object"),
        (lambda b: b'{"signature":{}}', "missing field 'manifest'"),
        (lambda b: b.replace(b'"kind":"cmdline"', b'"kind":"bios"'), "unknown measurement kind 'bios'"),
        (lambda b: b.replace(b'"config_digest":"' + b"c" * 64, b'"config_digest":"' + b"C" * 64),
         "'config_digest'"),
    ],
)
def test_stored_manifest_refuses_what_is_no_manifest(signed: bytes, edit, message: str) -> None:
    with pytest.raises(TrustError, match=message):
        stored_manifest(edit(signed))


def test_uuid_check_is_uuids_own() -> None:
    """The manifest's UUID check (a regex, to keep uuid off the hook's path) says what uuid.UUID said."""
    for text in (str(uuid.uuid4()), str(uuid.uuid4()).upper(), "{" + str(uuid.uuid4()) + "}",
                 str(uuid.uuid4()).replace("-", ""), str(uuid.uuid4()) + "\n", "urn:uuid:" + str(uuid.uuid4()), ""):
        try:
            expected = str(uuid.UUID(text)) == text
        except ValueError:
            expected = False
        assert manifest_format._is_canonical_uuid(text) is expected, text


def test_autoselection_hint_takes_measurements_or_their_json() -> None:
    firmware = (Measurement(kind="firmware-code", path="/usr/share/OVMF/CODE.fd", digest="a" * 64),
                Measurement(kind="firmware-vars", path="/usr/share/OVMF/VARS.fd", digest="b" * 64),
                Measurement(kind="firmware-code", path="/second/CODE.fd", digest="c" * 64))
    typed = autoselection_hint(EFI_XML, firmware)
    as_json = autoselection_hint(EFI_XML, manifest_to_dict(dataclasses.replace(MANIFEST, measurements=firmware))[
        "measurements"])
    assert typed is not None and typed == as_json
    assert (typed.code, typed.vars_template) == ("/usr/share/OVMF/CODE.fd", "/usr/share/OVMF/VARS.fd")


def test_the_format_module_needs_no_cryptography() -> None:
    out = subprocess.run([sys.executable, "-c", "import sys, tvorch.core.launch.manifest_format; print(sorted(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    top_level = {name.split(".")[0] for name in ast.literal_eval(out)}
    assert top_level.isdisjoint({"cryptography", "tpm2_pytss", "libvirt", "uuid"})
