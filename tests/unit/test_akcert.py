"""AK certification: the AK's attributes, the EK check, MakeCredential and the node's signed statement.

The AK and EK are a real swtpm's (tests/data/attestation/README.txt). MakeCredential
is checked by activating its output in software with an RSA EK whose private
key the test holds, following TPM 2.0 Part 1 section 24 independently of
tpm2-pytss; tests/integration/test_bundle_quote.py activates it in a real TPM.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode
from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_ENCRYPTED_SECRET, TPM2B_ID_OBJECT, TPM2B_PUBLIC
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

try:
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # cryptography before 47
    from cryptography.hazmat.primitives.ciphers.modes import CFB  # type: ignore[assignment]

from tvorch.core.attestation.akcert import (
    AkCertification,
    HostAkCertification,
    check_ak_public,
    ek_cert_sha256,
    ek_matches_certificate,
    make_credential,
    sign_ak_certification,
    sign_host_ak_certification,
    verify_ak_certification,
    verify_host_ak_certification,
)
from tvorch.core.vtpm.ekcert import ek_fingerprint, issue_ek_certificate
from tvorch.core.attestation.quote import ak_name
from tvorch.core.signing import generate_key, make_ca
from tvorch.errors import EvidenceError, InputError, TrustError

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
FIXTURE = json.loads((Path(__file__).resolve().parent.parent / "data" / "attestation" / "evidence.json").read_text())
EK_PUBLIC = base64.b64decode(FIXTURE["guest"]["ek_public"])
AK_PUBLIC = base64.b64decode(FIXTURE["guest"]["ak_public"])
HOST_AK_PUBLIC = base64.b64decode(FIXTURE["host_quote"]["ak_public"])
HOST_EK_PUBLIC = base64.b64decode(FIXTURE["host_ek_public"])


def with_attributes(public: bytes, set_: int = 0, clear: int = 0, name_alg: int | None = None) -> bytes:
    area, _ = TPM2B_PUBLIC.unmarshal(public)
    area.publicArea.objectAttributes = (int(area.publicArea.objectAttributes) | set_) & ~clear
    if name_alg is not None:
        area.publicArea.nameAlg = name_alg
    return area.marshal()


def ek_key(ek_public: bytes) -> rsa.RSAPublicKey:
    from cryptography.hazmat.primitives.serialization import load_der_public_key
    area, _ = TPM2B_PUBLIC.unmarshal(ek_public)
    key = load_der_public_key(area.publicArea.to_der())
    assert isinstance(key, rsa.RSAPublicKey)
    return key


def ek_certificate(ca, key):
    ca_key, ca_cert = ca
    return issue_ek_certificate(ca_key, ca_cert, key, "id:00001014", "swtpm", "id:20191023", None, NOW)


@pytest.fixture(scope="module")
def ca():
    return make_ca("tvorch node CA test", NOW)


# --- the AK's attributes ------------------------------------------------------------

def test_an_ak_made_by_tpm2_createak_is_accepted() -> None:
    check_ak_public(AK_PUBLIC)
    check_ak_public(HOST_AK_PUBLIC)


@pytest.mark.parametrize(("flag", "name"), [
    (TPMA_OBJECT.RESTRICTED, "restricted"),
    (TPMA_OBJECT.FIXEDTPM, "fixedTPM"),
    (TPMA_OBJECT.FIXEDPARENT, "fixedParent"),
    (TPMA_OBJECT.SENSITIVEDATAORIGIN, "sensitiveDataOrigin"),
])
def test_an_ak_lacking_an_attribute_is_refused_by_name(flag: int, name: str) -> None:
    with pytest.raises(TrustError, match=f"AK public key lacks {name} "):
        check_ak_public(with_attributes(AK_PUBLIC, clear=flag))


def test_a_decryption_key_or_a_sha1_name_is_not_an_ak() -> None:
    with pytest.raises(TrustError, match="also a decryption key"):
        check_ak_public(with_attributes(AK_PUBLIC, set_=TPMA_OBJECT.DECRYPT))
    with pytest.raises(TrustError, match="not SHA-256/384/512"):
        check_ak_public(with_attributes(AK_PUBLIC, name_alg=TPM2_ALG.SHA1))
    with pytest.raises(TrustError, match="lacks sign "):  # the EK: a decryption key
        check_ak_public(EK_PUBLIC)
    with pytest.raises(EvidenceError, match="AK public"):
        check_ak_public(AK_PUBLIC[:-3])


# --- the EK -------------------------------------------------------------------------

def test_the_ek_matches_the_certificate_issued_for_its_key_only(ca) -> None:
    assert ek_matches_certificate(EK_PUBLIC, ek_certificate(ca, ek_key(EK_PUBLIC)))
    other = rsa.generate_private_key(65537, 2048).public_key()
    assert not ek_matches_certificate(EK_PUBLIC, ek_certificate(ca, other))
    assert not ek_matches_certificate(EK_PUBLIC, ek_certificate(ca, generate_key().public_key()))
    # The AK's ECC key is not the EK's either, whatever certificate is compared.
    assert not ek_matches_certificate(AK_PUBLIC, ek_certificate(ca, ek_key(EK_PUBLIC)))
    with pytest.raises(EvidenceError, match="EK public"):
        ek_matches_certificate(b"\x00\x01", ek_certificate(ca, other))


# --- MakeCredential, and ActivateCredential in software --------------------------------

def kdfa(key: bytes, label: bytes, context: bytes, bits: int) -> bytes:
    return KBKDFHMAC(algorithm=hashes.SHA256(), mode=Mode.CounterMode, length=bits // 8, rlen=4, llen=4,
                     location=CounterLocation.BeforeFixed, label=label, context=context, fixed=None).derive(key)


def activate_in_software(ek_private: rsa.RSAPrivateKey, blob: bytes, encrypted: bytes, name: bytes) -> bytes:
    """TPM2_ActivateCredential (TPM 2.0 Part 1, 24.4-24.6) for an RSA EK with sha256 and AES-128-CFB."""
    id_object, used = TPM2B_ID_OBJECT.unmarshal(blob)
    assert used == len(blob)
    secret, used = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted)
    assert used == len(encrypted)
    seed = ek_private.decrypt(bytes(secret), padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(),
                                                          b"IDENTITY\0"))
    data = bytes(id_object)
    size = int.from_bytes(data[:2], "big")
    integrity, enc_identity = data[2:2 + size], data[2 + size:]
    hmac_key = kdfa(seed, b"INTEGRITY", b"", 256)
    if not hmac.compare_digest(integrity, hmac.new(hmac_key, enc_identity + name, hashlib.sha256).digest()):
        raise ValueError("integrity check failed")
    decryptor = Cipher(algorithms.AES(kdfa(seed, b"STORAGE", name, 128)), CFB(bytes(16))).decryptor()
    plain = decryptor.update(enc_identity) + decryptor.finalize()
    return plain[2:2 + int.from_bytes(plain[:2], "big")]


@pytest.fixture(scope="module")
def software_ek() -> tuple[rsa.RSAPrivateKey, bytes]:
    """An RSA EK with the TCG template (AES-128-CFB, sha256 name) whose private key the test knows."""
    key = rsa.generate_private_key(65537, 2048)

    def no_nv(index: int) -> bytes:
        raise NoSuchIndex(index)

    _, template = create_ek_template("EK-RSA2048", no_nv)
    template.publicArea.unique.rsa = key.public_key().public_numbers().n.to_bytes(256, "big")
    return key, template.marshal()


def test_a_credential_activates_only_with_the_ek_key_and_the_named_ak(software_ek) -> None:
    private, public = software_ek
    name = ak_name(AK_PUBLIC)
    secret = b"\x5a" * 32
    blob, encrypted = make_credential(public, name, secret)
    assert activate_in_software(private, blob, encrypted, name) == secret
    with pytest.raises(ValueError, match="integrity"):  # a TPM refuses to release it for another key
        activate_in_software(private, blob, encrypted, ak_name(HOST_AK_PUBLIC))
    with pytest.raises(ValueError):  # another EK cannot even recover the seed
        activate_in_software(rsa.generate_private_key(65537, 2048), blob, encrypted, name)


def test_credentials_for_the_real_ek_are_fresh_each_time() -> None:
    first = make_credential(EK_PUBLIC, ak_name(AK_PUBLIC), b"s" * 32)
    second = make_credential(EK_PUBLIC, ak_name(AK_PUBLIC), b"s" * 32)
    assert first != second  # a new seed, so a recorded answer is useless
    TPM2B_ID_OBJECT.unmarshal(first[0])
    TPM2B_ENCRYPTED_SECRET.unmarshal(first[1])


def test_make_credential_refuses_what_cannot_be_a_credential() -> None:
    name = ak_name(AK_PUBLIC)
    with pytest.raises(InputError, match="33 bytes; the EK takes 1 to 32"):
        make_credential(EK_PUBLIC, name, b"s" * 33)
    with pytest.raises(InputError, match="0 bytes"):
        make_credential(EK_PUBLIC, name, b"")
    with pytest.raises(InputError, match="AK name"):
        make_credential(EK_PUBLIC, name[:-1], b"s")
    with pytest.raises(TrustError, match="not a restricted decryption key"):
        make_credential(AK_PUBLIC, name, b"s")
    with pytest.raises(EvidenceError):
        make_credential(EK_PUBLIC + b"\0", name, b"s")


# --- the signed statement -----------------------------------------------------------

@pytest.fixture(scope="module")
def statement(ca) -> AkCertification:
    ek_cert = ek_certificate(ca, ek_key(EK_PUBLIC))
    return AkCertification(
        instance_id="i-0123456789ab", uuid="0f8fad5b-d9cb-469f-a165-70867728950e",
        ek_fingerprint=ek_fingerprint(ek_key(EK_PUBLIC)), ek_cert_sha256=ek_cert_sha256(ek_cert),
        ak_public=AK_PUBLIC, ak_name=ak_name(AK_PUBLIC), certified_at="2025-03-01T12:00:00.000+00:00",
    )


@pytest.fixture(scope="module")
def node_key() -> ec.EllipticCurvePrivateKey:
    return generate_key()


def test_a_signed_statement_verifies_and_round_trips(statement, node_key) -> None:
    signed = sign_ak_certification(statement, node_key)
    assert signed["format"] == "tvorch-ak-certification" and signed["method"] == "credential-activation"
    assert signed["ak_name"] == ak_name(AK_PUBLIC).hex()
    assert json.loads(json.dumps(signed)) == signed  # JSON-ready
    assert verify_ak_certification(signed, node_key.public_key()) == statement


@pytest.mark.parametrize(("field", "value"), [
    ("instance_id", "i-another"),
    ("uuid", "11111111-2222-3333-4444-555555555555"),
    ("ek_fingerprint", "0" * 64),
    ("ek_cert_sha256", "1" * 64),
    ("ak_public", base64.b64encode(HOST_AK_PUBLIC).decode()),
    ("ak_name", ak_name(HOST_AK_PUBLIC).hex()),
    ("certified_at", "2025-03-01T12:00:01.000+00:00"),
    ("method", "trust-on-first-use"),
    ("version", 2),
    ("format", "tvorch-vtpm-backup"),
])
def test_any_changed_field_is_refused(statement, node_key, field: str, value: object) -> None:
    signed = sign_ak_certification(statement, node_key)
    with pytest.raises(TrustError):
        verify_ak_certification({**signed, field: value}, node_key.public_key())


def test_another_signer_or_a_malformed_statement_is_refused(statement, node_key) -> None:
    signed = sign_ak_certification(statement, node_key)
    with pytest.raises(TrustError, match="does not verify with the node signing key"):
        verify_ak_certification(signed, generate_key().public_key())
    with pytest.raises(TrustError, match="does not verify"):
        verify_ak_certification({**signed, "signature": base64.b64encode(b"\x30\x00").decode()}, node_key.public_key())
    with pytest.raises(TrustError, match="not valid base64"):
        verify_ak_certification({**signed, "signature": "not base64!"}, node_key.public_key())
    with pytest.raises(TrustError, match="missing \\['uuid'\\], unknown \\['extra'\\]"):
        verify_ak_certification({**{k: v for k, v in signed.items() if k != "uuid"}, "extra": 1}, node_key.public_key())
    with pytest.raises(TrustError, match="'ak_name' is not a non-empty string"):
        verify_ak_certification({**signed, "ak_name": 7}, node_key.public_key())
    with pytest.raises(TrustError, match="not a JSON object"):
        verify_ak_certification([signed], node_key.public_key())


def test_the_node_refuses_to_sign_a_statement_that_could_not_verify(statement, node_key) -> None:
    for changes, match in [
        ({"ak_name": ak_name(HOST_AK_PUBLIC)}, "not the name of its ak_public"),
        ({"ak_public": with_attributes(AK_PUBLIC, clear=TPMA_OBJECT.FIXEDTPM)}, "lacks fixedTPM"),
        ({"method": "trust-on-first-use"}, "method"),
        ({"certified_at": "2025-03-01T13:00:00+01:00"}, "not a UTC"),
        ({"ek_fingerprint": "sha256:" + "0" * 64}, "ek_fingerprint"),
    ]:
        with pytest.raises(TrustError, match=match):
            sign_ak_certification(dataclasses.replace(statement, **changes), node_key)


# --- the host AK's certification ------------------------------------------------------

def host_statement(**changes) -> HostAkCertification:
    fields = dict(hostname="node1", ek_public=HOST_EK_PUBLIC, ak_public=HOST_AK_PUBLIC, ak_name=ak_name(HOST_AK_PUBLIC),
                  certified_at="2025-03-01T12:00:00.000+00:00")
    return HostAkCertification(**{**fields, **changes})


def test_a_host_ak_certification_round_trips_and_names_the_ek() -> None:
    key = generate_key()
    obj = sign_host_ak_certification(host_statement(), key)
    assert obj["format"] == "tvorch-host-ak-certification" and obj["hostname"] == "node1"
    cert = verify_host_ak_certification(json.loads(json.dumps(obj)), key.public_key())
    assert cert == host_statement()
    area, _ = TPM2B_PUBLIC.unmarshal(HOST_EK_PUBLIC)
    from cryptography.hazmat.primitives.serialization import load_der_public_key
    assert cert.ek_fingerprint == ek_fingerprint(load_der_public_key(area.publicArea.to_der()))  # type: ignore[arg-type]
    with pytest.raises(TrustError, match="signature does not verify"):
        verify_host_ak_certification({**obj, "hostname": "node2"}, key.public_key())
    with pytest.raises(TrustError, match="not a tvorch-host-ak-certification"):  # a guest's, under the host's fields
        verify_host_ak_certification({**obj, "format": "tvorch-ak-certification"}, key.public_key())
    with pytest.raises(TrustError, match="host AK certification fields wrong"):
        verify_host_ak_certification(sign_ak_certification(AkCertification(
            instance_id="i-1", uuid="u", ek_fingerprint="a" * 64, ek_cert_sha256="b" * 64, ak_public=HOST_AK_PUBLIC,
            ak_name=ak_name(HOST_AK_PUBLIC), certified_at="2025-03-01T12:00:00.000+00:00"), key), key.public_key())


@pytest.mark.parametrize(("changes", "message"), [
    (dict(ek_public=HOST_AK_PUBLIC), "the EK is not a restricted decryption key"),
    (dict(ak_public=with_attributes(HOST_AK_PUBLIC, clear=TPMA_OBJECT.FIXEDTPM)), "names an unusable AK"),
    (dict(ak_name=ak_name(AK_PUBLIC)), "ak_name is not the name of its ak_public"),
    (dict(certified_at="yesterday"), "not a UTC ISO-8601 time"),
    (dict(hostname=""), "names no host"),
])
def test_a_host_ak_certification_that_cannot_hold_is_not_signed(changes, message) -> None:
    with pytest.raises(TrustError, match=message):
        sign_host_ak_certification(host_statement(**changes), generate_key())
