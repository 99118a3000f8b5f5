"""The hook gate's pure judgement (tvorch.core.launch.gate): which hook calls matter, and why a start is refused.

The judgement must collect every reason, never stop at the first, and never
invent one: a clean start that gets a reason is an outage, a mismatch that
gets none is a hole.
"""

from __future__ import annotations

import dataclasses

import pytest

from tvorch.core.launch.gate import (
    FileEvidence,
    Phase,
    StartEvidence,
    managed_save_path,
    nvram_path,
    phase_of,
    start_path_refusal,
    start_refusals,
)

A, B, C, D = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)

# Every (operation, sub-operation) libvirt's qemu hook is called with (libvirt 9,
# docs/hooks.html), and what it means to tvorch.
PHASES = [
    ("prepare", "begin", Phase.START),
    ("start", "begin", Phase.START),
    ("restore", "begin", Phase.START),
    ("migrate", "begin", Phase.START),
    ("started", "begin", Phase.STARTED),
    ("reconnect", "begin", Phase.RECONNECT),
    ("stopped", "end", Phase.STOPPED),
    ("release", "end", Phase.RELEASED),
    ("attach", "begin", Phase.IGNORED),
    # Sub-operations that are not the one tvorch acts on: "-" is what libvirt sends
    # where there is none, "end" of a start operation is after the decision.
    ("prepare", "end", Phase.IGNORED),
    ("start", "end", Phase.IGNORED),
    ("started", "end", Phase.IGNORED),
    ("stopped", "begin", Phase.IGNORED),
    ("release", "begin", Phase.IGNORED),
    ("reconnect", "-", Phase.IGNORED),
    ("restore", "-", Phase.IGNORED),
    ("migrate", "-", Phase.IGNORED),
    ("unknown", "begin", Phase.IGNORED),
    ("", "", Phase.IGNORED),
]


@pytest.mark.parametrize(("operation", "sub_operation", "phase"), PHASES)
def test_phase_of_every_hook_operation(operation: str, sub_operation: str, phase: Phase) -> None:
    assert phase_of(operation, sub_operation) is phase


def test_only_begin_of_a_start_operation_can_refuse() -> None:
    """libvirt honours a non-zero exit only on these: anything else as START would refuse nothing or break stops."""
    starts = {(op, sub) for op, sub, phase in PHASES if phase is Phase.START}
    assert starts == {("prepare", "begin"), ("start", "begin"), ("restore", "begin"), ("migrate", "begin")}


def clean() -> StartEvidence:
    """Evidence of an untouched instance: everything on disk is what was vouched for."""
    return StartEvidence(
        manifest_in_xml=A,
        manifest_stored=A,
        config_now=B,
        config_manifest=B,
        files=(FileEvidence("/img/base.raw", C, C), FileEvidence("/img/mid.qcow2", D, D)),
        overlay_problem=None,
        vtpm_now=A,
        vtpm_recorded=A,
        host_problem=None,
    )


def test_clean_evidence_gives_no_reason() -> None:
    assert start_refusals(clean()) == ()


# Each mismatch alone, and a word the single reason must contain so an operator
# can tell which check failed.
MISMATCHES: dict[str, tuple[dict[str, object], tuple[str, ...]]] = {
    "manifest digest": ({"manifest_in_xml": D}, ("manifest", "sha256:dddddddddddd", "sha256:aaaaaaaaaaaa")),
    "manifest missing from metadata": ({"manifest_in_xml": None}, ("manifest", "none")),
    "config digest": ({"config_now": C}, ("configuration changed", "sha256:cccccccccccc", "sha256:bbbbbbbbbbbb")),
    "layer changed": (
        {"files": (FileEvidence("/img/base.raw", C, D), FileEvidence("/img/mid.qcow2", D, D))},
        ("/img/base.raw", "changed", "sha256:dddddddddddd"),
    ),
    "layer unreadable": (
        {"files": (FileEvidence("/img/base.raw", C, C), FileEvidence("/img/mid.qcow2", D, None, "no such file"))},
        ("/img/mid.qcow2", "no such file"),
    ),
    "overlay problem": ({"overlay_problem": "overlay /ov.qcow2 was replaced since launch"}, ("/ov.qcow2 was replaced",)),
    "vTPM differs": ({"vtpm_now": B}, ("vTPM state differs", "sha256:bbbbbbbbbbbb", "rollback")),
    "vTPM state missing": ({"vtpm_now": None}, ("vTPM state differs", "no state")),
    "host problem": ({"host_problem": "host verdict failed: PCR 0"}, ("host verdict failed: PCR 0",)),
}


@pytest.mark.parametrize("which", sorted(MISMATCHES))
def test_each_mismatch_alone_gives_exactly_one_reason_naming_it(which: str) -> None:
    changes, words = MISMATCHES[which]
    reasons = start_refusals(dataclasses.replace(clean(), **changes))  # type: ignore[arg-type]
    assert len(reasons) == 1, reasons
    for word in words:
        assert word in reasons[0], (word, reasons[0])
    assert "\n" not in reasons[0]


def test_no_vtpm_record_means_no_vtpm_reason() -> None:
    """Before the first recorded stop there is nothing to roll back to: state present or not is fine."""
    for now in (A, B, None):
        assert start_refusals(dataclasses.replace(clean(), vtpm_recorded=None, vtpm_now=now)) == ()


def test_every_mismatch_is_reported_in_check_order() -> None:
    evidence = dataclasses.replace(
        clean(),
        manifest_in_xml=D,
        config_now=C,
        files=(FileEvidence("/img/base.raw", C, A), FileEvidence("/img/mid.qcow2", D, None, "permission denied")),
        overlay_problem="overlay /ov.qcow2 was replaced since launch",
        vtpm_now=None,
        host_problem="no host attestation verdict",
    )
    reasons = start_refusals(evidence)
    assert len(reasons) == 7, reasons
    expected = ["manifest", "configuration changed", "/img/base.raw", "/img/mid.qcow2: permission denied",
                "overlay /ov.qcow2", "vTPM state differs", "no host attestation verdict"]
    for reason, word in zip(reasons, expected):
        assert word in reason, (word, reason)


# -- issue #13: every measured file, and the NVRAM -------------------------------------


def test_a_changed_file_of_any_measured_kind_is_refused_naming_kind_and_path() -> None:
    for kind, words in (("kernel", "kernel /boot/k"), ("initrd", "initrd /boot/k"),
                        ("firmware-code", "firmware code /boot/k"), ("firmware-vars", "firmware vars template /boot/k"),
                        ("emulator", "emulator /boot/k"), ("swtpm", "swtpm /boot/k")):
        evidence = dataclasses.replace(clean(), files=(*clean().files, FileEvidence("/boot/k", A, B, kind=kind)))
        reasons = start_refusals(evidence)
        assert len(reasons) == 1 and reasons[0].startswith(words + " changed"), reasons
        unreadable = dataclasses.replace(clean(), files=(FileEvidence("/boot/k", A, None, "gone", kind=kind),))
        assert start_refusals(unreadable) == (f"{words}: gone",)


def test_nvram_other_than_the_last_ledgered_is_refused() -> None:
    path = "/var/lib/libvirt/qemu/nvram/vm_VARS.fd"
    same = dataclasses.replace(clean(), nvram_path=path, nvram_now=C, nvram_recorded=C)
    assert start_refusals(same) == ()
    for now, found in ((D, "sha256:dddddddddddd"), (None, "unreadable")):
        reasons = start_refusals(dataclasses.replace(same, nvram_now=now))
        assert len(reasons) == 1 and reasons[0].startswith(f"NVRAM {path} differs from the last recorded stop"), reasons
        assert found in reasons[0] and "sha256:cccccccccccc" in reasons[0]
    # Without an NVRAM ledger (SeaBIOS, or launched before tvorch kept one) there is nothing to compare.
    assert start_refusals(dataclasses.replace(same, nvram_now=D, nvram_recorded=None)) == ()


def test_nvram_path_is_libvirts_or_its_default() -> None:
    assert nvram_path("<os><nvram template='/t.fd'>/x/vm_VARS.fd</nvram></os>", "vm") == "/x/vm_VARS.fd"
    assert nvram_path("<os><nvram template='/t.fd'/></os>", "vm") == "/var/lib/libvirt/qemu/nvram/vm_VARS.fd"
    assert nvram_path("<os firmware='efi'/>", "vm") == "/var/lib/libvirt/qemu/nvram/vm_VARS.fd"


# -- start paths (a sealed vTPM's key lent by tvorch; resuming only the save image tvorch made) ----------


def test_sealed_key_not_lent_names_tvorch_start():
    reason = start_path_refusal("vm1", sealed=True, key_lent=False, restoring=False, saved_digest=None,
                                image_digest=None)
    assert reason is not None and "`tvorch start vm1`" in reason
    assert start_path_refusal("vm1", True, True, False, None, None) is None  # tvorch start: key lent
    assert start_path_refusal("vm1", False, False, False, None, None) is None  # state in clear: libvirt can


def test_restore_only_of_the_save_image_tvorch_recorded():
    assert start_path_refusal("vm1", True, True, True, "aa" * 32, "aa" * 32) is None
    unrecorded = start_path_refusal("vm1", True, True, True, None, "aa" * 32)
    assert unrecorded is not None and "older than its last stop" in unrecorded
    other = start_path_refusal("vm1", True, True, True, "aa" * 32, "bb" * 32)
    assert other is not None and "not the one `tvorch save` made" in other and "bb" * 32 in other
    unreadable = start_path_refusal("vm1", False, False, True, "aa" * 32, None)
    assert unreadable is not None and "unreadable" in unreadable
    assert managed_save_path("vm1") == "/var/lib/libvirt/qemu/save/vm1.save"
