"""The host TPM through tpm2-pytss's ESAPI: attestation key, quotes, PCRs.

The only module that opens a TPM session. It imports tpm2-pytss (0.1-0.3 s),
so nothing on the hook's path may import it.

The attestation key (AK) is what tpm2-tools' ``tpm2_createak`` and Keylime
make: a restricted signing key whose parent is the endorsement key (EK), so it
can later be bound to the EK by MakeCredential/ActivateCredential. The EK is
the TCG EK Credential Profile's ECC P-256 primary (``create_ek_template`` also
honours a template or nonce the manufacturer put in NV, so it matches an EK
certificate). Creating and loading under the EK needs a PolicySecret session
on the endorsement hierarchy, whose auth is taken to be empty (the default).

The AK is ECC NIST P-256 with ECDSA-SHA256: the PC Client profile requires
the curve, so every TPM 2.0 has it; key generation takes milliseconds (RSA
2048 can take seconds on a discrete TPM); signatures are 64 bytes; and
``tpm2_checkquote`` takes its PEM.

The AK lives in ``<state_dir>/host/`` as ``ak.pub`` (TPM2B_PUBLIC) and
``ak.priv`` (TPM2B_PRIVATE, sealed to the EK: useless off this TPM), 0600,
the same bytes ``tpm2_createak -u/-r`` writes. Each use re-derives the EK
(primaries are deterministic from their template) and loads the AK under it.
Not a ContextSave blob: a saved object context is lost at every TPM reset
(reboot) and with its parent's transient instance. Not EvictControl: that
needs owner auth, spends scarce NV and competes for persistent handles with
other agents on the host.

Secrets (a vTPM's state key) are sealed to the host TPM: ``Tpm.seal`` makes
a KEYEDHASH data object under the storage root key (SRK) whose only
authorization is a TPM2_PolicyPCR over the PCRs' current values
(``tvorch.core.vtpm.sealed`` holds the blob format and the policy arithmetic), and
``Tpm.unseal`` returns the secret only while those PCRs still hold those
values. The SRK is the TCG Provisioning Guidance ECC NIST P-256 storage
template, derived anew from the owner hierarchy at each call (deterministic,
like the EK) and flushed after it; the owner hierarchy's auth is taken to be
empty (the default). The secret crosses the bus encrypted both ways: the
TPM2_Create and TPM2_Unseal sessions are salted with the SRK and encrypt the
first parameter (AES-128-CFB). That defeats a passive listener on the bus;
an active interposer could answer TPM2_CreatePrimary with its own key, which
only a pinned SRK name would catch (not done).

A vTPM key moves to another node through a transport key
(``tvorch.core.migration.transport``): ``create_transport_key`` makes a
decrypt-only RSA-OAEP-SHA256 key under the SRK, ``certify_key`` has the AK
certify it over the source's nonce, and ``decrypt_transport`` unwraps what the
source wrapped to it, the plaintext coming back over a salted session that
encrypts it. The key is never persisted here: the caller holds its blobs for
one migration, and they load only under this TPM's SRK.

Transient objects and sessions are flushed after every call: without a
resource manager (swtpm, or ``device:/dev/tpm0``) they would otherwise stay
in the TPM's few object slots.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_HC,
    TPM2_RC,
    TPM2_SE,
    TPMA_OBJECT,
    TPMA_SESSION,
)
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMT_RSA_DECRYPT,
    TPMT_SIG_SCHEME,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_SENSITIVE_CREATE,
    TPMT_HA,
    TPMT_PUBLIC,
    TPMT_SYM_DEF,
    TPMU_HA,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)
from tpm2_pytss.utils import NoSuchIndex, NVReadEK, create_ek_template

from tvorch.adapters.files import atomic_write, ensure_private_dir
from tvorch.core.attestation.quote import (
    BANKS,
    pcr_indices,
    ak_fingerprint,
    ak_name,
    ak_pem,
    digest_size,
    parse_attest,
    pcr_composite_digest,
    selected_pcrs,
    signature_hash_name,
)
from tvorch.core.migration.transport import TRANSPORT_ATTRIBUTES, TRANSPORT_RSA_BITS, TransportKey
from tvorch.core.vtpm.sealed import MAX_SECRET_SIZE, SealedKey, policy_pcr_digest
from tvorch.errors import InputError, TpmError

HOST_DIR = "host"
AK_PUB = "ak.pub"
AK_PRIV = "ak.priv"
_LOCK = ".lock"
_EK_TYPE = "EK-ECC256"
_AK_ATTRIBUTES = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
)
# A PCR may be extended between the Quote and the PCR_Read after it (IMA
# extends PCR 10 whenever a new file is measured); quote again a few times.
_QUOTE_ATTEMPTS = 3
# The TCG storage root key: TPM v2.0 Provisioning Guidance 7.5.1 (the EK
# Credential Profile's ECC NIST P-256 template with the SRK's attributes:
# userWithAuth, noDA, no policy), unique x and y 32 zero bytes each.
_SRK_ATTRIBUTES = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.NODA
)
# A sealed data object: no userWithAuth, so only its policy can unseal it.
_SEALED_ATTRIBUTES = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
# PCRs may change between the PCR_Read and the trial PolicyPCR that checks it.
_POLICY_ATTEMPTS = 3
# Most bytes a TPM2B_DATA (nonce, OAEP label) holds in tpm2-tss: a SHA-512 digest.
_MAX_DATA = 64


class SealedKeyLocked(TpmError):
    """The sealed key's PCR policy no longer holds: the host booted something else since sealing."""


@dataclass(frozen=True)
class AkInfo:
    """The host's attestation key: its public parts, and the private blob only this TPM can load."""

    public: bytes  # marshaled TPM2B_PUBLIC
    pem: bytes  # SubjectPublicKeyInfo PEM
    name: bytes  # TPM name: nameAlg || H(TPMT_PUBLIC)
    fingerprint: str  # "sha256:" + hex of the SubjectPublicKeyInfo DER
    private: bytes = field(repr=False)  # marshaled TPM2B_PRIVATE, wrapped by the EK


@dataclass(frozen=True)
class RawQuote:
    """A quote as the TPM returned it, with the PCR values read right after it."""

    attest: bytes  # marshaled TPMS_ATTEST (the contents of TPM2B_ATTEST)
    signature: bytes  # marshaled TPMT_SIGNATURE
    pcr_values: dict[int, bytes]
    bank: str


def ak_info(public: bytes, private: bytes) -> AkInfo:
    """AkInfo from the two marshaled blobs, deriving the PEM, name and fingerprint."""
    return AkInfo(
        public=public,
        pem=ak_pem(public),
        name=ak_name(public),
        fingerprint=ak_fingerprint(public),
        private=private,
    )


def read_ak(state_dir: Path) -> AkInfo | None:
    """The AK kept in STATE_DIR/host, without touching the TPM; None if there is none yet."""
    host = state_dir / HOST_DIR
    try:
        public = (host / AK_PUB).read_bytes()
    except FileNotFoundError:
        return None
    try:
        private = (host / AK_PRIV).read_bytes()
    except FileNotFoundError:
        raise TpmError(f"{host / AK_PUB} exists without {AK_PRIV}: remove it to make a new AK") from None
    return ak_info(public, private)


@contextmanager
def open_tpm(tcti: str) -> Iterator[Tpm]:
    """An ESAPI session on the TPM named by TCTI (``device:/dev/tpmrm0``, ``swtpm:host=H,port=N``).

    One session at a time in this process (the daemon starts instances in
    parallel): without a resource manager (a swtpm, /dev/tpm0) the sessions'
    transient objects share the TPM's three object slots, and a second
    unseal fails with TPM_RC_OBJECT_MEMORY.
    """
    # tpm2-tss logs every TPM error to stderr itself; tvorch reports them as
    # one TpmError line instead. An operator's own TSS2_LOG still wins.
    os.environ.setdefault("TSS2_LOG", "all+none")
    with _ONE_SESSION:
        try:
            esapi = ESAPI(tcti)
        except TSS2_Exception as err:
            raise TpmError(f"cannot open the TPM at {tcti!r}: {err}", err.rc) from None
        try:
            yield Tpm(esapi)
        finally:
            esapi.close()


_ONE_SESSION = threading.RLock()  # re-entrant: a nested session in one thread must not deadlock


class Tpm:
    """One open TPM: make and use the attestation key, read and extend PCRs, seal and unseal secrets."""

    def __init__(self, esapi: ESAPI) -> None:
        self._esapi = esapi

    def create_ak(self, state_dir: Path) -> AkInfo:
        """The host's AK, made and saved on first use; an existing one is checked to load here."""
        ensure_private_dir(state_dir)
        host = state_dir / HOST_DIR
        ensure_private_dir(host)
        with _locked(host / _LOCK):
            existing = read_ak(state_dir)
            if existing is not None:
                with self._loaded_ak(existing):  # still this TPM's AK
                    return existing
            template = TPM2B_PUBLIC.parse(
                "ecc256:ecdsa-sha256:null", objectAttributes=_AK_ATTRIBUTES, nameAlg="sha256"
            )
            with ExitStack() as stack:
                ek = self._ek(stack)
                session = self._endorsement_policy(stack)
                with _tss("TPM2_Create of the AK"):
                    private, public, *_ = self._esapi.create(ek, None, template, session1=session)
            ak = ak_info(public.marshal(), private.marshal())
            # ak.pub is written last: its presence means the pair is complete.
            atomic_write(host / AK_PRIV, ak.private)
            atomic_write(host / AK_PUB, ak.public)
            return ak

    def quote(self, ak: AkInfo, nonce: bytes, pcrs: Sequence[int], bank: str = "sha256") -> RawQuote:
        """Quote PCRS of BANK with AK over NONCE, and read those PCRs right after.

        PCR_Read is a second command, so a PCR extended in between makes the
        values newer than the quote; the quote's digest is what counts (the
        verifier refuses values that do not hash to it), so quote again until
        the values match it.
        """
        wanted = pcr_indices(pcrs)
        selection = _selection(wanted, bank)
        with self._loaded_ak(ak) as handle:
            for _ in range(_QUOTE_ATTEMPTS):
                with _tss("TPM2_Quote"):
                    attest, sig = self._esapi.quote(handle, selection, nonce)
                raw = RawQuote(bytes(attest), sig.marshal(), self.read_pcrs(wanted, bank), bank)
                quoted = bytes(parse_attest(raw.attest).attested.quote.pcrDigest)
                if pcr_composite_digest(raw.pcr_values, signature_hash_name(raw.signature)) == quoted:
                    return raw
        raise TpmError(f"{bank} PCRs {wanted} changed between each of {_QUOTE_ATTEMPTS} quotes and the read after it")

    def read_pcrs(self, pcrs: Sequence[int], bank: str = "sha256") -> dict[int, bytes]:
        """Current values of PCRS in BANK (the TPM returns at most 8 per read: read until all came)."""
        remaining = pcr_indices(pcrs)
        values: dict[int, bytes] = {}
        while remaining:
            with _tss("TPM2_PCR_Read"):
                _, read, digests = self._esapi.pcr_read(_selection(remaining, bank))
            got = selected_pcrs(read).get(bank, ())
            if not got:
                raise TpmError(f"the TPM returned no {bank} PCRs for {remaining}: is the {bank} bank allocated?")
            values.update(zip(got, (bytes(d) for d in digests)))
            remaining = [i for i in remaining if i not in values]
        return values

    def extend(self, pcr: int, digest_by_bank: Mapping[str, bytes]) -> None:
        """Extend PCR with one digest per bank (what a measuring boot component does)."""
        pcr_indices([pcr])
        entries = []
        for bank, digest in digest_by_bank.items():
            if len(digest) != digest_size(bank):
                raise InputError(f"a {bank} digest has {digest_size(bank)} bytes, not {len(digest)}")
            entries.append(TPMT_HA(hashAlg=BANKS[bank], digest=TPMU_HA(**{bank: digest})))
        with _tss(f"TPM2_PCR_Extend of PCR {pcr}"):
            self._esapi.pcr_extend(ESYS_TR(ESYS_TR.PCR0 + pcr), TPML_DIGEST_VALUES(entries))

    def seal(self, secret: bytes, pcrs: Sequence[int], bank: str = "sha256") -> SealedKey:
        """SECRET sealed to this TPM's SRK, unsealable only while PCRS of BANK hold their current values.

        The policy digest is computed from the values read (``policy_pcr_digest``)
        and checked against a trial PolicyPCR on the TPM's own values; read
        again if a PCR was extended in between. A PCR extended after that
        check but before TPM2_Create leaves a key sealed to the older values:
        ``unseal`` then raises ``SealedKeyLocked``.
        """
        if not secret:
            raise InputError("nothing to seal: the secret is empty")
        if len(secret) > MAX_SECRET_SIZE:
            raise InputError(f"a sealed secret holds at most {MAX_SECRET_SIZE} bytes, not {len(secret)}")
        wanted = pcr_indices(pcrs)
        selection = _selection(wanted, bank)
        digest = self._pcr_policy_digest(wanted, bank, selection)
        template = TPM2B_PUBLIC(
            TPMT_PUBLIC(
                type=TPM2_ALG.KEYEDHASH,
                nameAlg=TPM2_ALG.SHA256,
                objectAttributes=_SEALED_ATTRIBUTES,
                authPolicy=digest,
            )
        )
        template.publicArea.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.NULL
        sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(data=secret))
        with ExitStack() as stack:
            srk = self._srk(stack)
            session = self._salted_session(stack, srk, TPM2_SE.HMAC, TPMA_SESSION.DECRYPT)
            with _tss("TPM2_Create of the sealed key"):
                private, public, *_ = self._esapi.create(srk, sensitive, template, session1=session)
        return SealedKey(
            bank=bank, pcrs=tuple(wanted), public=public.marshal(), private=private.marshal(), policy_digest=digest
        )

    def unseal(self, sealed: SealedKey) -> bytes:
        """The secret in SEALED, if it was sealed on this TPM and its PCRs hold the values sealed to.

        ``SealedKeyLocked`` when they do not; a ``TpmError`` saying so when the
        blob was made on another TPM (or this TPM's owner seed was cleared).
        """
        public, private = _read_blobs(sealed.public, sealed.private, "sealed key")
        if bytes(public.publicArea.authPolicy) != sealed.policy_digest:
            raise InputError("the sealed key's policy digest is not the authPolicy of its public area")
        selection = _selection(pcr_indices(sealed.pcrs), sealed.bank)
        pcr_text = ",".join(map(str, sealed.pcrs))
        with ExitStack() as stack:
            srk = self._srk(stack)
            handle = self._load_under_srk(
                stack, srk, public, private, "sealed key",
                "sealed on another TPM (or this TPM's owner hierarchy was cleared since, or the blob was "
                "altered): the sealed key does not load under this TPM's storage root key",
            )
            session = self._salted_session(stack, srk, TPM2_SE.POLICY, TPMA_SESSION.ENCRYPT)
            with _tss(f"TPM2_PolicyPCR on {sealed.bank} PCRs {pcr_text}"):
                self._esapi.policy_pcr(session, b"", selection)
            try:
                data = self._esapi.unseal(handle, session1=session)
            except TSS2_Exception as err:
                if err.error == TPM2_RC.POLICY_FAIL:
                    raise SealedKeyLocked(
                        "the host's boot state changed since the key was sealed: "
                        f"{sealed.bank} PCRs {pcr_text} no longer match", err.rc,
                    ) from None
                raise TpmError(f"TPM2_Unseal failed: {err}", err.rc) from None
        return bytes(data)

    def create_transport_key(self) -> TransportKey:
        """A new RSA 2048 decrypt-only key under the SRK, OAEP-SHA256 its only scheme; its blobs, not persisted."""
        template = TPM2B_PUBLIC.parse(
            f"rsa{TRANSPORT_RSA_BITS}:oaep-sha256:null", objectAttributes=TRANSPORT_ATTRIBUTES, nameAlg="sha256"
        )
        with ExitStack() as stack:
            srk = self._srk(stack)
            with _tss("TPM2_Create of the transport key"):
                private, public, *_ = self._esapi.create(srk, None, template)
        return TransportKey(public=public.marshal(), private=private.marshal())

    def certify_key(self, ak: AkInfo, key: TransportKey, qualifying: bytes) -> tuple[bytes, bytes]:
        """TPM2_Certify of KEY by AK over QUALIFYING: (marshaled TPMS_ATTEST, marshaled TPMT_SIGNATURE).

        The encodings of ``RawQuote``; ``verify_key_certification`` checks them.
        Three objects at most are loaded at once: the key goes in under the
        SRK, the SRK is flushed, then the EK and the AK under it."""
        if not 0 < len(qualifying) <= _MAX_DATA:
            raise InputError(f"a key certification is over a nonce of 1 to {_MAX_DATA} bytes, not {len(qualifying)}")
        public, private = _read_blobs(key.public, key.private, "transport key")
        with ExitStack() as stack:
            with ExitStack() as srk_scope:
                handle = self._load_transport(stack, self._srk(srk_scope), public, private)
            signer = self._load_ak(stack, self._ek(stack), ak)
            with _tss("TPM2_Certify of the transport key"):
                attest, signature = self._esapi.certify(
                    handle, signer, qualifying, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                    session1=ESYS_TR.PASSWORD, session2=ESYS_TR.PASSWORD,
                )
        return bytes(attest), signature.marshal()

    def decrypt_transport(self, key: TransportKey, ciphertext: bytes, label: bytes) -> bytes:
        """The secret wrapped to KEY (RSA-OAEP-SHA256 with LABEL), decrypted in this TPM.

        The response is encrypted on the bus by a session salted with the SRK.
        A TpmError when the ciphertext was made for another key or label, or
        altered, and when KEY was made on another TPM."""
        if not label.endswith(b"\0") or len(label) > _MAX_DATA:
            raise InputError(f"an OAEP label for the TPM is 1 to {_MAX_DATA} bytes ending in a NUL byte")
        public, private = _read_blobs(key.public, key.private, "transport key")
        size = int(public.publicArea.parameters.rsaDetail.keyBits) // 8
        if len(ciphertext) != size:
            raise InputError(f"a ciphertext for this transport key is {size} bytes, not {len(ciphertext)}")
        scheme = TPMT_RSA_DECRYPT(scheme=TPM2_ALG.OAEP)
        scheme.details.oaep.hashAlg = TPM2_ALG.SHA256
        with ExitStack() as stack:
            srk = self._srk(stack)
            handle = self._load_transport(stack, srk, public, private)
            session = self._salted_session(stack, srk, TPM2_SE.HMAC, TPMA_SESSION.ENCRYPT)
            try:
                plain = self._esapi.rsa_decrypt(handle, ciphertext, scheme, label, session1=session)
            except TSS2_Exception as err:
                # libtpms answers a padding or label mismatch with TPM_RC_FAILURE (and stays usable).
                if err.error in (TPM2_RC.VALUE, TPM2_RC.FAILURE):
                    raise TpmError(
                        "TPM2_RSA_Decrypt refused the ciphertext: it was not wrapped to this transport key "
                        "with this label, or it was altered", err.rc,
                    ) from None
                raise TpmError(f"TPM2_RSA_Decrypt of the transport ciphertext failed: {err}", err.rc) from None
        return bytes(plain)

    def _load_transport(self, stack: ExitStack, srk: ESYS_TR, public: TPM2B_PUBLIC, private: TPM2B_PRIVATE) -> ESYS_TR:
        """A transport key loaded under SRK, flushed when STACK closes."""
        return self._load_under_srk(
            stack, srk, public, private, "transport key",
            "the transport key does not load under this TPM's storage root key (made on another TPM, or "
            "altered)",
        )

    def _load_under_srk(
        self, stack: ExitStack, srk: ESYS_TR, public: TPM2B_PUBLIC, private: TPM2B_PRIVATE, what: str, foreign: str
    ) -> ESYS_TR:
        """WHAT loaded under SRK, flushed when STACK closes; TpmError FOREIGN when its private blob was not
        wrapped by this SRK (made on another TPM, the owner hierarchy cleared since, or altered)."""
        try:
            handle = self._esapi.load(srk, private, public)
        except TSS2_Exception as err:
            if err.error == TPM2_RC.INTEGRITY:
                raise TpmError(foreign, err.rc) from None
            raise TpmError(f"TPM2_Load of the {what} failed: {err}", err.rc) from None
        stack.callback(self._flush, handle)
        return handle

    def _pcr_policy_digest(self, pcrs: list[int], bank: str, selection: TPML_PCR_SELECTION) -> bytes:
        """The PolicyPCR digest of PCRS' current values, computed here and confirmed by a trial session."""
        for _ in range(_POLICY_ATTEMPTS):
            digest = policy_pcr_digest(self.read_pcrs(pcrs, bank), bank)
            with ExitStack() as stack:
                with _tss("starting a trial policy session"):
                    trial = self._esapi.start_auth_session(
                        ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.TRIAL, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                        TPM2_ALG.SHA256,
                    )
                stack.callback(self._flush, trial)
                with _tss("TPM2_PolicyPCR in a trial session"):
                    self._esapi.policy_pcr(trial, b"", selection)
                with _tss("TPM2_PolicyGetDigest"):
                    computed = bytes(self._esapi.policy_get_digest(trial))
            if computed == digest:
                return digest
        raise TpmError(f"{bank} PCRs {pcrs} changed between each of {_POLICY_ATTEMPTS} reads and the policy after it")

    def _srk(self, stack: ExitStack) -> ESYS_TR:
        """The storage root key, derived anew from the owner hierarchy (empty auth), flushed when STACK closes."""
        template = TPM2B_PUBLIC.parse("ecc256:aes128cfb", objectAttributes=_SRK_ATTRIBUTES, nameAlg="sha256")
        template.publicArea.unique.ecc.x = bytes(32)
        template.publicArea.unique.ecc.y = bytes(32)
        try:
            srk, *_ = self._esapi.create_primary(None, template, ESYS_TR.OWNER)
        except TSS2_Exception as err:
            if err.error in (TPM2_RC.BAD_AUTH, TPM2_RC.AUTH_FAIL):
                raise TpmError(
                    "the TPM's owner hierarchy has an authorization value; tvorch derives its storage root key "
                    "with the default empty owner auth", err.rc,
                ) from None
            raise TpmError(f"TPM2_CreatePrimary of the storage root key failed: {err}", err.rc) from None
        stack.callback(self._flush, srk)
        return srk

    def _salted_session(self, stack: ExitStack, srk: ESYS_TR, kind: TPM2_SE, crypt: TPMA_SESSION) -> ESYS_TR:
        """A session salted with SRK that encrypts the first parameter (AES-128-CFB) in the CRYPT direction."""
        aes = TPMT_SYM_DEF(
            algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=128), mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB)
        )
        with _tss("starting a session salted with the storage root key"):
            session = self._esapi.start_auth_session(srk, ESYS_TR.NONE, kind, aes, TPM2_ALG.SHA256)
        stack.callback(self._flush, session)
        with _tss("setting the session attributes"):
            self._esapi.trsess_set_attributes(session, crypt | TPMA_SESSION.CONTINUESESSION)
        return session

    def ek_public(self) -> bytes:
        """The EK's TPM2B_PUBLIC, marshaled, as this TPM derives it from its EK template."""
        with ExitStack() as stack:
            _, public = self._ek_and_public(stack)
        return public

    def activate_credential(self, ak: AkInfo, id_object: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential: the secret of a credential made for this TPM's EK and AK's name.

        The TPM releases it only if it holds that EK and the named key is
        loaded in it: that is what proves the AK lives here."""
        with _tss("reading the credential"):
            blob, _ = TPM2B_ID_OBJECT.unmarshal(id_object)
            secret, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
        with ExitStack() as stack:
            ek = self._ek(stack)
            handle = self._load_ak(stack, ek, ak)
            session = self._endorsement_policy(stack)
            with _tss("TPM2_ActivateCredential"):
                return bytes(self._esapi.activate_credential(handle, ek, blob, secret, session2=session))

    @contextmanager
    def _loaded_ak(self, ak: AkInfo) -> Iterator[ESYS_TR]:
        """AK loaded under a freshly derived EK; both flushed on exit."""
        with ExitStack() as stack:
            yield self._load_ak(stack, self._ek(stack), ak)

    def _load_ak(self, stack: ExitStack, ek: ESYS_TR, ak: AkInfo) -> ESYS_TR:
        """AK loaded under EK, flushed when STACK closes."""
        with _tss("reading the AK blobs"):
            public, _ = TPM2B_PUBLIC.unmarshal(ak.public)
            private, _ = TPM2B_PRIVATE.unmarshal(ak.private)
        session = self._endorsement_policy(stack)
        try:
            handle = self._esapi.load(ek, private, public, session1=session)
        except TSS2_Exception as err:
            if err.error == TPM2_RC.INTEGRITY:  # the blob was not wrapped by this TPM's EK
                raise TpmError(
                    "the AK does not load under this TPM's EK (made on another TPM, or the endorsement "
                    f"seed changed); remove {HOST_DIR}/{AK_PUB} and {AK_PRIV} in the state directory "
                    "to make a new one", err.rc,
                ) from None
            raise TpmError(f"TPM2_Load of the AK failed: {err}", err.rc) from None
        stack.callback(self._flush, handle)
        return handle

    def _ek(self, stack: ExitStack) -> ESYS_TR:
        """The EK, derived anew from its template, flushed when STACK closes."""
        return self._ek_and_public(stack)[0]

    def _ek_and_public(self, stack: ExitStack) -> tuple[ESYS_TR, bytes]:
        with _tss("reading the EK template"):
            _, template = create_ek_template(_EK_TYPE, self._nv_reader())
        with _tss("TPM2_CreatePrimary of the EK"):
            ek, public, *_ = self._esapi.create_primary(None, template, ESYS_TR.ENDORSEMENT)
        stack.callback(self._flush, ek)
        return ek, public.marshal()

    def _nv_reader(self) -> Callable[[int], bytes]:
        """NVReadEK that looks up defined indices first: reading a missing one makes the TSS log errors."""
        defined: set[int] = set()
        more = True
        first = TPM2_HC.NV_INDEX_FIRST
        while more:
            with _tss("listing NV indices"):
                more, data = self._esapi.get_capability(TPM2_CAP.HANDLES, first, 256)
            handles = [int(h) for h in data.data.handles]
            defined.update(handles)
            more = bool(more) and bool(handles)
            first = max(handles, default=first) + 1

        def read(index: int) -> bytes:
            if int(index) not in defined:
                raise NoSuchIndex(index)
            return NVReadEK(self._esapi)(index)

        return read

    def _endorsement_policy(self, stack: ExitStack) -> ESYS_TR:
        """A policy session satisfying the EK's policy (PolicySecret on the endorsement hierarchy)."""
        with _tss("starting the EK policy session"):
            session = self._esapi.start_auth_session(
                ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256
            )
        stack.callback(self._flush, session)
        with _tss("TPM2_PolicySecret on the endorsement hierarchy"):
            self._esapi.policy_secret(ESYS_TR.ENDORSEMENT, session)
        return session

    def _flush(self, handle: ESYS_TR) -> None:
        with _tss("TPM2_FlushContext"):
            self._esapi.flush_context(handle)


@contextmanager
def _tss(what: str) -> Iterator[None]:
    """Turn a TSS failure into a one-line TpmError that keeps the response code."""
    try:
        yield
    except TSS2_Exception as err:
        raise TpmError(f"{what} failed: {err}", err.rc) from None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on PATH: a daemon and a CLI must not both make an AK."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_blobs(public_blob: bytes, private_blob: bytes, what: str) -> tuple[TPM2B_PUBLIC, TPM2B_PRIVATE]:
    """WHAT's marshaled public and private blobs; InputError unless each is exactly its TPM structure."""
    with _tss(f"reading the {what} blobs"):
        public, public_end = TPM2B_PUBLIC.unmarshal(public_blob)
        private, private_end = TPM2B_PRIVATE.unmarshal(private_blob)
    if (public_end, private_end) != (len(public_blob), len(private_blob)):
        raise InputError(f"the {what}'s public or private blob has bytes after its TPM structure")
    return public, private


def _selection(pcrs: Sequence[int], bank: str) -> TPML_PCR_SELECTION:
    digest_size(bank)  # refuses an unknown bank by name
    return TPML_PCR_SELECTION.parse(f"{bank}:{','.join(map(str, pcrs))}")
