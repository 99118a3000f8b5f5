#!/usr/bin/env bash
# Make this Debian 12 host ready for tvorch: packages present, libvirtd running.
# Idempotent and quick when there is nothing to do.
set -euo pipefail

PACKAGES=(
    # run VMs with a vTPM and measuring firmware
    libvirt-daemon-system libvirt-clients libvirt-dev pkg-config
    qemu-system-x86 qemu-utils swtpm swtpm-tools ovmf tpm2-tools libtss2-dev
    libxml2-utils python3-venv python3-dev
    # build the test guest
    linux-image-cloud-amd64 busybox-static cpio systemd-boot-efi sbsigntool
    mtools dosfstools fdisk
)

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup-host: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

libvirt_up() { virsh -c qemu:///system version >/dev/null 2>&1; }

if ! libvirt_up; then
    if [ -d /run/systemd/system ]; then
        systemctl start virtlogd.socket libvirtd.service
    else
        # No systemd here (containers, CI): start the daemons by hand.
        pgrep -x virtlogd >/dev/null || virtlogd -d
        pgrep -x libvirtd >/dev/null || libvirtd -d
    fi
    for _ in $(seq 50); do libvirt_up && break; sleep 0.2; done
    libvirt_up || { echo "setup-host: libvirtd did not come up" >&2; exit 1; }
fi
echo "setup-host: packages present, libvirtd answering"
