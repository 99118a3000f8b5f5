import base64
import hashlib
from datetime import datetime, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from tvorch.core.launch.image_signature import decode_signature, verify_image_signature
from tvorch.core.launch.references import Checked, check_references
from tvorch.core.signing import issue_certificate, make_ca
from tvorch.errors import TrustError

NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)
D1, D2, D3 = ("1" * 64, "2" * 64, "3" * 64)


def test_every_failure_is_collected():
    measured = [
        Checked("image", "/base", D1),
        Checked("image", "/top", D2),
        Checked("firmware", "/code", D3),
        Checked("emulator", "/qemu", D1),
    ]
    verdict = check_references(measured, {("image", D1)}, ["image", "firmware"])
    assert not verdict.passed
    assert [(f.kind, f.path) for f in verdict.failures] == [("image", "/top"), ("firmware", "/code")]
    assert "/top" in verdict.reason() and "/code" in verdict.reason()


def test_digest_must_match_its_kind():
    # A trusted firmware digest does not make an image with the same bytes trusted.
    verdict = check_references([Checked("image", "/x", D1)], {("firmware", D1)}, ["image"])
    assert not verdict.passed


def test_not_required_kinds_pass_and_waivers_are_reported():
    measured = [Checked("image", "/top", D2), Checked("swtpm", "/swtpm", D3)]
    assert check_references(measured, set(), []).passed
    waived = check_references(measured, set(), ["image"], waive_kinds=["image"])
    assert waived.passed and [f.path for f in waived.waived] == ["/top"]


def _signer(ca_key, ca_cert, key):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "image signer")])
    usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    return issue_certificate(ca_key, ca_cert, key.public_key(), name, NOW, years=1,
                             extensions=[(x509.BasicConstraints(ca=False, path_length=None), True), (usage, True)])


@pytest.fixture(scope="module")
def ca():
    return make_ca("image CA", NOW)


IMAGE = b"image bytes " * 1000
DIGEST = hashlib.sha256(IMAGE).hexdigest()


def _sign(key, data):
    if isinstance(key, rsa.RSAPrivateKey):
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
        return key.sign(data, pss, hashes.SHA256())
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("make_key", [
    lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    lambda: ec.generate_private_key(ec.SECP256R1()),
    lambda: ec.generate_private_key(ec.SECP384R1()),
], ids=["rsa-pss", "ecdsa-p256", "ecdsa-p384"])
def test_image_signature_round_trip_and_tamper(ca, make_key):
    ca_key, ca_cert = ca
    key = make_key()
    cert = _signer(ca_key, ca_cert, key)
    sig = _sign(key, IMAGE)
    assert verify_image_signature(DIGEST, sig, cert, ca_cert, NOW) == "CN=image signer"
    other = hashlib.sha256(IMAGE + b"x").hexdigest()
    with pytest.raises(TrustError, match="does not verify"):
        verify_image_signature(other, sig, cert, ca_cert, NOW)
    bad = bytes([sig[0] ^ 1]) + sig[1:]
    with pytest.raises(TrustError, match="does not verify"):
        verify_image_signature(DIGEST, bad, cert, ca_cert, NOW)


def test_signer_from_another_ca_is_refused(ca):
    other_key, other_cert = make_ca("someone else", NOW)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _signer(other_key, other_cert, key)
    with pytest.raises(TrustError, match="not by the CA"):
        verify_image_signature(DIGEST, _sign(key, IMAGE), cert, ca[1], NOW)


def test_signature_encodings():
    raw = bytes(range(256))
    assert decode_signature(raw) == raw
    assert decode_signature(base64.b64encode(raw) + b"\n") == raw
