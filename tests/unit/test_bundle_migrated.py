"""The evidence bundle of a VM that migrated: made by node B for a VM node A launched (issue #18).

The manifest and the EK certificate are A's; the bundle, its AK certifications and its host evidence are
B's; the signed handoffs the bundle carries are what links the two under the fleet root.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import pytest

from tests.fleet_certs import FleetNode, ca
from tests.unit.test_bundle import INSTANCE, MAX_HOST_AGE, NOW, FIXTURE, ek_certificate, make_pieces, rsa_key
from tvorch.core.attestation.akcert import (
    AkCertification,
    HostAkCertification,
    ek_cert_sha256,
    sign_ak_certification,
    sign_host_ak_certification,
)
from tvorch.core.attestation.bundle import build_bundle, verify_bundle
from tvorch.core.attestation.quote import ak_name
from tvorch.core.launch.manifest import LaunchManifest, Measurement, sign_manifest
from tvorch.core.migration.handoff import Handoff, HandoffEvent, next_entry
from tvorch.core.vtpm.ekcert import ek_fingerprint
from tvorch.core.vtpm.ledger import chain_entry


@pytest.fixture(scope="module")
def migrated():
    pieces = make_pieces(FIXTURE)
    root = ca("fleet root", None, 1, NOW)
    a, b, c = FleetNode("a", root, NOW), FleetNode("b", root, NOW), FleetNode("c", root, NOW)
    ek_cert = ek_certificate(a.ca_key, a.ca, rsa_key(base64.b64decode(FIXTURE["guest"]["ek_public"])))
    manifest = sign_manifest(LaunchManifest(
        instance_id=INSTANCE[0], name=INSTANCE[1], uuid=INSTANCE[2], node="node-a",
        created_at="2025-03-01T11:58:00.000+00:00",
        measurements=(Measurement(kind="vtpm-ek", digest=ek_cert_sha256(ek_cert),
                                  details={"ek_fingerprint": ek_fingerprint(ek_cert.public_key()), "encrypted": True,
                                           "swtpm_version": "0.7.1"}),),
        config_digest="c" * 64, policy_digest="d" * 64), a.key, a.cert, (a.ca, root[1]))
    last = chain_entry(INSTANCE[0], 0, "2025-03-01T11:58:00Z", "manufactured", "e" * 64, None)
    out = Handoff(HandoffEvent.OUT, next_entry(last, HandoffEvent.OUT, "2025-03-01T11:59:00Z"), INSTANCE[2],
                  INSTANCE[1], "f" * 64, a.name, b.name, "qemu+ssh://node-b/system", "5" * 64)
    inn = Handoff(HandoffEvent.IN, next_entry(out.entry, HandoffEvent.IN, "2025-03-01T11:59:05Z"), INSTANCE[2],
                  INSTANCE[1], "f" * 64, b.name, a.name, "node-a", "5" * 64)
    guest_ak = sign_ak_certification(AkCertification(
        instance_id=INSTANCE[0], uuid=INSTANCE[2], ek_fingerprint=ek_fingerprint(ek_cert.public_key()),
        ek_cert_sha256=ek_cert_sha256(ek_cert), ak_public=pieces.guest.ak_public,
        ak_name=ak_name(pieces.guest.ak_public), certified_at="2025-03-01T11:59:30.000+00:00"), b.key)
    host_ak = sign_host_ak_certification(HostAkCertification(
        hostname="node-b", ek_public=pieces.host_ek_public, ak_public=pieces.host_quote.ak_public,
        ak_name=ak_name(pieces.host_quote.ak_public), certified_at="2025-03-01T11:00:00.000+00:00"), b.key)

    def bundle(migrations: list[dict[str, Any]] | None = None, maker: FleetNode = b) -> bytes:
        return build_bundle(
            nonce=pieces.nonce, instance_id=INSTANCE[0], name=INSTANCE[1], uuid=INSTANCE[2], hostname="node-b",
            signing_key=maker.key, signing_cert=maker.cert, ca_cert=maker.ca, ca_chain=(root[1],),
            manifest=manifest, ek_cert=ek_cert, ak_certification=guest_ak, guest=pieces.guest,
            baseline_eventlog=pieces.baseline, host_verdict=pieces.host_verdict, host_quote=pieces.host_quote,
            created_at=NOW, host_ak_certification=host_ak, live_config_digest="c" * 64,
            migrations=[a.handoff(out), b.handoff(inn)] if migrations is None else migrations)

    def verify(data: bytes) -> dict[str, str]:
        report = verify_bundle(data, root[1], pieces.nonce, NOW, max_host_age=MAX_HOST_AGE)
        return {c.name: ("ok: " if c.passed else "FAIL: ") + c.detail for c in report.checks}

    return dataclasses.make_dataclass("Migrated", ["a", "b", "c", "out", "inn", "bundle", "verify"])(
        a, b, c, out, inn, bundle, verify)


def test_a_bundle_made_on_the_node_a_vm_migrated_to_verifies_under_the_root(migrated) -> None:
    checks = migrated.verify(migrated.bundle())
    assert all(d.startswith("ok") for d in checks.values()), checks
    assert "migrated 1 time(s) to this node" in checks["launch manifest"]


def test_without_its_handoffs_the_other_nodes_manifest_and_ek_do_not_verify(migrated) -> None:
    checks = migrated.verify(migrated.bundle([]))
    assert checks["launch manifest"].startswith("FAIL") and checks["vTPM EK certificate"].startswith("FAIL")


def test_handoffs_that_do_not_lead_to_the_bundles_node_fail(migrated) -> None:
    a, b, c, out, inn = migrated.a, migrated.b, migrated.c, migrated.out, migrated.inn
    # Handed to C, and C's migrated-in, but the bundle is B's.
    to_c = dataclasses.replace(out, peer=c.name)
    checks = migrated.verify(migrated.bundle([a.handoff(to_c), c.handoff(dataclasses.replace(inn, node=c.name))]))
    assert "do not lead to the node that made it" in checks["launch manifest"], checks
    # B claims a migration A never signed: B signs the migrated-out in A's name.
    checks = migrated.verify(migrated.bundle([b.handoff(out), b.handoff(inn)]))
    assert "signed under node CA" in checks["launch manifest"], checks
    # Half a migration.
    checks = migrated.verify(migrated.bundle([a.handoff(out)]))
    assert "pairs" in checks["launch manifest"], checks
    # A migrated-in of another migration (another session).
    checks = migrated.verify(migrated.bundle([a.handoff(out), b.handoff(dataclasses.replace(inn, session="6" * 64))]))
    assert "does not continue" in checks["launch manifest"], checks


def test_an_altered_handoff_fails_its_signature(migrated) -> None:
    a, b, out, inn = migrated.a, migrated.b, migrated.out, migrated.inn
    doc = a.handoff(out)
    doc = json.loads(json.dumps(doc))
    doc["handoff"]["peer_uri"] = "qemu+ssh://elsewhere/system"
    checks = migrated.verify(migrated.bundle([doc, b.handoff(inn)]))
    assert "does not verify" in checks["launch manifest"], checks
