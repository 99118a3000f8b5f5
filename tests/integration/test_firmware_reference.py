"""Firmware-side predicted PCRs (0-3, 6, 7) against first boots, with real libvirtd, OVMF, swtpm and the test guest.

A firmware reference is made once per firmware and platform through the CLI
(`tvorch firmware reference create`, which boots a reference VM with an empty
disk); the prediction is then taken with ``create=False`` (no VM may boot for
it) and compared with the first boot of the test guest: the unsigned UKI
under OVMF with Secure Boot off, and the snakeoil-signed UKI under the
snakeoil profile with Secure Boot on.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import pytest

from tvorch.config import load_config
from tvorch.core.attestation.eventlog import parse_event_log
from tvorch.core.boot.firmware_reference import differences
from tvorch.core.boot.prediction import PredictedEvent, replay
from tvorch.core.boot.secureboot import CERT_X509_GUID, pcr7_events
from tvorch.core.launch.spec import FirmwareImages, TpmModel
from tvorch.core.boot.uefi_vars import IMAGE_SECURITY_DATABASE_GUID, Variable, VariableStore, parse_vars_file
from tvorch.service.firmware_reference import FirmwareChoice, firmware_events, list_references
from tvorch.service.node import Node

from .conftest import PREFIX, SNAKEOIL_CODE, SNAKEOIL_VARS, Tv
from .guest import GuestReport, wait_for_ready

pytestmark = pytest.mark.integration

COVERED = (0, 1, 2, 3, 6, 7)
PLAIN = FirmwareChoice(secure_boot=False, memory_mib=512, vcpus=1, tpm_model=TpmModel.CRB)
SNAKEOIL = FirmwareChoice(secure_boot=True, memory_mib=512, vcpus=1, tpm_model=TpmModel.CRB,
                          firmware_images=FirmwareImages(SNAKEOIL_CODE, SNAKEOIL_VARS, True))


def boot_file(image: Path, tmp: Path) -> bytes:
    """EFI/BOOT/BOOTX64.EFI from the test guest's GPT disk (first partition, the ESP)."""
    raw = tmp / f"{image.stem}.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    table = json.loads(subprocess.run(["sfdisk", "-J", str(raw)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    offset = table["partitions"][0]["start"] * table.get("sectorsize", 512)
    out = tmp / f"{image.stem}.efi"
    subprocess.run(["mcopy", "-n", "-i", f"{raw}@@{offset}", "::/EFI/BOOT/BOOTX64.EFI", str(out)], check=True)
    raw.unlink()
    return out.read_bytes()


def logged(report: GuestReport) -> list[PredictedEvent]:
    return [PredictedEvent(e.pcr, e.type_name, e.digests["sha256"], e.type_name)
            for e in parse_event_log(report.eventlog).events[1:] if e.pcr in COVERED]


@pytest.fixture(scope="module")
def node(tv: Tv):
    n = Node(load_config(str(tv.config)))
    yield n
    n.close()


@pytest.fixture(scope="module")
def references(tv: Tv) -> dict[str, dict]:
    """Both references, made once through the CLI; a second create must find them without a boot."""
    made = {"plain": tv.json("firmware", "reference", "create", "--memory", "512", "--vcpus", "1",
                             "--no-secure-boot"),
            "snakeoil": tv.json("firmware", "reference", "create", "--memory", "512", "--vcpus", "1",
                                "--firmware-profile", "snakeoil")}
    return made


@pytest.fixture(scope="module")
def boots(tv: Tv, guest_dir: Path, references) -> dict[str, GuestReport]:
    """The first boots of both images, launched after the references were made (so after the prediction's
    inputs were fixed), one right after the other, then left to boot side by side."""
    names = {"plain": f"{PREFIX}fwref-plain-{secrets.token_hex(2)}",
             "snakeoil": f"{PREFIX}fwref-sb-{secrets.token_hex(2)}"}
    try:
        logs = {"plain": tv.launch(guest_dir / "guest.qcow2", names["plain"])["console_log"],
                "snakeoil": tv.launch(guest_dir / "guest-signed.qcow2", names["snakeoil"],
                                      "--firmware-profile", "snakeoil")["console_log"]}
        yield {kind: wait_for_ready(Path(log)) for kind, log in logs.items()}
    finally:
        for name in names.values():
            tv.destroy(name)


def test_a_second_create_reuses_the_stored_reference_without_booting(tv: Tv, references):
    again = tv.json("firmware", "reference", "create", "--memory", "512", "--vcpus", "1", "--no-secure-boot")
    assert again == references["plain"]  # the same signed document, made when it was first created
    listed = tv.json("firmware", "reference", "list")
    assert {r["key_digest"] for r in listed} >= {r["key_digest"] for r in references.values()}
    shown = tv.json("firmware", "reference", "show", references["snakeoil"]["key_digest"][:12])
    assert shown == references["snakeoil"]


def test_plain_ovmf_prediction_equals_the_first_boot(node: Node, boots, guest_dir: Path, tmp_path):
    uki = boot_file(guest_dir / "guest.qcow2", tmp_path)
    predicted = firmware_events(node, PLAIN, [("BOOTX64.EFI", uki, None)], create=False)
    report = boots["plain"]
    assert differences(predicted, logged(report), COVERED) == []
    values = replay(predicted)
    assert {p: values[p] for p in COVERED} == {p: report.pcrs[p] for p in COVERED}


def test_snakeoil_secure_boot_prediction_equals_the_first_boot(node: Node, boots, guest_dir: Path, tmp_path):
    signed_boot = boots["snakeoil"]
    uki = boot_file(guest_dir / "guest-signed.qcow2", tmp_path)
    predicted = firmware_events(node, SNAKEOIL, [("BOOTX64.EFI", uki, None)], create=False)
    assert signed_boot.secure_boot == "enabled"
    assert differences(predicted, logged(signed_boot), COVERED) == []
    values = replay(predicted)
    assert {p: values[p] for p in COVERED} == {p: signed_boot.pcrs[p] for p in COVERED}
    assert predicted[-1].type_name == "EV_EFI_VARIABLE_AUTHORITY"


def test_secure_boot_off_when_the_profile_says_on_is_named_on_pcr7(node: Node, boots, guest_dir: Path, tmp_path):
    """The profile's prediction (Secure Boot on) against a boot that ran with Secure Boot off."""
    uki = boot_file(guest_dir / "guest-signed.qcow2", tmp_path)
    predicted = firmware_events(node, SNAKEOIL, [("BOOTX64.EFI", uki, None)], create=False)
    diff = differences([e for e in predicted if e.pcr == 7], logged(boots["plain"]), [7])
    assert diff and diff[0].startswith("PCR7: EV_EFI_VARIABLE_DRIVER_CONFIG (SecureBoot (1 bytes)): predicted")


def test_a_different_db_key_changes_the_predicted_pcr7_and_is_named(boots):
    """The snakeoil template with another certificate in db: the db event differs from the first boot's."""
    from cryptography.hazmat.primitives import serialization

    from tests.unit.test_secureboot import _self_signed

    store = parse_vars_file(Path(SNAKEOIL_VARS).read_bytes())
    _, other = _self_signed("another db key")
    entry = bytes(16) + other.public_bytes(serialization.Encoding.DER)
    db = CERT_X509_GUID.bytes_le + (28 + len(entry)).to_bytes(4, "little") + bytes(4) \
        + len(entry).to_bytes(4, "little") + entry
    variables = dict(store.variables)
    variables[(IMAGE_SECURITY_DATABASE_GUID, "db")] = Variable(IMAGE_SECURITY_DATABASE_GUID, "db", 0x27, db)
    predicted = pcr7_events(VariableStore(True, variables))
    diff = differences(predicted, logged(boots["snakeoil"]), [7])
    assert diff[0].startswith("PCR7: EV_EFI_VARIABLE_DRIVER_CONFIG (db (")
    assert replay(predicted)[7] != boots["snakeoil"].pcrs[7]


def test_references_are_kept_signed_and_reused_across_images(node: Node, tv: Tv, guest_dir: Path, references,
                                                             tmp_path):
    """Both images' predictions come from the same stored reference; nothing boots (create=False)."""
    count = len(list_references(node.cfg))
    one = firmware_events(node, SNAKEOIL, [("BOOTX64.EFI", boot_file(guest_dir / "guest-signed.qcow2", tmp_path),
                                            None)], create=False)
    two = firmware_events(node, PLAIN, [], create=False)
    assert [e for e in one if e.pcr != 7] and [e for e in two if e.pcr != 7]
    assert len(list_references(node.cfg)) == count
    path = Path(node.cfg.state_dir) / "firmware-references" / f"{references['plain']['key_digest']}.json"
    assert path.stat().st_mode & 0o777 == 0o600
