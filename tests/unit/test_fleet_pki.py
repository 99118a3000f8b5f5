"""Fleet PKI: one root over every node CA and every image signer.

The root and its intermediate are made here with the `openssl` command line,
as a fleet's CA would be, and sign what the nodes send them. Two nodes are two
tvorch configs with their own state_dir on this machine (the CA work needs no
libvirt: their libvirt URI leads nowhere). Each node CA is issued by the
intermediate from the node's own `tvorch ca csr`, installed with `tvorch ca
install`; then a manifest or bundle from either node verifies with nothing
but the root, what the node signed and issued before still verifies, and a
node CA outside the root, a wrong intermediate or an expired one is refused
with the link named.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.unit.test_bundle import FIXTURE, ek_certificate, make_pieces, rsa_key
from tvorch.adapters import node_keys
from tvorch.cli import main
from tvorch.core.chain import ca_path, ca_request, issuer_under
from tvorch.core.vtpm.ekcert import verify_ek_certificate
from tvorch.core.launch.image_signature import verify_image_signature
from tvorch.core.launch.manifest import LaunchManifest, Measurement, sign_manifest, verify_manifest
from tvorch.core.vtpm.platformcert import Platform, issue_platform_certificate, verify_platform_certificate
from tvorch.core.signing import generate_key, issue_signing_cert, make_ca
from tvorch.errors import ExitCode, TrustError

UNREACHABLE = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
CA_EXT = "basicConstraints=critical,CA:true{pathlen}\nkeyUsage=critical,keyCertSign,cRLSign\n" \
         "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"


def openssl(*args: str | Path, cwd: Path) -> str:
    proc = subprocess.run(["openssl", *map(str, args)], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@dataclass(frozen=True)
class Fleet:
    """A root, an intermediate under it (pathlen 1: it issues node CAs), files in DIR."""

    dir: Path

    @classmethod
    def make(cls, root: Path, name: str = "Fleet") -> Fleet:
        root.mkdir()
        fleet = cls(root)
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", "root.key", "-out", "root.pem", "-subj", f"/CN={name} Root", "-days", "60",
                "-addext", "basicConstraints=critical,CA:true", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                cwd=root)
        fleet.intermediate("int", f"{name} Intermediate", days=30)
        (root / "chain.pem").write_bytes((root / "int.pem").read_bytes() + (root / "root.pem").read_bytes())
        return fleet

    def intermediate(self, stem: str, cn: str, days: int, key: str | None = None) -> Path:
        """An intermediate issued by the root (DAYS may be negative: already expired); KEY reuses a key."""
        key = key or f"{stem}.key"
        if not (self.dir / key).exists():
            openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key, cwd=self.dir)
        openssl("req", "-new", "-key", key, "-subj", f"/CN={cn}", "-out", f"{stem}.csr", cwd=self.dir)
        (self.dir / f"{stem}.ext").write_text(CA_EXT.format(pathlen=",pathlen:1"))
        openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", "root.pem", "-CAkey", "root.key", "-set_serial",
                str(abs(hash(stem)) % 10**9 + 1), "-days", str(days), "-extfile", f"{stem}.ext",
                "-out", f"{stem}.pem", cwd=self.dir)
        return self.dir / f"{stem}.pem"

    def issue(self, csr: Path, out: Path, *, issuer: str = "int", days: int = 20, extfile: str | None = None) -> Path:
        """The certificate ISSUER signs for a node's request: its extensions as requested, or EXTFILE's."""
        args = ["-extfile", extfile] if extfile else ["-copy_extensions", "copy"]
        openssl("x509", "-req", "-in", csr, "-CA", f"{issuer}.pem", "-CAkey", f"{issuer}.key", "-set_serial",
                str(abs(hash(str(out))) % 10**9 + 1), "-days", str(days), *args, "-out", out, cwd=self.dir)
        return out

    def image_signer(self, image: Path, signature: Path) -> Path:
        """A signing certificate the intermediate issued, and SIGNATURE over IMAGE by its key."""
        d = self.dir
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "signer.key", cwd=d)
        openssl("req", "-new", "-key", "signer.key", "-subj", "/CN=image signer", "-out", "signer.csr", cwd=d)
        (d / "signer.ext").write_text("basicConstraints=critical,CA:false\nkeyUsage=critical,digitalSignature\n")
        self.issue(d / "signer.csr", d / "signer.pem", extfile="signer.ext")
        openssl("dgst", "-sha256", "-sign", "signer.key", "-out", signature, image, cwd=d)
        return d / "signer.pem"

    @property
    def root(self) -> Path:
        return self.dir / "root.pem"

    @property
    def chain(self) -> Path:
        return self.dir / "chain.pem"


@dataclass(frozen=True)
class Node:
    """One node's config and state_dir; its CA is made up front under HOSTNAME so the two differ."""

    config: Path
    state: Path
    hostname: str

    @classmethod
    def make(cls, root: Path, hostname: str) -> Node:
        root.mkdir()
        state = root / "state"
        config = root / "tvorch.toml"
        config.write_text(f'state_dir = "{state}"\noverlay_dir = "{root / "overlays"}"\n'
                          f'console_log_dir = "{root / "logs"}"\nlibvirt_uri = "{UNREACHABLE}"\n')
        node_keys.load_or_create(state, hostname)
        return cls(config, state, hostname)

    def tvorch(self, capsys, *args: str | Path) -> tuple[int, str, str]:
        rc = main(["--config", str(self.config), *map(str, args)])
        out, err = capsys.readouterr()
        return rc, out, err

    def ok(self, capsys, *args: str | Path) -> str:
        rc, out, err = self.tvorch(capsys, *args)
        assert rc == 0, err
        return out

    def refused(self, capsys, code: ExitCode, words: str, *args: str | Path) -> str:
        pki = self.state / "pki"
        before = {p.name: p.read_bytes() for p in pki.iterdir() if p.is_file()}
        rc, _, err = self.tvorch(capsys, *args)
        lines = err.strip().splitlines()
        assert rc == code and len(lines) == 1 and lines[0].startswith("tvorch: error: "), err
        assert words in lines[0], lines[0]
        assert {p.name: p.read_bytes() for p in pki.iterdir() if p.is_file()} == before  # nothing changed
        return lines[0]

    def identity(self) -> node_keys.NodeIdentity:
        return node_keys.load_or_create(self.state, self.hostname)

    def join(self, capsys, fleet: Fleet, **issue: object) -> Path:
        """The node's CA certificate from the fleet: request, issue, install; the certificate's path."""
        csr = self.state.parent / "node-ca.csr"
        self.ok(capsys, "ca", "csr", "--out", csr)
        cert = fleet.issue(csr, self.state.parent / "node-ca.pem", **issue)  # type: ignore[arg-type]
        self.ok(capsys, "ca", "install", cert, "--chain", fleet.chain)
        return cert


def manifest_of(node: Node, identity: node_keys.NodeIdentity, ek: x509.Certificate | None = None) -> bytes:
    digest = "b" * 64 if ek is None else hashlib.sha256(ek.public_bytes(serialization.Encoding.DER)).hexdigest()
    return sign_manifest(LaunchManifest(
        instance_id="i-0123456789ab", uuid="0f8fad5b-d9cb-469f-a165-70867728950e", name="vm1", node=node.hostname,
        created_at="2026-01-01T00:00:00.000+00:00",
        measurements=(Measurement(kind="vtpm-ek", digest=digest, details={}),),
        config_digest="c" * 64, policy_digest="d" * 64,
    ), identity.signing_key, identity.signing_cert, identity.carried_chain())


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet.make(tmp_path / "fleet")


@pytest.fixture
def nodes(tmp_path: Path) -> tuple[Node, Node]:
    return Node.make(tmp_path / "n1", "node1"), Node.make(tmp_path / "n2", "node2")


def now() -> datetime:
    return datetime.now(timezone.utc)


# --- ca csr / ca install --------------------------------------------------------------

def test_the_request_is_for_the_node_ca_key_as_a_ca_with_pathlen_0(capsys, nodes, tmp_path: Path) -> None:
    node = nodes[0]
    node.ok(capsys, "ca", "csr", "--out", tmp_path / "n.csr")
    openssl("req", "-in", tmp_path / "n.csr", "-verify", "-noout", cwd=tmp_path)  # self-signature holds
    csr = x509.load_pem_x509_csr((tmp_path / "n.csr").read_bytes())
    ca = node.identity().ca_cert
    assert csr.public_key() == ca.public_key() and csr.subject == ca.subject
    constraints = csr.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = csr.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert node.ok(capsys, "ca", "csr").startswith("-----BEGIN CERTIFICATE REQUEST-----")


def test_two_nodes_join_one_root_and_everything_from_either_verifies_with_only_the_root(
        capsys, fleet: Fleet, nodes: tuple[Node, Node], tmp_path: Path) -> None:
    for node in nodes:
        before = node.identity()
        old_ca = tmp_path / f"{node.hostname}-selfsigned.pem"
        old_ca.write_bytes(before.ca_pem())
        # Issued while the node CA was self-signed: a manifest, an EK and a platform certificate.
        ek_key = rsa_key(base64.b64decode(FIXTURE["guest"]["ek_public"]))
        old_ek = ek_certificate(before.ca_key, before.ca_cert, ek_key)
        old_platform = issue_platform_certificate(before.ca_key, before.ca_cert, old_ek, Platform(version="1"), now())
        old_manifest = manifest_of(node, before)
        assert b'"chain"' not in old_manifest  # a node outside a fleet writes manifests as before

        node.join(capsys, fleet)
        after = node.identity()
        assert (after.ca_cert.subject, after.ca_cert.public_key()) == (before.ca_cert.subject,
                                                                      before.ca_cert.public_key())
        assert [c.subject for c in after.chain] == [load(fleet.dir / "int.pem").subject, load(fleet.root).subject]
        assert oct((node.state / "pki" / "chain.pem").stat().st_mode & 0o777) == "0o644"
        shown = node.ok(capsys, "ca", "show")
        assert "issuer:      CN=Fleet Intermediate" in shown and "chain:       'CN=Fleet Root'" in shown
        chain_file = tmp_path / f"{node.hostname}-chain.pem"
        chain_file.write_text(node.ok(capsys, "ca", "show", "--chain", "--pem"))
        assert len(x509.load_pem_x509_certificates(chain_file.read_bytes())) == 3  # node CA, intermediate, root

        # New manifests carry the chain: the root alone verifies them (CLI: exit 0).
        new_manifest = tmp_path / f"{node.hostname}-new.json"
        new_manifest.write_bytes(manifest_of(node, after))
        assert "valid: manifest of vm1" in node.ok(capsys, "manifest", "verify", new_manifest, "--ca", fleet.root)
        # Old manifests: with the old self-signed CA, the new node CA, or the root and the node's chain.
        old_file = tmp_path / f"{node.hostname}-old.json"
        old_file.write_bytes(old_manifest)
        for args in (("--ca", old_ca), ("--ca", node.state / "pki" / "ca.pem"),
                     ("--ca", fleet.root, "--chain", chain_file)):
            node.ok(capsys, "manifest", "verify", old_file, *args)
        node.refused(capsys, ExitCode.TRUST_REFUSED, "not by the CA 'CN=Fleet Root'",
                     "manifest", "verify", old_file, "--ca", fleet.root)  # it carries no chain
        # The EK and platform certificates issued before: under the new node CA, and up to the root.
        verify_ek_certificate(old_ek, after.ca_cert, now())
        verify_platform_certificate(old_platform, after.ca_cert, old_ek, now())
        new_ek = ek_certificate(after.ca_key, after.ca_cert, ek_key)
        for ek in (old_ek, new_ek):
            ek_file = tmp_path / "ek.pem"
            ek_file.write_bytes(ek.public_bytes(serialization.Encoding.PEM))
            out = openssl("verify", "-CAfile", fleet.root, "-untrusted", chain_file, ek_file, cwd=tmp_path)
            assert out.strip() == f"{ek_file}: OK"
    # The two nodes' CAs are different intermediates of the one root.
    assert nodes[0].identity().ca_cert.public_key() != nodes[1].identity().ca_cert.public_key()


def test_installing_the_same_certificate_again_is_a_no_op(capsys, fleet, nodes) -> None:
    node = nodes[0]
    cert = node.join(capsys, fleet)
    pki = {p.name: p.read_bytes() for p in (node.state / "pki").iterdir() if p.is_file()}
    node.ok(capsys, "ca", "install", cert, "--chain", fleet.chain)
    assert {p.name: p.read_bytes() for p in (node.state / "pki").iterdir() if p.is_file()} == pki


def test_install_refuses_what_is_not_this_node_cas_certificate(capsys, fleet: Fleet, nodes, tmp_path: Path) -> None:
    node, other = nodes
    csr = tmp_path / "n1.csr"
    node.ok(capsys, "ca", "csr", "--out", csr)
    other.ok(capsys, "ca", "csr", "--out", tmp_path / "n2.csr")
    theirs = fleet.issue(tmp_path / "n2.csr", tmp_path / "n2.pem")
    node.refused(capsys, ExitCode.TRUST_REFUSED, "is not for the node CA key", "ca", "install", theirs,
                 "--chain", fleet.chain)
    (fleet.dir / "pathlen1.ext").write_text(CA_EXT.format(pathlen=",pathlen:1"))
    wide = fleet.issue(csr, tmp_path / "wide.pem", extfile="pathlen1.ext")
    node.refused(capsys, ExitCode.TRUST_REFUSED, "is not a CA with pathlen 0", "ca", "install", wide,
                 "--chain", fleet.chain)
    expired = fleet.issue(csr, tmp_path / "expired.pem", days=-1)
    node.refused(capsys, ExitCode.TRUST_REFUSED, "is not valid now", "ca", "install", expired,
                 "--chain", fleet.chain)
    node.refused(capsys, ExitCode.TRUST_REFUSED, "is self-signed", "ca", "install",
                 node.state / "pki" / "ca.pem", "--chain", fleet.chain)
    good = fleet.issue(csr, tmp_path / "good.pem")
    # The chain: without the root, with a wrong intermediate (same name, another key), an expired one.
    node.refused(capsys, ExitCode.TRUST_REFUSED, "'CN=Fleet Intermediate' <- 'CN=Fleet Root': the issuer is not in "
                 "the chain", "ca", "install", good, "--chain", fleet.dir / "int.pem")
    wrong = fleet.intermediate("wrong", "Fleet Intermediate", days=30)
    (tmp_path / "wrong-chain.pem").write_bytes(wrong.read_bytes() + fleet.root.read_bytes())
    node.refused(capsys, ExitCode.TRUST_REFUSED, "'CN=tvorch node CA node1' <- 'CN=Fleet Intermediate': not signed "
                 "by the key", "ca", "install", good, "--chain", tmp_path / "wrong-chain.pem")
    stale = fleet.intermediate("stale", "Fleet Intermediate", days=-1, key="int.key")
    (tmp_path / "stale-chain.pem").write_bytes(stale.read_bytes() + fleet.root.read_bytes())
    node.refused(capsys, ExitCode.TRUST_REFUSED, "'CN=tvorch node CA node1' <- 'CN=Fleet Intermediate': the issuer "
                 "expired at", "ca", "install", good, "--chain", tmp_path / "stale-chain.pem")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    node.refused(capsys, ExitCode.INVALID_INPUT, "is not a PEM certificate", "ca", "install", tmp_path / "junk.pem",
                 "--chain", fleet.chain)
    node.refused(capsys, ExitCode.INVALID_INPUT, "is not PEM certificates", "ca", "install", good,
                 "--chain", tmp_path / "junk.pem")
    assert node.identity().chain == ()  # still the self-signed CA


def test_a_chain_left_by_an_interrupted_install_is_not_used(capsys, fleet: Fleet, nodes) -> None:
    node = nodes[0]
    selfsigned = (node.state / "pki" / "ca.pem").read_bytes()
    node.join(capsys, fleet)
    (node.state / "pki" / "ca.pem").write_bytes(selfsigned)  # chain.pem written, ca.pem not yet: the crash
    assert node.identity().chain == ()
    assert b'"chain"' not in manifest_of(node, node.identity())


# --- manifests and bundles against the root ---------------------------------------------

def test_a_manifest_whose_node_ca_is_outside_the_root_or_whose_chain_is_wrong_names_the_link(
        fleet: Fleet, nodes, tmp_path: Path, capsys) -> None:
    node, stranger = nodes
    node.join(capsys, fleet)
    identity = node.identity()
    root = load(fleet.root)
    good = manifest_of(node, identity)
    assert verify_manifest(good, root, now()).name == "vm1"
    # A node CA of another fleet, carried with that fleet's chain.
    other = Fleet.make(tmp_path / "other", "Other")
    stranger.join(capsys, other)
    with pytest.raises(TrustError, match=r"'CN=Other Root': a self-signed root that is not the root given "
                                         r"\('CN=Fleet Root'\)"):
        verify_manifest(manifest_of(stranger, stranger.identity()), root, now())
    wrong = load(fleet.intermediate("wrong", "Fleet Intermediate", days=30))
    with pytest.raises(TrustError, match="'CN=tvorch node CA node1' <- 'CN=Fleet Intermediate': not signed"):
        verify_manifest(manifest_of(node, dataclasses.replace(identity, chain=(wrong, root))), root, now())
    stale = load(fleet.intermediate("stale", "Fleet Intermediate", days=-1, key="int.key"))
    with pytest.raises(TrustError, match="'CN=tvorch node CA node1' <- 'CN=Fleet Intermediate': the issuer expired"):
        verify_manifest(manifest_of(node, dataclasses.replace(identity, chain=(stale,))), root, now())


def test_an_old_self_signed_node_ca_among_the_intermediates_does_not_hide_the_path(capsys, fleet: Fleet, nodes) -> None:
    node = nodes[0]
    before = node.identity()
    old_manifest = manifest_of(node, before)
    node.join(capsys, fleet)
    after = node.identity()
    # A verifier that keeps both certificates of the node CA (same name, same key) in its --chain.
    pool = (before.ca_cert, after.ca_cert, *after.chain)
    assert verify_manifest(old_manifest, load(fleet.root), now(), pool).name == "vm1"


def fleet_pieces(node: Node):
    """The bundle fixtures of test_bundle, made by NODE's keys under its fleet node CA."""
    identity = node.identity()
    pieces = make_pieces(FIXTURE)
    ek = ek_certificate(identity.ca_key, identity.ca_cert,
                        rsa_key(base64.b64decode(FIXTURE["guest"]["ek_public"])))
    return dataclasses.replace(pieces, ca_key=identity.ca_key, ca_cert=identity.ca_cert,
                               signing_key=identity.signing_key, signing_cert=identity.signing_cert, ek_cert=ek)


def test_a_bundle_from_either_node_verifies_with_only_the_root(capsys, fleet: Fleet, nodes) -> None:
    root = load(fleet.root)
    for node in nodes:
        node.join(capsys, fleet)
        pieces = fleet_pieces(node)
        bundle = pieces.bundle(ca_chain=node.identity().chain)
        report = pieces.verify(bundle, ca=root, at=now())
        assert report.passed, report.table()
        detail = {c.name: c.detail for c in report.checks}["node certificate"]
        assert detail.endswith(f"issued by 'CN=tvorch node CA {node.hostname}', under the root 'CN=Fleet Root'")
        assert pieces.verify(bundle, at=now()).passed  # and with the node CA itself, as before fleets


def test_a_bundle_outside_the_root_or_with_a_wrong_or_expired_intermediate_fails_naming_the_link(
        capsys, fleet: Fleet, nodes, tmp_path: Path) -> None:
    node, stranger = nodes
    root = load(fleet.root)
    node.join(capsys, fleet)
    pieces = fleet_pieces(node)

    def failing(bundle: bytes) -> dict[str, str]:
        report = pieces.verify(bundle, ca=root, at=now())
        return {c.name: c.detail for c in report.failures()}

    alone = fleet_pieces(stranger)  # a node that never joined: self-signed CA
    assert "was issued by 'CN=tvorch node CA node2', not by the CA 'CN=Fleet Root'" in \
        failing(alone.bundle())["node certificate"]
    other = Fleet.make(tmp_path / "other", "Other")
    stranger.join(capsys, other)
    outside = fleet_pieces(stranger)
    assert "'CN=Other Root': a self-signed root that is not the root given ('CN=Fleet Root')" in \
        failing(outside.bundle(ca_chain=stranger.identity().chain))["node certificate"]
    wrong = load(fleet.intermediate("wrong", "Fleet Intermediate", days=30))
    failed = failing(pieces.bundle(ca_chain=(wrong, root)))
    assert "'CN=tvorch node CA node1' <- 'CN=Fleet Intermediate': not signed by the key" in failed["node certificate"]
    assert {"node certificate", "launch manifest", "vTPM EK certificate"} <= set(failed)  # nothing it anchors holds
    stale = load(fleet.intermediate("stale", "Fleet Intermediate", days=-1, key="int.key"))
    failed = failing(pieces.bundle(ca_chain=(stale, root)))
    assert "'CN=tvorch node CA node1' <- 'CN=Fleet Intermediate': the issuer expired at" in failed["node certificate"]
    # A verifier's own intermediates (--chain) do not rescue a carried chain that leads elsewhere... but
    # they complete one that is missing: a bundle carrying only the node CA verifies with the intermediate given.
    short = pieces.bundle(ca_chain=())
    assert "node certificate" in failing(short)
    report = pieces.verify(short, ca=root, at=now(), untrusted=(node.identity().ca_cert, load(fleet.dir / "int.pem")))
    assert report.passed, report.table()


# --- image signers under an intermediate -------------------------------------------------

def test_an_image_signer_issued_by_an_intermediate_under_the_image_signing_ca(fleet: Fleet, tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    image.write_bytes(b"image bytes" * 1000)
    signer = load(fleet.image_signer(image, tmp_path / "image.sig"))
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    signature = (tmp_path / "image.sig").read_bytes()
    root, intermediate = load(fleet.root), load(fleet.dir / "int.pem")
    assert verify_image_signature(digest, signature, signer, root, now(), (intermediate,)) == "CN=image signer"
    with pytest.raises(TrustError, match="issued by 'CN=Fleet Intermediate', not by the CA 'CN=Fleet Root'"):
        verify_image_signature(digest, signature, signer, root, now())  # the intermediate not given
    stale = load(fleet.intermediate("stale", "Fleet Intermediate", days=-1, key="int.key"))
    with pytest.raises(TrustError, match="'CN=image signer' <- 'CN=Fleet Intermediate': the issuer expired"):
        verify_image_signature(digest, signature, signer, root, now(), (stale,))


def test_image_trust_takes_the_intermediates_with_chain(capsys, fleet: Fleet, tmp_path: Path) -> None:
    d = fleet.dir
    node = Node.make(tmp_path / "n", "node1")
    node.config.write_text(node.config.read_text() + f'[policy]\nimage_signing_ca = "{fleet.root}"\n')
    raw = tmp_path / "disk.raw"
    data = bytearray(1 << 20)
    data[510:512] = b"\x55\xaa"
    raw.write_bytes(bytes(data))
    signer = fleet.image_signer(raw, tmp_path / "disk.sig")
    sign = ("image", "trust", raw, "--signature", tmp_path / "disk.sig", "--cert", signer)
    node.refused(capsys, ExitCode.TRUST_REFUSED, "not by the CA 'CN=Fleet Root'", *sign)
    node.refused(capsys, ExitCode.INVALID_INPUT, "--chain goes with --signature", "image", "trust", raw,
                 "--chain", d / "int.pem")
    out = node.ok(capsys, *sign, "--chain", d / "int.pem", "--json")
    assert '"signer": "CN=image signer"' in out


# --- the path rules on their own ---------------------------------------------------------

def test_pathlen_of_an_issuer_bounds_the_cas_below_it(fleet: Fleet, tmp_path: Path) -> None:
    d = fleet.dir
    (d / "int0.ext").write_text(CA_EXT.format(pathlen=",pathlen:0"))
    openssl("req", "-new", "-key", "int.key", "-subj", "/CN=Narrow Intermediate", "-out", "n.csr", cwd=d)
    openssl("x509", "-req", "-in", "n.csr", "-CA", "root.pem", "-CAkey", "root.key", "-set_serial", "77",
            "-days", "5", "-extfile", "int0.ext", "-out", "narrow.pem", cwd=d)
    narrow = load(d / "narrow.pem")
    ca_key, ca_cert = make_ca("tvorch node CA x", now())
    csr = tmp_path / "x.csr"
    csr.write_bytes(ca_request(ca_key, ca_cert.subject).public_bytes(serialization.Encoding.PEM))
    openssl("x509", "-req", "-in", csr, "-CA", "narrow.pem", "-CAkey", "int.key", "-set_serial", "78", "-days", "5",
            "-copy_extensions", "copy", "-out", tmp_path / "x.pem", cwd=d)
    node_ca = load(tmp_path / "x.pem")
    assert ca_path(node_ca, (narrow, load(fleet.root)), now())[0] == narrow  # a CA right below it: allowed
    leaf = issue_signing_cert(ca_key, node_ca, generate_key().public_key(), "tvorch node x", now())
    with pytest.raises(TrustError, match="'CN=tvorch node CA x' <- 'CN=Narrow Intermediate': the issuer's pathlen 0"):
        ca_path(leaf, (node_ca, narrow, load(fleet.root)), now())
    with pytest.raises(TrustError, match="'CN=tvorch node CA x' <- 'CN=Narrow Intermediate': the issuer's pathlen 0"):
        issuer_under(leaf, load(fleet.root), (node_ca, narrow), now())
