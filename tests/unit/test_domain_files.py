"""tvorch.core.launch.domain_files: the host paths a domain XML names, and which of them are tvorch's."""

from __future__ import annotations

from pathlib import Path

import pytest

from tvorch.core.launch.domain_files import (
    FileUse,
    OwnedFiles,
    OwnedPath,
    file_uses,
    owned_file_uses,
    volume_path,
)
from tvorch.errors import InputError

LIBVIRT_XML = Path(__file__).resolve().parents[1] / "data" / "libvirt"


def uses(devices: str, os_extra: str = "", top: str = "") -> tuple[FileUse, ...]:
    return file_uses(f"<domain type='qemu'><name>d</name>{top}<os><type>hvm</type>{os_extra}</os>"
                     f"<devices>{devices}</devices></domain>")


def test_libvirts_hook_xml_of_an_instance():
    found = file_uses((LIBVIRT_XML / "efi-firmware-profile" / "hook-prepare-begin.xml").read_text())
    by_path = {u.path: u for u in found}
    assert by_path["/usr/share/OVMF/OVMF_CODE_4M.snakeoil.fd"].writable is False
    assert by_path["/usr/share/OVMF/OVMF_VARS_4M.snakeoil.fd"].writable is False  # the nvram template
    nvram = by_path["/var/lib/libvirt/qemu/nvram/tvtest-canon-efi-firmware-profile_VARS.fd"]
    assert (nvram.element, nvram.writable) == ("nvram", True)
    assert by_path["/var/lib/libvirt/images/tvtest-canon-efi-firmware-profile.qcow2"].writable is True
    assert by_path["/var/lib/libvirt/images/tvtest-canon-base.qcow2"].writable is False  # backing layer
    assert by_path["/usr/bin/qemu-system-x86_64"].writable is False
    assert all(u.path.startswith("/") for u in found)
    assert "i-canon-efi" not in " ".join(u.path for u in found)  # tvorch's metadata is not configuration


def test_every_element_that_names_a_path_counts():
    found = uses(
        "<disk type='file' device='disk'><source file='/a/disk'/><readonly/></disk>"
        "<disk type='file' device='cdrom'><source file='/a/iso'/><readonly/></disk>"
        "<disk type='block'><source dev='/dev/sdz'/><target dev='vdb'/></disk>"
        "<filesystem type='mount'><source dir='/a/share'/><target dir='tag'/></filesystem>"
        "<serial type='file'><source path='/a/serial'/></serial>"
        "<channel type='unix'><source mode='bind' path='/a/chan.sock'/></channel>"
        "<tpm model='tpm-crb'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>"
        "<rng model='virtio'><backend model='random'>/a/random</backend></rng>"
        "<shmem name='s'><server path='/a/shmem.sock'/></shmem>",
        os_extra="<loader type='pflash'>/a/loader</loader><nvram><source file='/a/vars'/></nvram>"
                 "<kernel>/a/kernel</kernel><initrd>/a/initrd</initrd>",
        top="<description>/a/said/in/passing</description><title>/a/title</title>",
    )
    assert [(u.path, u.element, u.writable) for u in found] == [
        ("/a/loader", "loader", True),  # not readonly='yes': QEMU may write it
        ("/a/vars", "source", True),
        ("/a/kernel", "kernel", False),
        ("/a/initrd", "initrd", False),
        ("/a/disk", "source", False),
        ("/a/iso", "source", False),
        ("/dev/sdz", "source", True),
        ("/a/share", "source", True),
        ("/a/serial", "source", True),
        ("/a/chan.sock", "source", True),
        ("/dev/tpm0", "device", True),
        ("/a/random", "backend", False),
        ("/a/shmem.sock", "server", True),
    ]


def test_paths_are_normalised_and_relative_ones_taken_from_the_root():
    found = uses("<disk type='file'><source file='var//lib/../lib/tvorch/./x.qcow2'/></disk>"
                 "<disk type='file'><source file='//var/lib/tvorch/y.qcow2'/></disk>")
    assert found == (FileUse("/var/lib/tvorch/x.qcow2", "source", True),
                     FileUse("/var/lib/tvorch/y.qcow2", "source", True))


def test_paths_handed_to_qemu_unread_count_wherever_they_stand_in_a_value():
    """<qemu:commandline> and <qemu:override>: libvirt passes them to QEMU without reading them."""
    found = file_uses(
        "<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>d</name><devices/>"
        "<qemu:commandline><qemu:arg value='-drive'/>"
        "<qemu:arg value='file=/var/lib/x/a.qcow2,format=qcow2,if=none'/>"
        "<qemu:env name='X' value='/etc/tvorch/tvorch.toml'/></qemu:commandline>"
        "<qemu:override><qemu:device alias='x'><qemu:frontend>"
        "<qemu:property name='p' type='string' value='path=//var/../var/lib/tvorch/k'/>"
        "</qemu:frontend></qemu:device></qemu:override></domain>")
    assert found == (FileUse("/var/lib/x/a.qcow2", "qemu:arg", True),
                     FileUse("/etc/tvorch/tvorch.toml", "qemu:env", True),
                     FileUse("/var/lib/tvorch/k", "qemu:property", True))


def test_a_storage_volume_is_named_by_its_pool():
    found = uses("<disk type='volume'><source pool='p' volume='v.qcow2'/></disk>")
    assert found == (FileUse("v.qcow2", "source", True, pool="p"),)
    pool = "<pool type='dir'><name>p</name><target><path>/var/lib/x/</path></target></pool>"
    assert volume_path(pool, "v.qcow2") == "/var/lib/x/v.qcow2"
    assert volume_path(pool, "../../tvorch/v") == "/var/tvorch/v"
    assert volume_path("<pool type='rbd'><name>p</name></pool>", "v") is None
    assert volume_path("<pool", "v") is None


def test_malformed_xml_is_an_input_error():
    with pytest.raises(InputError, match="not well-formed"):
        file_uses("<domain><devices>")


OWNED = OwnedFiles(
    trees=(OwnedPath("/var/lib/libvirt/images/tvorch", "tvorch's overlay directory (overlay_dir)"),),
    files=(OwnedPath("/var/lib/libvirt/swtpm/u-1", "tvorch instance i-1 (a): its vTPM state"),
           OwnedPath("/var/lib/libvirt/qemu/nvram/a_VARS.fd", "tvorch instance i-1 (a): its NVRAM")),
    shared=(OwnedPath("/images/base.qcow2", "trusted image 'base'"),),
)


def test_a_stripped_copy_of_an_instance_is_named_for_each_thing_it_takes():
    found = uses(
        "<disk type='file'><source file='/var/lib/libvirt/images/tvorch/a.i-1.qcow2'/>"
        "<backingStore type='file'><source file='/images/base.qcow2'/></backingStore></disk>",
        os_extra="<nvram>/var/lib/libvirt/qemu/nvram/a_VARS.fd</nvram>",
    )
    assert owned_file_uses(found, OWNED) == (
        "<nvram> /var/lib/libvirt/qemu/nvram/a_VARS.fd belongs to tvorch instance i-1 (a): its NVRAM",
        "<source> /var/lib/libvirt/images/tvorch/a.i-1.qcow2 is in tvorch's overlay directory (overlay_dir)",
    )


def test_a_trusted_image_may_be_read_but_not_written():
    read_only = uses("<disk type='file'><source file='/images/base.qcow2'/><readonly/></disk>")
    assert owned_file_uses(read_only, OWNED) == ()
    writable = uses("<disk type='file'><source file='/images/base.qcow2'/></disk>")
    assert owned_file_uses(writable, OWNED) == (
        "<source> /images/base.qcow2 is trusted image 'base', opened writable (only read-only is allowed)",)


def test_inside_an_owned_directory_counts_and_a_neighbour_does_not():
    inside = uses("<filesystem type='mount'><source dir='/var/lib/libvirt/swtpm/u-1/tpm2'/></filesystem>")
    assert owned_file_uses(inside, OWNED) == (
        "<source> /var/lib/libvirt/swtpm/u-1/tpm2 belongs to tvorch instance i-1 (a): its vTPM state",)
    neighbours = uses("<disk type='file'><source file='/var/lib/libvirt/images/tvorch-other/x.qcow2'/></disk>"
                      "<disk type='file'><source file='/var/lib/libvirt/swtpm/u-10'/></disk>")
    assert owned_file_uses(neighbours, OWNED) == ()


def test_a_foreign_domain_of_libvirts_own_form_uses_nothing_of_tvorchs():
    xml = (LIBVIRT_XML / "efi" / "hook-prepare-begin.xml").read_text()
    assert owned_file_uses(file_uses(xml), OWNED) == ()
