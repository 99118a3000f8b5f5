"""Signed launch manifests: the round trip, and that no change to a signed file goes unnoticed."""

import base64
import dataclasses
import hashlib
import json
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from tvorch.core.launch.manifest import (
    BootPredictionRecord,
    LaunchManifest,
    Measurement,
    canonical_json,
    manifest_digest,
    manifest_from_dict,
    manifest_to_dict,
    sign_manifest,
    verify_manifest,
)
from tvorch.core.boot.prediction import EventSource, PredictedEvent, Prediction
from tvorch.core.signing import (
    generate_key,
    issue_certificate,
    issue_signing_cert,
    make_ca,
    verify_chain,
)
from tvorch.errors import ExitCode, TrustError

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def identity(hostname="node1", now=NOW):
    ca_key, ca_cert = make_ca(f"tvorch node CA {hostname}", now)
    key = generate_key()
    cert = issue_signing_cert(ca_key, ca_cert, key.public_key(), f"tvorch node signing {hostname}", now)
    return ca_key, ca_cert, key, cert


@pytest.fixture(scope="module")
def node():
    return identity()


MANIFEST = LaunchManifest(
    instance_id="i-0123456789ab",
    uuid="0f8fad5b-d9cb-469f-a165-70867728950e",
    name="vm1",
    node="node1",
    created_at="2025-03-01T12:00:00.000+00:00",
    measurements=(
        Measurement(
            kind="image-layer",
            path="/var/lib/libvirt/images/base.qcow2",
            digest="a" * 64,
            size=4096,
            details={"format": "qcow2", "layer": 1, "virtual_size": 1 << 30, "cached": False},
        ),
        Measurement(kind="cmdline", digest="b" * 64, details={"value": "console=ttyS0 ré"}),
    ),
    config_digest="c" * 64,
    policy_digest="d" * 64,
)


@pytest.fixture(scope="module")
def signed(node):
    _, _, key, cert = node
    return sign_manifest(MANIFEST, key, cert)


def reserialise(file_bytes, change):
    """Apply CHANGE to the parsed file and write it back canonically: only the signature can catch it."""
    data = json.loads(file_bytes)
    change(data)
    return canonical_json(data)


def test_round_trip(node, signed):
    _, ca_cert, _, _ = node
    assert verify_manifest(signed, ca_cert, NOW) == MANIFEST
    assert verify_manifest(signed, ca_cert, NOW + timedelta(days=4 * 365)) == MANIFEST
    assert manifest_digest(signed) == hashlib.sha256(signed).hexdigest()
    assert canonical_json(json.loads(signed)) == signed
    assert manifest_from_dict(manifest_to_dict(MANIFEST)) == MANIFEST


def test_file_layout(signed):
    data = json.loads(signed)
    assert list(data) == ["manifest", "signature"]
    assert list(data["signature"]) == ["algorithm", "certificate", "value"]
    assert data["signature"]["algorithm"] == "ecdsa-p256-sha256"
    assert data["signature"]["certificate"].startswith("-----BEGIN CERTIFICATE-----\n")
    assert data["manifest"]["version"] == 1
    assert not signed.endswith(b"\n")


def test_canonical_json_form():
    assert canonical_json({"b": [1, True, None], "a": "é\n"}) == '{"a":"é\\n","b":[1,true,null]}'.encode()
    for bad in (1.0, {"x": float("nan")}, {1: "x"}, 2**53, "\ud800", {"s": {1, 2}}):
        with pytest.raises(ValueError):
            canonical_json(bad)


# Every field of the manifest and of a measurement, each changed after signing.
TAMPERS = {
    "version": lambda m: m.update(version=2),
    "boot_prediction": lambda m: m.update(boot_prediction={"status": "unavailable", "reason": "x"}),
    "instance_id": lambda m: m.update(instance_id="i-0123456789ac"),
    "uuid": lambda m: m.update(uuid="0f8fad5b-d9cb-469f-a165-70867728950f"),
    "name": lambda m: m.update(name="vm2"),
    "node": lambda m: m.update(node="node2"),
    "created_at": lambda m: m.update(created_at="2025-03-01T12:00:00.001+00:00"),
    "algorithm": lambda m: m.update(algorithm="sha384"),
    "measurements": lambda m: m["measurements"].reverse(),
    "measurements-dropped": lambda m: m["measurements"].pop(),
    "config_digest": lambda m: m.update(config_digest="e" * 64),
    "policy_digest": lambda m: m.update(policy_digest="e" * 64),
    "measurement.kind": lambda m: m["measurements"][0].update(kind="kernel"),
    "measurement.path": lambda m: m["measurements"][0].update(path="/other.qcow2"),
    "measurement.path-null": lambda m: m["measurements"][1].update(path="/proc/cmdline"),
    "measurement.digest": lambda m: m["measurements"][0].update(digest="a" * 63 + "b"),
    "measurement.size": lambda m: m["measurements"][0].update(size=4097),
    "measurement.details": lambda m: m["measurements"][0]["details"].update(extra="x"),
    "measurement.details.format": lambda m: m["measurements"][0]["details"].update(format="raw"),
    "measurement.details.layer": lambda m: m["measurements"][0]["details"].update(layer=0),
    "measurement.details.cached": lambda m: m["measurements"][0]["details"].update(cached=True),
    "measurement.details.value": lambda m: m["measurements"][1]["details"].update(value="console=ttyS0 re"),
}


def test_tampers_cover_every_field():
    covered = {name.split("-")[0] for name in TAMPERS}
    assert {f.name for f in dataclasses.fields(LaunchManifest)} <= covered
    assert {f"measurement.{f.name}" for f in dataclasses.fields(Measurement)} <= covered


@pytest.mark.parametrize("field", sorted(TAMPERS))
def test_tampered_field_fails(node, signed, field):
    _, ca_cert, _, _ = node
    tampered = reserialise(signed, lambda d: TAMPERS[field](d["manifest"]))
    assert tampered != signed
    with pytest.raises(TrustError, match="manifest signature does not verify") as err:
        verify_manifest(tampered, ca_cert, NOW)
    assert err.value.exit_code is ExitCode.TRUST_REFUSED


def test_every_single_byte_flip_fails(node, signed):
    _, ca_cert, _, _ = node
    for position in range(len(signed)):
        changed = bytearray(signed)
        changed[position] ^= 0x01
        with pytest.raises(TrustError):
            verify_manifest(bytes(changed), ca_cert, NOW)


def _at(signed, marker, offset):
    return signed.rindex(marker) + len(marker) + offset


@pytest.mark.parametrize(
    "where, edit, message",
    [
        ("signature value", lambda b: _flip(b, _at(b, b'"value":"', 20)), "signature"),
        ("certificate PEM", lambda b: _flip(b, _at(b, b"-----BEGIN CERTIFICATE-----\\n", 200)), "certificate"),
        ("a digest in the manifest", lambda b: _flip(b, _at(b, b'"config_digest":"', 5)), "does not verify"),
        ("space after the first brace", lambda b: b[:1] + b" " + b[1:], "not in canonical form"),
        ("trailing newline", lambda b: b + b"\n", "not in canonical form"),
        ("keys reordered", lambda b: json.dumps(dict(reversed(json.loads(b).items())), separators=(",", ":"), ensure_ascii=False).encode(), "not in canonical form"),
        ("non-ASCII escaped", lambda b: json.dumps(json.loads(b), sort_keys=True, separators=(",", ":")).encode(), "not in canonical form"),
        ("pretty-printed", lambda b: json.dumps(json.loads(b), sort_keys=True, indent=1, ensure_ascii=False).encode(), "not in canonical form"),
        ("duplicate key", lambda b: b.replace(b'{"manifest":', b'{"manifest":1,"manifest":', 1), "duplicate key"),
        ("a float", lambda b: b.replace(b'"size":4096', b'"size":4096.0'), "not an integer"),
        ("not UTF-8", lambda b: b.replace("ré".encode(), b"r\xe9"), "not UTF-8"),
    ],
)
def test_changed_file_fails_with_reason(node, signed, where, edit, message):
    _, ca_cert, _, _ = node
    changed = edit(signed)
    assert changed != signed
    with pytest.raises(TrustError, match=message):
        verify_manifest(changed, ca_cert, NOW)


def _flip(data, position):
    changed = bytearray(data)
    changed[position] ^= 0x01
    return bytes(changed)


def test_high_s_twin_of_a_valid_signature_is_refused(node, signed):
    """ECDSA (r, n-s) verifies too; accepting it would give a second valid file with another digest."""
    _, ca_cert, _, _ = node

    def twin(data):
        r, s = decode_dss_signature(base64.b64decode(data["signature"]["value"]))
        data["signature"]["value"] = base64.b64encode(encode_dss_signature(r, P256_ORDER - s)).decode()

    with pytest.raises(TrustError, match="signature is not in canonical form"):
        verify_manifest(reserialise(signed, twin), ca_cert, NOW)


def test_node_key_of_another_ca_fails(node):
    _, ca_cert, _, _ = node
    for hostname in ("node1", "node2"):  # the same CA name as ours, and another
        _, _, key, cert = identity(hostname)
        with pytest.raises(TrustError, match="not signed by the CA|not by the CA"):
            verify_manifest(sign_manifest(MANIFEST, key, cert), ca_cert, NOW)


def test_certificate_swapped_for_another_ca_fails(node, signed):
    _, ca_cert, _, _ = node
    _, _, _, other_cert = identity("node2")
    pem = other_cert.public_bytes(Encoding.PEM).decode()
    with pytest.raises(TrustError, match="not by the CA"):
        verify_manifest(reserialise(signed, lambda d: d["signature"].update(certificate=pem)), ca_cert, NOW)


def test_wrong_ca_fails(signed):
    _, other_ca, _, _ = identity("node2")
    with pytest.raises(TrustError, match="not by the CA 'CN=tvorch node CA node2'"):
        verify_manifest(signed, other_ca, NOW)


def test_expired_signing_cert_fails(node):
    ca_key, ca_cert, _, _ = node
    key = generate_key()
    old = issue_signing_cert(ca_key, ca_cert, key.public_key(), "tvorch node signing node1", NOW - timedelta(days=6 * 365))
    with pytest.raises(TrustError, match="certificate 'CN=tvorch node signing node1' expired at"):
        verify_manifest(sign_manifest(MANIFEST, key, old), ca_cert, NOW)


def test_certificate_not_for_document_signing_fails(node):
    """Another leaf of the same CA (e.g. a future EK or TLS certificate) may not sign manifests."""
    ca_key, ca_cert, _, _ = node
    key = generate_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not a signer")])
    usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    cert = issue_certificate(ca_key, ca_cert, key.public_key(), subject, NOW, years=1, extensions=[(usage, True)])
    verify_chain(cert, ca_cert, NOW)  # a good leaf, just not for this purpose
    with pytest.raises(TrustError, match="lacks extended key usage 1.3.6.1.5.5.7.3.36"):
        verify_manifest(sign_manifest(MANIFEST, key, cert), ca_cert, NOW)


def test_ca_certificate_cannot_sign_as_its_own_leaf(node):
    ca_key, ca_cert, _, _ = node
    with pytest.raises(TrustError, match="is a CA certificate"):
        verify_manifest(sign_manifest(MANIFEST, ca_key, ca_cert), ca_cert, NOW)


def test_sign_refuses_a_key_that_is_not_the_certificates(node):
    _, _, _, cert = node
    with pytest.raises(TrustError, match="signing key does not match"):
        sign_manifest(MANIFEST, generate_key(), cert)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.pop("node"), "missing field 'node'"),
        (lambda m: m.update(extra={}), "unknown field 'extra'"),
        (lambda m: m["measurements"][0].pop("size"), "measurements\\[0\\]: missing field 'size'"),
        (lambda m: m["measurements"][0].update(sha1="x"), "measurements\\[0\\]: unknown field 'sha1'"),
        (lambda m: m["measurements"][0].update(kind="bootloader"), "unknown measurement kind 'bootloader'"),
        (lambda m: m["measurements"][0].update(digest="A" * 64), "'measurements\\[0\\].digest'"),
        (lambda m: m["measurements"][0].update(path="relative.qcow2"), "'measurements\\[0\\].path'"),
        (lambda m: m["measurements"][0].update(size=True), "'measurements\\[0\\].size'"),
        (lambda m: m["measurements"][0]["details"].update(Bad=1), "key 'Bad'"),
        (lambda m: m["measurements"][0]["details"].update(nested={}), "'measurements\\[0\\].details.nested'"),
        (lambda m: m.update(version=2), "unsupported version 2"),
        (lambda m: m.update(uuid="0F8FAD5B-D9CB-469F-A165-70867728950E"), "field 'uuid'"),
        (lambda m: m.update(created_at="2025-03-01T12:00:00Z"), "field 'created_at'"),
        (lambda m: m.update(created_at="2025-03-01T13:00:00.000+01:00"), "field 'created_at'"),
        (lambda m: m.update(name=""), "field 'name'"),
    ],
)
def test_strict_parsing_names_the_field(change, message):
    data = manifest_to_dict(MANIFEST)
    change(data)
    with pytest.raises(TrustError, match=message):
        manifest_from_dict(data)


def test_sign_refuses_what_verify_would_refuse(node):
    _, _, key, cert = node
    bad = dataclasses.replace(MANIFEST, config_digest="not hex")
    with pytest.raises(TrustError, match="'config_digest'"):
        sign_manifest(bad, key, cert)


# --- boot_prediction: the boot measurements predicted at launch (optional, signed with the rest) ---

def _predicted() -> BootPredictionRecord:
    events = (PredictedEvent(4, "EV_EFI_ACTION", "1" * 64, "Calling EFI Application from Boot Option"),
              PredictedEvent(4, "EV_SEPARATOR", "2" * 64, "separator"),
              PredictedEvent(7, "EV_SEPARATOR", "2" * 64, "separator", EventSource.FIRMWARE_REFERENCE))
    return BootPredictionRecord("predicted", Prediction(events, frozenset({4, 7, 8})), {0: "no firmware reference"})


def test_boot_prediction_round_trip_and_absence_keeps_old_bytes(node):
    _, ca_cert, key, cert = node
    with_prediction = dataclasses.replace(MANIFEST, boot_prediction=_predicted())
    signed = sign_manifest(with_prediction, key, cert)
    assert verify_manifest(signed, ca_cert, NOW) == with_prediction
    body = json.loads(signed)["manifest"]["boot_prediction"]
    assert body["pcrs"]["8"] == "00" * 32 and body["status"] == "predicted" and body["not_predicted"] == {"0": "no firmware reference"}
    unavailable = dataclasses.replace(MANIFEST, boot_prediction=BootPredictionRecord("unavailable", reason="no GPT"))
    assert verify_manifest(sign_manifest(unavailable, key, cert), ca_cert, NOW) == unavailable
    assert "boot_prediction" not in manifest_to_dict(MANIFEST)


@pytest.mark.parametrize("edit, message", [
    (lambda b: b["pcrs"].update({"4": "0" * 64}), "not what its events replay to"),
    (lambda b: b["events"][0].update(pcr=9), "does not cover"),
    (lambda b: b["events"][0].update(source="guessed"), "unknown source"),
    (lambda b: b.update(status="maybe"), "must be one of predicted, unavailable"),
    (lambda b: b.update(extra=1), "unknown field 'extra'"),
    (lambda b: b["covered"].append(99), "PCR index from 0 to 23"),
])
def test_boot_prediction_that_does_not_hold_together_is_refused(edit, message):
    body = manifest_to_dict(dataclasses.replace(MANIFEST, boot_prediction=_predicted()))
    edit(body["boot_prediction"])
    with pytest.raises(TrustError, match=message):
        manifest_from_dict(body)
