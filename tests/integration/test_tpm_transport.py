"""The transport key that carries a vTPM state key between nodes, against two real swtpms as two nodes' TPMs.

TPM 1 is the destination that makes and certifies a transport key; TPM 2 is
another node with its own AK and transport key. Wrapping is done in software
(what the source node does), decrypting in the TPM. No libvirt, no guest:
these use their own swtpm processes, not the integration lock.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RC, TPM2_SE, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_PUBLIC, TPMT_SIG_SCHEME, TPMT_SYM_DEF

from tests.integration.test_tpm_seal import leftovers, recorded
from tests.tpm_fixtures import running_swtpm
from tvorch.adapters.tpm import AkInfo, open_tpm
from tvorch.core.attestation.quote import parse_attest
from tvorch.core.migration.transport import (
    TRANSPORT_ATTRIBUTES,
    TRANSPORT_LABEL,
    TransportKey,
    check_transport_public,
    verify_key_certification,
    wrap_for_transport,
)
from tvorch.errors import ExitCode, InputError, TpmError, TrustError

pytestmark = pytest.mark.integration

NONCE = bytes.fromhex("5e1f") * 16


@dataclass(frozen=True)
class Node:
    tcti: str
    ak: AkInfo
    key: TransportKey


@dataclass(frozen=True)
class Nodes:
    one: Node
    two: Node


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    """Two TPMs, each with its AK and one transport key; the keys only read from here on."""
    base = tmp_path_factory.mktemp("transport")
    with running_swtpm(base / "tpm-1") as one, running_swtpm(base / "tpm-2") as two:
        made = []
        for tcti, name in ((one, "one"), (two, "two")):
            with open_tpm(tcti) as tpm:
                made.append(Node(tcti, tpm.create_ak(base / f"state-{name}"), tpm.create_transport_key()))
        yield Nodes(*made)


def certified(node: Node, nonce: bytes = NONCE) -> tuple[bytes, bytes]:
    with open_tpm(node.tcti) as tpm:
        return tpm.certify_key(node.ak, node.key, nonce)


def decrypt(node: Node, ciphertext: bytes, key: TransportKey | None = None) -> bytes:
    with open_tpm(node.tcti) as tpm:
        return tpm.decrypt_transport(key or node.key, ciphertext, TRANSPORT_LABEL)


def one_line(err: pytest.ExceptionInfo[TpmError]) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_a_secret_round_trips_through_a_certified_transport_key_leaving_nothing_loaded(nodes: Nodes) -> None:
    secret = secrets.token_bytes(32)
    attest, signature = certified(nodes.one)
    assert leftovers(nodes.one.tcti) == ([], [])  # the key, SRK, EK and AK all flushed
    public_key = verify_key_certification(nodes.one.ak.public, nodes.one.key.public, attest, signature, NONCE)
    ciphertext = wrap_for_transport(public_key, secret)
    assert decrypt(nodes.one, ciphertext) == secret
    assert leftovers(nodes.one.tcti) == ([], [])
    # What the TPM made is what was asked for: RSA 2048, these attributes, OAEP-SHA256.
    area = TPM2B_PUBLIC.unmarshal(nodes.one.key.public)[0].publicArea
    assert int(area.objectAttributes) == int(TRANSPORT_ATTRIBUTES)
    assert check_transport_public(nodes.one.key.public).key_size == 2048
    assert bytes(parse_attest(attest).attested.certify.name) == bytes(TPM2B_PUBLIC.unmarshal(nodes.one.key.public)[0]
                                                                      .get_name())


def test_a_nonce_or_label_the_tpm_cannot_take_is_refused_before_the_tpm(nodes: Nodes) -> None:
    ciphertext = wrap_for_transport(check_transport_public(nodes.one.key.public), secrets.token_bytes(32))
    with open_tpm(nodes.one.tcti) as tpm:
        for nonce in (b"", bytes(65)):
            with pytest.raises(InputError, match=f"nonce of 1 to 64 bytes, not {len(nonce)}"):
                tpm.certify_key(nodes.one.ak, nodes.one.key, nonce)
        attest, _ = tpm.certify_key(nodes.one.ak, nodes.one.key, bytes(64))
        assert bytes(parse_attest(attest).extraData) == bytes(64)
        for label in (b"", bytes(65)):
            with pytest.raises(InputError, match="label for the TPM is 1 to 64 bytes ending in a NUL"):
                tpm.decrypt_transport(nodes.one.key, ciphertext, label)
    assert leftovers(nodes.one.tcti) == ([], [])


def test_the_tpm_and_software_agree_on_the_nul_terminated_label(nodes: Nodes) -> None:
    """The TPM hashes the label with its NUL into the padding: without the NUL software makes another one."""
    assert TRANSPORT_LABEL.endswith(b"\0")
    key = check_transport_public(nodes.one.key.public)
    secret = secrets.token_bytes(32)
    without_nul = key.encrypt(secret, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), TRANSPORT_LABEL[:-1]))
    with pytest.raises(TpmError, match="refused the ciphertext"):
        decrypt(nodes.one, without_nul)
    with open_tpm(nodes.one.tcti) as tpm, pytest.raises(InputError, match="ending in a NUL byte"):
        tpm.decrypt_transport(nodes.one.key, wrap_for_transport(key, secret), TRANSPORT_LABEL[:-1])


def test_a_key_certified_by_one_tpms_ak_does_not_verify_against_another_ak(nodes: Nodes) -> None:
    attest, signature = certified(nodes.one)
    with pytest.raises(TrustError, match="key certification signature does not verify with the AK"):
        verify_key_certification(nodes.two.ak.public, nodes.one.key.public, attest, signature, NONCE)
    # Nor does TPM 2's own key pass as the one TPM 1 certified.
    with pytest.raises(TrustError, match="names another key"):
        verify_key_certification(nodes.one.ak.public, nodes.two.key.public, attest, signature, NONCE)


def test_a_certification_over_another_nonce_is_refused(nodes: Nodes) -> None:
    attest, signature = certified(nodes.one, b"an older nonce")
    with pytest.raises(TrustError, match="another nonce"):
        verify_key_certification(nodes.one.ak.public, nodes.one.key.public, attest, signature, NONCE)


def test_a_secret_wrapped_to_tpm_1_does_not_decrypt_in_tpm_2(nodes: Nodes) -> None:
    ciphertext = wrap_for_transport(check_transport_public(nodes.one.key.public), secrets.token_bytes(32))
    with pytest.raises(TpmError, match="refused the ciphertext") as err:
        decrypt(nodes.two, ciphertext)
    assert err.value.exit_code == ExitCode.TPM
    one_line(err)
    assert leftovers(nodes.two.tcti) == ([], [])


def test_the_transport_private_blob_does_not_load_on_another_tpm(nodes: Nodes) -> None:
    ciphertext = wrap_for_transport(check_transport_public(nodes.one.key.public), secrets.token_bytes(32))
    with pytest.raises(TpmError, match="does not load under this TPM's storage root key") as err:
        decrypt(nodes.two, ciphertext, key=nodes.one.key)
    one_line(err)
    with open_tpm(nodes.two.tcti) as tpm, pytest.raises(TpmError, match="does not load under this TPM's"):
        tpm.certify_key(nodes.two.ak, nodes.one.key, NONCE)
    assert leftovers(nodes.two.tcti) == ([], [])


def test_a_tampered_ciphertext_fails_cleanly_and_the_tpm_stays_usable(nodes: Nodes) -> None:
    secret = secrets.token_bytes(32)
    ciphertext = bytearray(wrap_for_transport(check_transport_public(nodes.one.key.public), secret))
    ciphertext[100] ^= 0x01
    with pytest.raises(TpmError, match="refused the ciphertext") as err:
        decrypt(nodes.one, bytes(ciphertext))
    one_line(err)
    with open_tpm(nodes.one.tcti) as tpm, pytest.raises(InputError, match="256 bytes, not 255"):
        tpm.decrypt_transport(nodes.one.key, bytes(ciphertext[:-1]), TRANSPORT_LABEL)
    ciphertext[100] ^= 0x01
    assert decrypt(nodes.one, bytes(ciphertext)) == secret
    assert leftovers(nodes.one.tcti) == ([], [])


def test_the_secret_never_crosses_the_bus_in_clear(nodes: Nodes) -> None:
    secret = secrets.token_bytes(32)
    ciphertext = wrap_for_transport(check_transport_public(nodes.one.key.public), secret)
    with recorded(nodes.one.tcti) as wire:
        with open_tpm(wire.tcti) as tpm:
            assert tpm.decrypt_transport(nodes.one.key, ciphertext, TRANSPORT_LABEL) == secret
        assert secret[:8] not in wire.traffic


def test_the_tpm_does_not_certify_a_public_key_loaded_from_outside(nodes: Nodes) -> None:
    """Why a certified fixedTPM attribute is worth trusting: TPM2_LoadExternal takes a public area with fixedTPM
    set (the private key in software), but no session can authorize a public-only object, not even through an
    admin policy anyone can satisfy, so the AK never certifies it."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    public = TPM2B_PUBLIC.from_pem(
        pem, objectAttributes=TRANSPORT_ATTRIBUTES | TPMA_OBJECT.ADMINWITHPOLICY, nameAlg=TPM2_ALG.SHA256
    )
    public.publicArea.authPolicy = bytes(32)  # the digest of a policy session with no assertion
    public.publicArea.parameters.rsaDetail.scheme.scheme = TPM2_ALG.OAEP
    public.publicArea.parameters.rsaDetail.scheme.details.anySig.hashAlg = TPM2_ALG.SHA256
    check_transport_public(public.marshal())  # every attribute looks right
    with open_tpm(nodes.one.tcti) as tpm:
        esapi = tpm._esapi
        with ExitStack() as stack:
            handle = esapi.load_external(public, None, ESYS_TR.OWNER)
            stack.callback(esapi.flush_context, handle)
            # A password is not taken where the admin role needs a policy; the policy is not available.
            for session, refusal in ((ESYS_TR.PASSWORD, TPM2_RC.AUTH_TYPE),
                                     (_empty_policy(esapi, stack), TPM2_RC.AUTH_UNAVAILABLE)):
                with tpm._loaded_ak(nodes.one.ak) as signer, pytest.raises(TSS2_Exception) as err:
                    esapi.certify(handle, signer, NONCE, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                                  session1=session, session2=ESYS_TR.PASSWORD)
                assert err.value.error == refusal
    assert leftovers(nodes.one.tcti) == ([], [])


def _empty_policy(esapi: ESAPI, stack: ExitStack) -> ESYS_TR:
    session = esapi.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256
    )
    stack.callback(esapi.flush_context, session)
    return session
